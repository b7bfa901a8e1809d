"""espmed.export: checkpoint -> ONNX, ONNX FP16/INT8, OpenVINO IR, TensorRT engines."""

"""espmed.export: checkpoint -> ONNX, ONNX FP16/INT8, OpenVINO IR, TensorRT engines.

`export(checkpoint_or_model, target, out, ...)` is the one entry point; `TARGETS` is the one
table of targets (name, artifact suffix, accepted options, GPU needed, backend, precision).
"""

from .targets import TARGETS, ExportResult, Target, export

__all__ = ["TARGETS", "ExportResult", "Target", "export"]

"""espmed.export: checkpoint -> ONNX, ONNX FP16/INT8, OpenVINO IR, TensorRT engines.

`export(checkpoint_or_model, target, out, ...)` is the one entry point. `TARGETS` are the
exportable rows of the one table of formats, `espmed.runtimes.formats` (name, artifact suffix,
backend, precision, accepted options, GPU needed, label).
"""

from .targets import TARGETS, ExportResult, Target, export

__all__ = ["TARGETS", "ExportResult", "Target", "export"]

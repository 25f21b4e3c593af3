"""torch -> ONNX: wrappers for the served graphs, metadata, parity checks, atomic writes.

``export_checkpoint(ckpt_path, output)`` is the one call a caller needs; ``export.py`` wraps it.
"""
from rectrain.export.onnx_export import ExportError, ExportReport, export_checkpoint, export_model, output_paths

__all__ = ["ExportError", "ExportReport", "export_checkpoint", "export_model", "output_paths"]

"""Real low-precision execution: export a model under a recipe, run the file, measure it.

The simulation predicts what quantization does; this package writes the file that computes it and
puts both side by side, every number labelled with where it comes from:

- ``report``: ``export(workload, recipe, "onnx" | "safetensors" | "openvino", out) -> ExportReport`` (size on disk,
  metrics measured in ONNX Runtime next to the simulated ones, how each layer executes, every gap explained);
- ``onnx``: ``export_qdq``, the ONNX file holding exactly the simulated model (codes, scales,
  zero-points, calibrated input ranges), and ``graph`` the small ONNX graph-editing helpers it uses;
- ``safetensors``: codes, scales and zero-points in a safetensors file, and back;
- ``policy``: which kernel each layer gets in ONNX Runtime and why numbers differ from the simulation;
- ``sessions``: ONNX Runtime sessions and feeds; ``openvino``: the same file compiled by OpenVINO, its execution
  precision reported; ``bench``: ``bench(...) -> BenchResult``, FP32 and quantized files timed in interleaved rounds
  in either runtime; ``profile``: where a runtime spends its time, per op type and precision, from its own profiler.
"""

from qcore.export.onnx import OnnxExport, export_qdq
from qcore.export.report import ExportReport, export, summary_lines

__all__ = ["ExportReport", "OnnxExport", "export", "export_qdq", "summary_lines"]

"""Exports whose file is the simulation: the quantized model written with the engine's own numbers.

``qdq.export_qdq(workload, recipe, path)`` writes an ONNX file holding exactly what
``workload.simulate(recipe)`` computes (integer codes, scales, zero-points, calibrated input ranges)
and says per layer what ONNX Runtime executes in low precision and what it runs in float, and why.
``graph`` holds the small ONNX graph-editing helpers it uses.
"""

from qcore.export.qdq import OnnxExport, export_qdq

__all__ = ["OnnxExport", "export_qdq"]

"""ONNX export whose file *is* the simulation: ``export_qdq(workload, recipe, path) -> OnnxExport``.

- ``float_graph``: the FP32 graph, built once per workload (an upload's own graph, or torch.onnx.export);
- ``weights``: each quantized weight as codes + decode ops (DequantizeLinear, MatMulNBits, float casts, NF4);
- ``embedding``: an integer embedding table looked up on its codes (GatherBlockQuantized, or Gather + decode of the rows);
- ``activations``: each quantized layer input as the simulation's input quantizer in ops;
- ``qdq``: ``export_qdq``, and what ONNX Runtime executes per layer (read from its optimized graph).
"""

from qcore.export.onnx.qdq import OnnxExport, export_qdq

__all__ = ["OnnxExport", "export_qdq"]

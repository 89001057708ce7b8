"""Which precision and kernel each exported layer gets, and why a number differs from the simulation's.

- ``uses_matmul_nbits``: a Linear's integer weight goes into ONNX Runtime's ``MatMulNBits`` unless the
  QDQ pattern already fuses it (int8 weights meeting int8 static inputs);
- ``why_float``: why ONNX Runtime runs a layer in float (the file still holds the exact values);
- ``why_wider``: why a layer's stored weight takes more bytes than the recipe's theoretical size;
- ``size_differences`` / ``metric_differences``: one line per gap between the file and the simulation
  (size beyond ``SIZE_TOLERANCE``, headline metric beyond one evaluation sample).
"""

from __future__ import annotations

import re

from qcore.model.size import weight_bytes
from qcore.recipe import Recipe

SIZE_TOLERANCE = 0.10  # file vs theoretical size: a larger relative gap is explained in ``differences``


def _qdq_fused(spec) -> bool:
    """ONNX Runtime's QDQ fusions (QLinearMatMul, QLinearConv, ...) compute with this ``TensorSpec``'s format."""
    return "QLinearMatMul" in spec.fmt.ort_kernels


def uses_matmul_nbits(weights, iq) -> bool:
    """True if a Linear's weights (``TensorSpec``) with input quantizer ``iq`` (or None) are written as
    MatMulNBits: a format MatMulNBits takes (int2..int8), except when weights and static inputs are both
    of a format ONNX Runtime's QDQ fusions turn into an int8 kernel (int8)."""
    fused = iq is not None and not iq.spec.dynamic and _qdq_fused(weights) and _qdq_fused(iq.spec)
    return "MatMulNBits" in weights.fmt.ort_kernels and not fused


def why_float(plan, kind: str) -> str:
    """Why ONNX Runtime runs this layer in float (the file still holds the exact quantized values)."""
    w, a = plan.weights, plan.activations
    if not w.fmt.ort_kernels:  # no ONNX Runtime CPU kernel computes with this format
        if w.fmt.codebook:
            return (f"{w.format.upper()} needs a codebook-lookup kernel; ONNX Runtime's CPU provider has none, so it "
                    "dequantizes at load")
        if w.fmt.can_be_scaled:  # a float type
            return (f"ONNX Runtime's CPU provider has no {w.format} MatMul/Conv; the stored {w.format} weight is "
                    "cast to float32")
        return f"ONNX Runtime has no {w.format} MatMul/Conv kernels on CPU"
    if kind == "Embedding":
        return "the table is dequantized before the Gather (no quantized Gather for this layout)"
    if a is None or not a.fmt.quantizes:
        return (f"{w.format} weight-only: ONNX Runtime fuses weight-only integers only as MatMulNBits on a Linear "
                "with blocks of a power of two >= 16 inside one scale; here the weight is dequantized")
    if a.dynamic and kind.startswith("Conv"):
        return ("ONNX Runtime's only convolution with a run-time input scale, ConvInteger, has no fast CPU kernel "
                "(3-12x slower than its float Conv, measured; microsoft/onnxruntime#12206), so the file holds the "
                f"{w.format} codes, ONNX Runtime decodes them once at load and the Conv computes in float on the "
                "exact dequantized input and weight")
    if a.dynamic:
        return ("dynamic activations are written with the engine's own per-batch range formula; ONNX Runtime "
                "fuses only constant scales, so the layer computes on dequantized values")
    if kind == "Linear" and _qdq_fused(a) and _qdq_fused(w):
        return ("ONNX Runtime's MatMulAddFusion (level 1) turns the QDQ MatMul + bias Add into a float Gemm before "
                "its QDQ fusions run, so the Linear computes in float on the exact dequantized values (with "
                "disabled_optimizers=['MatMulAddFusion'] it becomes MatMulIntegerToFloat)")
    if not (_qdq_fused(a) and _qdq_fused(w)):
        return (f"ONNX Runtime's integer kernels take int8 (or uint8) weights and inputs; {w.format} weights with "
                f"{a.format} inputs run as float on the exact quantized values")
    return ("ONNX Runtime fuses a QDQ Conv into QLinearConv only when its output is quantized again by the next "
            "layer's input; this one's output feeds a float op, so it computes in float on the dequantized values")


def size_differences(workload, recipe: Recipe, report) -> list[str]:
    """Where the file's bytes go when the ``ExportReport`` ``report`` is more than 10 % off the theoretical
    size: one line per layer stored wider (or narrower), one for everything outside the layers' weights
    (the two sizes and the gap itself are stated once, by ``summary_lines``)."""
    file_b, theory_b = report.file_size_bytes, report.theoretical_size_bytes
    if abs(file_b / theory_b - 1) <= SIZE_TOLERANCE:
        return []
    lines = []
    plans = recipe.resolve(workload.layer_shapes)
    for row in report.layers:
        spec = plans[row["layer"]].weights
        theory = weight_bytes(workload.layer_shapes[row["layer"]], spec)
        stored = row["stored_bytes"]
        extra = stored["total"] - theory["total"]
        if abs(extra) <= max(32, 0.05 * theory["total"]):
            continue
        parts = [f"{role.replace('_', '-')} {stored[role]:,} vs {theory.get(role, 0):,} B ({why_wider(role, row, spec)})"
                 for role in ("codes", "scales", "zero_points", "other") if stored[role] > theory.get(role, 0)]
        lines.append(f"{row['layer']}: {stored['total']:,} B stored vs {theory['total']:,} B theoretical "
                     f"({extra:+,} B); {row['weights']}" + (": " + "; ".join(parts) if parts else ""))
    import onnx

    tensors = sum(len(i.raw_data) or i.ByteSize() for i in onnx.load(report.path).graph.initializer)
    other = tensors - sum(r["stored_bytes"]["total"] for r in report.layers)
    rest_theory = theory_b - sum(r["theoretical_bytes"] for r in report.layers)
    lines.append(f"outside the layers' weights: {other:,} B of other tensors in the file (biases, input-quantizer "
                 f"constants) vs {rest_theory:,} B in theory (biases, norms, buffers), and {file_b - tensors:,} B of "
                 "graph (ops, names, protobuf framing) that the theoretical size does not count")
    return lines


def why_wider(role: str, row: dict, spec) -> str:
    nbits = "MatMulNBits" in row["weights"]
    if role == "codes":
        slot = re.search(r"bits=(\d+)", row["weights"])
        if nbits and int(slot.group(1)) > spec.fmt.bits:
            return f"MatMulNBits has {slot.group(1)}-bit slots for {spec.fmt.bits}-bit codes"
        return ("padded to whole MatMulNBits blocks" if nbits else
                "ONNX integer types are 4, 8 or 16 bits wide, so narrower codes take the next container")
    if role == "scales":
        per = {"per_tensor": "tensor", "per_channel": "output channel",
               "per_group": f"group of {spec.group_size}"}[spec.granularity]
        return (f"MatMulNBits keeps one float32 scale per block along the input dimension, the recipe one per {per}"
                if nbits else f"float32 scales, one per {per}")
    if role == "zero_points":
        return ("MatMulNBits packs one per block" if nbits else "stored in a whole INT4/INT8 container") + \
            f"; the recipe counts them at {spec.fmt.bits} bits per {spec.granularity.removeprefix('per_')}"
    return "shapes and codebook constants for the decode ops"


def metric_differences(head: str, measured: float, simulated: float, n_samples: int, layers: list[dict]) -> list[str]:
    """One line when ONNX Runtime's headline metric is more than one evaluation sample off the simulated one."""
    diff = measured - simulated
    if abs(diff) <= 1.0 / n_samples + 1e-12:
        return []
    kernels = [r["layer"] for r in layers if r["executes"] == "int8 kernel"]
    why = (f"{', '.join(kernels)} run in ONNX Runtime's fused int8 kernels, which quantize the bias to int32 and "
           "requantize the int32 sums where the simulation computes in float" if kernels else
           "every layer computes in float on the exact simulated values, so only float32 summation order differs")
    return [f"ONNX Runtime {head} {measured:.4f} vs simulated {simulated:.4f} ({diff:+.4f}, more than one of "
            f"{n_samples} evaluation samples): {why}"]

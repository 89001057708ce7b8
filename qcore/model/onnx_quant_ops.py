"""ONNX's quantization operators as torch functions, exactly as the ONNX spec defines them (the rounding, the
saturation, the broadcasting of scales): what a quantized ``.onnx`` file computes, so an imported one computes it
too. ``QUANT_OPS`` joins ``qcore.model.onnx_ops.OPS``; ``dequantize_linear`` also decodes stored weights at
import (``qcore.io.onnx.quantized``).

Shapes: ``x`` any rank; a scale (and zero-point) is a scalar (per tensor), 1-D with ``x.shape[axis]`` values (per
axis), or, with ``block_size`` b > 0, of ``x``'s rank with ``ceil(x.shape[axis] / b)`` along ``axis`` (blocked:
value i along the axis uses scale i // b). Codes: uint8, int8, int16 (int32 into DequantizeLinear); 4-bit codes
are read into int8/uint8 by the importer and decoded by it, never quantized to at run time.
"""

from __future__ import annotations

import torch

# code dtype -> (lowest, highest) code: QuantizeLinear saturates to these
CODE_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}
OUTPUT_DTYPES = {2: torch.uint8, 3: torch.int8, 5: torch.int16}  # QuantizeLinear's output_dtype attribute


def broadcast_param(p: torch.Tensor, shape, axis: int = 1, block_size: int = 0) -> torch.Tensor:
    """A scale or zero-point ``p`` laid out to broadcast against a tensor of ``shape`` (see the module docstring)."""
    rank = len(shape)
    if block_size > 0:
        axis %= rank
        if p.dim() != rank or p.shape[axis] != -(-shape[axis] // block_size) or any(
                p.shape[d] != shape[d] for d in range(rank) if d != axis):
            raise ValueError(f"blocked scale of shape {tuple(p.shape)} does not fit {tuple(shape)} "
                             f"(axis {axis}, block_size {block_size})")
        return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, shape[axis])
    if p.numel() == 1:
        return p.reshape(())
    axis %= rank
    if p.dim() != 1 or p.shape[0] != shape[axis]:
        raise ValueError(f"per-axis scale of shape {tuple(p.shape)} does not fit {tuple(shape)} (axis {axis})")
    return p.reshape([shape[axis] if d == axis else 1 for d in range(rank)])


def dequantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                      axis: int = 1, block_size: int = 0) -> torch.Tensor:
    """ONNX DequantizeLinear: ``(x - zero_point) * scale`` (the difference in integers, the product in scale's
    float type), zero-point 0 when omitted."""
    s = broadcast_param(scale, x.shape, axis, block_size)
    diff = x.to(torch.int32)
    if zero_point is not None:
        diff = diff - broadcast_param(zero_point, x.shape, axis, block_size).to(torch.int32)
    return diff.to(s.dtype) * s


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None, axis: int = 1,
                    block_size: int = 0, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """ONNX QuantizeLinear: ``saturate(round(x / scale) + zero_point)``, rounding half to even, in the
    zero-point's dtype (``dtype`` when there is none; ONNX's default is uint8)."""
    dtype = zero_point.dtype if zero_point is not None else dtype
    lo, hi = CODE_RANGES[dtype]
    q = torch.round(x.float() / broadcast_param(scale, x.shape, axis, block_size).float())
    if zero_point is not None:  # q is integer-valued; adding in float32 is exact below 2**24, beyond it saturates
        q = q + broadcast_param(zero_point, x.shape, axis, block_size).float()
    return q.clamp(lo, hi).to(dtype)


def dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: uint8 codes of ``x`` over [min(0, min x), max(0, max x)],
    ``scale = (max - min) / 255`` (1 / 255 when max == min), ``zero_point = round(saturate(0 - min / scale))``.
    Returns (codes uint8, scale float32 scalar, zero_point uint8 scalar)."""
    x = x.float()
    hi = torch.clamp(x.max(), min=0) if x.numel() else torch.zeros(())
    lo = torch.clamp(x.min(), max=0) if x.numel() else torch.zeros(())
    scale = torch.where(hi == lo, torch.ones(()), hi - lo) / 255
    zero_point = torch.round(torch.clamp(0 - lo / scale, 0, 255))
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return codes.to(torch.uint8), scale, zero_point.to(torch.uint8)


def matmul_integer(a: torch.Tensor, b: torch.Tensor, a_zero_point: torch.Tensor | None = None,
                   b_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """ONNX MatMulInteger: ``(a - a_zero_point) @ (b - b_zero_point)`` exactly, in int32. ``a_zero_point``:
    scalar or one per row of ``a``; ``b_zero_point``: scalar or one per column of ``b``."""
    a, b = a.to(torch.int64), b.to(torch.int64)
    if a_zero_point is not None:
        a = a - (a_zero_point.reshape(()) if a_zero_point.numel() == 1 else a_zero_point.reshape(-1, 1)).to(torch.int64)
    if b_zero_point is not None:
        b = b - (b_zero_point.reshape(()) if b_zero_point.numel() == 1 else b_zero_point.reshape(-1)).to(torch.int64)
    return torch.matmul(a, b).to(torch.int32)


def _quantize(xs, a):
    return quantize_linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None, a.get("axis", 1), a.get("block_size", 0),
                           OUTPUT_DTYPES.get(a.get("output_dtype", 0), torch.uint8))


def _is_inf(xs, a):
    x = xs[0]
    return ((x == float("inf")) & bool(a.get("detect_positive", 1))) | ((x == float("-inf")) & bool(a.get("detect_negative", 1)))


QUANT_OPS = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": lambda xs, a: dequantize_linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None,
                                                        a.get("axis", 1), a.get("block_size", 0)),
    "DynamicQuantizeLinear": lambda xs, a: dynamic_quantize_linear(xs[0]),
    "MatMulInteger": lambda xs, a: matmul_integer(*xs),
    "Round": lambda xs, a: torch.round(xs[0]),  # half to even, as ONNX
    "IsInf": _is_inf,
}

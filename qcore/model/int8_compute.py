"""int8 compute for weight-only Linear layers: the input quantized as ONNX Runtime's MatMulNBits kernel does it
with ``accuracy_level=4`` (MLAS ``QuantizeARow_CompInt8``), so the simulation computes what the file computes.

The kernel quantizes A (..., K) on the fly, per row and per block of ``block`` values along K (the weight's
block size): symmetric int8, ``scale = max|a| / 127`` (float32), ``q = round(a * (1 / scale))`` to nearest,
ties to even, clamped to [-127, 127] (a block of zeros has scale 0 and codes 0); then it sums
``scale_a * scale_w * sum(q_a * (q_w - z_w))`` per block in int32. The dequantized A times the dequantized W
in float is the same sum up to float32 rounding, which is what the hook gives the layer.
"""

from __future__ import annotations

import torch

from qcore.numerics.quantize import check_finite
from qcore.numerics.spec import INT8_COMPUTE_BLOCKS, TensorSpec


def int8_compute_block(kind: str, weights: TensorSpec | None) -> int | None:
    """The activation block (values along K) of a layer whose weight spec asks for int8 compute, or None when
    the layer computes in float: not asked, not a Linear (MatMulNBits is a Linear), or a resolved group size
    MatMulNBits does not take (``INT8_COMPUTE_BLOCKS``)."""
    if weights is None or weights.compute != "int8" or kind != "Linear":
        return None
    return weights.group_size if weights.group_size in INT8_COMPUTE_BLOCKS else None


def quantize_blocks_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., K), K a multiple of ``block``, as (codes int8 (..., K), scales float32 (..., K / block))."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = blocks.abs().amax(dim=-1) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(blocks * inverse[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(x.shape), scale


class Int8ComputeInput:
    """Forward pre-hook replacing a Linear's input by its int8-per-block quantized value (dequantized)."""

    def __init__(self, name: str, block: int):
        self.name, self.block = name, block

    def __call__(self, module, args):
        x = args[0]
        if not torch.is_floating_point(x):
            return None
        check_finite(x, f"the input of layer {self.name!r}")  # a NaN/Inf would make its whole block NaN
        codes, scale = quantize_blocks_int8(x, self.block)
        blocks = codes.float().reshape(*x.shape[:-1], -1, self.block) * scale[..., None]
        return (blocks.reshape(x.shape).to(x.dtype),) + tuple(args[1:])

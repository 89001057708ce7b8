"""Model size in bytes under a recipe (theoretical storage, not a file on disk).

A quantized weight costs ceil(numel * bits / 8) bytes for its codes, plus 4 bytes (float32) per
scale and ceil(n_blocks * bits / 8) bytes for the zero-points of affine integer formats. Every
other tensor (biases, norms, layers kept in float, buffers) counts at its stored dtype. per_group
counts the group size each weight resolves to (``Recipe.resolve``, ``TensorSpec.for_shape``), as quantize
uses it. Which parameters a block stores is the format's (``Format.params``).
"""

from __future__ import annotations

import math

from torch import nn

from qcore.recipe import Recipe
from qcore.numerics.spec import TensorSpec

SCALE_BYTES = 4  # scales are stored as float32


def n_blocks(shape: tuple[int, ...], spec: TensorSpec) -> int:
    numel = math.prod(shape)
    if spec.granularity == "per_channel":
        return shape[spec.axis] if len(shape) > 1 else 1  # a 1-D tensor is one channel
    if spec.granularity == "per_group":
        return numel // spec.for_shape(shape).group_size
    return 1


def weight_bytes(shape: tuple[int, ...], spec: TensorSpec | None) -> dict:
    """Bytes of one weight of ``shape`` under ``spec``: codes, scales, zero_points, total."""
    numel = math.prod(shape)
    if spec is None or spec.format == "fp32":
        return {"codes": numel * 4, "scales": 0, "zero_points": 0, "total": numel * 4}
    fmt = spec.fmt
    blocks = n_blocks(shape, spec)
    params = fmt.params(spec.symmetric, spec.scaled)
    codes = math.ceil(numel * fmt.bits / 8)
    scales = blocks * SCALE_BYTES if "scale" in params else 0
    zps = math.ceil(blocks * fmt.bits / 8) if "zero_point" in params else 0
    return {"codes": codes, "scales": scales, "zero_points": zps, "total": codes + scales + zps}


def float_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` at its stored dtype (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def model_size(model: nn.Module, layers: dict, recipe: Recipe) -> dict:
    """``{"fp32_bytes", "size_bytes", "layers": [{name, format, bits_per_weight, fp32_bytes, size_bytes}]}``.

    ``layers`` is ``simulate.find_layers(model)``; bits_per_weight includes scale/zero-point overhead.
    """
    fp32 = float_bytes(model)
    rows, saved = [], 0
    plans = recipe.resolve({name: info.weight_shape for name, info in layers.items()})
    for name, info in layers.items():
        spec = plans[name].weights
        b = weight_bytes(info.weight_shape, spec)
        full = math.prod(info.weight_shape) * 4
        saved += full - b["total"]
        rows.append({"name": name, "format": spec.format if spec else "fp32", "fp32_bytes": full,
                     "size_bytes": b["total"], "bits_per_weight": 8 * b["total"] / math.prod(info.weight_shape)})
    return {"fp32_bytes": fp32, "size_bytes": fp32 - saved, "layers": rows}

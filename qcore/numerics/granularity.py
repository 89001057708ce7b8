"""Granularity: how a tensor is cut into blocks that share one scale (and zero-point).

Every quantizer works on a 2-D view ``(n_blocks, block_len)``. A weight is read as rows (dim 0, the
output channels) by fan-in (all other dims flattened: the input dimension of a Linear, the
``C_in*kh*kw`` of a Conv). A 1-D tensor is one row whose fan-in is its length -- one output channel
-- which is how bitsandbytes quantizes a flattened tensor block-wise.

- ``per_tensor``  : one block holding every element                       -> (1, numel)
- ``per_channel`` : one block per index along ``axis`` (default 0, the output channel of a
                    Linear/Conv weight ``(C_out, C_in, ...)``)             -> (shape[axis], numel / shape[axis])
                    A 1-D tensor is one channel                            -> (1, numel)
- ``per_group``   : each row is cut into groups of ``g`` consecutive fan-in elements
                                                                           -> (numel / g, g)
                    ``g = group_size_for(fan_in, group_size)``: the spec's ``group_size`` is the largest
                    group; a row whose fan-in it does not divide uses the largest divisor of the fan-in
                    not above it (fan-in 96, group_size 64 -> 48; fan-in 9, group_size 32 -> 9).

``to_blocks`` and ``from_blocks`` are exact inverses (pure reshapes/permutes, no copies of values).
"""

from __future__ import annotations

import torch

from qcore.errors import QcoreError

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


def fan_in(shape: tuple[int, ...]) -> int:
    """Input dimension of a weight of ``shape``: product of all dims but the first; a 1-D tensor's
    length (one row); 1 for a scalar."""
    if len(shape) == 1:
        return shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def group_size_for(n_in: int, group_size: int) -> int:
    """The group length used on a row of ``n_in`` elements: the largest divisor of ``n_in`` that is at
    most ``group_size`` (``group_size`` itself when it divides; 1 at worst, for a prime fan-in)."""
    if n_in == 0 or n_in % group_size == 0:
        return group_size
    best, d = 1, 1
    while d * d <= n_in:  # divisors come in pairs (d, n_in / d)
        if n_in % d == 0:
            best = max([best] + [c for c in (d, n_in // d) if c <= group_size])
        d += 1
    return best


def to_blocks(x: torch.Tensor, granularity: str, axis: int = 0, group_size: int = 128) -> torch.Tensor:
    """View ``x`` as ``(n_blocks, block_len)`` for ``granularity`` (see module docstring)."""
    if x.dim() == 0:
        x = x.reshape(1)
    if granularity == "per_tensor" or (granularity == "per_channel" and x.dim() == 1):
        return x.reshape(1, -1)
    if granularity == "per_channel":
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if granularity == "per_group":
        n_in = fan_in(tuple(x.shape))
        return x.reshape(-1, group_size_for(n_in, group_size))
    raise QcoreError(f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")


def from_blocks(blocks: torch.Tensor, shape: tuple[int, ...], granularity: str, axis: int = 0) -> torch.Tensor:
    """Inverse of ``to_blocks``: reshape ``blocks`` back to a tensor of ``shape``."""
    if len(shape) == 0:
        return blocks.reshape(())
    if granularity == "per_channel" and len(shape) > 1:
        moved = list(shape)
        moved.insert(0, moved.pop(axis % len(shape)))
        return blocks.reshape(moved).movedim(0, axis)
    return blocks.reshape(shape)

"""Granularity: how a tensor is cut into blocks that share one scale (and zero-point).

Every quantizer works on a 2-D view ``(n_blocks, block_len)``:

- ``per_tensor``  : one block holding every element                       -> (1, numel)
- ``per_channel`` : one block per index along ``axis`` (default 0, the output channel of a
                    Linear/Conv weight ``(C_out, C_in, ...)``)             -> (shape[axis], numel / shape[axis])
- ``per_group``   : the tensor is viewed as rows (dim 0) by fan-in (all other dims flattened, i.e.
                    the input dimension of a Linear or the ``C_in*kh*kw`` of a Conv); each row is cut into
                    groups of ``group_size`` consecutive fan-in elements  -> (numel / group_size, group_size)

``to_blocks`` and ``from_blocks`` are exact inverses (pure reshapes/permutes, no copies of values).
"""

from __future__ import annotations

import torch

from .errors import QcoreError

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


def fan_in(shape: tuple[int, ...]) -> int:
    """Input dimension of a weight of ``shape``: product of all dims but the first (1 for 0-/1-D)."""
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def to_blocks(x: torch.Tensor, granularity: str, axis: int = 0, group_size: int = 128) -> torch.Tensor:
    """View ``x`` as ``(n_blocks, block_len)`` for ``granularity`` (see module docstring)."""
    if x.dim() == 0:
        x = x.reshape(1)
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    if granularity == "per_channel":
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if granularity == "per_group":
        rows = x.reshape(x.shape[0], -1)
        if rows.shape[1] % group_size:
            raise QcoreError(
                f"group_size={group_size} does not divide the input dimension {rows.shape[1]} of a tensor "
                f"of shape {tuple(x.shape)}; choose a divisor of {rows.shape[1]} or granularity per_channel"
            )
        return rows.reshape(-1, group_size)
    raise QcoreError(f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")


def from_blocks(blocks: torch.Tensor, shape: tuple[int, ...], granularity: str, axis: int = 0) -> torch.Tensor:
    """Inverse of ``to_blocks``: reshape ``blocks`` back to a tensor of ``shape``."""
    if len(shape) == 0:
        return blocks.reshape(())
    if granularity == "per_channel":
        moved = list(shape)
        moved.insert(0, moved.pop(axis % len(shape)))
        return blocks.reshape(moved).movedim(0, axis)
    return blocks.reshape(shape)

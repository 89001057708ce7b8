"""Padded positions: which rows of a batch are real, for what rounding learns from calibration data.

A data set may say which of its inputs marks each sample's real positions (``Data.real_rows``: an attention mask
(N, T), nonzero = real). The model discards what it computes at padded positions, so GPTQ's Hessians, AdaRound's
rows and the embedding lookup counts leave them out (``qcore.model.rounding``, ``qcore.model.embedding_sums``).
"""

from __future__ import annotations

import torch


def real_mask(batch: tuple, real_rows: int | None) -> torch.Tensor | None:
    """The batch's real positions (bool, the shape of its input ``real_rows``), or None (all are real)."""
    return None if real_rows is None else batch[real_rows] != 0


def real_part(x: torch.Tensor, mask: torch.Tensor | None, last_axes: int) -> torch.Tensor:
    """``x`` without its padded positions: the elements of ``x``'s leading axes (all but ``last_axes``) where
    ``mask`` is true, when those axes are ``mask``'s shape (or broadcast to it); else ``x`` as it is."""
    if mask is None or x.dim() != mask.dim() + last_axes:
        return x
    lead = x.shape[:x.dim() - last_axes]
    try:
        if torch.broadcast_shapes(lead, mask.shape) != mask.shape:
            return x
    except RuntimeError:
        return x
    return x.expand(*mask.shape, *x.shape[x.dim() - last_axes:])[mask]

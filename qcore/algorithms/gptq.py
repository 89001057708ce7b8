"""GPTQ: round a weight one input column at a time, pushing each column's rounding error onto the columns
not yet rounded, weighted by the layer's input Hessian (Frantar, Ashkboos, Hoefler, Alistarh 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"; Optimal Brain
Quantization, Frantar & Alistarh 2022).

Objective, per layer, over calibration inputs X (N, in) (rows are tokens / conv patches):

    min over grid points W'   || W X^T - W' X^T ||_F^2  =  tr((W - W') H (W - W')^T),   H = X^T X

GPTQ minimises it greedily: with ``Hinv = H^-1`` and ``U`` its upper Cholesky factor (``Hinv = U^T U``),
column ``j`` is rounded to ``q_j`` and the remaining columns take the OBS update

    W[:, j+1:] -= (W[:, j] - q_j) / U[j, j] * U[j, j+1:]

-- the least-squares best correction of the not-yet-rounded weights for the error just made. Columns are
processed in blocks of ``block_size`` with the update of later blocks applied once per block (lazy
batch updates: the same result, fewer memory passes).

Choices, as the reference implementation (IST-DASLab/gptq) makes them:
- damping: ``damp * mean(diag H)`` is added to the diagonal; if the Cholesky factorisation still fails
  (H singular to working precision) the damping grows 10x until it succeeds, so the result is never NaN;
- dead input channels (``H[i, i] == 0``: the input was always zero on the calibration data) get
  ``H[i, i] = 1``; unlike the reference, which sets those weights to 0, their weights are rounded to nearest
  (the calibration data says nothing about them, so they keep what rounding to nearest gives);
- ``act_order``: columns are rounded in order of decreasing ``H[i, i]`` (the most-used inputs first, while
  the most columns remain to absorb their error);
- scales: per_tensor and per_channel use the ranges of the original weight; per_group chooses a group's
  range (``spec.range`` on its current, error-updated weights) when the first of its columns is rounded
  -- in the natural order that is the group's first column, as the reference does; with act_order it
  is whichever of its columns comes first, so the groups stay contiguous in the stored layout
  (MatMulNBits, safetensors) with no column permutation;
- ``clip`` > 0: each range is then shrunk by the factor that minimises that group's output error
  ``d^T H_gg d`` (``qcore.algorithms.clip``, AWQ's clip search) -- GPTQ rounds onto the searched grid.

Conv weights are flattened to (C_out, C_in*kh*kw) and their inputs unfolded (``F.unfold``) to match; the
caller builds H that way (``qcore.model.rounding``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from qcore.algorithms.clip import clipped_params, hessian_blocks
from qcore.algorithms.grid import block_params, check_roundable, make_grid
from qcore.numerics.granularity import fan_in
from qcore.numerics.quantize import QuantizedTensor, check_finite
from qcore.numerics.spec import TensorSpec

MAX_DAMPING_TRIES = 8  # damping grows 10x per try: up to 1e7 x the first


@contextmanager
def one_thread():
    """Torch ops in this thread run on one intra-op thread (restored on exit; usable as a decorator).
    GPTQ's column loop makes ~10 small ops per input column; split across OpenMP threads each one waits
    at a barrier, which on a loaded 2-core machine made GPTQ 5-30x slower than on one thread (the block
    matmuls and the (in, in) inverse are too small to gain much from a second thread).
    With the OpenMP backend ``torch.set_num_threads`` changes the calling thread and the default of threads
    that make their first torch call meanwhile; threads already running torch keep theirs. Elementwise ops
    give the same bits on any number of threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1, float32 (in, in): damping ``damp * mean(diag H)``,
    grown 10x until the factorisation succeeds. ``hessian`` must already have no zero diagonal."""
    h = hessian.double()
    mean_diag = float(torch.diagonal(h).mean())
    scale = mean_diag if mean_diag > 0 and torch.isfinite(torch.tensor(mean_diag)) else 1.0
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    for attempt in range(MAX_DAMPING_TRIES):
        damped = h + eye * (damp * 10 ** attempt * scale)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper.float()
    return torch.eye(h.shape[0])  # nothing factorises: no error feedback, i.e. rounding to nearest


@one_thread()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: TensorSpec, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128, clip: int = 0) -> QuantizedTensor:
    """``weight`` (out, in) -- or (C_out, C_in, k...) read as (C_out, C_in*k...) -- quantized by GPTQ under
    ``spec`` (an integer format) with ``hessian`` (in, in) = sum of x x^T over the calibration input rows
    (any positive multiple gives the same result); ``clip`` the steps of the clipping search (0: none).
    Returns the ``QuantizedTensor`` in ``quantize``'s layout."""
    shape = tuple(weight.shape)
    spec = spec.for_shape(shape)
    check_roundable(spec, shape)
    check_finite(weight, "the weight")
    out, n = shape[0], fan_in(shape)
    W = weight.detach().float().reshape(out, n).clone()
    H = hessian.detach().double().clone()
    check_finite(H, "the Hessian")
    dead = torch.diagonal(H) <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    h_blocks = hessian_blocks(H, spec, n)  # in the original column order

    def params(w2, grp=slice(None)):  # (lo, hi, scale, zp) of the blocks of w2, its groups ``grp``
        return clipped_params(spec, w2, h_blocks[grp], clip) if clip else block_params(spec, w2)

    g = spec.group_size if spec.granularity == "per_group" else n
    n_groups = n // g
    if spec.granularity == "per_group":  # chosen as the loop reaches each group
        lo, hi, scale, zp = (torch.zeros(out, n_groups) for _ in range(4))
    else:  # one range per row (per_channel) or for the whole tensor (per_tensor), from the original weight
        lo, hi, scale, zp = (t.reshape(-1, 1).expand(out, 1).clone() for t in params(W))
    has_params = torch.full((n_groups,), spec.granularity != "per_group")

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    position = torch.empty(n, dtype=torch.long)
    position[perm] = torch.arange(n)  # original column -> its position in processing order
    U = inverse_hessian_factor(H, damp)
    fmt = spec.fmt
    Q = torch.zeros_like(W)  # codes, in processing order

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not has_params[grp]:  # first column of this group: its range from the group's current weights
                pos = position[grp * g:(grp + 1) * g]  # its columns' places in processing order, all >= i1 + i
                inside = pos < i2
                later = W[:, pos] - Err1[:, :i] @ U[i1:i1 + i][:, pos]  # beyond this block: its updates so far
                current = torch.where(inside[None, :], W1[:, (pos - i1).clamp(max=i2 - i1 - 1)], later)
                for t, v in zip((lo, hi, scale, zp), params(current, slice(grp, grp + 1))):
                    t[:, grp] = v
                has_params[grp] = True
            s, z = scale[:, grp], zp[:, grp]
            w = W1[:, i]
            q = torch.clamp(torch.round(w.double() / s.double()).float() + z, fmt.qmin, fmt.qmax)
            Q[:, i1 + i] = q
            err = (w - (q - z) * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    codes = Q[:, position]  # back to the original column order
    if spec.granularity == "per_tensor":
        lo, hi, scale, zp = (t[:1, 0] for t in (lo, hi, scale, zp))
    return make_grid(spec, shape, *(t.reshape(-1) for t in (lo, hi, scale, zp))).result(codes)

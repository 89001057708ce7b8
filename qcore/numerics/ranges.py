"""Range (clipping) methods: where to put the clip, per block.

Each method takes values cut into blocks ``x: (n_blocks, n)`` (see ``granularity``) and optional
non-negative sample weights ``w`` of the same shape -- a histogram is passed as bin centres with
their counts as weights, which is how calibrated activation ranges reuse the same code -- and
returns the chosen range ``(lo, hi)``, each ``(n_blocks,)`` float32. Symmetric specs get
``lo == -hi``.

- ``minmax``     : the smallest and largest value (nothing is clipped).
- ``percentile`` : the ``spec.percentile``-th percentile (of |x| when symmetric; of both tails otherwise).
- ``mse``        : shrink the min-max range by a factor in (0, 1] chosen from a grid to minimise the
                   squared reconstruction error sum w (x' - x)^2; the grid includes 1, so it is never
                   worse than min-max.
- ``entropy``    : TensorRT-style KL calibration: pick the |x| threshold whose quantized histogram
                   is closest (KL divergence) to the clipped reference histogram.

``RANGE_METHODS`` maps a method name to its function; adding a method is adding one entry.

Every method treats blocks independently, so ``choose_range`` runs them on chunks of blocks: the
working memory stays under about ``CHUNK_BYTES`` whatever the recipe's granularity (a 2048-bin
histogram per group of 32 values is 64 times the tensor), with results identical to one call. The
entropy search also costs time per block (a histogram and ~64 thresholds each); more than
``MAX_ENTROPY_BLOCKS`` blocks in one tensor is refused with a one-line ``QcoreError``.
"""

from __future__ import annotations

import math

import torch

from qcore.errors import QcoreError
from qcore.numerics.formats import Format

MSE_GRID = 50  # candidate clip factors for ``mse``: 1/50, 2/50, ..., 1
ENTROPY_BINS = 2048
ENTROPY_CANDIDATES = 64
CHUNK_BYTES = 64 * 2**20  # working memory (bytes) of one chunk of blocks in ``choose_range``
MAX_ENTROPY_BLOCKS = 2048  # blocks per tensor for ``entropy``: ~3 ms each on one idle thread, ~6 s in all


def _weights(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.float64) if w is None else w.to(torch.float64)


def minmax(x: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest value per block (ignoring zero-weight samples)."""
    if w is None:
        return x.amin(1).float(), x.amax(1).float()
    present = w > 0
    inf = torch.full_like(x, math.inf)
    lo = torch.where(present, x, inf).amin(1)
    hi = torch.where(present, x, -inf).amax(1)
    empty = ~present.any(1)
    return torch.where(empty, 0.0, lo).float(), torch.where(empty, 0.0, hi).float()


def _quantile(x: torch.Tensor, q: float, w: torch.Tensor | None) -> torch.Tensor:
    """Per-row weighted quantile, q in [0, 1] (lower interpolation)."""
    n = x.shape[1]
    if w is None:
        # rounding q * n first keeps float error (0.999 * 10000 = 9990.000000000002) from adding a rank
        k = min(max(math.ceil(round(q * n, 9)), 1), n)
        return x.kthvalue(k, dim=1).values.float()
    xs, order = torch.sort(x, dim=1)
    cw = torch.cumsum(w.to(torch.float64).gather(1, order), dim=1)
    total = cw[:, -1:].clamp(min=1e-300)
    # first value whose cumulative share reaches q; for q = 0, the first value with any weight
    idx = torch.searchsorted(cw / total, torch.full_like(total, q), right=q <= 0).clamp(max=n - 1)
    return xs.gather(1, idx).squeeze(1).float()


def percentile(x, fmt: Format, spec, w=None):
    p = spec.percentile / 100.0
    if spec.symmetric:
        amax = _quantile(x.abs(), p, w)
        return -amax, amax
    return _quantile(x, 1.0 - p, w), _quantile(x, p, w)


def _symmetrize(lo, hi, spec):
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return -amax, amax
    return lo, hi


def mse(x, fmt: Format, spec, w=None):
    lo0, hi0 = _symmetrize(*minmax(x, w), spec)
    weights = _weights(x, w)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    best_err = torch.full_like(lo0, math.inf, dtype=torch.float64)
    for k in range(MSE_GRID, 0, -1):  # from 1.0 down, so ties keep the wider (min-max) range
        alpha = k / MSE_GRID
        lo, hi = lo0 * alpha, hi0 * alpha
        xq = fmt.decode(*fmt.encode(x, lo, hi, spec.symmetric, spec.scaled))
        err = ((xq.double() - x.double()) ** 2 * weights).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _levels(fmt: Format) -> int:
    """Number of non-negative levels of the format's grid (128 for int8), capped for the KL search."""
    return int(min((fmt.values() >= 0).sum().item(), ENTROPY_BINS // 4))


def entropy_threshold(hist: torch.Tensor, amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The KL (TensorRT) clip of |x| per block, ``(n_blocks,)`` float32, from ``hist: (n_blocks, bins)``, the
    counts of |x| in ``bins`` equal bins over [0, amax] (``amax: (n_blocks,)``, the largest |x|): the bin edge
    whose quantized slice (merged into the format's non-negative levels) is closest in KL divergence to the
    slice with the clipped outliers piled into its last bin. Candidates: every ``(bins - levels) //
    ENTROPY_CANDIDATES``-th edge from ``levels`` bins up, and ``amax`` itself (nothing clipped)."""
    hist = hist.to(torch.float64)
    n_blocks, bins = hist.shape
    levels = _levels(fmt)
    step = max(1, (bins - levels) // ENTROPY_CANDIDATES)
    best_kl = torch.full((n_blocks,), math.inf, dtype=torch.float64)
    best_i = torch.full((n_blocks,), bins, dtype=torch.float64)
    for i in list(range(levels, bins, step)) + [bins]:
        sliced = hist[:, :i]
        p = sliced.clone()
        p[:, -1] += hist[:, i:].sum(1)  # reference: clipped outliers pile up in the last bin
        # candidate: the unclipped slice merged into `levels` bins, spread back over its non-empty bins
        chunk = (torch.arange(i) * levels) // i  # which quantized level each reference bin falls into
        nonzero = (sliced > 0).double()
        chunk_sum = torch.zeros(n_blocks, levels, dtype=torch.float64).index_add_(1, chunk, sliced)
        chunk_nz = torch.zeros(n_blocks, levels, dtype=torch.float64).index_add_(1, chunk, nonzero)
        q = torch.where(sliced > 0, chunk_sum[:, chunk] / chunk_nz[:, chunk].clamp(min=1), 0.0)
        p_n = p / p.sum(1, keepdim=True).clamp(min=1e-300)
        q_n = q / q.sum(1, keepdim=True).clamp(min=1e-300)
        # P > 0 where Q == 0 (outlier mass in an empty last bin) gets a finite penalty (TensorRT: infinite, never
        # chosen); with 64 candidates that lets a sparse tail still be clipped
        kl = torch.where(p > 0, p_n * torch.log(p_n.clamp(min=1e-300) / q_n.clamp(min=1e-12)), 0.0).sum(1)
        better = kl < best_kl
        best_kl = torch.where(better, kl, best_kl)
        best_i = torch.where(better, torch.full_like(best_i, i), best_i)
    return (amax.to(torch.float64) * best_i / bins).float()


def entropy(x, fmt: Format, spec, w=None):
    """``entropy_threshold`` on an ``ENTROPY_BINS``-bin histogram of |x| per block; an asymmetric spec keeps
    the block's own extremes where they lie inside the clip."""
    lo0, hi0 = minmax(x, w)
    amax = torch.maximum(lo0.abs(), hi0.abs()).to(torch.float64)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    idx = torch.clamp((x.abs().double() / safe[:, None] * ENTROPY_BINS).long(), 0, ENTROPY_BINS - 1)
    hist = torch.zeros(x.shape[0], ENTROPY_BINS, dtype=torch.float64).scatter_add_(1, idx, _weights(x, w))
    t = entropy_threshold(hist, amax, fmt)
    if spec.symmetric:
        return -t, t
    return torch.maximum(lo0, -t), torch.minimum(hi0, t)


def _minmax_method(x, fmt, spec, w=None):
    return _symmetrize(*minmax(x, w), spec)


RANGE_METHODS = {
    "minmax": _minmax_method,
    "percentile": percentile,
    "mse": mse,
    "entropy": entropy,
}
# For activations only: the exponential moving average of per-batch min/max (torch.ao's default).
ACTIVATION_ONLY_METHODS = ("moving_average",)


def block_bytes(method: str, n: int) -> int:
    """Working memory (bytes) a method needs per block of ``n`` values: about 16 float64 temporaries
    as wide as the block, and for ``entropy`` as wide as its histogram too."""
    return 8 * 16 * (n + (ENTROPY_BINS if method == "entropy" else 0))


def choose_range(x: torch.Tensor, fmt: Format, spec, w: torch.Tensor | None = None):
    """Clipping range ``(lo, hi)`` per block of ``x: (n_blocks, n)`` for ``spec.range``, computed
    on chunks of at most ``CHUNK_BYTES // block_bytes`` blocks (the same result as one call)."""
    method = "minmax" if spec.range in ACTIVATION_ONLY_METHODS else spec.range
    n_blocks = x.shape[0]
    if method == "entropy" and n_blocks > MAX_ENTROPY_BLOCKS:
        shape = "per_group of " + str(spec.group_size) if spec.granularity == "per_group" else spec.granularity
        raise QcoreError(f"range 'entropy' with granularity {shape} makes {n_blocks:,} blocks, above the limit of "
                         f"{MAX_ENTROPY_BLOCKS:,} (each block gets its own {ENTROPY_BINS}-bin histogram search); use "
                         "range minmax, percentile or mse, or fewer blocks (per_channel or larger groups)")
    rows = max(1, CHUNK_BYTES // block_bytes(method, x.shape[1]))
    if n_blocks <= rows:
        return RANGE_METHODS[method](x, fmt, spec, w)
    parts = [RANGE_METHODS[method](x[i:i + rows], fmt, spec, None if w is None else w[i:i + rows])
             for i in range(0, n_blocks, rows)]
    return torch.cat([lo for lo, _ in parts]), torch.cat([hi for _, hi in parts])

"""The numbers behind the app's explanatory pages (Formats, Weights, Activations).

Each function takes tensors, specs or a workload and returns plain numbers, tensors and dicts;
``qcore.figures.viz`` draws them and the pages only show them. All ranges are in the tensor's own units.

- Formats: ``sample_distribution``, ``grid`` (a spec's representable values over a tensor),
  ``bit_layout``, ``format_numbers`` (step size, dynamic range), ``bitwidth_sweep`` (error vs bits),
  ``clipping_tradeoff`` (rounding vs clipping error as the clip moves).
- Weights: ``analysed_weight`` (big tensors are analysed on whole sampled rows), ``method_ranges``,
  ``weight_error``, ``channel_ranges``, ``layer_sqnr``.
- Activations: ``activation_ranges`` (every method from one calibration), ``rebin``,
  ``outlier_channels``, ``batch_ranges`` (what a dynamic quantizer would use per batch).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from qcore.model.calibrate import ActivationStats
from qcore.numerics.formats import Format
from qcore.numerics.granularity import fan_in
from qcore.numerics.metrics import sqnr_db
from qcore.numerics.quantize import fake_quantize, quantize
from qcore.numerics.ranges import RANGE_METHODS, choose_range
from qcore.numerics.spec import TensorSpec
from qcore.model.hooks import run_with_hooks

DISTRIBUTIONS = ("normal", "laplace", "normal with outliers")
MAX_ANALYSED_WEIGHTS = 2**18  # larger weights are analysed on a seeded sample of whole rows
OUTLIER_SHARE = 0.002  # "normal with outliers": 0.2% of the values sit at 6..10 standard deviations


# ---- Formats page ------------------------------------------------------------------------------
def sample_distribution(kind: str, n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """``n`` float32 samples of unit standard deviation (before outliers), seeded: ``normal``,
    ``laplace`` (heavier tails, like most trained weights) or ``normal with outliers``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "laplace":  # inverse CDF; scale 1/sqrt(2) gives unit variance
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)
    if kind == "normal with outliers":
        x = torch.randn(n, generator=g)
        k = max(1, int(n * OUTLIER_SHARE))
        idx = torch.randperm(n, generator=g)[:k]
        sign = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
        x[idx] = sign * (6 + 4 * torch.rand(k, generator=g))
        return x
    raise ValueError(f"unknown distribution {kind!r}; one of {DISTRIBUTIONS}")


def grid(x: torch.Tensor, spec: TensorSpec, lo=None, hi=None) -> dict:
    """The values ``spec`` can represent when quantizing all of ``x`` with one scale (per tensor).

    Returns ``{"levels": float64 (L,) sorted, in x's units, or None for fp32, "lo", "hi" (clip range
    or None), "scale", "zero_point" (floats or None)}``. ``lo``/``hi`` fix the range instead of
    ``spec.range``.
    """
    spec = replace(spec, granularity="per_tensor")
    q = quantize(x.reshape(-1), spec, lo, hi)
    fmt = spec.fmt
    scale = float(q.scale[0]) if q.scale is not None else None
    zero_point = float(q.zero_point[0]) if q.zero_point is not None else None
    if not fmt.quantizes:
        levels = None
    else:
        levels = fmt.values() - (zero_point or 0.0)
        levels = levels * scale if scale is not None else levels
    return {"levels": levels, "scale": scale, "zero_point": zero_point,
            "lo": float(q.lo[0]) if q.lo is not None else None, "hi": float(q.hi[0]) if q.hi is not None else None}


def visible_levels(g: dict, lo: float, hi: float) -> torch.Tensor | None:
    """The levels of ``grid`` result ``g`` worth drawing over data in [lo, hi]: those within the data range and
    the grid's clip range (``g["lo"]``, ``g["hi"]``), widened by 10 % of that span on each side. A scaled grid spans
    its clip range, so it is drawn whole (a symmetric grid over ReLU outputs shows its unused negative half); of a
    plain cast (fp16 has 63,487 finite values), or of a grid whose scale fell back to 1 (bf16 "scaled" into its own
    range would need a scale below float32's smallest normal number), only the levels near the data."""
    if g["levels"] is None:
        return None
    a = lo if g["lo"] is None else min(lo, g["lo"])
    b = hi if g["hi"] is None else max(hi, g["hi"])
    pad = 0.1 * max(b - a, 1e-12)
    return g["levels"][(g["levels"] >= a - pad) & (g["levels"] <= b + pad)]


def bit_layout(fmt: Format) -> list[tuple[str, int]]:
    """The fields of one stored value, most significant first: ``[(field, bits), ...]``."""
    return fmt.bit_fields()


def format_numbers(x: torch.Tensor, spec: TensorSpec) -> dict:
    """What one per-tensor quantization of ``x`` under ``spec`` looks like in numbers.

    levels (codes in the format), smallest_step / largest_step (gaps between adjacent representable
    values inside the clip range, in x's units; equal for integer grids), dynamic_range_db
    (20 log10 of largest / smallest non-zero magnitude the format holds), lo/hi, scale, zero_point,
    sqnr_db, mse and clipped_fraction of x.
    """
    g = grid(x, spec)
    fmt = spec.fmt
    d = fmt.describe()
    q = quantize(x.reshape(-1), replace(spec, granularity="per_tensor"))
    xq = q.dequantize()
    out = {"levels": d["levels"], "dynamic_range_db": 20 * math.log10(d["max"] / d["smallest_step_near_zero"]),
           **{k: g[k] for k in ("lo", "hi", "scale", "zero_point")},
           "sqnr_db": sqnr_db(xq, x.reshape(-1)), "mse": float(((xq - x.reshape(-1)).double() ** 2).mean()),
           "clipped_fraction": q.clipped_fraction(x.reshape(-1))}
    if g["levels"] is not None:  # steps inside the clip range (a plain cast: inside the data's range)
        amax = float(x.abs().max())
        lo, hi = (g["lo"], g["hi"]) if g["lo"] is not None else (-amax, amax)
        lv = g["levels"]
        lv = lv[(lv >= lo - 1e-9 * abs(lo)) & (lv <= hi + 1e-9 * abs(hi))]
        gaps = torch.diff(lv)
        gaps = gaps[gaps > 0]
        out["smallest_step"] = float(gaps.min()) if len(gaps) else 0.0
        out["largest_step"] = float(gaps.max()) if len(gaps) else 0.0
    else:
        out["smallest_step"] = out["largest_step"] = None
    return out


def bitwidth_sweep(x: torch.Tensor, methods=("minmax", "mse"), bits=(2, 3, 4, 5, 6, 7, 8),
                   symmetric: bool = True) -> list[dict]:
    """Per-tensor int-b quantization of ``x`` for each bit width and range method:
    rows ``{"bits", "range", "mse", "sqnr_db"}`` (about +6 dB per extra bit on a uniform grid)."""
    x = x.reshape(-1).float()
    rows = []
    for method in methods:
        for b in bits:
            spec = TensorSpec(format=f"int{b}", symmetric=symmetric, range=method)
            xq = fake_quantize(x, spec)
            rows.append({"bits": b, "range": method, "mse": float(((xq - x).double() ** 2).mean()),
                         "sqnr_db": sqnr_db(xq, x)})
    return rows


def _clip_errors(x: torch.Tensor, spec: TensorSpec, lo: float, hi: float) -> tuple[float, float]:
    """Mean squared error of elements inside [lo, hi] (rounding) and outside it (clipping), both / N."""
    xq = fake_quantize(x, spec, lo, hi)
    err2 = (xq - x).double() ** 2
    inside = (x >= lo) & (x <= hi)
    n = max(x.numel(), 1)
    return float(err2[inside].sum()) / n, float(err2[~inside].sum()) / n


def clipping_tradeoff(x: torch.Tensor, spec: TensorSpec, points: int = 60) -> dict:
    """Move the clip threshold t from max|x|/points to max|x| (range [-t, t], cut to [min x, max x]
    for affine specs) and split the mean squared error into rounding (inside the range) and
    clipping (outside) parts.

    Returns ``{"threshold": [...], "rounding": [...], "clipping": [...], "total": [...],
    "methods": {method: {"lo", "hi", "threshold", "total"}}}`` -- the threshold each range method
    picks for ``spec`` and the error there. Meaningful for formats that use a range.
    """
    x = x.reshape(-1).float()
    spec = replace(spec, granularity="per_tensor")
    xmin, xmax = float(x.min()), float(x.max())
    amax = max(abs(xmin), abs(xmax))
    out = {"threshold": [], "rounding": [], "clipping": [], "total": []}
    for k in range(1, points + 1):
        t = amax * k / points
        lo, hi = (-t, t) if spec.symmetric else (max(xmin, -t), min(xmax, t))
        r, c = _clip_errors(x, spec, lo, hi)
        for key, v in (("threshold", t), ("rounding", r), ("clipping", c), ("total", r + c)):
            out[key].append(v)
    out["methods"] = {}
    for method, (lo, hi) in method_ranges(x, spec).items():
        r, c = _clip_errors(x, spec, lo, hi)
        out["methods"][method] = {"lo": lo, "hi": hi, "threshold": max(abs(lo), abs(hi)), "total": r + c}
    return out


# ---- Weights page -----------------------------------------------------------------------------
def analysed_weight(w: torch.Tensor, limit: int = MAX_ANALYSED_WEIGHTS) -> tuple[torch.Tensor, str | None]:
    """``w`` as float32, or, when it has more than ``limit`` values, a seeded random subset of its
    whole rows (dim 0: output channels / embedding rows) so per-row results stay exact; the second
    value is a sentence saying what was sampled (None when nothing was)."""
    w = w.detach().float()
    if w.numel() <= limit or w.dim() < 2:
        return w, None
    rows = max(1, limit // (w.numel() // w.shape[0]))
    keep = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:rows].sort().values
    note = (f"This weight has {w.numel():,} values; to stay interactive the analysis uses {rows:,} of its "
            f"{w.shape[0]:,} rows ({rows * (w.numel() // w.shape[0]):,} values, a fixed random sample).")
    return w[keep], note


def sample_values(x: torch.Tensor, limit: int) -> tuple[torch.Tensor, str | None]:
    """All of ``x`` flattened, or a seeded random sample of ``limit`` of its values with a note."""
    x = x.detach().float().reshape(-1)
    if x.numel() <= limit:
        return x, None
    keep = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:limit]
    return x[keep], f"This layer has {x.numel():,} weights; the page uses {limit:,} of them (a fixed random sample)."


def method_ranges(x: torch.Tensor, spec: TensorSpec, methods=tuple(RANGE_METHODS)) -> dict[str, tuple[float, float]]:
    """The per-tensor clip range ``(lo, hi)`` each range method picks for all of ``x`` under ``spec``."""
    blocks = x.detach().float().reshape(1, -1)
    out = {}
    for m in methods:
        lo, hi = choose_range(blocks, spec.fmt, replace(spec, range=m, granularity="per_tensor"))
        out[m] = (float(lo[0]), float(hi[0]))
    return out


def weight_error(w: torch.Tensor, spec: TensorSpec, lo=None, hi=None) -> dict:
    """Quantize ``w`` under ``spec`` (``lo``/``hi`` fix a per-tensor range): ``{"error": (w' - w)
    flattened float32, "sqnr_db", "clipped_fraction", "max_abs_error"}``."""
    q = quantize(w, spec, lo, hi)
    wq = q.dequantize()
    err = (wq - w.float()).reshape(-1)
    return {"error": err, "sqnr_db": sqnr_db(wq, w), "clipped_fraction": q.clipped_fraction(w),
            "max_abs_error": float(err.abs().max()) if err.numel() else 0.0}


def channel_ranges(w: torch.Tensor) -> dict:
    """Per output channel (dim 0) min and max, ordered by the channel's max |w| (largest first).

    ``{"channel": (C,) original indices, "min": (C,), "max": (C,), "tensor_min", "tensor_max",
    "absmax_ratio": largest / median channel max|w| (1 = all channels alike)}``.
    """
    rows = w.detach().float().reshape(w.shape[0], -1)
    mn, mx = rows.amin(1), rows.amax(1)
    absmax = torch.maximum(mn.abs(), mx.abs())
    order = torch.argsort(absmax, descending=True)
    median = float(absmax.median())
    return {"channel": order, "min": mn[order], "max": mx[order], "tensor_min": float(mn.min()),
            "tensor_max": float(mx.max()), "absmax_ratio": float(absmax.max()) / median if median > 0 else 1.0}


def spec_for_layer(spec: TensorSpec, shape: tuple[int, ...]) -> tuple[TensorSpec, str | None]:
    """``spec`` as applied to a weight of ``shape`` (``TensorSpec.for_shape``, as simulation and sizes do): a
    group size that does not divide the fan-in becomes the largest divisor not above it, with a note saying so."""
    resolved = spec.for_shape(shape)
    if resolved.group_size != spec.group_size and spec.granularity == "per_group":
        return resolved, (f"group size {spec.group_size} does not divide the fan-in {fan_in(shape)}: groups of "
                          f"{resolved.group_size} (the largest divisor not above {spec.group_size})")
    return resolved, None


def layer_sqnr(weights: dict[str, torch.Tensor], spec: TensorSpec, progress=None) -> list[dict]:
    """SQNR of every layer's weight under ``spec`` (layer name -> weight, in model order):
    rows ``{"name", "sqnr_db", "granularity", "note", "sampled"}``; ``progress(fraction)`` after each layer."""
    rows = []
    for i, (name, w) in enumerate(weights.items()):
        x, sample_note = analysed_weight(w)
        s, note = spec_for_layer(spec, tuple(x.shape))
        rows.append({"name": name, "sqnr_db": sqnr_db(fake_quantize(x, s), x), "granularity": s.granularity,
                     "note": note, "sampled": sample_note is not None})
        if progress:
            progress((i + 1) / len(weights))
    return rows


def weight_report(w: torch.Tensor, spec: TensorSpec, bins: int = 120) -> dict:
    """Everything the Weights page shows for one layer's weight ``w`` under ``spec``.

    ``{"numel", "note" (sampling) , "fallback" (granularity), "spec" (as applied, dict),
    "hist": (counts, edges) of w, "ranges": {method: (lo, hi)} per tensor (empty for a plain cast),
    "grid": ``grid`` of the per-tensor spec, "sqnr_db", "clipped_fraction", "max_abs_error" (of the
    spec as applied), "error_hist": (counts, edges) of w' - w, "sqnr_per_tensor", "sqnr_per_channel",
    "channels": ``channel_ranges``}``.
    """
    x, note = analysed_weight(w)
    s, fallback = spec_for_layer(spec, tuple(x.shape))
    ranges = method_ranges(x, s) if s.fmt.uses_range(s.scaled) else {}
    lo, hi = ranges.get(s.range, (None, None))
    per_tensor = replace(s, granularity="per_tensor")
    chosen = weight_error(x, s, lo, hi) if s.granularity == "per_tensor" else weight_error(x, s)
    m = max(chosen["max_abs_error"], 1e-30)
    return {"numel": x.numel(), "note": note, "fallback": fallback, "spec": s.to_dict(),
            "hist": histogram(x, bins), "ranges": ranges, "grid": grid(x, per_tensor, lo, hi),
            **{k: chosen[k] for k in ("sqnr_db", "clipped_fraction", "max_abs_error")},
            "error_hist": histogram(chosen["error"], 101, -m, m),
            "sqnr_per_tensor": weight_error(x, per_tensor, lo, hi)["sqnr_db"],
            "sqnr_per_channel": weight_error(x, replace(s, granularity="per_channel", axis=0))["sqnr_db"],
            "channels": channel_ranges(x)}


# ---- Activations page -------------------------------------------------------------------------
ACTIVATION_METHODS = (*RANGE_METHODS, "moving_average")


def activation_ranges(stats: ActivationStats, spec: TensorSpec) -> list[dict]:
    """For every static range method: the calibrated range of a layer's input under ``spec``.

    Rows ``{"range", "lo", "hi", "step", "clipped_fraction"}``: ``step`` is the spacing of the grid
    (the scale of int formats; None for float formats), ``clipped_fraction`` the share of
    calibration values outside [lo, hi] (counted on the calibration histogram's bins).
    """
    e = stats.edges
    centers = (e[1:] + e[:-1]) / 2
    total = float(stats.hist.sum()) or 1.0
    rows = []
    for method in ACTIVATION_METHODS:
        s = replace(spec, range=method)
        lo, hi = stats.static_range(s.fmt, s)
        _, scale, _ = s.fmt.encode(torch.zeros(1, 1), torch.tensor([lo]), torch.tensor([hi]), s.symmetric, s.scaled)
        outside = float(stats.hist[(centers < lo) | (centers > hi)].sum()) / total
        rows.append({"range": method, "lo": lo, "hi": hi,
                     "step": float(scale[0]) if scale is not None and s.fmt.step_is_scale else None,
                     "clipped_fraction": outside})
    return rows


def rebin(counts: torch.Tensor, edges: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every ``factor`` adjacent bins (counts (B,), edges (B+1,); B divisible by factor)."""
    return counts.reshape(-1, factor).sum(1), edges[::factor]


def outlier_channels(stats: ActivationStats) -> dict:
    """Input channels by max |x| over calibration, largest first: ``{"channel", "absmax", "median",
    "ratio"}`` -- ratio = largest / median channel (a few channels far above the rest are outliers)."""
    a = stats.channel_absmax.double()
    order = torch.argsort(a, descending=True)
    median = float(a.median())
    return {"channel": order, "absmax": a[order], "median": median,
            "ratio": float(a.max()) / median if median > 0 else 1.0}


def batch_ranges(workload, batch_size: int, progress=None) -> dict[str, list[tuple[float, float]]]:
    """Per layer, the (min, max) of its input in each batch of ``batch_size`` calibration samples:
    the ranges a dynamic quantizer would use, batch by batch (layers whose input is not floating
    point, such as token indices, get an empty list). One pass over the data on a private copy of
    the folded model, so the shared (cached) model never carries this function's hooks;
    ``progress(fraction)`` after each batch."""
    ranges: dict[str, list[tuple[float, float]]] = {name: [] for name in workload.layers}

    def record(name):
        def hook(module, args):
            x = args[0]
            if torch.is_floating_point(x) and x.numel():
                ranges[name].append((float(x.min()), float(x.max())))
        return hook

    run_with_hooks(workload.folded[0], workload.calibration.batches(batch_size),
                   pre={n: record(n) for n in workload.layers}, progress=progress)
    return ranges


def histogram(x: torch.Tensor, bins: int = 120, lo: float | None = None, hi: float | None = None):
    """Counts (bins,) and edges (bins + 1,) of ``x`` over [lo, hi] (default: its min and max);
    values outside are counted in the end bins, so counts sum to x.numel()."""
    x = x.detach().reshape(-1).double()
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    idx = ((x - lo) / (hi - lo) * bins).long().clamp(0, bins - 1)
    return torch.bincount(idx, minlength=bins).double(), edges

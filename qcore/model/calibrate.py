"""Calibration: statistics of each layer's input activations over calibration batches.

``calibrate(model, layer_names, batches)`` runs the FP32 model twice over the batches with
forward pre-hooks on the named layers (``hooks.run_with_hooks``: on a private copy each pass):

1. pass 1 records, per layer input, the running min/max, the exponential moving average of the
   per-batch min/max (averaging constant 0.01, as torch.ao's MovingAverageMinMaxObserver), the
   per-batch ranges (what a dynamic quantizer would use), and each channel's absolute max (last
   axis for Linear inputs, axis 1 for Conv inputs: outlier channels show up here);
2. pass 2 fills a ``HIST_BINS``-bin histogram over the final [min, max], so that percentile and MSE
   ranges are computed over *all* batches, not one, and a ``HIST_BINS``-bin histogram of |x| over
   [0, max |x|] for the entropy (KL) range: the histogram TensorRT's calibrator searches. (Re-binning the
   signed histogram's centres onto |x| bins instead folds two bin grids of different widths together:
   every few |x| bins comes out empty or doubled, and the KL threshold moved by up to 12 candidate steps
   from TensorRT's on a Laplace distribution.)

The result, one ``ActivationStats`` per layer, serves every static range method, so one
calibration is shared by every recipe evaluated on the same model and data. The caller's model
(often shared by every session) is only read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.numerics.formats import Format
from qcore.numerics.ranges import choose_range, entropy_threshold
from qcore.model.conv_transpose import ConvTransposeLayer
from qcore.model.hooks import run_with_hooks

HIST_BINS = 2048
EMA_CONSTANT = 0.01
CLIP_NOTE_SHARE = 0.10  # a static range removing more than this share of a layer's input energy gets a note


@dataclass
class ActivationStats:
    """Calibration statistics of one layer's input. Ranges in the activation's own units."""

    min: float = float("inf")
    max: float = float("-inf")
    ema_min: float | None = None
    ema_max: float | None = None
    batch_ranges: list[tuple[float, float]] = field(default_factory=list)  # per batch (min, max)
    channel_absmax: torch.Tensor | None = None  # (C,) max |x| per input channel
    hist: torch.Tensor | None = None  # (HIST_BINS,) counts over [min, max]
    abs_hist: torch.Tensor | None = None  # (HIST_BINS,) counts of |x| over [0, absmax]
    numel: int = 0

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.min, self.max, HIST_BINS + 1, dtype=torch.float64)

    @property
    def absmax(self) -> float:
        """The largest |x| seen, the top edge of ``abs_hist``."""
        return max(abs(self.min), abs(self.max))

    def static_range(self, fmt: Format, spec) -> tuple[float, float]:
        """The clipping range a static quantizer with ``spec`` fixes after calibration."""
        if spec.range == "minmax":
            lo, hi = self.min, self.max
        elif spec.range == "moving_average":
            lo, hi = self.ema_min, self.ema_max
        elif spec.range == "entropy":  # the KL clip t of |x|; an asymmetric range keeps the true extremes inside it
            t = float(entropy_threshold(self.abs_hist[None], torch.tensor([self.absmax]), fmt)[0])
            return (-t, t) if spec.symmetric else (max(self.min, -t), min(self.max, t))
        else:
            e = self.edges
            centers = ((e[1:] + e[:-1]) / 2).float()[None]
            lo_t, hi_t = choose_range(centers, fmt, spec, self.hist[None])
            return float(lo_t[0]), float(hi_t[0])
        if spec.symmetric:
            amax = max(abs(lo), abs(hi))
            return -amax, amax
        return lo, hi

    def clipped_energy(self, lo: float, hi: float) -> float:
        """Share in [0, 1] of the calibration inputs' energy (sum of x^2) that clipping to [lo, hi] removes:
        sum (clip(x) - x)^2 / sum x^2, over the histogram's bin centres (0 when all inputs are 0)."""
        e = self.edges
        centers = (e[1:] + e[:-1]) / 2
        energy = float((self.hist * centers**2).sum())
        if energy <= 0:
            return 0.0
        return min(1.0, float((self.hist * (centers.clamp(lo, hi) - centers) ** 2).sum()) / energy)


def entropy_clip_note(clipped: dict[str, float]) -> str | None:
    """One line when the KL (entropy) range clips more than ``CLIP_NOTE_SHARE`` of some layers' calibration
    input energy (``clipped``: layer -> ``clipped_energy`` share in [0, 1]), naming the worst three; else None."""
    heavy = sorted(((s, n) for n, s in clipped.items() if s > CLIP_NOTE_SHARE), reverse=True)
    if not heavy:
        return None
    worst = ", ".join(f"{n} {s:.0%}" for s, n in heavy[:3]) + (", ..." if len(heavy) > 3 else "")
    return (f"range entropy (KL) clips more than {CLIP_NOTE_SHARE:.0%} of the calibration input energy (sum of x²) "
            f"of {len(heavy)} of {len(clipped)} layers ({worst}): KL drops tails that can carry the output; "
            "compare with range percentile or mse")


def _channel_axis(module: nn.Module, x: torch.Tensor) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, ConvTransposeLayer)) and x.dim() > 2 else -1


def calibrate(model: nn.Module, layer_names: Iterable[str], batches: Iterable[tuple],
              progress: Callable[[float], None] | None = None) -> dict[str, ActivationStats]:
    """Input statistics of each module of ``model`` named in ``layer_names`` over ``batches`` (each a
    tuple of model inputs). Each pass runs a private copy carrying the hooks (``run_with_hooks``);
    ``model`` itself is left exactly as it was (no hooks, same mode)."""
    batches = list(batches)
    if not batches:
        raise QcoreError("no calibration data: static activation quantization needs at least one batch")
    names = list(layer_names)
    stats = {name: ActivationStats() for name in names}

    def observe(name):  # pass 1: ranges, moving averages, per-batch ranges, per-channel max |x|
        def hook(mod, args):
            x = args[0].detach().float()
            if not torch.is_floating_point(args[0]) or x.numel() == 0:
                return None
            if not torch.isfinite(x).all():
                raise QcoreError(f"the input of layer {name!r} contains NaN/Inf during calibration; check the data")
            s = stats[name]
            lo, hi = float(x.min()), float(x.max())
            s.min, s.max = min(s.min, lo), max(s.max, hi)
            s.ema_min = lo if s.ema_min is None else s.ema_min + EMA_CONSTANT * (lo - s.ema_min)
            s.ema_max = hi if s.ema_max is None else s.ema_max + EMA_CONSTANT * (hi - s.ema_max)
            s.batch_ranges.append((lo, hi))
            axis = _channel_axis(mod, x)
            ch = x.abs().movedim(axis, -1).reshape(-1, x.shape[axis]).amax(0)
            s.channel_absmax = ch if s.channel_absmax is None else torch.maximum(s.channel_absmax, ch)
            s.numel += x.numel()
            return None
        return hook

    def bin_of(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:  # HIST_BINS equal bins over [lo, hi]
        if hi - lo <= 0:
            return torch.zeros(x.numel(), dtype=torch.long)
        return ((x.reshape(-1).double() - lo) / (hi - lo) * HIST_BINS).long().clamp(0, HIST_BINS - 1)

    def count(name):  # pass 2: histograms of x over the final [min, max], of |x| over [0, max |x|]
        def hook(mod, args):
            x = args[0].detach().float()
            if not torch.is_floating_point(args[0]) or x.numel() == 0:
                return None
            s = stats[name]
            s.hist += torch.bincount(bin_of(x, s.min, s.max), minlength=HIST_BINS).double()
            s.abs_hist += torch.bincount(bin_of(x.abs(), 0.0, s.absmax), minlength=HIST_BINS).double()
            return None
        return hook

    n = len(batches)

    def overall(done: int):  # progress over both passes: pass ``done`` (0 or 1) plus the fraction of this one
        return None if progress is None else lambda f: progress((done * n + round(f * n)) / (2 * n))

    run_with_hooks(model, batches, pre={name: observe(name) for name in names}, progress=overall(0))
    for s in stats.values():
        s.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        s.abs_hist = torch.zeros(HIST_BINS, dtype=torch.float64)
    run_with_hooks(model, batches, pre={name: count(name) for name in names}, progress=overall(1))
    return stats

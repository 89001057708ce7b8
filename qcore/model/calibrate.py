"""Calibration: statistics of each layer's input activations over calibration batches.

``calibrate(model, layer_names, batches)`` runs the FP32 model twice over the batches with
forward pre-hooks on the named layers:

1. pass 1 records, per layer input, the running min/max, the exponential moving average of the
   per-batch min/max (averaging constant 0.01, as torch.ao's MovingAverageMinMaxObserver), the
   per-batch ranges (what a dynamic quantizer would use), and each channel's absolute max (last
   axis for Linear inputs, axis 1 for Conv inputs: outlier channels show up here);
2. pass 2 fills a ``HIST_BINS``-bin histogram over the final [min, max], so that percentile, MSE
   and entropy ranges are computed over *all* batches, not one.

The result, one ``ActivationStats`` per layer, serves every static range method, so one
calibration is shared by every recipe evaluated on the same model and data. The hooks go on a
private copy of the model: the caller's model (often shared by every session) is only read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.numerics.formats import Format
from qcore.numerics.ranges import choose_range
from qcore.model.simulate import temporary_hooks

HIST_BINS = 2048
EMA_CONSTANT = 0.01


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
    numel: int = 0

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.min, self.max, HIST_BINS + 1, dtype=torch.float64)

    def static_range(self, fmt: Format, spec) -> tuple[float, float]:
        """The clipping range a static quantizer with ``spec`` fixes after calibration."""
        if spec.range == "minmax":
            lo, hi = self.min, self.max
        elif spec.range == "moving_average":
            lo, hi = self.ema_min, self.ema_max
        else:
            e = self.edges
            centers = ((e[1:] + e[:-1]) / 2).float()[None]
            lo_t, hi_t = choose_range(centers, fmt, spec, self.hist[None])
            return float(lo_t[0]), float(hi_t[0])
        if spec.symmetric:
            amax = max(abs(lo), abs(hi))
            return -amax, amax
        return lo, hi


def _channel_axis(module: nn.Module, x: torch.Tensor) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d)) and x.dim() > 2 else -1


def calibrate(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[tuple],
              progress: Callable[[float], None] | None = None) -> dict[str, ActivationStats]:
    """Input statistics of each module in ``layers`` (name -> module of ``model``) over ``batches``
    (each a tuple of model inputs). A copy of the model, carrying the hooks, is run in eval mode
    under ``torch.no_grad``; ``model`` itself is left exactly as it was (no hooks, same mode)."""
    batches = list(batches)
    if not batches:
        raise QcoreError("no calibration data: static activation quantization needs at least one batch")
    model, layers = copy.deepcopy((model, layers))  # one memo: the copied layers are the copy's modules
    model.eval()
    stats = {name: ActivationStats() for name in layers}
    state = {"pass": 1}

    def hook_for(name):
        def hook(mod, args):
            x = args[0].detach().float()
            if not torch.is_floating_point(args[0]) or x.numel() == 0:
                return None
            s = stats[name]
            if state["pass"] == 1:
                if not torch.isfinite(x).all():
                    raise QcoreError(f"the input of layer {name!r} contains NaN/Inf during calibration; check the data")
                lo, hi = float(x.min()), float(x.max())
                s.min, s.max = min(s.min, lo), max(s.max, hi)
                s.ema_min = lo if s.ema_min is None else s.ema_min + EMA_CONSTANT * (lo - s.ema_min)
                s.ema_max = hi if s.ema_max is None else s.ema_max + EMA_CONSTANT * (hi - s.ema_max)
                s.batch_ranges.append((lo, hi))
                axis = _channel_axis(mod, x)
                ch = x.abs().movedim(axis, -1).reshape(-1, x.shape[axis]).amax(0)
                s.channel_absmax = ch if s.channel_absmax is None else torch.maximum(s.channel_absmax, ch)
                s.numel += x.numel()
            else:
                width = s.max - s.min
                if width <= 0:
                    idx = torch.zeros(x.numel(), dtype=torch.long)
                else:
                    idx = ((x.reshape(-1).double() - s.min) / width * HIST_BINS).long().clamp(0, HIST_BINS - 1)
                s.hist += torch.bincount(idx, minlength=HIST_BINS).double()
            return None
        return hook

    with temporary_hooks(pre=[(m, hook_for(n)) for n, m in layers.items()]), torch.no_grad():
        for p in (1, 2):
            state["pass"] = p
            if p == 2:
                for s in stats.values():
                    s.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
            for i, batch in enumerate(batches):
                model(*batch)
                if progress:
                    progress(((p - 1) * len(batches) + i + 1) / (2 * len(batches)))
    return stats

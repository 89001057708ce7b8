"""A layer's own quantization error, measured on its FP32 input: what the sensitivity sweep reports beside the
model-level numbers.

``rmse_over_step`` is the error of one quantized tensor in units of its grid step; ``LayerError`` accumulates,
over the batches (and over every call of a layer called several times), the layer's output error with its
weight and input quantized against its FP32 output on the same FP32 input, and its input's statistics.
``measuring_hook`` adds a layer's calls in an FP32 run; ``perturbed_forward`` replaces a layer's forward in a
run of the sweep's ``Runner`` so that each stacked copy of the batch gets one candidate's quantized layer.
"""

from __future__ import annotations

import math

import torch

from qcore.numerics.granularity import to_blocks
from qcore.numerics.metrics import sqnr_db_from_sums
from qcore.numerics.quantize import QuantizedTensor, check_finite
from qcore.analysis.replay import Unstackable


def rmse_over_step(qt: QuantizedTensor, x: torch.Tensor, xq: torch.Tensor | None = None) -> float | None:
    """Root-mean-square quantization error in units of the grid step: sqrt(mean(((x' - x) / step)^2)).

    Rounding to a uniform grid without clipping gives 1/sqrt(12) ~= 0.289; clipping pushes it up.
    The step is the block's scale for integer grids and, for float and codebook grids, the mean
    spacing to the neighbours of the value x' lands on. None for fp32 (no grid). Computed in float32 on
    this one tensor (an 11.7M-entry embedding table is not copied to float64): within 1e-5 relative of float64.
    ``xq``: ``qt.dequantize()`` when the caller has it already (not computed twice).
    """
    s = qt.spec
    fmt = s.fmt
    if not fmt.quantizes or x.numel() == 0:
        return None
    xb = to_blocks(x.detach().float(), s.granularity, s.axis, s.group_size)
    qb = to_blocks(qt.dequantize() if xq is None else xq, s.granularity, s.axis, s.group_size)
    scale = qt.scale[:, None] if qt.scale is not None else torch.ones(1, 1)
    if fmt.step_is_scale:
        step = scale
    else:
        grid = fmt.values().float()
        if fmt.codebook:  # the codes are the indices of the grid values x' is on (NF4)
            i = to_blocks(qt.codes, s.granularity, s.axis, s.group_size).long()
        else:  # float formats: find x' on the grid
            i = torch.bucketize(qb / scale, (grid[1:] + grid[:-1]) / 2)
        j = torch.arange(len(grid))  # each grid value's mean spacing to its neighbours, then looked up per element
        lower, upper = grid[(j - 1).clamp(min=0)], grid[(j + 1).clamp(max=len(grid) - 1)]
        step = ((upper - lower) / ((j > 0).float() + (j < len(grid) - 1).float()))[i] * scale
    return float(((qb - xb) / step).square().mean().sqrt())  # float32 (torch sums in cascade: ~1e-6 relative)


class LayerError:
    """Accumulates, over calls, one layer's output error under one candidate and its input's statistics.

    ``weight``: the candidate's dequantized weight (None: FP32); ``aq``: its input quantizer
    (``simulate.InputQuantizer`` or None); ``int8``: the weight-only int8-compute input hook (or None), applied
    after ``aq`` as the simulation does."""

    def __init__(self, weight: torch.Tensor | None, aq, int8):
        self.weight, self.aq, self.int8 = weight, aq, int8
        self.signal = self.noise = 0.0
        self.input_sq = self.input_clipped = self.input_n = 0.0

    def add(self, module, forward, args, kwargs, output, fp32_weight: torch.Tensor) -> torch.Tensor:
        """Recompute ``module`` (its computation: ``forward``) quantized on the FP32 ``args`` of a call whose FP32
        result was ``output``; returns the quantized result."""
        x = args[0]
        if self.aq is not None and torch.is_floating_point(x):
            check_finite(x, f"the input of layer {self.aq.name!r}")
            qx = self.aq.quantize(x)
            xq = qx.dequantize()
            r = rmse_over_step(qx, x, xq)
            self.input_sq += (r or 0.0) ** 2 * x.numel()
            self.input_clipped += qx.clipped_fraction(x) * x.numel()
            self.input_n += x.numel()
            args = (xq.to(x.dtype),) + tuple(args[1:])
        if self.int8 is not None:
            args = self.int8(module, args) or args
        if self.weight is not None:
            module.weight.copy_(self.weight)
        try:
            yq = forward(*args, **kwargs)
        finally:
            if self.weight is not None:
                module.weight.copy_(fp32_weight)
        y = output.double()
        self.signal += float((y ** 2).sum())
        self.noise += float(((yq.double() - y) ** 2).sum())
        return yq

    def row(self) -> dict:
        n = self.input_n
        return {"layer_sqnr_db": sqnr_db_from_sums(self.signal, self.noise),
                "input_rmse_over_step": math.sqrt(self.input_sq / n) if n else None,
                "input_clipped_fraction": self.input_clipped / n if n else None}


def measuring_hook(errors: list[LayerError], fp32_weight):
    """A forward hook (with kwargs) adding each call of the FP32 layer to every ``LayerError`` of ``errors``."""
    def hook(module, args, kwargs, output):
        for e in errors:
            e.add(module, module.forward, args, kwargs, output, fp32_weight)
    return hook


def perturbed_forward(runner, name: str, errors: list[LayerError]):
    """A forward for layer ``name`` in a run with ``len(errors)`` copies of each batch: copy i computes the layer
    quantized as ``errors[i]`` says, on its own input, and adds the call to ``errors[i]``'s statistics. In view
    "only" the copies' inputs are the same FP32 tensor (nothing before the layer is quantized), so the FP32
    output is computed once; a layer called again in the same forward (a loop, a shared block) gets each copy's
    own input, which its earlier quantized call changed."""
    module = runner.layers[name]
    forward, fp32_weight = module.forward, runner.fp32_weights[name]  # before the run replaces it

    def perturbed(x, *args, **kwargs):
        k, b = len(errors), runner.batch_size
        if k > 1 and (x.dim() == 0 or x.shape[0] != k * b):
            raise Unstackable(f"layer {name!r} got an input of shape {tuple(x.shape)} for {k} x {b} samples")
        outputs, first = [], None
        for e, chunk in zip(errors, x.split(b) if k > 1 else [x]):
            if first is None or not torch.equal(chunk, first):
                first, y = chunk, forward(chunk, *args, **kwargs)
            outputs.append(e.add(module, forward, (chunk, *args), kwargs, y, fp32_weight))
        if k > 1 and any(not torch.is_tensor(o) or o.dim() == 0 or o.shape[0] != b for o in outputs):
            raise Unstackable(f"layer {name!r} returns an output whose dim 0 is not the batch")
        return torch.cat(outputs) if k > 1 else outputs[0]
    return perturbed

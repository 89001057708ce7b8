"""AdaRound: learn, for every weight, whether to round down or up (Nagel, Amjad, van Baalen, Louizos,
Blankevoort 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

On the grid rounding to nearest uses (same blocks, ranges, scales and zero-points: ``grid``), each weight
is ``floor(w / s) + h`` codes with ``h`` in [0, 1] a rectified sigmoid of a learned ``V``:

    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),      zeta = 1.1, gamma = -0.1

Objective, per layer, over calibration input rows X (N, in):

    min over V   mean((X W^T - X W~(V)^T)^2) / mean((X W^T)^2)  +  reg * sum over weights of (1 - |2 h(V) - 1| ^ beta)

The reconstruction term is AIMET's output MSE divided by the float output's mean square, so it is scale-free
and ``reg`` weighs the same for every layer whatever the size of its outputs.

The regulariser pushes every ``h`` to exactly 0 or 1; ``beta`` anneals from 20 to 2 over the iterations
after a warm-up (the first 20 % without it), as the paper and AIMET do. ``V`` starts where ``h`` equals the
fractional part of ``w / s`` (so the start is the float weight itself), it is optimised with Adam
(lr 1e-2) on mini-batches of X, and the result is the hard rounding ``h >= 0.5``. Codes are clamped
to the grid's range as rounding to nearest clamps them.

The loss is the layer's own output (before any activation function) with float inputs. Conv weights
are flattened to (C_out, C_in*kh*kw) and their inputs unfolded (``F.unfold``) to match (the caller's
job: ``qcore.model.rounding``). At the end the result is compared with rounding to nearest on the same
X and the better of the two is returned, so AdaRound never makes a layer's output error worse.
"""

from __future__ import annotations

from typing import Callable

import torch

from qcore.algorithms.grid import nearest_grid
from qcore.numerics.granularity import fan_in
from qcore.numerics.quantize import QuantizedTensor, check_finite
from qcore.numerics.spec import TensorSpec

ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2
LEARNING_RATE = 1e-2
BATCH_ROWS = 1024  # input rows per optimisation step


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def adaround(weight: torch.Tensor, inputs: torch.Tensor, spec: TensorSpec, iters: int = 500, reg: float = 0.01,
             seed: int = 0, should_stop: Callable[[], bool] | None = None) -> QuantizedTensor:
    """``weight`` (out, in) -- or (C_out, C_in, k...) read as (C_out, C_in*k...) -- quantized by AdaRound under
    ``spec`` (an integer format), learning from ``inputs`` (N, in): the layer's input rows on calibration
    data. ``iters`` Adam steps, ``reg`` the rounding regulariser's weight, ``seed`` fixes the mini-batch
    order. ``should_stop()`` true ends the optimisation early (the rounding learned so far is used)."""
    shape = tuple(weight.shape)
    grid = nearest_grid(weight, spec)
    out, n = shape[0], fan_in(shape)
    W = weight.detach().float().reshape(out, n)
    X = inputs.detach().float().reshape(-1, n)
    check_finite(X, "the layer's inputs")
    nearest = grid.codes(W)
    if X.shape[0] == 0 or iters <= 0:
        return grid.result(nearest)

    scaled = (W.double() / grid.s.double()).float()  # w / s in code units
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    V = torch.log((rest - GAMMA) / (ZETA - rest)).requires_grad_(True)  # h(V) = rest: the float weight
    optimizer = torch.optim.Adam([V], lr=LEARNING_RATE)
    target = X @ W.T  # (N, out): the float layer's output
    energy = max(float(target.pow(2).mean()), torch.finfo(torch.float32).tiny)
    generator = torch.Generator().manual_seed(seed)
    warmup = int(WARMUP * iters)

    def soft_weight(h):
        codes = torch.clamp(floor + h + grid.z, grid.qmin, grid.qmax)
        return (codes - grid.z) * grid.s

    for step in range(iters):
        if should_stop and should_stop():
            break
        rows = torch.randint(0, X.shape[0], (min(BATCH_ROWS, X.shape[0]),), generator=generator)
        h = _h(V)
        recon = (X[rows] @ soft_weight(h).T - target[rows]).pow(2).mean() / energy
        loss = recon
        if step >= warmup:
            progress = (step - warmup) / max(1, iters - warmup)
            beta = BETA_END + (BETA_START - BETA_END) * (1 - progress)
            loss = recon + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        learned = torch.clamp(floor + (_h(V) >= 0.5).float() + grid.z, grid.qmin, grid.qmax)
        error = lambda codes: float((X @ grid.value(codes).T - target).pow(2).sum())  # noqa: E731
        best = learned if error(learned) <= error(nearest) else nearest
    return grid.result(best)

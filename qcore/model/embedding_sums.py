"""Embedding tables added into one input (BERT's word + position + token type): which they are, how often each
row is read on the calibration data, and how much the model's output feels an error in their sum -- what
``qcore.algorithms.embedding_feedback`` rounds them with (``"gptq": {"embeddings": true}``, ``qcore.model.rounding``).
Give ``summed_embeddings`` and ``lookup_counts`` a private copy of the model: they register hooks on it
(``output_metric`` copies it itself).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qcore.model.hooks import temporary_hooks
from qcore.model.real_rows import real_mask, real_part


def summed_embeddings(model: nn.Module, names: list[str], batch: tuple) -> list[tuple[str, ...]]:
    """Groups (two or more) of the Embedding layers ``names`` whose outputs are added into one tensor, each
    ordered by rows (fewest first). Found by probing ``model`` on ``batch``: one constant vector added to the
    output of each table in turn -- two tables feed one sum when the model's output moves the same way for both
    (to 1e-3 of the move), and a table whose output does not move the model is in no group."""
    modules = dict(model.named_modules())
    dims = {n: modules[n].weight.shape[1] for n in names}
    delta = {d: 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(0)) for d in set(dims.values())}

    def run(shifted: str | None) -> torch.Tensor:
        hook = [(modules[shifted], lambda m, a, out: out + delta[dims[shifted]])] if shifted else []
        with temporary_hooks(post=hook), torch.no_grad():
            out = model(*batch)
        return (out[0] if isinstance(out, (tuple, list)) else out).detach().double()

    base = run(None)
    moved = {n: run(n) for n in names}
    groups: list[list[str]] = []
    for n in names:
        change = float((moved[n] - base).norm())
        if change == 0:
            continue
        g = next((g for g in groups if dims[g[0]] == dims[n] and float((moved[g[0]] - moved[n]).norm()) <= 1e-3 * change), None)
        g.append(n) if g is not None else groups.append([n])
    return [tuple(sorted(g, key=lambda n: modules[n].weight.shape[0])) for g in groups if len(g) > 1]


def lookup_counts(model: nn.Module, names: list[str], batches: list[tuple],
                  real_rows: int | None = None) -> dict[str, torch.Tensor]:
    """How often each row of the Embedding layers ``names`` is read over ``batches`` (at real positions only,
    given ``real_rows``; an index tensor broadcast over the batch counts once per sample): name -> (rows,) float64."""
    modules = dict(model.named_modules())
    counts = {n: torch.zeros(modules[n].weight.shape[0], dtype=torch.float64) for n in names}
    now: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name):
        def record(module, args):
            idx = real_part(args[0], now["mask"], 0)
            counts[name] += torch.bincount(idx.reshape(-1), minlength=len(counts[name])).double()
        return record

    with temporary_hooks(pre=[(modules[n], hook(n)) for n in names]), torch.no_grad():
        for batch in batches:
            now["mask"] = real_mask(batch, real_rows)
            model(*batch)
    return counts


OUTPUT_DIRECTIONS = 32  # output directions per batch for ``output_metric``'s estimate
MAX_GRAD_ELEMENTS = 2**24  # directions per backward pass: at most this many output or gradient values (64 MB)


def output_metric(model: nn.Module, table: str, batches: list[tuple]) -> torch.Tensor | None:
    """M = sum over the calibration positions of J^T J (dim, dim) float64, J the Jacobian of the model's output
    (its first tensor) with respect to the output of Embedding ``table`` at that position -- for a table in a sum,
    the Jacobian with respect to the sum. Exact (the output's unit vectors) when a sample's output has at most
    ``OUTPUT_DIRECTIONS`` values, else estimated from that many random Gaussian directions v per batch
    (E[v v^T] = I; seeded). Padded positions do not move the output, so they add nothing. None when the output
    cannot be differentiated (an integer output)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    module = dict(model.named_modules())[table]
    seen, dim = {}, module.weight.shape[1]
    metric = torch.zeros(dim, dim, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)

    def leaf(mod, args, out):
        seen["x"] = out.detach().requires_grad_(True)
        return seen["x"]

    with temporary_hooks(post=[(module, leaf)]), torch.enable_grad():
        for batch in batches:
            out = model(*batch)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not out.is_floating_point() or not out.requires_grad:
                return None
            per_sample = out[0].numel()
            exact = per_sample <= OUTPUT_DIRECTIONS  # every unit vector of one sample's output, all samples at once
            n = per_sample if exact else OUTPUT_DIRECTIONS
            chunk = max(1, MAX_GRAD_ELEMENTS // max(out.numel(), seen["x"].numel()))  # directions per backward
            for k0 in range(0, n, chunk):
                k = min(chunk, n - k0)
                if exact:
                    v = torch.eye(per_sample)[k0:k0 + k].reshape(k, 1, *out.shape[1:]).expand(k, *out.shape)
                else:
                    v = torch.randn(k, *out.shape, generator=generator)
                grads, = torch.autograd.grad(out, seen["x"], grad_outputs=v.contiguous(), is_grads_batched=True,
                                             retain_graph=k0 + k < n)
                g = grads.reshape(-1, dim).double()
                metric += g.T @ g / (1 if exact else OUTPUT_DIRECTIONS)
    return metric

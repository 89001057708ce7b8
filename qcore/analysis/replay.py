"""The sensitivity sweep's working copy: one model changed in place, layer by layer, and replaying
the unaffected prefix of the network instead of recomputing it.

``Runner`` holds a private copy of the workload's BatchNorm-folded FP32 model (the workload's own is
shared and only read); ``set_layer`` swaps one layer's weight and input hooks in and out, and
``run`` evaluates the batches, optionally recording module outputs or replaying recorded ones, and
optionally with every batch stacked several times along dim 0 (``copies``: one run computes several
perturbations of one layer, each on its own copy of the batch).
``call_order`` and ``replay_set`` find which modules finish before a layer starts: their outputs
do not depend on that layer, so a run perturbing it can replay them.
"""

from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree

from qcore.model.hooks import run_with_hooks, temporary_hooks
from qcore.model.simulate import modules_by_name
from qcore.model.workload import Workload


def call_order(model, layers, batch) -> tuple[dict[str, tuple[int, int]], set[str], float]:
    """Run ``batch`` once recording, per module name, (first start, last end) event numbers, the names
    called exactly once, and the Linear/Conv multiply-add FLOPs per sample."""
    events, spans, calls, flops = [0], {}, {}, [0.0]

    def pre(name):
        def hook(module, args):
            events[0] += 1
            calls[name] = calls.get(name, 0) + 1
            spans.setdefault(name, [events[0], None])
        return hook

    def post(name):
        def hook(module, args, output):
            events[0] += 1
            spans[name][1] = events[0]
            if layers.get(name) is not None and layers[name].kind != "Embedding" and torch.is_tensor(output):
                flops[0] += 2.0 * module.weight.numel() * output.numel() / module.weight.shape[0]
        return hook

    names = [n for n, _ in model.named_modules() if n]
    run_with_hooks(model, [batch], pre={n: pre(n) for n in names}, post={n: post(n) for n in names})
    order = {n: (s, e) for n, (s, e) in spans.items() if e is not None}
    return order, {n for n, c in calls.items() if c == 1}, flops[0] / max(len(batch[0]), 1)


def replay_set(model, target: str, order, once: set[str]) -> list[str]:
    """The largest modules whose every call ends before ``target`` starts: their outputs do not depend
    on ``target``, so a run perturbing ``target`` can replay them. The walk descends into modules that
    contain ``target``, are called several times, and into containers never called themselves (an
    ``nn.ModuleList`` of blocks its parent loops over, an ONNX graph's dotted module paths): for a layer in
    block k of minilm-l6, blocks 0..k-1 are replayed. Modules holding a tensor that shares storage with the
    target's weight (tied weights) are recomputed."""
    start = order[target][0]
    modules = dict(model.named_modules(remove_duplicate=False))
    tied = tied_modules(model, target)
    keep = {n for n in modules if n and any(t == n or t.startswith(n + ".") for t in tied)}
    found = []

    def visit(prefix, module):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if name == target:
                continue
            if name not in order:  # never called itself (an nn.ModuleList, a plain container): its parent
                visit(name, child)  # calls its children, which may be replayable
            elif target.startswith(name + ".") or name in keep or name not in once:
                if order[name][0] < start:
                    visit(name, child)
            elif order[name][1] < start and "forward" not in child.__dict__:
                found.append(name)

    visit("", model)
    return found


def tied_modules(model, target: str) -> set[str]:
    """The other modules holding a tensor that shares storage with ``target``'s weight (tied weights)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    ptr = modules[target].weight.data_ptr()
    return {n for n, m in modules.items() if n != target and any(
        p is not None and p.data_ptr() == ptr for p in list(m._parameters.values()) + list(m._buffers.values()))}


class Unstackable(Exception):
    """A stacked run met a tensor whose dim 0 is not the batch (a broadcast position table, a sequence-first
    tensor): the caller runs the copies one at a time instead."""


def stacked(t, copies: int, batch_size: int):
    """Tensor ``t`` of one batch (dim 0 = ``batch_size``) repeated ``copies`` times along dim 0 (1: a clone)."""
    if not torch.is_tensor(t):
        return t
    if copies == 1:
        return t.detach().clone()
    if t.dim() == 0 or t.shape[0] != batch_size:
        raise Unstackable(f"a tensor of shape {tuple(t.shape)} in a batch of {batch_size}")
    return t.detach().repeat(copies, *[1] * (t.dim() - 1))


class Runner:
    """A private working copy of the folded FP32 model (the workload's own is shared and only read);
    layers of the copy are switched to quantized in place."""

    def __init__(self, workload: Workload):
        fp32 = workload.folded[0]
        self.model = copy.deepcopy(fp32).eval()
        self.fp32_weights = {n: m.weight for n, m in modules_by_name(fp32, workload.layers).items()}
        self.layers = modules_by_name(self.model, workload.layers)
        self.input_hooks: dict[str, tuple] = {}  # layer -> forward pre-hooks in order, added for each run
        self.batches: list[tuple] = []
        self.batch = self.batch_size = 0  # the batch being run (index, samples in it)

    def set_layer(self, name: str, weight: torch.Tensor | None = None, pre: tuple = ()) -> None:
        """Layer ``name`` computes with ``weight`` (None: its FP32 weight) and the input pre-hooks ``pre``."""
        with torch.no_grad():
            self.layers[name].weight.copy_(self.fp32_weights[name] if weight is None else weight)
        self.input_hooks.pop(name, None)
        if pre:
            self.input_hooks[name] = tuple(pre)

    def run(self, replay: dict[str, list] | None = None, record=(), layer_hooks=None, copies: int = 1,
            forwards=None):
        """Model outputs over the batches, concatenated, and the recorded outputs of ``record`` modules
        (name -> one per batch). ``replay`` modules return their recorded outputs instead of computing.
        ``layer_hooks``: layer -> forward hook with keyword arguments; ``forwards``: module -> a function
        replacing its forward for this run. ``copies`` > 1: every batch (and every replayed output) is
        stacked ``copies`` times along dim 0 and the outputs are a list of ``copies`` tensors, one per copy;
        ``Unstackable`` if a model input, replayed tensor or output does not have the batch in dim 0."""
        recorded = {n: [] for n in record}
        recorders = [(self.model.get_submodule(n), lambda m, a, out, n=n: recorded[n].append(stacked(out, 1, 0)))
                     for n in record]
        inputs = [(self.layers[n], h) for n, hooks in self.input_hooks.items() for h in hooks]
        errors = [(self.layers[n], h) for n, h in (layer_hooks or {}).items()]
        replaced = {name: lambda *a, _outs=outputs, **k: pytree.tree_map_only(
            torch.Tensor, lambda t: stacked(t, copies, self.batch_size), _outs[self.batch])
            for name, outputs in (replay or {}).items()}
        replaced.update(forwards or {})
        for name, forward in replaced.items():
            self.model.get_submodule(name).forward = forward
        try:
            outs = []
            with temporary_hooks(pre=inputs, post=recorders, post_kwargs=errors), torch.no_grad():
                for self.batch, b in enumerate(self.batches):
                    self.batch_size = len(b[0])
                    out = self.model(*(stacked(t, copies, self.batch_size) if copies > 1 else t for t in b)).float()
                    if copies > 1 and (out.dim() == 0 or out.shape[0] != copies * self.batch_size):
                        raise Unstackable(f"an output of shape {tuple(out.shape)} for {copies} x {self.batch_size} samples")
                    outs.append(out)
        finally:
            for name in replaced:
                del self.model.get_submodule(name).forward
        if copies == 1:
            return torch.cat(outs), recorded
        return [torch.cat([o.chunk(copies)[i] for o in outs]) for i in range(copies)], recorded

"""The sensitivity sweep's working copy: one model changed in place, layer by layer, and replaying
the unaffected prefix of the network instead of recomputing it.

``Runner`` holds a private copy of the workload's BatchNorm-folded FP32 model (the workload's own is
shared and only read); ``set_layer`` swaps one layer's weight and input quantizer in and out, and
``run`` evaluates the batches, optionally recording module outputs or replaying recorded ones.
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
    ptr = modules[target].weight.data_ptr()
    tied = {n for n, m in modules.items() if n != target and any(
        p is not None and p.data_ptr() == ptr for p in list(m._parameters.values()) + list(m._buffers.values()))}
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


def _clone(output):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), output)


class Runner:
    """A private working copy of the folded FP32 model (the workload's own is shared and only read);
    layers of the copy are switched to quantized in place."""

    def __init__(self, workload: Workload):
        fp32 = workload.folded[0]
        self.model = copy.deepcopy(fp32).eval()
        self.fp32_weights = {n: m.weight for n, m in modules_by_name(fp32, workload.layers).items()}
        self.layers = modules_by_name(self.model, workload.layers)
        self.input_quantizers: dict[str, object] = {}  # layer -> forward pre-hook, added for each run
        self.batches: list[tuple] = []
        self.batch = 0

    def set_layer(self, name: str, weight: torch.Tensor | None = None, aq=None) -> None:
        """Layer ``name`` computes with ``weight`` (None: its FP32 weight) and input quantizer ``aq``."""
        with torch.no_grad():
            self.layers[name].weight.copy_(self.fp32_weights[name] if weight is None else weight)
        self.input_quantizers.pop(name, None)
        if aq is not None:
            self.input_quantizers[name] = aq

    def run(self, replay: dict[str, list] | None = None, record=(), layer_hooks=None):
        """Model outputs over the batches, concatenated, and the recorded outputs of ``record`` modules
        (name -> one per batch). ``replay`` modules return their recorded outputs instead of computing.
        ``layer_hooks``: layer -> forward hook with keyword arguments."""
        recorded = {n: [] for n in record}
        recorders = [(self.model.get_submodule(n), lambda m, a, out, n=n: recorded[n].append(_clone(out)))
                     for n in record]
        inputs = [(self.layers[n], aq) for n, aq in self.input_quantizers.items()]
        errors = [(self.layers[n], h) for n, h in (layer_hooks or {}).items()]
        for name, outputs in (replay or {}).items():
            self.model.get_submodule(name).forward = lambda *a, _outs=outputs, **k: _clone(_outs[self.batch])
        try:
            outs = []
            with temporary_hooks(pre=inputs, post=recorders, post_kwargs=errors), torch.no_grad():
                for self.batch, b in enumerate(self.batches):
                    outs.append(self.model(*b).float())
        finally:
            for name in replay or {}:
                del self.model.get_submodule(name).forward
        return torch.cat(outs), recorded

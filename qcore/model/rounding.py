"""Weight rounding on a model: what each layer saw on the calibration data, and its rounded weight.

A weight spec with ``"rounding": "gptq"`` or ``"adaround"`` (``TensorSpec.rounding``) is quantized by
``qcore.algorithms`` from the layer's inputs over the calibration data, collected here with forward
pre-hooks (``hooks.temporary_hooks``) on a private copy of the float model being simulated (the
BatchNorm-folded model; every layer sees FP32 inputs, all layers are collected in one pass):

- GPTQ needs ``H = sum x x^T`` over the input rows (float64, (in, in));
- AdaRound needs the input rows themselves: at most ``MAX_SAMPLE_ROWS`` of them, evenly spaced.

Input rows: a Linear's input ``(..., in)`` read as ``(-1, in)``; a Conv's input padded as the layer pads
it and unfolded (``F.unfold``) into one row of ``C_in*kh*kw`` values per output position, matching the
weight flattened to ``(C_out, C_in*kh*kw)``. Rounding applies to Linear and ungrouped Conv1d/Conv2d
layers (``roundable``). A recipe's *default* rounding applies to those and leaves every other layer (an
Embedding, a grouped conv, a recurrent matrix) rounded to nearest (``rounding_specs``); a layer entry
asking for gptq/adaround on such a layer is a one-line ``QcoreError`` naming it.

``"gptq": {"embeddings": true}`` also rounds the Embedding tables that are added into one input (``applies``):
``embedding_sums.summed_embeddings`` probes which (once per ``Rounder``), ``lookup_counts`` counts each row's
reads on the calibration data, ``output_metric`` measures M = E[J^T J] of the sum (J: the model output's Jacobian with
respect to it), and ``algorithms.embedding_feedback`` rounds each sum's tables in turn, their rows by GPTQ under
M; a table in no sum rounds to nearest.

Padding: with ``Data.real_rows`` (the input that marks each sample's real positions, an attention mask), a
Linear's input rows and the embedding lookups at padded positions are left out (``real_part``): the model
discards what it computes there, and GPTQ would otherwise fit it (``qcore.model.real_rows``).

``Rounder`` caches both per workload: the inputs by layer, the rounded weights by (layer, spec), so a
sweep or a search that tries one spec on many recipes computes each rounding once.

``"gptq": {"sequential": true}`` (GPTQ's reference quantizes a transformer block by block, each from the
outputs of the blocks already quantized): the layers with it are rounded in the order the model runs them,
each from inputs collected on a copy of the float model whose earlier sequential layers already hold their
rounded weights -- so a layer's rounding also corrects the error the layers before it made. Other layers
(nearest, not sequential) stay float in that copy. A sequential rounding is cached by (layer, spec, the
sequential layers before it and their specs).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qcore.algorithms.adaround import adaround
from qcore.algorithms.embedding_feedback import quantize_summed
from qcore.algorithms.gptq import gptq_quantize
from qcore.errors import QcoreError
from qcore.model.embedding_sums import lookup_counts, output_metric, summed_embeddings
from qcore.model.hooks import temporary_hooks
from qcore.model.real_rows import real_mask, real_part
from qcore.numerics.quantize import QuantizedTensor
from qcore.numerics.spec import TensorSpec

MAX_SAMPLE_ROWS = 4096  # input rows kept per layer for AdaRound


class RoundingCancelled(QcoreError):
    """``should_stop()`` was true while weights were being rounded; nothing partial is cached."""


@dataclass
class LayerInputs:
    """What one layer saw on the calibration data: ``hessian`` (in, in) float64 = sum of x x^T over its
    ``rows`` input rows, and ``samples`` (<= MAX_SAMPLE_ROWS, in) float32 of those rows (None if not kept)."""

    hessian: torch.Tensor
    rows: int
    samples: torch.Tensor | None


def roundable(module: nn.Module, kind: str) -> bool:
    """Whether GPTQ/AdaRound apply to this layer: a Linear or an ungrouped Conv1d/Conv2d."""
    return kind == "Linear" or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1)


def applies(module: nn.Module, kind: str, spec: TensorSpec) -> bool:
    """Whether ``spec``'s rounding applies to this layer: ``roundable``, or an Embedding under GPTQ with
    ``"embeddings": true`` (error feedback across the summed tables, ``embedding_feedback``)."""
    return roundable(module, kind) or (kind == "Embedding" and spec.rounding == "gptq" and spec.gptq.embeddings)


def rounding_specs(recipe, plans: Mapping, kinds: Mapping[str, str], modules: Mapping[str, nn.Module]) -> dict:
    """Layer -> weight spec for every layer ``recipe`` (resolved to ``plans``) rounds by GPTQ/AdaRound: a default
    rounding skips the layers it does not apply to (they round to nearest); a layer's own entry asking for it on
    such a layer raises ``check_roundable_layer``'s error."""
    specs = {}
    for n, plan in plans.items():
        w = plan.weights
        if w is None or w.rounding == "nearest":
            continue
        entry = recipe.layers.get(n)
        written = getattr(entry, "weights", None)
        if applies(modules[n], kinds[n], w) or (isinstance(written, Mapping) and "rounding" in written):
            check_roundable_layer(n, modules[n], kinds[n], w)
            specs[n] = w
    return specs


def check_roundable_layer(name: str, module: nn.Module, kind: str, spec: TensorSpec) -> None:
    """A one-line QcoreError unless ``spec``'s rounding applies to ``module`` (``applies``)."""
    if not applies(module, kind, spec):
        what = f"a grouped {kind}" if isinstance(module, (nn.Conv1d, nn.Conv2d)) else f"an {kind}" \
            if kind[0] in "AEIOU" else f"a {kind}"
        also = ', or gptq with "embeddings": true' * (kind == "Embedding" and spec.rounding == "gptq")
        raise QcoreError(f"layer {name!r} is {what}: rounding {spec.rounding} applies to Linear and ungrouped Conv "
                         f"layers (a weight multiplied with the layer's input); use rounding nearest for this layer{also}")


def input_rows(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's input ``x`` as rows (n, fan_in) matching its weight flattened to (out, fan_in)."""
    x = x.detach().float()
    if kind == "Linear":
        return x.reshape(-1, module.weight.shape[1])
    pad = module._reversed_padding_repeated_twice  # how the conv pads its input, whatever ``padding`` says
    x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        stride=(1, module.stride[0]))
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N * positions, C_in*kh*kw)


def collect_inputs(model: nn.Module, kinds: Mapping[str, str], batches: list[tuple], samples: set[str],
                   progress: Callable[[float], None] | None = None, real_rows: int | None = None) -> dict[str, LayerInputs]:
    """``LayerInputs`` of each layer of ``kinds`` (name -> kind) over ``batches``, from one pass through a
    private copy of ``model``; input rows are kept for the layers in ``samples``. With ``real_rows`` (the input
    marking each sample's real positions, ``Data.real_rows``), a Linear's input rows at padded positions are
    left out."""
    private = copy.deepcopy(model).eval()
    modules = dict(private.named_modules())
    per_batch = max(1, -(-MAX_SAMPLE_ROWS // max(1, len(batches))))  # rows kept from each batch
    acc: dict[str, list] = {n: [None, 0, []] for n in kinds}
    now: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name):
        def record(module, args):
            x = real_part(args[0], now["mask"], 1) if kinds[name] == "Linear" else args[0]
            rows = input_rows(module, kinds[name], x)
            entry = acc[name]
            gram = (rows.T @ rows).double()
            entry[0] = gram if entry[0] is None else entry[0].add_(gram)  # summed in place
            entry[1] += rows.shape[0]
            if name in samples and rows.shape[0]:
                keep = torch.linspace(0, rows.shape[0] - 1, min(per_batch, rows.shape[0])).round().long()
                entry[2].append(rows[keep])
        return record

    with temporary_hooks(pre=[(modules[n], hook(n)) for n in kinds]), torch.no_grad():
        for i, batch in enumerate(batches):
            now["mask"] = real_mask(batch, real_rows)
            private(*batch)
            if progress:
                progress((i + 1) / len(batches))
    found = {}
    for n, (gram, rows, kept) in acc.items():
        fan_in = modules[n].weight[0].numel()
        found[n] = LayerInputs(torch.zeros(fan_in, fan_in, dtype=torch.float64) if gram is None else gram, rows,
                               torch.cat(kept)[:MAX_SAMPLE_ROWS] if kept else None)
    return found


def execution_order(model: nn.Module, names: list[str], batch: tuple) -> list[str]:
    """``names`` in the order ``model`` first calls them on ``batch`` (layers never called: last, as given)."""
    modules, seen = dict(model.named_modules()), []

    def hook(name):
        return lambda module, args: None if name in seen else seen.append(name)

    with temporary_hooks(pre=[(modules[n], hook(n)) for n in names]), torch.no_grad():
        model(*batch)
    return seen + [n for n in names if n not in seen]


def round_weight(weight: torch.Tensor, spec: TensorSpec, inputs: LayerInputs) -> QuantizedTensor:
    """``weight`` quantized under ``spec`` by its rounding algorithm from the layer's ``inputs``."""
    if spec.rounding == "gptq":
        o = spec.gptq
        return gptq_quantize(weight, inputs.hessian, spec, o.damp, o.act_order, o.block_size, o.clip)
    o = spec.adaround
    rows = inputs.samples if inputs.samples is not None else torch.zeros(0, weight[0].numel())
    return adaround(weight, rows, spec, o.iters, o.reg)


class Rounder:
    """Rounded weights of one float model over its calibration batches, cached (thread-safe).

    ``model``: the float model simulated (read only: inputs are collected on a private copy); ``kinds``:
    its quantizable layers (name -> kind); ``batches()``: the calibration batches."""

    def __init__(self, model: nn.Module, kinds: Mapping[str, str], batches: Callable[[], list[tuple]],
                 real_rows: int | None = None):
        self.model, self.kinds, self.batches, self.real_rows = model, dict(kinds), batches, real_rows
        self.modules = dict(model.named_modules())
        self.inputs: dict[str, LayerInputs] = {}
        self.rounded: dict[tuple, QuantizedTensor] = {}  # (layer, spec[, what its rounding also depended on])
        self.summed: list[tuple[str, ...]] | None = None  # Embedding tables added into one input
        self.counts: dict[str, torch.Tensor] = {}  # their row counts on the calibration data
        self.metrics: dict[str, torch.Tensor | None] = {}  # per sum (by its last table): ``output_metric``
        self._lock = threading.RLock()

    def weights(self, specs: Mapping[str, TensorSpec], progress: Callable[[float, str], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> dict[str, QuantizedTensor]:
        """Layer -> its weight rounded under ``specs[layer]`` (specs whose rounding is not nearest)."""
        specs = {n: s for n, s in specs.items() if s.rounding != "nearest"}
        for n, s in specs.items():
            check_roundable_layer(n, self.modules[n], self.kinds[n], s)
        tables = {n: s for n, s in specs.items() if self.kinds[n] == "Embedding"}
        sequential = {n: s for n, s in specs.items() if s.rounding == "gptq" and s.gptq.sequential and n not in tables}
        specs = {n: s for n, s in specs.items() if n not in sequential and n not in tables}
        with self._lock:
            done = self.sequential_weights(sequential, progress, should_stop) if sequential else {}
            done.update(self.embedding_weights(tables) if tables else {})
            todo = [n for n, s in specs.items() if (n, s) not in self.rounded]
            self.layer_inputs(todo, {n for n in todo if specs[n].rounding == "adaround"},
                              None if progress is None else lambda f: progress(0.2 * f, "collecting layer inputs"))
            for i, n in enumerate(todo):
                if should_stop and should_stop():
                    raise RoundingCancelled("the rounding was cancelled; run it again to finish")
                if progress:
                    progress(0.2 + 0.8 * i / len(todo), f"{specs[n].rounding}: {n}")
                self.rounded[n, specs[n]] = round_weight(self.modules[n].weight.detach(), specs[n], self.inputs[n])
            return {**done, **{n: self.rounded[n, s] for n, s in specs.items()}}

    def sequential_weights(self, specs: Mapping[str, TensorSpec], progress=None, should_stop=None) -> dict:
        """Layer -> its weight rounded under ``specs[layer]``, in execution order, each from inputs of a copy
        of the model whose earlier layers of ``specs`` hold their rounded weights (see the module docstring)."""
        batches = self.batches()
        if not batches:
            raise QcoreError("rounding gptq learns from calibration data, and this workload has none; "
                             "provide a data file, or use rounding nearest")
        private = copy.deepcopy(self.model).eval()
        modules = dict(private.named_modules())
        order = execution_order(private, list(specs), batches[0])
        prior, found = (), {}
        for i, n in enumerate(order):
            key = (n, specs[n], prior)
            if key not in self.rounded:
                if should_stop and should_stop():
                    raise RoundingCancelled("the rounding was cancelled; run it again to finish")
                if progress:
                    progress(i / len(order), f"gptq (sequential): {n}")
                inputs = collect_inputs(private, {n: self.kinds[n]}, batches, set(), real_rows=self.real_rows)[n]
                self.rounded[key] = round_weight(self.modules[n].weight.detach(), specs[n], inputs)
            found[n] = self.rounded[key]
            with torch.no_grad():
                modules[n].weight.copy_(found[n].dequantize().reshape(modules[n].weight.shape))
            prior += ((n, specs[n]),)
        return found

    def embedding_weights(self, specs: Mapping[str, TensorSpec]) -> dict:
        """Embedding -> its table rounded under ``specs[table]``: the tables of one sum (``summed_embeddings``, found
        once) jointly by ``embedding_feedback.quantize_summed`` with the row counts of the calibration data; a
        table summed with none of the others in ``specs`` rounds to nearest. Cached by (table, spec, its group)."""
        batches = self.batches()
        if not batches:
            raise QcoreError("rounding gptq learns from calibration data, and this workload has none; "
                             "provide a data file, or use rounding nearest")
        if self.summed is None:
            private = copy.deepcopy(self.model).eval()  # hooks go on a private copy
            self.summed = summed_embeddings(private, [n for n, k in self.kinds.items() if k == "Embedding"], batches[0])
            self.counts = lookup_counts(private, [n for g in self.summed for n in g], batches, self.real_rows)
            self.metrics = {g[-1]: output_metric(private, g[-1], batches) for g in self.summed}
        found = {}
        for group in self.summed + [(n,) for n in specs if not any(n in g for g in self.summed)]:
            members = tuple((n, specs[n]) for n in group if n in specs)
            if not members:
                continue
            if any((n, s, members) not in self.rounded for n, s in members):
                weights = [self.modules[n].weight.detach() for n, _ in members]
                counts = [self.counts.get(n, torch.ones(len(w))) for (n, _), w in zip(members, weights)]
                metric = self.metrics.get(group[-1]) if len(group) > 1 else None
                for (n, s), q in zip(members, quantize_summed(weights, [s for _, s in members], counts, metric,
                                                              members[0][1].gptq.damp)):
                    self.rounded[n, s, members] = q
            found.update({n: self.rounded[n, s, members] for n, s in members})
        return found

    def layer_inputs(self, names, samples: set[str] = frozenset(),
                     progress: Callable[[float], None] | None = None) -> dict[str, LayerInputs]:
        """``LayerInputs`` of the layers ``names`` (with input rows for those in ``samples``), collected in one
        pass for the ones not cached yet."""
        with self._lock:
            needed = [n for n in names if n not in self.inputs or (n in samples and self.inputs[n].samples is None)]
            if needed:
                batches = self.batches()
                if not batches:
                    raise QcoreError("rounding gptq/adaround learns from calibration data, and this workload has none; "
                                     "provide a data file, or use rounding nearest")
                self.inputs.update(collect_inputs(self.model, {n: self.kinds[n] for n in needed}, batches,
                                                  {n for n in needed if n in samples}, progress, self.real_rows))
            return {n: self.inputs[n] for n in names}

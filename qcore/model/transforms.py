"""Where the recipe's transforms apply in a model, and applying them to a copy so that its float outputs stay
the same (the math of each transform: ``qcore.algorithms``).

SmoothQuant, AWQ and CLE all rescale channels between two places: a *producer* (a LayerNorm, a Linear or a Conv)
whose output channel j is divided by s_j, and the *consumers* (the Linear/Conv layers reading those channels)
whose input column j is multiplied by s_j. That is exact only when nothing else reads the producer's output and
what lies between is positively homogeneous per channel (a ReLU, max/average pooling, a reshape that keeps
channels, attention's weighted sum of values) -- not a GELU, a residual add (BERT's LayerNorm output feeds one)
or a softmax. Rather than pattern-match module names, ``find_groups`` *tests* it on a calibration batch: it
divides each candidate producer's channels by random factors r in [1/2, 2], keeps as consumers the layers whose
input became exactly input / r, multiplies their columns by r, and accepts the group only if every other layer's
input and the model's output are unchanged (relative error below ``EXACT``). What passes is exact by
construction; anything else is skipped (and named in the notes) or, when a recipe lists it, refused in one line.

SmoothQuant's ``"unfoldable": "mul"`` reaches the Linear layers no fold does with an op (``input_scale``): the
input times 1/s per channel, the weight's columns times s; exact after any producer, one op and own s per layer.

Bias correction is not a float-preserving transform: it needs the quantized weight, so ``simulate`` applies it
right after quantizing each weight (``qcore.model.bias_targets`` says to which layers), from the layers' input means
(``input_means``) over the calibration data of the transformed float model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from qcore.algorithms.awq import awq_scales
from qcore.algorithms.cle import equalization_scales
from qcore.algorithms.smoothquant import search_alpha, smoothing_scales
from qcore.errors import QcoreError
from qcore.model.input_scale import add_input_scale
from qcore.numerics.quantize import fake_quantize
from qcore.recipe.transforms import APPLIES_TO, Transform

EXACT = 1e-4  # relative L2 error below which two tensors count as equal (float32 rounding through a model)
PROBE_SAMPLES = 2  # calibration samples the fold test runs on
AWQ_ROWS = 4096  # calibration input rows (tokens, pixels) the AWQ loss is computed on
CLE_SWEEPS = 20  # passes over a chain of CLE pairs (each pass changes the neighbours' ranges)
SEARCH_CONV_ALPHA = 0.5  # SmoothQuant's alpha for convolutions under "alpha": "search" (the paper's default)
PRODUCERS = (nn.LayerNorm, nn.Linear, nn.Conv1d, nn.Conv2d) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class Group:
    """Layers ``consumers`` reading the channels of module ``producer`` in a way a per-channel scale folds
    through; ``kind`` is the producer's class name (LayerNorm, Linear, Conv2d, ...)."""

    producer: str
    kind: str
    consumers: tuple[str, ...]


@dataclass
class Transformed:
    """A float copy of a model with transforms applied: ``model`` (never changed afterwards), what was done
    (``scales``: producer -> s (C,), the producer's output divided by it; a layer smoothed by a Mul instead holds
    its 1/s in an ``input_scale.InputScale``), and ``notes`` (layers skipped, and
    why)."""

    model: nn.Module
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)  # the layers whose input channels a transform rescaled
    notes: list[str] = field(default_factory=list)
    calibration: dict | None = None  # calibrate.calibrate of ``model``, filled by the workload when needed
    means: dict[str, torch.Tensor] | None = None  # each layer's input mean per channel (C,), likewise


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _channel_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d)) else -1


def _view(s: torch.Tensor, module: nn.Module, x_dim: int) -> torch.Tensor:
    """``s`` (C,) shaped to broadcast over an input of ``module`` of rank ``x_dim`` along its channel axis."""
    if _channel_axis(module) == -1:
        return s
    return s.reshape(-1, *([1] * (x_dim - 2)))


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [t for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]


def fold(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """In place: the producer's output channel j divided by s_j (its weight's rows and its bias; an
    ``nn.Identity`` producer: nothing), each consumer's input column j multiplied by s_j (weights
    (C_out, C_in, k...): axis 1)."""
    with torch.no_grad():
        w = getattr(producer, "weight", None)
        if w is not None:
            w.div_(s.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        for c in consumers:
            c.weight.mul_(s.reshape(1, -1, *([1] * (c.weight.dim() - 2))).to(c.weight.dtype))


def _out_channels(m: nn.Module) -> int | None:
    if isinstance(m, (nn.LayerNorm, *PRODUCERS[4:])):
        w = getattr(m, "weight", None)
        return w.numel() if isinstance(w, nn.Parameter) and w.dim() == 1 else None
    return m.weight.shape[0]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """Raised by a probe hook to end a forward pass early: its answer is known."""


def find_groups(model: nn.Module, layer_names, batch: tuple) -> list[Group]:
    """Every producer -> consumers group of ``model`` (see the module docstring), tested on ``batch`` (a tuple
    of model inputs) on a private copy. ``layer_names``: the quantizable layers (consumers are among them).

    A probe whose first changed layer input is not a per-channel scale of the old one stops there: that
    producer has no group (a consumer reached only later would leave the output changed anyway, as the
    first layer's input is not compensated)."""
    m = copy.deepcopy(model).eval()
    table = dict(m.named_modules())
    readers = {n: table[n] for n in layer_names if isinstance(table.get(n), CONSUMERS)
               and getattr(table[n], "groups", 1) == 1}
    seen: dict[str, torch.Tensor] = {}
    probe: dict = {}  # empty: recording; first pass of a probe: "name", "r", "consumers"; second: "checking"

    def linear(n, x, r):
        return x.shape[_channel_axis(readers[n])] == len(r) and _rel(x * _view(r, readers[n], x.dim()), seen[n]) < EXACT

    def record(name):
        def hook(mod, args):
            x = args[0].detach()
            if not probe:
                seen[name] = x.clone()
            elif "r" in probe and name != probe["name"] and x.shape == seen[name].shape and _rel(x, seen[name]) >= EXACT:
                if linear(name, x, probe["r"]):
                    probe["consumers"].append(name)
                elif not probe["consumers"]:
                    raise _Stop  # the producer's first changed reader is not a consumer: no group
        return hook

    handles = [mod.register_forward_pre_hook(record(n)) for n, mod in readers.items()]
    gen = torch.Generator().manual_seed(0)
    groups = []
    try:
        with torch.no_grad():
            reference = _first(m(*batch)).detach().clone()
            for pname, p in table.items():
                c = _out_channels(p) if isinstance(p, PRODUCERS) and pname else None
                if not c or not any(x.shape[_channel_axis(readers[n])] == c for n, x in seen.items()):
                    continue
                saved = {id(t): t.detach().clone() for t in _tensors(p)}
                r = 2.0 ** (torch.rand(c, generator=gen) * 2 - 1)
                fold(p, [], r)
                probe.update(name=pname, r=r, consumers=[])
                try:
                    _first(m(*batch))
                except _Stop:
                    pass
                consumers, ok = probe["consumers"], False
                probe.clear()
                probe["checking"] = True  # the second pass: the record hooks stay quiet
                if consumers:
                    saved.update({id(readers[n].weight): readers[n].weight.detach().clone() for n in consumers})
                    fold(nn.Identity(), [readers[n] for n in consumers], r)
                    now = {}
                    hs = [readers[n].register_forward_pre_hook(
                        lambda mod, args, n=n, now=now: now.__setitem__(n, args[0].detach().clone())) for n in readers]
                    try:
                        out = _first(m(*batch))
                    finally:
                        for h in hs:
                            h.remove()
                    ok = _rel(out, reference) < EXACT and all(
                        _rel(x * (_view(r, readers[n], x.dim()) if n in consumers else 1), seen[n]) < EXACT
                        for n, x in now.items() if n != pname)
                probe.clear()
                for t in [*_tensors(p), *(readers[n].weight for n in consumers)]:
                    t.copy_(saved[id(t)])
                if ok:
                    groups.append(Group(pname, type(p).__name__, tuple(consumers)))
    finally:
        for h in handles:
            h.remove()
    return groups


# ---- statistics of the groups' inputs --------------------------------------------------------------------
@dataclass
class InputStats:
    """Per-channel statistics of one layer's input over calibration batches: max |x| and mean |x| (C,),
    mean x (C,), and up to ``AWQ_ROWS`` rows (R, C) of it (every k-th row: the same ones for every recipe)."""

    absmax: torch.Tensor
    absmean: torch.Tensor
    mean: torch.Tensor
    rows: torch.Tensor


def input_stats(model: nn.Module, names, batches, keep_rows: bool = False) -> dict[str, InputStats]:
    """``InputStats`` of the inputs of the layers ``names`` of ``model`` (a private copy carries the hooks)."""
    m = copy.deepcopy(model).eval()
    table = dict(m.named_modules())
    acc: dict[str, list] = {}

    def record(name):
        def hook(mod, args):
            x = args[0].detach().float()
            if not torch.is_floating_point(args[0]) or x.numel() == 0:
                return
            rows = x.movedim(_channel_axis(mod), -1).reshape(-1, x.shape[_channel_axis(mod)])
            a = acc.setdefault(name, [torch.zeros(rows.shape[1]), torch.zeros(rows.shape[1], dtype=torch.float64),
                                      torch.zeros(rows.shape[1], dtype=torch.float64), 0, []])
            a[0] = torch.maximum(a[0], rows.abs().amax(0))
            a[1] += rows.abs().double().sum(0)
            a[2] += rows.double().sum(0)
            a[3] += rows.shape[0]
            if keep_rows:
                a[4].append(rows)
        return hook

    handles = [table[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                m(*b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (absmax, abssum, total, count, rows) in acc.items():
        kept = torch.cat(rows) if rows else torch.zeros(0, len(absmax))
        if len(kept) > AWQ_ROWS:
            kept = kept[torch.linspace(0, len(kept) - 1, AWQ_ROWS).long()]
        out[n] = InputStats(absmax, (abssum / count).float(), (total / count).float(), kept)
    return out


# ---- applying a recipe's transforms ------------------------------------------------------------------------
def _eligible(t: Transform, groups: list[Group], table: dict) -> list[Group]:
    if t.name == "cle":
        return [g for g in groups if g.kind != "LayerNorm" and g.kind != "RMSNorm" and len(g.consumers) == 1]
    if t.name == "awq":
        return [g for g in groups if all(isinstance(table[c], nn.Linear) for c in g.consumers)]
    return groups


def _selected(t: Transform, index: int, eligible: list[Group], layer_kinds: dict[str, str],
              mul: bool = False) -> tuple[list[Group], list[str], list[str]]:
    """The groups ``t`` transforms, the layers of its kind it skips (only when it names no layers) and, when
    ``mul`` (SmoothQuant's ``"unfoldable": "mul"``), the Linear layers no group covers, smoothed by a Mul."""
    if t.layers is None:
        covered = {c for g in eligible for c in g.consumers}
        skipped = [n for n, k in layer_kinds.items() if k in ("Linear", "Conv1d", "Conv2d") and n not in covered]
        muls = [n for n in skipped if layer_kinds[n] == "Linear"] if mul else []
        return eligible, [n for n in skipped if n not in muls], muls
    chosen, muls = [], []
    for layer in t.layers:
        if layer not in layer_kinds:
            raise QcoreError(f"transforms[{index}].{t.name}.layers names {layer!r}, which is not a quantizable layer "
                             "of this model; see the Weights page or `python -m qcore inspect` for the layer names")
        g = next((g for g in eligible if layer in g.consumers), None)
        if g is None and not (mul and layer_kinds[layer] == "Linear"):
            raise QcoreError(f"transforms[{index}].{t.name} cannot apply to layer {layer!r} ({layer_kinds[layer]}): "
                             f"{t.name} applies to {APPLIES_TO[t.name]}{' or, with unfoldable mul, any Linear' * mul}")
        muls += [layer] if g is None else []
        chosen += [g] if g is not None and g not in chosen else []
    return chosen, [], muls


def _weight_absmax_per_input(w: torch.Tensor) -> torch.Tensor:
    """max |W| per input channel (axis 1) of a (C_out, C_in, k...) weight -> (C_in,)."""
    return w.detach().abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1)


def apply_transforms(model: nn.Module, layer_kinds: dict[str, str], transforms, groups: list[Group], batches,
                     plans) -> Transformed:
    """A copy of ``model`` with the float-preserving ``transforms`` (SmoothQuant, AWQ, CLE; bias correction is
    ``simulate``'s) applied in order. ``layer_kinds``: quantizable layer -> kind; ``groups``: ``find_groups``
    of ``model``; ``batches``: calibration batches (each transform reads its inputs' statistics on the model as
    the transforms before it left it); ``plans``: the recipe's resolved plans (AWQ quantizes with them)."""
    m = copy.deepcopy(model).eval()
    table = dict(m.named_modules())
    done = Transformed(m)
    for i, t in enumerate(transforms):
        if t.name == "bias_correction":
            continue
        mul = t.name == "smoothquant" and t.option("unfoldable") == "mul"
        chosen, skipped, muls = _selected(t, i, _eligible(t, groups, table), layer_kinds, mul)
        done.notes += [f"{t.name} skipped {len(skipped)} layer(s) it does not apply to ({_listed(skipped)}): it "
                       f"applies to {APPLIES_TO[t.name]}"] if skipped else []
        if t.name == "cle" or not (chosen or muls):
            _equalize(table, chosen, done)  # (nothing chosen: nothing equalized)
            continue
        stats = input_stats(m, [g.consumers[0] for g in chosen] + muls, batches,
                            keep_rows=t.name == "awq" or (t.name == "smoothquant" and t.option("alpha") == "search"))
        smoothed = [n for n in muls if n in stats and _searchable(t, [n], plans)]  # reached, and worth it
        for n in smoothed:
            add_input_scale(table[n], _smoothing(t, stats[n], [table[n]], [n], plans))
        done.reached.update(smoothed)
        done.notes += [f"smoothquant adds {len(smoothed)} Mul op(s), the input times 1/s per channel, before the "
                       f"layer(s) no fold reaches ({_listed(smoothed)})"] if smoothed else []
        conv_alpha: list[str] = []
        for g in chosen:
            st = stats.get(g.consumers[0])
            if st is None or (t.name == "smoothquant" and not _searchable(t, g.consumers, plans)):  # not reached
                continue
            readers = [table[c] for c in g.consumers]
            if t.name == "smoothquant":
                s = _smoothing(t, st, readers, g.consumers, plans)
                conv_alpha += [c for c, r in zip(g.consumers, readers) if t.option("alpha") == "search"
                               and not isinstance(r, nn.Linear)]
            else:
                specs = [plans[c].weights for c in g.consumers]
                if all(sp is None or not sp.fmt.quantizes for sp in specs):
                    continue
                s = awq_scales(st.rows, [r.weight.detach() for r in readers], [_fake(sp) for sp in specs],
                               t.option("grid")).scales
            fold(table[g.producer], readers, s)
            done.scales[g.producer] = done.scales.get(g.producer, torch.ones_like(s)) * s
            done.reached.update(g.consumers)
        done.notes += [f"smoothquant's alpha search measures Linear layers only: {len(conv_alpha)} convolution(s) "
                       f"took alpha {SEARCH_CONV_ALPHA} ({_listed(conv_alpha)})"] if conv_alpha else []
    return done


def _smoothing(t: Transform, st: InputStats, readers: list[nn.Module], names, plans) -> torch.Tensor:
    """SmoothQuant's s (C,) for the layers ``readers`` (named ``names``) sharing one input, at the recipe's alpha or
    (``"search"``) per layer with their plans' quantizers on the kept calibration rows (``search_alpha``). The
    search's loss is a matrix product of rows, so readers that are convolutions (a kernel spans several pixels)
    take ``SEARCH_CONV_ALPHA``, the paper's alpha, instead (``conv_search_note`` says so)."""
    alpha = t.option("alpha")
    if alpha == "search" and not all(isinstance(r, nn.Linear) for r in readers):
        alpha = SEARCH_CONV_ALPHA
    if alpha != "search":
        wmax = torch.stack([_weight_absmax_per_input(r.weight) for r in readers]).amax(0)
        return smoothing_scales(st.absmax, wmax, alpha)
    return search_alpha(st.rows, st.absmax, [r.weight.detach() for r in readers],
                        [_fake(plans[n].weights) for n in names], _fake(plans[names[0]].activations)).scales


def _searchable(t: Transform, names, plans) -> bool:
    """False for an alpha search on layers the recipe leaves float (nothing to measure: not smoothed)."""
    return t.option("alpha") != "search" or any(
        sp is not None and sp.fmt.quantizes for n in names for sp in (plans[n].weights, plans[n].activations))


def _fake(spec):
    """The fake-quantizer of ``spec`` (tensor -> dequantized tensor; none or a float spec: the identity)."""
    return (lambda v: v) if spec is None or not spec.fmt.quantizes else (lambda v: fake_quantize(v, spec))


def _listed(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _equalize(table: dict, chosen: list[Group], done: Transformed) -> None:
    """CLE over ``chosen`` pairs, repeated until the scales settle (a chain's pairs share layers)."""
    for _ in range(CLE_SWEEPS):
        largest = 0.0
        for g in chosen:
            p, c = table[g.producer], table[g.consumers[0]]
            s = equalization_scales(p.weight.detach().abs().reshape(p.weight.shape[0], -1).amax(1),
                                    _weight_absmax_per_input(c.weight))
            fold(p, [c], s)
            done.scales[g.producer] = done.scales.get(g.producer, torch.ones_like(s)) * s
            done.reached.update(g.consumers)
            largest = max(largest, float(s.log().abs().max()))
        if largest < 1e-3:
            break


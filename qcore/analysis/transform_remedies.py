"""Remedies a user can try on one layer: a recipe transform restricted to that layer's group, and the before/after
numbers that show why it works (per-channel maxima, the layer's output SQNR, the model metric).

Each ``*_for(workload, recipe, layer)`` returns ``recipe`` with the transform added for the group ``layer`` belongs to
(an existing entry of the same transform gains the layer), or raises a one-line ``QcoreError`` naming the layer and
what the transform applies to. ``qcore.analysis.remedies.REMEDIES`` lists them, with the rounding remedies, for the
Sensitivity page's "Try a remedy" panel.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qcore.errors import QcoreError
from qcore.model.hooks import run_with_hooks
from qcore.model.simulate import modules_by_name
from qcore.model.transforms import input_stats
from qcore.model.workload import Workload
from qcore.numerics.metrics import sqnr_db
from qcore.recipe import Recipe
from qcore.recipe.transforms import APPLIES_TO, Transform


def with_transform(recipe: Recipe, name: str, layer: str, same: tuple[str, ...] = (), **options) -> Recipe:
    """``recipe`` with transform ``name`` applied to ``layer`` too: the first entry of that name (whose options named
    in ``same`` already equal ``options``') restricted to layers gains it (its options replaced by ``options`` when
    given); otherwise a new entry is appended."""
    entries = list(recipe.transforms)
    for i, t in enumerate(entries):
        if t.name == name and all(t.option(k) == options[k] for k in same):
            if t.layers is None:
                return recipe  # already applied to every layer it fits
            opts = {**dict(t.options), **options, "layers": [*t.layers, layer]}
            entries[i] = Transform.from_json({name: opts}, f"transforms[{i}]")
            return replace(recipe, transforms=tuple(entries))
    entries.append(Transform.from_json({name: {**options, "layers": [layer]}}, f"transforms[{len(entries)}]"))
    return replace(recipe, transforms=tuple(entries))


def group_of(w: Workload, layer: str, transform: str):
    """The fold group ``transform`` would scale for ``layer``, or a one-line error."""
    kinds = {n: i.kind for n, i in w.layers.items()}
    if layer not in kinds:
        raise QcoreError(f"{layer!r} is not a quantizable layer of {w.name}")
    for g in w.groups:
        if layer in g.consumers and (transform != "cle" or (g.kind not in ("LayerNorm", "RMSNorm")
                                                            and len(g.consumers) == 1)):
            return g
    raise QcoreError(f"{transform} cannot apply to layer {layer!r} ({kinds[layer]}): {transform} applies to "
                     f"{APPLIES_TO[transform]}")


def smoothquant_for(w: Workload, recipe: Recipe, layer: str, alpha: float = 0.5) -> Recipe:
    try:
        group_of(w, layer, "smoothquant")
    except QcoreError as e:
        hint = "; try SmoothQuant with a Mul" if getattr(w.layers.get(layer), "kind", None) == "Linear" else ""
        raise QcoreError(f"{e}{hint}") from None
    return with_transform(recipe, "smoothquant", layer, alpha=alpha)


def smoothquant_mul_for(w: Workload, recipe: Recipe, layer: str) -> Recipe:
    """SmoothQuant on a Linear no fold reaches (after a GELU, or a LayerNorm that also feeds a residual add):
    ``"unfoldable": "mul"`` -- an explicit per-channel Mul by 1/s before the layer, its weight's columns times s --
    with alpha searched on the layer's output error, as the ``w8a8-smoothquant-mul`` preset does. A layer a fold
    reaches is a one-line error pointing to the fold (no extra op)."""
    kinds = {n: i.kind for n, i in w.layers.items()}
    if layer not in kinds:
        raise QcoreError(f"{layer!r} is not a quantizable layer of {w.name}")
    if any(layer in g.consumers for g in w.groups):
        raise QcoreError(f"a fold reaches layer {layer!r}: use SmoothQuant (the layer's block), which adds no op")
    if kinds[layer] != "Linear":
        raise QcoreError(f"smoothquant with a Mul cannot apply to layer {layer!r} ({kinds[layer]}): it applies to "
                         "Linear layers no fold reaches (after a GELU or a residual-fed LayerNorm)")
    return with_transform(recipe, "smoothquant", layer, ("unfoldable",), alpha="search", unfoldable="mul")


def awq_for(w: Workload, recipe: Recipe, layer: str) -> Recipe:
    group_of(w, layer, "awq")
    return with_transform(recipe, "awq", layer)


def cle_for(w: Workload, recipe: Recipe, layer: str) -> Recipe:
    group_of(w, layer, "cle")
    return with_transform(recipe, "cle", layer)


def bias_correction_for(w: Workload, recipe: Recipe, layer: str) -> Recipe:
    new = with_transform(recipe, "bias_correction", layer)
    w.simulate(new)  # validates: a Linear/Conv with a bias and quantized weights
    return new


def layer_output_sqnr(w: Workload, recipe: Recipe, layer: str) -> float:
    """SQNR (dB) of ``layer``'s output in the simulated model against the FP32 model's, on the first calibration
    batch (the whole model quantized as the recipe says, so errors arriving from earlier layers count)."""
    batch = w.calibration.batches(w.batch_size)[:1]
    outs = {}

    def grab(tag):
        def hook(mod, args, out):
            outs[tag] = out.detach().float()
        return hook

    run_with_hooks(w.folded[0], batch, post={layer: grab("fp32")})
    sim = w.simulate(recipe).model
    with torch.no_grad():
        h = modules_by_name(sim, [layer])[layer].register_forward_hook(grab("q"))
        try:
            sim(*batch[0])
        finally:
            h.remove()
    return sqnr_db(outs["q"], outs["fp32"])


def smoothquant_fold_or_mul(w: Workload, recipe: Recipe, layer: str, alpha: float = 0.5) -> tuple[Recipe, bool]:
    """``(recipe with SmoothQuant on layer, whether it is the Mul)``: the fold (``smoothquant_for``) where one reaches
    the layer, else the Mul (``smoothquant_mul_for``, which says in one line where neither applies)."""
    if any(layer in g.consumers for g in w.groups):
        return smoothquant_for(w, recipe, layer, alpha), False
    return smoothquant_mul_for(w, recipe, layer), True


def smoothquant_preview(w: Workload, recipe: Recipe, layer: str, alpha: float = 0.5) -> dict:
    """What SmoothQuant does to ``layer``'s group (or, where no fold reaches it, to the layer with a Mul before it:
    ``mul`` true): each input channel's max |x| and max |W| before and after
    (``act_before``/``act_after``/``weight_before``/``weight_after``, lists), the layer's output SQNR (dB) and the
    model's headline metric before and after (the simulation), and the recipe with it applied (``recipe``)."""
    new, mul = smoothquant_fold_or_mul(w, recipe, layer, alpha)
    before = w.transformed(recipe)
    after = w.transformed(new)
    m0, m1 = (w.folded[0] if before is None else before.model), after.model
    a0 = input_stats(m0, [layer], w.calibration.batches(w.batch_size))[layer].absmax
    a1 = input_stats(m1, [layer], w.calibration.batches(w.batch_size))[layer].absmax
    wmax = lambda m: modules_by_name(m, [layer])[layer].weight.detach().abs().transpose(0, 1).reshape(len(a0), -1).amax(1)
    headline = w.task.headline
    return {"act_before": a0.tolist(), "act_after": a1.tolist(), "weight_before": wmax(m0).tolist(),
            "weight_after": wmax(m1).tolist(),
            "sqnr_before": layer_output_sqnr(w, recipe, layer), "sqnr_after": layer_output_sqnr(w, new, layer),
            "metric": headline, "metric_before": w.evaluate(recipe).quantized.metrics[headline],
            "metric_after": w.evaluate(new).quantized.metrics[headline], "recipe": new, "mul": mul}


def cle_preview(w: Workload, recipe: Recipe, layer: str) -> dict:
    """Channel ranges of the CLE pair ending at ``layer``: the producer's output channels (max |W| per row) and
    ``layer``'s input channels (max |W| per column), before and after equalization, plus the model metric."""
    g = group_of(w, layer, "cle")
    new = cle_for(w, recipe, layer)
    before, after = w.transformed(recipe), w.transformed(new)
    m0, m1 = (w.folded[0] if before is None else before.model), after.model

    def ranges(m):
        p, c = (modules_by_name(m, [n])[n].weight.detach().abs() for n in (g.producer, layer))
        return p.reshape(p.shape[0], -1).amax(1).tolist(), c.transpose(0, 1).reshape(c.shape[1], -1).amax(1).tolist()

    (p0, c0), (p1, c1) = ranges(m0), ranges(m1)
    headline = w.task.headline
    return {"producer": g.producer, "producer_before": p0, "producer_after": p1, "consumer_before": c0,
            "consumer_after": c1, "metric": headline, "metric_before": w.evaluate(recipe).quantized.metrics[headline],
            "metric_after": w.evaluate(new).quantized.metrics[headline], "recipe": new}

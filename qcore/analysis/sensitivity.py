"""Per-layer sensitivity: which layers hurt when quantized, and whether their weights or inputs do.

``sweep(workload, candidates, mode, view)`` measures, for every quantizable layer and candidate:

- view ``"only"``    : that one layer quantized, every other layer FP32 (how much the layer costs);
- view ``"all_but"`` : every layer quantized except that one (how much keeping it in float recovers);
- mode ``"weights"`` / ``"activations"`` / ``"both"``: quantize the layer's weight, its input, or both,
  so a user sees whether the weight or the input activations (outliers) are the problem.

Candidates are preset names (``recipe.PRESETS``, GPTQ/AdaRound rounding included: ``int4-gptq``) or the layer specs of ``LAYER_SPECS`` (``int2`` ..
``int7``: b-bit symmetric per-channel min-max weights, float activations). A candidate that changes
nothing for a layer in a mode (a weight-only candidate in ``"activations"`` mode, an Embedding's
integer input) still gets a row: ``changed`` is false and its numbers are the base model's, measured
once (the FP32 model for ``"only"``, the all-quantized model for ``"all_but"``).

The result is a ``Sweep`` (``qcore.analysis.sweep_result``: its ``to_dict`` is the JSON and cache
form) with one ``SweepRow`` per layer and candidate. Each row holds measured numbers: the headline ``metric`` and ``metric_drop`` (FP32 minus metric,
oriented so that positive is worse), ``sqnr_db`` of the model output against the FP32 reference, and
the layer's own error with FP32 inputs: ``layer_sqnr_db`` (the layer's output quantized vs FP32),
``rmse_over_step`` / ``clipped_fraction`` of its weight and ``input_rmse_over_step`` /
``input_clipped_fraction`` of its input (None when not quantized). ``rank`` 1 is the most sensitive
layer (``"only"``: largest drop, then lowest SQNR) or the one whose float copy recovers most
(``"all_but"``), per candidate.

A candidate carrying model transforms (``w8a8-smoothquant``, ``int4-awq``) is measured on the transformed model,
each row exactly as ``Workload.evaluate`` of ``recipe_for`` (``qcore.analysis.transformed_sweep``: no prefix reuse
and no shared working copy, since those are of the untransformed model); the speed notes below are the others'.

Speed: nothing shared is recomputed. One working copy (``qcore.analysis.replay.Runner``) of the BatchNorm-folded
model runs every pass; each weight is quantized once per spec, the calibration statistics come from the workload,
the FP32 reference outputs are computed on the swept samples only (``sweep_reference``), and each run replays the
recorded outputs of every module that finished before the perturbed layer started (the unaffected prefix). View
``"only"`` goes layer by layer: one FP32 run records the prefix outputs, then one run per layer computes all
candidates of that layer at once (those computing it alike once: int8-dynamic and int8-static on an Embedding),
each on its own copy of the batch (stacked along dim 0; the layer's FP32 input is the same for every copy, so
its own error is measured in that run too). Stacking is used only where a run of k copies reproduces
the FP32 model k times bit for bit (else, and for a layer whose input is shared by the batch or whose weight is
tied to another module, its candidates run one at a time), so every number equals a run of that one recipe.
A model whose cost per sample is large is swept on an evenly spaced subset of the evaluation data
(``SWEEP_FLOPS``); the result says how many samples.

Results are cached per candidate in memory and on disk (``cache_dir``, default ``$QCORE_CACHE_DIR``
or ``~/.cache/qcore``; written atomically) under a key made of the workload's fingerprint (a hash of
the bytes it was made from and its metric), the candidate, mode, view and the qcore source code, so
every user of one server shares a sweep of the same files and a sweep over more candidates computes
only the new ones. An entry is served only if it has the fields and types a sweep writes and one row
per layer of this workload; anything else is recomputed. A cancelled sweep (``should_stop()`` true)
raises ``SweepCancelled`` and caches nothing.
"""

from __future__ import annotations

import json
import os
from types import MappingProxyType
from typing import Callable

import torch

from qcore.errors import QcoreError
from qcore.numerics.metrics import SQNR_EXACT_DB, sqnr_db
from qcore.numerics.quantize import check_finite, quantize
from qcore.recipe import PRESETS, LayerPlan, Recipe, preset
from qcore.numerics.spec import TensorSpec
from qcore.model.rounding import roundable
from qcore.model.int8_compute import Int8ComputeInput, int8_compute_block
from qcore.model.simulate import input_quantizer, needs_calibration
from qcore.analysis import sweep_cache
from qcore.analysis.layer_error import LayerError, measuring_hook, perturbed_forward, rmse_over_step
from qcore.analysis.replay import Runner, Unstackable, call_order, replay_set, tied_modules
from qcore.analysis.sweep_cache import cache_key
from qcore.analysis.sweep_result import Score, Sweep, SweepRow, valid_entry
from qcore.model.workload import Workload

MODES = ("weights", "activations", "both")
VIEWS = ("only", "all_but")
LAYER_SPECS = {f"int{b}": {"weights": {"format": f"int{b}", "granularity": "per_channel", "symmetric": True,
                                       "range": "minmax"}, "activations": None} for b in range(2, 8)}
SWEEP_FLOPS = 12e9  # multiply-add FLOPs of Linear/Conv layers per forward pass over the sweep's samples
MIN_SWEEP_SAMPLES = 16


class SweepCancelled(QcoreError):
    """The sweep was stopped by ``should_stop``; nothing was cached."""


# ---- candidates ------------------------------------------------------------------------------
def candidate_recipe(name: str, layer_shapes: dict[str, tuple[int, ...]]) -> Recipe:
    """A candidate (preset or ``LAYER_SPECS`` name) as a whole-model Recipe."""
    if name in PRESETS:
        return preset(name, layer_shapes)
    if name in LAYER_SPECS:
        return Recipe.from_dict({"name": name, **LAYER_SPECS[name]})
    raise QcoreError(f"unknown candidate {name!r}; use a preset ({', '.join(PRESETS)}) "
                     f"or a layer spec ({', '.join(LAYER_SPECS)})")


def check_candidates(candidates) -> list[str]:
    """The candidate names, stripped and de-duplicated in order; QcoreError if empty or unknown."""
    if isinstance(candidates, str):
        candidates = candidates.split(",")
    names = list(dict.fromkeys(c.strip() for c in candidates if c and c.strip()))
    if not names:
        raise QcoreError("give at least one candidate, e.g. int8-dynamic,int4-weight-only")
    for name in names:
        candidate_recipe(name, {})
    return names


def mode_plan(plan: LayerPlan, mode: str, kind: str) -> LayerPlan:
    """The part of ``plan`` that ``mode`` quantizes (fp32 specs and Embedding inputs count as none)."""
    w = plan.weights if mode in ("weights", "both") else None
    a = plan.activations if mode in ("activations", "both") and kind != "Embedding" else None
    return LayerPlan(None if w is None or w.format == "fp32" else w, None if a is None or a.format == "fp32" else a)


def candidate_plans(workload: Workload, candidate: str, mode: str) -> dict[str, LayerPlan]:
    """Per layer of ``workload``, the part of ``candidate`` that ``mode`` quantizes."""
    recipe = candidate_recipe(candidate, workload.layer_shapes)
    return {n: mode_plan(recipe.plan(n), mode, info.kind) for n, info in workload.layers.items()}


def plan_override(plan: LayerPlan) -> dict | None:
    """``plan`` as a recipe's per-layer override dict (None: the layer stays float)."""
    if plan.is_float:
        return None
    return {"weights": plan.weights.to_dict() if plan.weights else None,
            "activations": plan.activations.to_dict() if plan.activations else None}


def _overrides(plans: dict[str, LayerPlan]) -> MappingProxyType:
    return MappingProxyType({n: plan_override(p) for n, p in plans.items()})


def recipe_for(workload: Workload, layer: str, candidate: str, mode: str = "both", view: str = "only") -> Recipe:
    """The recipe a sweep row measures: ``layer`` alone quantized (only) or kept in float (all_but), with the
    candidate's transforms (on the whole model)."""
    plans = candidate_plans(workload, candidate, mode)
    if view == "only":
        layers = {layer: plan_override(plans[layer])}
    else:
        layers = {n: (None if n == layer else plan_override(p)) for n, p in plans.items()}
    transforms = [t.to_json() for t in candidate_recipe(candidate, workload.layer_shapes).transforms]
    return Recipe.from_dict({"name": f"{candidate}/{mode}/{view}/{layer}", "weights": None,
                             "activations": None, "layers": layers, **({"transforms": transforms} if transforms else {})})


# ---- the sweep -------------------------------------------------------------------------------
def sweep(workload: Workload, candidates: list[str], mode: str = "both", view: str = "only",
          progress: Callable[[float, str], None] | None = None, cache_dir: str | os.PathLike | None = None,
          should_stop: Callable[[], bool] | None = None) -> Sweep:
    """Per-layer sensitivity of ``workload`` to each candidate (see the module docstring)."""
    candidates = check_candidates(candidates)
    if mode not in MODES:
        raise QcoreError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if view not in VIEWS:
        raise QcoreError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}")
    keys = {c: cache_key(workload, [c], mode, view) for c in candidates}  # one entry per candidate
    with sweep_cache.lock_for(cache_key(workload, [], mode, view)):
        found = {c: sweep_cache.cached(cache_dir, keys[c], lambda e, c=c: valid_entry(e, workload, c, mode, view))
                 for c in candidates}
        texts = {c: f[0] for c, f in found.items() if f is not None}
        parts = {c: Sweep.from_dict(f[1]) for c, f in found.items() if f is not None}
        missing = [c for c in candidates if c not in texts]
        if missing:
            from qcore.analysis.transformed_sweep import compute_transformed  # it builds on this module

            transformed = [c for c in missing if candidate_recipe(c, {}).transforms]
            parts_now = [f(workload, cs, mode, view, progress, should_stop) for f, cs in
                         ((_compute, [c for c in missing if c not in transformed]), (compute_transformed, transformed)) if cs]
            computed = Sweep.merged(parts_now)
            for c in missing:
                texts[c] = json.dumps(computed.for_candidate(c).to_dict())
                sweep_cache.write_disk(cache_dir, keys[c], texts[c])
                parts[c] = Sweep.from_dict(json.loads(texts[c]))  # exactly what a later read returns
        sweep_cache.remember({keys[c]: texts[c] for c in candidates})
    if progress:
        progress(1.0, "done")
    return Sweep.merged([parts[c] for c in candidates])


def _sweep_index(n_total: int, flops_per_sample: float) -> torch.Tensor:
    """The evaluation samples a sweep uses: all if cheap, else ``evenly_spaced`` ones whose forward
    pass costs at most ``SWEEP_FLOPS``."""
    n = n_total
    if flops_per_sample * n_total > SWEEP_FLOPS:
        n = min(n_total, max(MIN_SWEEP_SAMPLES, int(SWEEP_FLOPS // flops_per_sample)))
    return evenly_spaced(n_total, n)


def sweep_reference(workload: Workload, index: torch.Tensor) -> torch.Tensor:
    """The FP32 reference outputs every row is scored against: the workload's own if the sweep uses every
    sample, else the FP32 model run on the samples ``index`` only (minilm-l6: 22 of 300 sentences computed);
    equal to ``workload.reference_outputs[index]`` up to float summation order (the batches differ)."""
    if len(index) == len(workload.evaluation):
        return workload.reference_outputs
    return workload.run(workload.model, workload.evaluation.subset(index))


def evenly_spaced(n_total: int, n: int) -> torch.Tensor:
    """About ``n`` indices evenly spread over ``range(n_total)``, the same offsets taken in both halves
    (when n_total is even) so evaluation sets of pairs stored as two halves (a_i, then b_i) stay paired."""
    if n >= n_total:
        return torch.arange(n_total)
    if n_total % 2:
        return torch.linspace(0, n_total - 1, n).round().long()
    half = torch.linspace(0, n_total // 2 - 1, max(n // 2, 1)).round().long()
    return torch.cat([half, half + n_total // 2])


def _compute(workload, candidates, mode, view, progress, should_stop) -> Sweep:
    task, layers = workload.task, workload.layers
    plans = {c: candidate_plans(workload, c, mode) for c in candidates}
    calibration = workload.calibration_stats() if any(
        needs_calibration(Recipe(layers=_overrides(plans[c])), layers) for c in candidates) else None
    runner = Runner(workload)
    evaluation = workload.evaluation
    order, once, flops = call_order(runner.model, layers, tuple(t[:2] for t in evaluation.inputs))
    index = _sweep_index(len(evaluation), flops)
    runner.batches = evaluation.subset(index).batches(workload.batch_size)
    reference = sweep_reference(workload, index)
    labels = None if evaluation.labels is None else evaluation.labels[index]
    fp32_metric = float(task.metrics(reference, reference, labels)[task.headline])
    replay = {n: replay_set(runner.model, n, order, once) for n in layers if n in order}
    tied = {n for n in replay if tied_modules(runner.model, n)}  # quantizing it changes another module too
    recorded_names = sorted({m for ms in replay.values() for m in ms})
    notes = [] if len(index) == len(evaluation) else [
        f"swept on {len(index)} of {len(evaluation)} evaluation samples (evenly spaced) to keep the sweep fast"]
    notes += [f"layer {n!r} is never reached by the evaluation data: quantizing it changes nothing"
              for n in layers if n not in order]

    def score(outputs) -> Score:
        return Score(float(task.metrics(outputs, reference, labels)[task.headline]), sqnr_db(outputs, reference))

    quantizers = {c: {n: input_quantizer(n, layers[n].kind, p.activations, calibration) for n, p in plans[c].items()}
                  for c in candidates}
    int8 = {c: {n: _int8_input(n, layers[n].kind, p.weights) for n, p in plans[c].items()} for c in candidates}
    changed = {c: [n for n in layers if n in order and (plans[c][n].weights is not None or quantizers[c][n])]
               for c in candidates}
    total = sum(1 + (view == "all_but") + len(changed[c]) for c in candidates) + 2
    done = [0]

    def step(message: str, runs: int = 1):
        if should_stop and should_stop():
            raise SweepCancelled("the sensitivity sweep was cancelled; nothing was cached (run it again to finish)")
        if progress:
            progress(done[0] / total, message)
        done[0] += runs

    for n in dict.fromkeys(n for c in candidates for n in changed[c] if plans[c][n].weights is not None):  # once
        check_finite(runner.fp32_weights[n].detach(), f"the weight of layer {n!r}")
    weights: dict[tuple[str, TensorSpec], tuple] = {}  # (layer, spec) -> (dequantized, rmse_over_step, clipped)

    def error(c: str, n: str) -> LayerError:  # layer n's error under candidate c (its weight quantized once per spec)
        spec = plans[c][n].weights
        if spec is not None and (n, spec) not in weights:
            w = runner.fp32_weights[n].detach()
            rounder = workload.rounder
            qt = rounder.weights({n: spec.for_shape(tuple(w.shape))})[n] if spec.rounding != "nearest" \
                and roundable(rounder.modules[n], layers[n].kind) else quantize(w, spec)  # GPTQ/AdaRound: cached
            xq = qt.dequantize()
            weights[n, spec] = (xq.to(w.dtype), rmse_over_step(qt, w, xq), qt.clipped_fraction(w))
        return LayerError(weights[n, spec][0] if spec else None, quantizers[c][n], int8[c][n])

    def weight_stats(c: str, n: str) -> dict:
        _, rmse, clipped = weights.get((n, plans[c][n].weights), (None, None, None))
        return {"rmse_over_step": rmse, "clipped_fraction": clipped}

    measured, base, stats = {}, {}, {}  # (candidate, layer) -> Score / layer statistics; candidate -> base Score
    if view == "only":  # layer by layer, all candidates of a layer in one run (a copy of the batch each)
        step("FP32 run")
        errors = {(c, n): error(c, n) for c in candidates for n in changed[c] if n in tied}
        hooks = {n: measuring_hook([e for (_, m), e in errors.items() if m == n], runner.fp32_weights[n]) for n in tied}
        base_outputs, record = runner.run(record=recorded_names, layer_hooks=hooks)
        stats.update({k: e.row() for k, e in errors.items()})
        base = {c: score(base_outputs) for c in candidates}
        replay, stacks = _check_replay(runner, replay, order, record, base_outputs, notes, step)
        for n in layers:
            same = {}  # what layer n computes -> the candidates computing it, run once (int8-dynamic and -static
            for c in (c for c in candidates if n in changed[c]):  # on an Embedding: one weight, no input quantizer)
                same.setdefault((plans[c][n].weights, quantizers[c][n] and plans[c][n].activations), []).append(c)
            todo = [cs[0] for cs in same.values()]
            if not todo:
                continue
            step(n, sum(map(len, same.values())))
            errors = {c: error(c, n) for c in todo}
            replayed = {m: record[m] for m in replay[n]}
            outputs = None
            if n in tied:  # the tied module must see the quantized weight too: switch the layer in place
                outputs = []
                for c in todo:
                    runner.set_layer(n, errors[c].weight, _pre_hooks(quantizers[c][n], int8[c][n]))
                    outputs.append(runner.run(replay=replayed)[0])
                    runner.set_layer(n)
            elif len(todo) > 1 and stacks(len(todo)):
                try:
                    outputs, _ = runner.run(replay=replayed, copies=len(todo), forwards={
                        n: perturbed_forward(runner, n, [errors[c] for c in todo])})
                except Unstackable:
                    errors = {c: error(c, n) for c in todo}  # fresh statistics
            if outputs is None:  # one run per candidate
                outputs = [runner.run(replay=replayed, forwards={n: perturbed_forward(runner, n, [errors[c]])})[0]
                           for c in todo]
            for cs, out in zip(same.values(), outputs):
                measured.update({(c, n): score(out) for c in cs})
                stats.update({(c, n): {**stats.get((c, n), errors[cs[0]].row()), **weight_stats(c, n)} for c in cs})
            for key in [k for k in weights if k[0] == n]:
                del weights[key]
    else:  # candidate by candidate: everything quantized, then one layer at a time back to FP32
        for ci, c in enumerate(candidates):
            for key in [k for k in weights if all(plans[d][k[0]].weights != k[1] for d in candidates[ci:])]:
                del weights[key]  # no later candidate uses this quantized weight
            step(f"{c}: layer errors")  # every layer recomputed quantized on its FP32 input (its own error)
            errors = {n: error(c, n) for n in changed[c]}
            runner.run(layer_hooks={n: measuring_hook([e], runner.fp32_weights[n]) for n, e in errors.items()})
            step(f"{c}: everything quantized")
            for n in changed[c]:
                runner.set_layer(n, errors[n].weight, _pre_hooks(quantizers[c][n], int8[c][n]))
            base_outputs, record = runner.run(record=recorded_names)
            base[c] = score(base_outputs)
            if ci == 0:
                replay, _ = _check_replay(runner, replay, order, record, base_outputs, notes, step)
            for n in changed[c]:  # one run per layer, replaying the unaffected prefix
                step(f"{c}: {n}")
                runner.set_layer(n)
                measured[c, n] = score(runner.run(replay={m: record[m] for m in replay[n]})[0])
                runner.set_layer(n, errors[n].weight, _pre_hooks(quantizers[c][n], int8[c][n]))
                stats[c, n] = {**errors[n].row(), **weight_stats(c, n)}
            for n in changed[c]:
                runner.set_layer(n)
            del record

    rows = []
    for c in candidates:
        plan, aqs = plans[c], quantizers[c]
        for n, info in layers.items():
            row = {"layer": n, "kind": info.kind, "candidate": c, "mode": mode, "view": view,
                   "changed": n in changed[c], "weight_format": plan[n].weights.format if plan[n].weights else "fp32",
                   "input_format": aqs[n].spec.format if aqs[n] else "fp32"}
            got = measured.get((c, n), base[c])
            metric, sqnr = got.metric, got.sqnr_db
            drop = fp32_metric - metric if task.higher_is_better else metric - fp32_metric
            row.update(metric=metric, metric_drop=drop, sqnr_db=sqnr, **stats.get((c, n), _UNCHANGED))
            if view == "all_but":
                row["recovered"] = (metric - base[c].metric) * (1 if task.higher_is_better else -1)
            rows.append(row)
    _rank(rows, view)
    return Sweep(model=workload.name, metric=task.headline, higher_is_better=task.higher_is_better,
                 fp32_metric=fp32_metric, candidates=candidates, mode=mode, view=view, samples=len(index),
                 evaluation_samples=len(evaluation), base=base, notes=notes, rows=[SweepRow(**r) for r in rows])


_UNCHANGED = {"layer_sqnr_db": SQNR_EXACT_DB, "rmse_over_step": None, "clipped_fraction": None,
              "input_rmse_over_step": None, "input_clipped_fraction": None}


def _int8_input(name: str, kind: str, weights: TensorSpec | None) -> Int8ComputeInput | None:
    block = int8_compute_block(kind, weights)
    return None if block is None else Int8ComputeInput(name, block)


def _pre_hooks(aq, int8) -> tuple:
    """A layer's input hooks in the simulation's order: its input quantizer, then int8 compute's."""
    return tuple(h for h in (aq, int8) if h is not None)


def _check_replay(runner, replay, order, record, base_outputs, notes, step) -> tuple[dict, Callable[[int], bool]]:
    """Replaying must reproduce the base exactly (else recompute everything: ``replay`` emptied); and a run of k
    stacked copies of each batch is used only if it gives the base k times bit for bit (checked once per k: matrix
    kernels may round differently for another number of rows). Returns (replay, stacks(k) -> bool)."""
    step("checking prefix reuse")
    last = max(replay, key=lambda n: order[n][0]) if replay else None
    if last is None or not replay[last]:
        return replay, lambda k: False
    replayed = {m: record[m] for m in replay[last]}
    again, _ = runner.run(replay=replayed)
    if not torch.allclose(again, base_outputs, rtol=1e-5, atol=1e-6 * float(base_outputs.abs().max())):
        notes.append("prefix reuse disabled: replaying recorded module outputs did not reproduce the "
                     "model (a module with state or side effects); every run recomputes the whole model")
        return {n: [] for n in replay}, lambda k: False
    exact: dict[int, bool] = {}

    def stacks(k: int) -> bool:
        if k not in exact:
            try:
                exact[k] = all(torch.equal(t, again) for t in runner.run(replay=replayed, copies=k)[0])
            except Unstackable:
                exact[k] = False
        return exact[k]
    return replay, stacks


def _rank(rows: list[dict], view: str) -> None:
    """rank 1 = most sensitive (only) / recovers most when kept in float (all_but), per candidate."""
    sign = 1 if view == "only" else -1
    for c in dict.fromkeys(r["candidate"] for r in rows):
        group = [r for r in rows if r["candidate"] == c]
        group.sort(key=lambda r: (-sign * r["metric_drop"], sign * r["sqnr_db"]))
        for i, r in enumerate(group, 1):
            r["rank"] = i

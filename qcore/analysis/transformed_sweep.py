"""Sensitivity rows of a candidate that carries model transforms (``w8a8-smoothquant``, ``int4-awq``).

Such a candidate quantizes a *transformed* float model (SmoothQuant's, AWQ's scales folded into weights, or
multiplied in by an explicit Mul), so the sweep's fast path -- one working copy of the untransformed model,
one layer's weight swapped in and the unaffected prefix of the network replayed -- would measure the wrong
model. Here every row is what ``Workload.evaluate`` measures for the row's recipe
(``sensitivity.recipe_for``, which carries the candidate's transforms): ``Workload.simulate`` of it (the
workload's transformed copy, its calibration of that copy), run over the sweep's samples, without prefix
reuse (a whole forward pass per row). A row's transform is the candidate's, applied to the whole model (it
leaves the float model unchanged; AWQ and an alpha search choose their scales for the layers the row
quantizes). The layer's own error (``layer_sqnr_db``, its weight's and input's statistics) is measured as in
the fast path, on the transformed float model: the layer recomputed with the row's quantized weight and input
quantizer on its float input.
"""

from __future__ import annotations

import torch

from qcore.analysis.replay import call_order
from qcore.analysis.layer_error import LayerError, measuring_hook, rmse_over_step
from qcore.analysis.sensitivity import (_rank, _sweep_index, SweepCancelled, candidate_plans, candidate_recipe,
                                        plan_override, recipe_for, sweep_reference)
from qcore.analysis.sweep_result import Score, Sweep, SweepRow
from qcore.model.hooks import run_with_hooks
from qcore.model.simulate import input_quantizer, modules_by_name
from qcore.numerics.metrics import SQNR_EXACT_DB, sqnr_db
from qcore.recipe import Recipe


def compute_transformed(workload, candidates, mode, view, progress=None, should_stop=None) -> Sweep:
    """The sweep (``sensitivity.sweep``'s rows and base) of ``candidates``, each carrying transforms."""
    task, layers, evaluation = workload.task, workload.layers, workload.evaluation
    _, _, flops = call_order(workload.folded[0], layers, tuple(t[:2] for t in evaluation.inputs))
    index = _sweep_index(len(evaluation), flops)
    data = evaluation.subset(index)
    reference = sweep_reference(workload, index)
    labels = None if evaluation.labels is None else evaluation.labels[index]
    fp32_metric = float(task.metrics(reference, reference, labels)[task.headline])
    notes = [] if len(index) == len(evaluation) else [
        f"swept on {len(index)} of {len(evaluation)} evaluation samples (evenly spaced) to keep the sweep fast"]
    total = sum(1 + len(layers) for _ in candidates)
    done = [0]

    def step(message: str):
        if should_stop and should_stop():
            raise SweepCancelled("the sensitivity sweep was cancelled; nothing was cached (run it again to finish)")
        if progress:
            progress(done[0] / total, message)
        done[0] += 1

    def measured(recipe: Recipe):
        sim = workload.simulate(recipe)
        outputs = workload.run(sim.model, data)
        return sim, Score(float(task.metrics(outputs, reference, labels)[task.headline]), sqnr_db(outputs, reference))

    rows, base = [], {}
    for c in candidates:
        plans = candidate_plans(workload, c, mode)
        transforms = [t.to_json() for t in candidate_recipe(c, workload.layer_shapes).transforms]
        step(f"{c}: the base model")
        base_recipe = Recipe.from_dict({"name": f"{c}/{mode}/{view}/base", "weights": None, "activations": None,
                                        "transforms": transforms, "layers": {} if view == "only" else {
                                            n: plan_override(p) for n, p in plans.items()}})
        _, base[c] = measured(base_recipe)
        errors: dict[str, tuple] = {}  # layer -> (its LayerError inputs), grouped by the float model they read
        for n, info in layers.items():
            plan = plans[n]
            row = {"layer": n, "kind": info.kind, "candidate": c, "mode": mode, "view": view}
            recipe = recipe_for(workload, n, c, mode, view)
            calibration = workload.calibration_of(recipe) if plan.activations is not None else None
            aq = input_quantizer(n, info.kind, plan.activations, calibration)
            row.update(changed=plan.weights is not None or aq is not None,
                       weight_format=plan.weights.format if plan.weights else "fp32",
                       input_format=aq.spec.format if aq else "fp32")
            stats = {"layer_sqnr_db": SQNR_EXACT_DB, "rmse_over_step": None, "clipped_fraction": None,
                     "input_rmse_over_step": None, "input_clipped_fraction": None}
            if row["changed"]:
                step(f"{c}: {n}")
                sim, score = measured(recipe)
                model = workload.transformed(recipe).model
                w = modules_by_name(model, [n])[n].weight.detach()
                qt = sim.weights.get(n)
                if qt is not None:
                    stats.update(rmse_over_step=rmse_over_step(qt, w), clipped_fraction=qt.clipped_fraction(w))
                wq = None if qt is None else qt.dequantize().reshape(w.shape).to(w.dtype)
                errors.setdefault(id(model), (model, {}))[1][n] = (wq, aq, stats)
            else:
                score = base[c]
            drop = fp32_metric - score.metric if task.higher_is_better else score.metric - fp32_metric
            row.update(metric=score.metric, metric_drop=drop, sqnr_db=score.sqnr_db, stats=stats)
            if view == "all_but":
                row["recovered"] = (score.metric - base[c].metric) * (1 if task.higher_is_better else -1)
            rows.append(row)
        for model, wanted in errors.values():  # one float pass per transformed model measures its layers' errors
            _layer_errors(model, wanted, data.batches(workload.batch_size))
    for r in rows:
        r.update(r.pop("stats"))
    _rank(rows, view)
    return Sweep(model=workload.name, metric=task.headline, higher_is_better=task.higher_is_better,
                 fp32_metric=fp32_metric, candidates=list(candidates), mode=mode, view=view, samples=len(index),
                 evaluation_samples=len(evaluation), base=base, notes=notes, rows=[SweepRow(**r) for r in rows])


def _layer_errors(model, wanted: dict[str, tuple], batches) -> None:
    """Fill each ``wanted`` layer's stats (layer -> (quantized weight or None, input quantizer or None, stats))
    with its output error recomputed quantized on its float input in ``model``."""
    errors = {n: LayerError(wq, aq, None) for n, (wq, aq, _) in wanted.items()}
    fp32 = {n: m.weight.detach().clone() for n, m in modules_by_name(model, wanted).items()}
    post = {}
    for n in wanted:
        hook = measuring_hook([errors[n]], fp32[n])
        post[n] = lambda m, args, out, hook=hook: hook(m, args, {}, out)
    with torch.no_grad():
        run_with_hooks(model, batches, post=post)
    for n, (_, _, stats) in wanted.items():
        stats.update(errors[n].row())

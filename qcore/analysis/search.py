"""Mixed-precision search: per-layer formats that meet a size budget or a metric floor.

``search(workload, candidates, max_size_fraction= | max_size_bytes= | min_metric=)``

1. **Sensitivity** (``sensitivity.sweep``, view ``"only"``, mode ``"both"``): for each layer and
   candidate, the measured metric drop with only that layer quantized, and the output SQNR.
2. **Greedy path** (multiple-choice knapsack, LP-greedy): each layer's options are FP32 (always
   allowed) and every candidate; an option's *cost* is its metric drop (clamped at 0) plus
   ``NOISE_WEIGHT`` x its output noise-to-signal power ratio (a tie-breaker: the headline metric
   moves in coarse steps on a small evaluation set, one digit image = 0.28 % accuracy), and its
   *gain* is the weight bytes it saves against FP32 (exact, from ``size.weight_bytes``). Per layer
   the options on the lower convex hull of (bytes saved, cost) give upgrade steps with increasing
   cost per byte; all layers' steps sorted by cost per byte form one path from all-FP32 (step 0)
   to the smallest recipe (step K). Summing per-layer costs is a *prediction*, used only to order.
3. **Measure**: recipes are evaluated for real with ``Workload.evaluate``: the uniform candidates,
   a few points spread along the path (for the Pareto front), and the goal's own search --
   size budget: the first path steps that fit; metric floor: binary search over the path for the
   longest prefix whose *measured* metric still meets the floor.
4. **Choose** among the evaluated recipes: the best measured metric within the size budget, or the
   smallest size whose measured metric meets the floor. ``pareto`` is the measured size-vs-metric
   front of everything evaluated.

Every ``metric`` in the result is measured on the whole evaluation set; sizes are exact weight
storage in bytes (``Workload.size``). ``recipe`` is a plain recipe dict with one override per
quantized layer: ``Recipe.from_dict(result.recipe)`` evaluates to ``result.measured``. The front is
``pareto_front`` (the one used by the Trade-offs figure too).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

from qcore.errors import QcoreError
from qcore.numerics.metrics import SQNR_EXACT_DB
from qcore.recipe import Recipe
from qcore.analysis.sensitivity import (SweepCancelled, candidate_plans, candidate_recipe, check_candidates, mode_plan,
                                        plan_override, sweep)
from qcore.analysis.sweep_result import Sweep, SweepRow
from qcore.model.size import weight_bytes
from qcore.model.workload import Workload

NOISE_WEIGHT = 0.01  # cost of an output noise-to-signal power ratio of 1 (0 dB SQNR), in metric units
PATH_POINTS = 4  # path recipes evaluated (besides the goal's own) to draw the Pareto front
BUDGET_STEPS = 3  # path steps evaluated from the first that fits a size budget
SWEEP_SHARE = 0.6  # share of the progress bar given to the sensitivity sweep


class SearchCancelled(SweepCancelled):
    """The search was stopped by ``should_stop``."""


@dataclass(frozen=True)
class Goal:
    """What the search must meet: a size budget in bytes (``max_size_fraction`` of FP32 when given
    that way) or a headline metric floor; the unused ones are None."""

    max_size_fraction: float | None
    max_size_bytes: int | None
    min_metric: float | None


@dataclass(frozen=True)
class Point:
    """One evaluated recipe: weight storage in bytes and the headline metric measured on the whole
    evaluation set; ``recipe`` is the recipe's dict (named ``label``)."""

    label: str
    size_bytes: int
    metric: float
    recipe: dict


@dataclass(frozen=True)
class Measurement:
    """The headline metric and weight storage in bytes of one model."""

    metric: float
    size_bytes: int


@dataclass(frozen=True)
class SearchResult:
    """The chosen ``recipe`` (a dict; ``Recipe.from_dict(recipe)`` evaluates to ``measured``), whether it
    ``met`` the goal, FP32 for comparison, everything ``evaluated`` (by size) and its Pareto front."""

    model: str
    metric: str
    higher_is_better: bool
    candidates: list[str]
    goal: Goal
    met: bool
    recipe: dict
    measured: Measurement
    fp32: Measurement
    pareto: list[Point]
    evaluated: list[Point]
    notes: list[str]

    def to_dict(self) -> dict:
        """The ``--json`` form: nested dicts with the field names as keys."""
        return asdict(self)


# ---- the greedy path -------------------------------------------------------------------------
def _cost(row: SweepRow) -> float:
    """Predicted harm of one layer's option: metric drop (>= 0) plus weighted output noise power."""
    noise = 0.0 if row.sqnr_db >= SQNR_EXACT_DB else 10.0 ** (-row.sqnr_db / 10.0)
    return max(row.metric_drop, 0.0) + NOISE_WEIGHT * noise


def _hull_steps(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower convex hull of (bytes saved, cost, candidate) options starting at FP32 (0, 0).

    Returns the hull's points after FP32, in order: each step saves more bytes at a higher cost per
    byte than the one before (dominated and non-convex options are skipped)."""
    hull, at = [], (0, 0.0)
    remaining = [o for o in options if o[0] > 0]
    while True:
        ahead = [o for o in remaining if o[0] > at[0]]
        if not ahead:
            return hull
        # smallest cost per byte from here; on a tie the option saving most (skip collinear points)
        best = min(ahead, key=lambda o: ((o[1] - at[1]) / (o[0] - at[0]), -o[0]))
        hull.append(best)
        at = best


def greedy_path(workload: Workload, rows: list[SweepRow], candidates: list[str]) -> list[dict]:
    """The path of recipes from all-FP32 to the smallest recipe (see the module docstring).

    Returns ``[{"choice": {layer: candidate}, "predicted_cost": float}]``, step 0 = all FP32."""
    plans = {c: candidate_plans(workload, c, "both") for c in candidates}
    by_layer: dict[str, list] = {n: [] for n in workload.layers}
    for row in rows:
        n, c = row.layer, row.candidate
        shape = workload.layers[n].weight_shape
        saved = weight_bytes(shape, None)["total"] - weight_bytes(shape, plans[c][n].weights)["total"]
        by_layer[n].append((saved, _cost(row), c))
    steps = []
    for li, (n, options) in enumerate(by_layer.items()):
        at = (0, 0.0)
        for pos, (saved, cost, c) in enumerate(_hull_steps(options)):
            slope = (cost - at[1]) / (saved - at[0])
            steps.append((slope, li, pos, n, c, cost - at[1]))
            at = (saved, cost)
    steps.sort(key=lambda s: s[:3])
    path, choice, total = [{"choice": {}, "predicted_cost": 0.0}], {}, 0.0
    for _, _, _, n, c, delta in steps:
        choice = {**choice, n: c}
        total += delta
        path.append({"choice": choice, "predicted_cost": total})
    return path


def recipe_from_choice(workload: Workload, choice: dict[str, str], name: str) -> Recipe:
    """A recipe quantizing each layer in ``choice`` as its candidate does (mode both), others FP32. A candidate's
    transforms (SmoothQuant, AWQ) come along restricted to the layers chosen for it that they reach (as its sweep
    rows measured them), so a layer chosen for another candidate is not rescaled."""
    plans = {c: candidate_plans(workload, c, "both") for c in set(choice.values())}
    layers = {n: plan_override(plans[c][n]) for n, c in choice.items()}
    transforms = []
    for c in dict.fromkeys(choice.values()):
        whole = candidate_recipe(c, workload.layer_shapes)
        if whole.transforms:
            reached = workload.transformed(whole).reached
            mine = [n for n, chosen in choice.items() if chosen == c and n in reached]
            transforms += [{t.name: {**t.to_json()[t.name], "layers": mine}} for t in whole.transforms if mine]
    return Recipe.from_dict({"name": name, "weights": None, "activations": None,
                             "layers": {n: o for n, o in layers.items() if o is not None},
                             **({"transforms": transforms} if transforms else {})})


# ---- the goal --------------------------------------------------------------------------------
def _goal(workload: Workload, max_size_fraction, max_size_bytes, min_metric) -> Goal:
    given = [g is not None for g in (max_size_fraction, max_size_bytes, min_metric)]
    if sum(given) != 1:
        raise QcoreError("give exactly one goal: a size budget (max_size_fraction or max_size_bytes) "
                         "or a minimum headline metric (min_metric)")
    fp32_bytes = workload.size(Recipe())["fp32_bytes"]
    if max_size_fraction is not None:
        if not (isinstance(max_size_fraction, (int, float)) and 0 < max_size_fraction and math.isfinite(max_size_fraction)):
            raise QcoreError(f"max_size_fraction={max_size_fraction!r} must be a positive number such as 0.3 "
                             "(30 % of the FP32 size)")
        max_size_bytes = int(math.floor(max_size_fraction * fp32_bytes))
    elif max_size_bytes is not None and not (isinstance(max_size_bytes, int) and max_size_bytes > 0):
        raise QcoreError(f"max_size_bytes={max_size_bytes!r} must be a positive whole number of bytes")
    if min_metric is not None and not (isinstance(min_metric, (int, float)) and math.isfinite(min_metric)):
        raise QcoreError(f"min_metric={min_metric!r} must be a finite number, e.g. 0.95")
    return Goal(max_size_fraction, max_size_bytes, min_metric)


def _meets_metric(metric: float, floor: float, higher_is_better: bool) -> bool:
    return metric >= floor if higher_is_better else metric <= floor


# ---- the search ------------------------------------------------------------------------------
def search(workload: Workload, candidates: list[str], *, max_size_fraction: float | None = None,
           max_size_bytes: int | None = None, min_metric: float | None = None,
           progress: Callable[[float, str], None] | None = None, should_stop: Callable[[], bool] | None = None,
           cache_dir: str | os.PathLike | None = None) -> SearchResult:
    """Per-layer precision for ``workload`` meeting one goal (see the module docstring)."""
    candidates = check_candidates(candidates)
    goal = _goal(workload, max_size_fraction, max_size_bytes, min_metric)
    task, headline = workload.task, workload.task.headline
    higher = task.higher_is_better

    def sweep_progress(frac: float, msg: str):
        if progress:
            progress(SWEEP_SHARE * frac, f"sensitivity: {msg}")

    sens = sweep(workload, candidates, mode="both", view="only", progress=sweep_progress,
                 should_stop=should_stop, cache_dir=cache_dir)
    path = greedy_path(workload, sens.rows, candidates)
    recipes = [recipe_from_choice(workload, p["choice"], f"search step {k}") for k, p in enumerate(path)]
    sizes = [workload.size(r)["size_bytes"] for r in recipes]

    evaluated: dict[str, Point] = {}  # recipe JSON (without name) -> its point

    def evaluate(recipe: Recipe, label: str) -> Point:
        d = recipe.to_dict()
        key = json.dumps({**d, "name": None}, sort_keys=True)
        if key not in evaluated:
            if should_stop and should_stop():
                raise SearchCancelled("the search was cancelled; run it again to finish")
            if progress:
                progress(SWEEP_SHARE + (1 - SWEEP_SHARE) * min(len(evaluated) / planned, 0.99), f"evaluating {label}")
            r = workload.evaluate(recipe)
            evaluated[key] = Point(label, r.quantized.size_bytes, r.quantized.metrics[headline], {**d, "name": label})
        return evaluated[key]

    def step_label(k: int) -> str:
        quantized = len(path[k]["choice"])
        return f"mixed: step {k} of {len(path) - 1} ({quantized} of {len(workload.layers)} layers quantized)"

    planned = 1 + len(candidates) + PATH_POINTS + BUDGET_STEPS + 2 * max(1, math.ceil(math.log2(len(path) + 1)))
    fp32 = evaluate(recipes[0], "fp32")
    for c in candidates:
        evaluate(recipe_from_choice(workload, {n: c for n in workload.layers}, c), f"uniform {c}")
    # points evenly spaced in size along the path, for the Pareto front
    for i in range(1, PATH_POINTS + 1):
        target = sizes[0] - (sizes[0] - sizes[-1]) * i / PATH_POINTS
        k = min(range(len(path)), key=lambda k: abs(sizes[k] - target))
        evaluate(recipes[k], step_label(k))

    notes = list(sens.notes)
    if goal.max_size_bytes is not None:
        budget = goal.max_size_bytes
        fits = [k for k in range(len(path)) if sizes[k] <= budget]
        for k in fits[:BUDGET_STEPS]:  # the first steps that fit: measured, not predicted, decides
            evaluate(recipes[k], step_label(k))
        if not fits:
            notes.append(f"no recipe from these candidates fits in {budget} bytes: the smallest is {sizes[-1]} "
                         f"bytes ({sizes[-1] / sizes[0]:.1%} of FP32); it is returned and the goal is not met")
        ok = [e for e in evaluated.values() if e.size_bytes <= budget]
        sign = 1 if higher else -1
        best = max(ok, key=lambda e: (sign * e.metric, -e.size_bytes)) if ok \
            else min(evaluated.values(), key=lambda e: e.size_bytes)
        met = bool(ok)
    else:
        floor = goal.min_metric
        last = len(path) - 1
        smallest = evaluate(recipes[last], step_label(last))
        if not _meets_metric(smallest.metric, floor, higher) and _meets_metric(fp32.metric, floor, higher):
            good, bad = 0, last  # binary search: the longest prefix whose measured metric meets the floor
            while bad - good > 1:
                mid = (good + bad) // 2
                if _meets_metric(evaluate(recipes[mid], step_label(mid)).metric, floor, higher):
                    good = mid
                else:
                    bad = mid
        ok = [e for e in evaluated.values() if _meets_metric(e.metric, floor, higher)]
        if ok:
            best = min(ok, key=lambda e: (e.size_bytes, -e.metric if higher else e.metric))
        else:
            best = fp32
            notes.append(f"even FP32 does not reach {headline} {floor} (it measures {workload.fp32_metrics[headline]:.6g}); "
                         "FP32 is returned and the goal is not met")
        met = bool(ok)

    if sens.samples < sens.evaluation_samples:
        notes.append("the sensitivity sweep (which orders the greedy path) used a subset of the evaluation data; "
                     "every metric reported here is measured on all of it")
    entries = sorted(evaluated.values(), key=lambda e: e.size_bytes)
    if progress:
        progress(1.0, "done")
    return SearchResult(model=workload.name, metric=headline, higher_is_better=higher, candidates=candidates,
                        goal=goal, met=met, recipe=best.recipe, measured=Measurement(best.metric, best.size_bytes),
                        fp32=Measurement(workload.fp32_metrics[headline], fp32.size_bytes),
                        pareto=[entries[i] for i in pareto_front([asdict(e) for e in entries], higher)],
                        evaluated=entries, notes=notes)


def pareto_front(points: list[dict], higher_is_better: bool = True) -> list[int]:
    """Indices of the points (dicts with ``size_bytes`` and ``metric``) that no other point dominates,
    sorted by size, smallest first (on equal size the better metric first). A point dominates another
    when it is at most as large and at least as good, and strictly smaller or strictly better: two
    identical points do not dominate each other, so both are on the front."""
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i]["size_bytes"], -sign * points[i]["metric"]))
    front, best = [], None  # best = (size, oriented metric) of the last point kept
    for i in order:
        size, metric = points[i]["size_bytes"], sign * points[i]["metric"]
        if best is None or metric > best[1] or (size, metric) == best:
            front.append(i)
            best = (size, metric)
    return front


def estimate_metric(w, recipe: Recipe, result: Sweep) -> dict:
    """Metric ESTIMATE for ``recipe`` from a "both"/"only" sweep: the FP32 metric minus the sum of the
    measured single-layer drops of each quantized layer's spec (drops rarely add exactly; never a
    measurement). ``{"metric", "drops": {layer: drop}, "missing": [layers whose spec was not swept]}``;
    ``metric`` is None when a layer is missing: a sum without its drop would look complete and is not."""
    rows = {(r.layer, r.candidate): r for r in result.rows}
    plans = {c: candidate_recipe(c, w.layer_shapes).resolve(w.layer_shapes) for c in result.candidates}
    mine = recipe.resolve(w.layer_shapes)
    drops, missing = {}, []
    for name, info in w.layers.items():
        plan = mode_plan(mine[name], "both", info.kind)
        if plan.is_float:
            drops[name] = 0.0
            continue
        match = [c for c, r in plans.items() if (name, c) in rows and mode_plan(r[name], "both", info.kind) == plan]
        if match:
            drops[name] = rows[(name, match[0])].metric_drop
        else:
            missing.append(name)
    sign = 1.0 if result.higher_is_better else -1.0
    metric = None if missing else result.fp32_metric - sign * sum(drops.values())
    return {"metric": metric, "drops": drops, "missing": missing}

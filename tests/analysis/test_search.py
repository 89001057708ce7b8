"""Mixed-precision search: the budget holds, every reported metric is a real evaluation of the
recipe returned, and the CLI writes a recipe that ``evaluate`` reproduces."""

import json
import math

import pytest

from qcore import QcoreError, Recipe
from qcore.cli import main
from hypothesis import given
from hypothesis import strategies as st

from qcore.analysis.search import Measurement, SearchCancelled, pareto_front, search
from qcore.model.size import float_bytes

CANDIDATES = ["int8-static", "int4-weight-only", "int3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sweeps")


def evaluated_metric(w, recipe_dict) -> tuple[float, int]:
    r = w.evaluate(Recipe.from_dict(recipe_dict))
    return r.quantized.metrics[w.task.headline], r.quantized.size_bytes


def test_size_budget_is_honoured_and_metric_is_measured(digits_cnn, cache_dir):
    r = search(digits_cnn, CANDIDATES, max_size_fraction=0.2, cache_dir=cache_dir)
    fp32_bytes = float_bytes(digits_cnn.model)
    budget = math.floor(0.2 * fp32_bytes)
    recipe = Recipe.from_dict(json.loads(json.dumps(r.recipe)))
    assert r.goal.max_size_bytes == budget and r.met is True
    assert r.fp32 == Measurement(digits_cnn.fp32_metrics["accuracy"], fp32_bytes)
    assert digits_cnn.size(recipe)["size_bytes"] == r.measured.size_bytes <= budget
    assert evaluated_metric(digits_cnn, r.recipe) == (r.measured.metric, r.measured.size_bytes)
    assert r.measured.metric >= 0.95  # int3 everywhere gives ~0.96; the search does at least as well
    uniform_int3 = next(e for e in r.evaluated if e.label == "uniform int3")
    assert r.measured.metric >= uniform_int3.metric
    assert r.measured in [Measurement(e.metric, e.size_bytes) for e in r.pareto]


def test_metric_floor_gives_the_smallest_recipe_that_meets_it(digits_mlp, cache_dir):
    floor = digits_mlp.fp32_metrics["accuracy"] - 0.004  # at most one more of 360 test images wrong
    r = search(digits_mlp, CANDIDATES, min_metric=floor, cache_dir=cache_dir)
    assert r.met and r.measured.metric >= floor
    assert r.measured.size_bytes < 0.35 * r.fp32.size_bytes
    assert evaluated_metric(digits_mlp, r.recipe) == (r.measured.metric, r.measured.size_bytes)
    meeting = [e for e in r.evaluated if e.metric >= floor]
    assert r.measured.size_bytes == min(e.size_bytes for e in meeting)


def test_pareto_front_is_the_non_dominated_set(digits_mlp, cache_dir):
    r = search(digits_mlp, CANDIDATES, max_size_fraction=0.5, cache_dir=cache_dir)
    front, evaluated = r.pareto, r.evaluated
    for e in evaluated:  # every evaluated point is a real evaluation of the recipe stored with it
        assert evaluated_metric(digits_mlp, e.recipe) == (e.metric, e.size_bytes)
    assert [e.size_bytes for e in front] == sorted(e.size_bytes for e in front)
    assert [e.metric for e in front] == sorted(e.metric for e in front)  # bigger buys strictly better
    for f in front:  # nothing evaluated is smaller and at least as good, or as small and better
        assert not any((o.size_bytes <= f.size_bytes and o.metric > f.metric)
                       or (o.size_bytes < f.size_bytes and o.metric >= f.metric) for o in evaluated)
    for e in evaluated:  # everything else has a front point at least as small and as good
        assert e in front or any(f.size_bytes <= e.size_bytes and f.metric >= e.metric for f in front)


_points = st.lists(st.fixed_dictionaries({"size_bytes": st.integers(1, 50), "metric": st.integers(0, 20).map(lambda m: m / 20)}),
                   min_size=1, max_size=12)


def _dominates(q, p, sign) -> bool:
    return (q["size_bytes"] <= p["size_bytes"] and sign * q["metric"] >= sign * p["metric"]
            and (q["size_bytes"] < p["size_bytes"] or sign * q["metric"] > sign * p["metric"]))


@given(_points, st.lists(st.integers(0, 11), max_size=4), st.booleans())
def test_pareto_front_is_exactly_the_undominated_points_by_brute_force(points, copies, higher):
    """O(n^2) dominance check; ``copies`` repeats some points exactly (identical points are both on the front)."""
    points = points + [dict(points[i % len(points)]) for i in copies]
    sign = 1 if higher else -1
    front = pareto_front(points, higher)
    assert len(set(front)) == len(front)
    for i, p in enumerate(points):
        assert (i in front) == (not any(_dominates(q, p, sign) for j, q in enumerate(points) if j != i))
    keys = [(points[i]["size_bytes"], -sign * points[i]["metric"]) for i in front]
    assert keys == sorted(keys)


def test_pareto_front_small_example_with_a_tie():
    points = [{"label": "fp32", "size_bytes": 100, "metric": 0.98}, {"label": "int8", "size_bytes": 30, "metric": 0.98},
              {"label": "int4", "size_bytes": 20, "metric": 0.90}, {"label": "bad", "size_bytes": 40, "metric": 0.85},
              {"label": "int8 again", "size_bytes": 30, "metric": 0.98}]
    assert [points[i]["label"] for i in pareto_front(points)] == ["int4", "int8", "int8 again"]
    assert [points[i]["label"] for i in pareto_front(points, higher_is_better=False)] == ["int4", "bad"]


def test_unreachable_goals_are_reported_not_met(digits_mlp, cache_dir):
    tiny = search(digits_mlp, CANDIDATES, max_size_bytes=1000, cache_dir=cache_dir)
    smallest = min(e.size_bytes for e in tiny.evaluated)
    assert not tiny.met and tiny.measured.size_bytes == smallest > 1000
    assert any("no recipe from these candidates fits in 1000 bytes" in n for n in tiny.notes)
    perfect = search(digits_mlp, CANDIDATES, min_metric=1.01, cache_dir=cache_dir)
    assert not perfect.met and perfect.recipe["layers"] == {}
    assert perfect.measured.size_bytes == perfect.fp32.size_bytes


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one goal"),
    ({"max_size_fraction": 0.3, "min_metric": 0.9}, "give exactly one goal"),
    ({"max_size_fraction": -1.0}, "max_size_fraction=-1.0 must be a positive number"),
    ({"max_size_bytes": 0}, "max_size_bytes=0 must be a positive whole number"),
    ({"min_metric": float("nan")}, "min_metric=nan must be a finite number"),
])
def test_bad_goals_raise_one_clear_error(digits_mlp, kwargs, message):
    with pytest.raises(QcoreError, match=message):
        search(digits_mlp, CANDIDATES, **kwargs)


def test_cancel_stops_the_search(digits_mlp, cache_dir):
    with pytest.raises(SearchCancelled):
        search(digits_mlp, CANDIDATES, max_size_fraction=0.3, cache_dir=cache_dir, should_stop=lambda: True)


def test_cli_search_writes_a_recipe_that_evaluate_reproduces(capsys, tmp_path, cache_dir, digits_cnn):
    out = tmp_path / "mixed.json"
    code = main(["search", "digits-cnn", "--candidates", ",".join(CANDIDATES), "--max-size-fraction", "0.2",
                 "--out", str(out), "--cache-dir", str(cache_dir), "--json"])
    found = json.loads(capsys.readouterr().out)
    assert code == 0 and json.loads(out.read_text()) == found["recipe"]
    assert list(found) == ["model", "metric", "higher_is_better", "candidates", "goal", "met", "recipe", "measured",
                           "fp32", "pareto", "evaluated", "notes"]
    assert found["goal"] == {"max_size_fraction": 0.2, "max_size_bytes": math.floor(0.2 * float_bytes(digits_cnn.model)),
                             "min_metric": None}
    assert list(found["measured"]) == list(found["fp32"]) == ["metric", "size_bytes"]
    assert all(list(e) == ["label", "size_bytes", "metric", "recipe"] for e in found["pareto"] + found["evaluated"])
    code = main(["evaluate", "digits-cnn", "--recipe", str(out), "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    assert code == 0
    assert evaluated["quantized"]["metrics"]["accuracy"] == found["measured"]["metric"]
    assert evaluated["quantized"]["size_bytes"] == found["measured"]["size_bytes"] <= 0.2 * found["fp32"]["size_bytes"]


def test_estimate_metric_is_none_when_a_layer_was_not_swept_and_the_sum_of_drops_when_all_were(digits_mlp, cache_dir):
    """Regression: a layer whose spec no candidate swept was left out of the sum, so the estimate of a recipe with
    fc1 at int4 (int8 inputs) showed FP32's metric as if complete."""
    from qcore.recipe import preset
    from qcore.analysis.search import estimate_metric
    from qcore.analysis.sensitivity import sweep

    result = sweep(digits_mlp, CANDIDATES, "both", "only", cache_dir=cache_dir)
    drop = {(r.layer, r.candidate): r.metric_drop for r in result.rows}
    int8 = preset("int8-static", digits_mlp.layer_shapes)
    partial = estimate_metric(digits_mlp, int8.with_layer("fc1", {"weights": {"format": "int4"}}), result)
    assert partial["metric"] is None and partial["missing"] == ["fc1"] and "fc1" not in partial["drops"]
    whole = estimate_metric(digits_mlp, int8.with_layer("fc3", None), result)  # fc3 float: drop 0
    assert whole["missing"] == [] and whole["drops"]["fc3"] == 0.0
    assert whole["metric"] == pytest.approx(result.fp32_metric - drop[("fc1", "int8-static")] - drop[("fc2", "int8-static")])

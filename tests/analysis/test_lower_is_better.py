"""A lower-is-better headline (perplexity) is handled right everywhere a direction matters: the sensitivity
drops and ranking, the search's ceiling, the estimate, the Pareto front, the Trade-offs figure and the CLI.
Each check would fail with the sign of a higher-is-better metric. The workload is a small random LM."""

from __future__ import annotations

import json

import pytest
import torch

import qcore.cli as cli
from qcore.analysis import search as search_mod
from qcore.analysis.sensitivity import sweep
from qcore.figures.decide import tradeoff_scatter
from qcore.recipe import Recipe, preset
from test_generate import toy_workload

INT4 = preset("int4-weight-only").to_dict()["weights"]


@pytest.fixture(scope="module")
def w():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield toy_workload()
    torch.set_num_threads(threads)


def test_sensitivity_drop_is_the_perplexity_increase_and_rank_one_increases_most(w):
    s = sweep(w, ["int4-weight-only"], mode="weights", view="only")
    fp32 = w.fp32_metrics["perplexity"]
    assert s.higher_is_better is False and s.fp32_metric == fp32
    rows = sorted(s.rows, key=lambda r: r.rank)
    for r in rows[:3] + rows[-2:]:  # measured again with only that layer quantized
        only = Recipe.from_dict({"name": "only", "weights": None, "layers": {r.layer: {"weights": INT4}}})
        ppl = w.evaluate(only).quantized.metrics["perplexity"]
        assert r.metric == pytest.approx(ppl, rel=1e-9) and r.metric_drop == pytest.approx(ppl - fp32, rel=1e-9)
    assert rows[0].metric == max(r.metric for r in rows) and rows[0].metric_drop > 0


def test_search_treats_the_target_as_a_ceiling_and_the_estimate_adds_the_drops(w):
    fp32 = w.fp32_metrics["perplexity"]
    int4 = w.evaluate(preset("int4-weight-only", w.layer_shapes)).quantized.metrics["perplexity"]
    ceiling = fp32 + 0.5 * (int4 - fp32)  # int4 everywhere is too much; some mix is not
    r = search_mod.search(w, ["int8-weight-only", "int4-weight-only"], min_metric=ceiling)
    assert r.met and r.measured.metric <= ceiling
    assert w.evaluate(Recipe.from_dict(r.recipe)).quantized.metrics["perplexity"] == pytest.approx(r.measured.metric)
    smaller_ok = [p for p in r.evaluated if p.metric <= ceiling and p.size_bytes < r.measured.size_bytes]
    assert not smaller_ok  # the smallest recipe under the ceiling was chosen
    assert not search_mod.search(w, ["int4-weight-only"], min_metric=fp32 * 0.5).met  # below FP32: cannot be met
    s = sweep(w, ["int4-weight-only"], mode="both", view="only")
    est = search_mod.estimate_metric(w, preset("int4-weight-only", w.layer_shapes), s)
    total = sum(r.metric_drop for r in s.rows)
    assert abs(total) > 1 and est["metric"] == pytest.approx(fp32 + total)  # lower is better: FP32 plus the drops


def test_pareto_front_and_tradeoff_figure_prefer_lower():
    points = [{"label": "fp32", "size_bytes": 100, "metric": 10.0}, {"label": "int8", "size_bytes": 30, "metric": 10.1},
              {"label": "bad", "size_bytes": 40, "metric": 12.0}, {"label": "int4", "size_bytes": 15, "metric": 11.0}]
    front = search_mod.pareto_front(points, higher_is_better=False)
    assert [points[i]["label"] for i in front] == ["int4", "int8", "fp32"]
    fig = tradeoff_scatter(points, front, "perplexity", higher_is_better=False)
    assert "lower" in fig.layout.yaxis.title.text + (fig.layout.title.text or "")


def test_cli_says_lower_is_better(w, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_workload", lambda args, allow_no_data=False: w)
    assert cli.main(["sensitivity", "digits-mlp", "--candidates", "int4-weight-only", "--mode", "weights"]) == 0
    text = capsys.readouterr().out
    assert "perplexity fp32" in text and "lower is better" in text
    assert cli.main(["search", "digits-mlp", "--candidates", "int4-weight-only", "--max-size-fraction", "0.5",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "perplexity" and out["higher_is_better"] is False

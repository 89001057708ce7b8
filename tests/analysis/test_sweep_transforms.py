"""Sensitivity rows and search steps of candidates that carry transforms (``w8a8-smoothquant-mul``,
``w8a8-smoothquant``): each row is ``Workload.evaluate`` of its recipe, the search's recipes carry the transform
restricted to the layers chosen for that candidate.

Oracles: ``Workload.evaluate`` of the row's recipe (a fresh simulation of the transformed model, all evaluation
data); the layer's output SQNR recomputed here from the transformed float model with plain torch; the weights of
the untransformed model quantized directly."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from qcore.analysis.search import recipe_from_choice, search
from qcore.analysis.sensitivity import recipe_for, sweep
from qcore.model.task import output_task
from qcore.model.workload import Data, Workload
from qcore.numerics.quantize import fake_quantize
from qcore.recipe import Recipe, preset

from test_smoothquant_mul import PostLN

SQ = "w8a8-smoothquant-mul"


@functools.cache
def workload() -> Workload:
    torch.manual_seed(0)
    m = PostLN(d=8, hidden=16).eval()  # no fold exists (the residual, the GELU)
    with torch.no_grad():
        gain = torch.ones(8) + torch.tensor([30.0, 0, 10.0, 0, 0, 0, 0, 0])
        m.ln.weight.copy_(gain)
        m.fc1.weight.div_(gain)
    g = torch.Generator().manual_seed(1)
    return Workload("postln-small", m, Data((torch.randn(32, 8, generator=g),)), Data((torch.randn(48, 8, generator=g),)),
                    output_task("regression", (8,), False, "test"), batch_size=16)


@pytest.mark.parametrize("view", ["only", "all_but"])
def test_a_transform_candidates_rows_are_the_evaluation_of_their_recipe(tmp_path, view):
    w = workload()
    r = sweep(w, [SQ, "int8-static"], mode="both", view=view, cache_dir=tmp_path)
    assert r.samples == r.evaluation_samples == 48
    rows = {(row.layer, row.candidate): row for row in r.rows}
    for layer in ("fc1", "fc2"):
        recipe = recipe_for(w, layer, SQ, "both", view)
        assert recipe.transforms == preset(SQ).transforms
        assert rows[layer, SQ].metric == pytest.approx(w.evaluate(recipe).quantized.metrics[w.task.headline], rel=1e-9)
        plain = recipe_for(w, layer, "int8-static", "both", view)
        assert rows[layer, "int8-static"].metric == pytest.approx(w.evaluate(plain).quantized.metrics[w.task.headline])
    if view == "only":  # the layer's own error, recomputed on the transformed float model
        done = w.transformed(recipe_for(w, "fc1", SQ, "both", "only"))
        sim = w.simulate(recipe_for(w, "fc1", SQ, "both", "only"))
        x = done.model.ln(w.evaluation.inputs[0]).detach()
        inv = dict(done.model.named_modules())["fc1"]._forward_pre_hooks
        xs = next(iter(inv.values()))(None, (x,))[0]  # the smoothing Mul
        q = sim.model.fc1
        xq = next(h for h in q._forward_pre_hooks.values() if type(h).__name__ == "InputQuantizer").quantize(xs)
        f = done.model.fc1  # (calling it would run its Mul again)
        fp, got = nn.functional.linear(xs, f.weight, f.bias).detach(), nn.functional.linear(xq.dequantize(), q.weight, q.bias).detach()
        want_db = float(10 * torch.log10((fp.double() ** 2).sum() / ((got - fp).double() ** 2).sum()))
        assert rows["fc1", SQ].layer_sqnr_db == pytest.approx(want_db, abs=1e-3)


def test_the_search_carries_the_transform_to_the_layers_chosen_for_it(tmp_path):
    w = workload()
    mixed = recipe_from_choice(w, {"fc1": SQ, "fc2": "int8-weight-only"}, "mixed")
    assert mixed.to_dict()["transforms"] == [{"smoothquant": {"alpha": "search", "unfoldable": "mul", "layers": ["fc1"]}}]
    sim = w.simulate(mixed)  # fc2 is not rescaled: its codes are those of the untransformed weight
    assert torch.equal(sim.model.fc2.weight, fake_quantize(w.folded[0].fc2.weight, preset("int8-weight-only").weights))
    result = search(w, [SQ, "int8-weight-only"], max_size_fraction=0.5, cache_dir=tmp_path)
    uniform = next(p for p in result.evaluated if p.label == f"uniform {SQ}")
    assert uniform.recipe["transforms"] == [{"smoothquant": {"alpha": "search", "unfoldable": "mul",
                                                             "layers": ["fc1", "fc2"]}}]
    chosen = Recipe.from_dict(result.recipe)  # the answer is its recipe's evaluation
    assert result.measured.metric == pytest.approx(w.evaluate(chosen).quantized.metrics[w.task.headline])

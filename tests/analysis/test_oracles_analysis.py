"""Independent oracles for the analyses: sensitivity, search, roofline, sizes, latency statistics, Pareto front.

The analyses are reached through the CLI's ``--json`` (whose keys do not change) or through small stable
functions; every expected number is computed here another way:

- sweep ``layer_sqnr_db``   : the layer's FP32 input recorded with a hook, its weight quantized with
  ``torch.fake_quantize_per_channel_affine``, 10 log10(sum y^2 / sum (y_q - y)^2) in float64 (abs 0.01 dB);
- sweep ``metric_drop`` / ``sqnr_db``: the whole model re-run here with that one weight swapped (exact / 0.01 dB);
- metric estimate         : FP32 metric minus the hand sum of the chosen layers' single-layer drops (1e-12);
- greedy path             : each path point's predicted cost is the brute-force minimum over all 3^3
  assignments saving at least as many bytes (an LP-greedy point that is integral is optimal; 1e-12);
- search choice / Pareto  : recomputed from the ``evaluated`` list by brute force; the chosen recipe's
  metric re-measured with ``evaluate --recipe``;
- roofline                : bytes, ops, memory/compute times of each digits-mlp layer by hand from a hand-made
  profile, and the fallback precision of a profile without int8 units (rel 1e-12);
- sizes                   : ``weight_bytes`` for int4 per_group / nf4 / int8 affine / fp8 / int3 by hand;
- latency statistics      : median, p10/p90, speed-up ratio vs Python's ``statistics`` module (1e-12);
- Pareto front            : brute-force dominance over random entries (hypothesis).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics

import pytest
import torch
from hypothesis import given, strategies as st

from qcore.cli import main as cli
from qcore.hardware import Profile
from qcore.model.size import weight_bytes
from qcore.numerics.spec import TensorSpec

SHAPES = {"fc1": (128, 64), "fc2": (64, 128), "fc3": (10, 64)}  # digits-mlp: Linear weights (C_out, C_in)


def as_dict(x):
    return x.to_dict() if hasattr(x, "to_dict") else x


def run_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert cli([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit symmetric per-output-channel min-max, by torch's own fake quantizer."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1) / qmax
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(len(w), dtype=torch.int32), 0, -qmax - 1, qmax)


def db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise)


@pytest.fixture(scope="module")
def sweep_json(tmp_path_factory):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["sensitivity", "digits-mlp", "--candidates", "int2,int4", "--mode", "weights", "--json",
                    "--cache-dir", str(tmp_path_factory.mktemp("sweep"))]) == 0
    return json.loads(out.getvalue())


def test_sweep_layer_sqnr_and_drop_recomputed_from_the_layers_own_input_and_weight(digits_mlp, sweep_json):
    model, data = digits_mlp.model.eval(), digits_mlp.evaluation
    assert sweep_json["samples"] == len(data) == 360
    x = data.inputs[0]
    inputs = {}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].double()))
             for n in SHAPES]
    with torch.no_grad():
        reference = model(x).double()
    for h in hooks:
        h.remove()
    fp32_acc = float((reference.argmax(1) == data.labels).double().mean())
    assert sweep_json["fp32_metric"] == pytest.approx(fp32_acc, abs=1e-12)
    rows = {(r["layer"], r["candidate"]): r for r in sweep_json["rows"]}
    assert len(rows) == 6
    for (name, cand), row in rows.items():
        layer = getattr(model, name)
        weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
        wq = fake_quant_weight(layer.weight.detach(), int(cand[3:])).double()
        y = torch.nn.functional.linear(inputs[name], weight, bias)
        yq = torch.nn.functional.linear(inputs[name], wq, bias)
        assert row["layer_sqnr_db"] == pytest.approx(db(float((y**2).sum()), float(((yq - y) ** 2).sum())), abs=0.01)
        original = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.copy_(wq.float())
            out = model(x).double()
            layer.weight.copy_(original)
        acc = float((out.argmax(1) == data.labels).double().mean())
        assert row["metric"] == pytest.approx(acc, abs=1e-12)
        assert row["metric_drop"] == pytest.approx(fp32_acc - acc, abs=1e-12)  # positive = worse
        assert row["sqnr_db"] == pytest.approx(db(float((reference**2).sum()), float(((out - reference) ** 2).sum())),
                                               abs=0.01)
    assert max(r["metric_drop"] for r in rows.values()) > 0.05  # int2 really hurts: the sign is tested
    # rank 1 = the largest drop per candidate
    for cand in ("int2", "int4"):
        group = [r for r in rows.values() if r["candidate"] == cand]
        assert min(group, key=lambda r: r["rank"])["metric_drop"] == max(r["metric_drop"] for r in group)


def test_metric_estimate_is_fp32_minus_the_sum_of_single_layer_drops(digits_mlp, tmp_path):
    from qcore.analysis.search import estimate_metric
    from qcore.analysis.sensitivity import sweep
    from qcore.recipe import Recipe

    result = sweep(digits_mlp, ["int2", "int4"], mode="both", view="only", cache_dir=tmp_path)
    rows = {(r["layer"], r["candidate"]): r for r in as_dict(result)["rows"]}
    spec = {c: {"format": c, "granularity": "per_channel", "symmetric": True, "range": "minmax"} for c in ("int2", "int4")}
    recipe = Recipe.from_dict({"name": "mixed", "weights": None, "activations": None,
                               "layers": {"fc1": {"weights": spec["int2"]}, "fc3": {"weights": spec["int4"]}}})
    est = as_dict(estimate_metric(digits_mlp, recipe, result))
    by_hand = as_dict(result)["fp32_metric"] - rows["fc1", "int2"]["metric_drop"] - rows["fc3", "int4"]["metric_drop"]
    assert est["metric"] == pytest.approx(by_hand, abs=1e-12)
    assert rows["fc1", "int2"]["metric_drop"] != 0  # the sum is not trivially fp32


def _bytes_saved(shape, bits):
    """FP32 bytes minus b-bit per-channel symmetric bytes: packed codes + one float32 scale per row."""
    numel = shape[0] * shape[1]
    return 4 * numel - (math.ceil(numel * bits / 8) + 4 * shape[0])


def _check_path_against_brute_force(workload, rows, cands, swept_rows):
    """``rows``: the sweep's rows as dicts (the oracle reads them); ``swept_rows``: the same rows as the
    engine's ``SweepRow`` objects (what ``greedy_path`` takes)."""
    from qcore.analysis.search import NOISE_WEIGHT, greedy_path

    by = {(r["layer"], r["candidate"]): r for r in rows}

    def cost(r):  # drop (clamped at 0: a lucky improvement is no gain) + NOISE_WEIGHT x output noise-to-signal power
        return max(r["metric_drop"], 0.0) + NOISE_WEIGHT * 10 ** (-r["sqnr_db"] / 10)

    options = {n: [(0, 0.0, None)] + [(_bytes_saved(SHAPES[n], int(c[3:])), cost(by[n, c]), c) for c in cands]
               for n in SHAPES}
    everything = [(sum(o[0] for o in combo), sum(o[1] for o in combo))
                  for combo in itertools.product(*options.values())]
    path = [as_dict(p) for p in greedy_path(workload, swept_rows, cands)]
    assert path[0]["choice"] == {} and path[-1]["choice"] == {n: "int2" for n in SHAPES}
    assert len(path) >= 4
    previous = -1
    for p in path:
        saved = sum(_bytes_saved(SHAPES[n], int(c[3:])) for n, c in p["choice"].items())
        assert saved > previous  # every step saves more
        previous = saved
        best = min(c for s, c in everything if s >= saved)  # brute force over all 3^3 assignments
        assert p["predicted_cost"] == pytest.approx(best, abs=1e-12)
        assert p["predicted_cost"] == pytest.approx(sum(cost(by[n, c]) for n, c in p["choice"].items()), abs=1e-12)


def test_greedy_path_points_are_brute_force_optimal_for_their_size(digits_mlp, tmp_path):
    from qcore.analysis.sensitivity import sweep

    cands = ["int2", "int4"]
    swept = sweep(digits_mlp, cands, mode="both", view="only", cache_dir=tmp_path)
    rows = [as_dict(r) for r in as_dict(swept)["rows"]]
    _check_path_against_brute_force(digits_mlp, rows, cands, swept.rows)
    # a layer whose quantization happened to raise the metric: its drop counts as 0, not as a gain
    hit = ("fc2", "int4")
    lucky = [dict(r, metric_drop=-0.05) if (r["layer"], r["candidate"]) == hit else r for r in rows]
    lucky_rows = [dataclasses.replace(r, metric_drop=-0.05) if (r.layer, r.candidate) == hit else r for r in swept.rows]
    _check_path_against_brute_force(digits_mlp, lucky, cands, lucky_rows)


def _dominated(e, others, higher=True):
    sign = 1 if higher else -1
    return any(o["size_bytes"] <= e["size_bytes"] and sign * o["metric"] >= sign * e["metric"]
               and (o["size_bytes"] < e["size_bytes"] or sign * o["metric"] > sign * e["metric"]) for o in others)


def brute_force_front(entries, higher=True):
    """Every entry no other entry dominates (an identical twin does not dominate), as sorted (size, metric)."""
    return sorted((e["size_bytes"], e["metric"]) for e in entries if not _dominated(e, entries, higher))


entries_st = st.lists(st.fixed_dictionaries({"size_bytes": st.integers(1, 8), "metric": st.integers(0, 6).map(lambda v: v / 6)}),
                      min_size=1, max_size=12)


@given(entries_st, st.booleans())
def test_pareto_front_is_brute_force_non_dominated_set(entries, higher):
    from qcore.analysis.search import pareto_front

    indices = pareto_front(entries, higher)
    assert len(set(indices)) == len(indices)
    front = [entries[i] for i in indices]
    assert sorted((e["size_bytes"], e["metric"]) for e in front) == brute_force_front(entries, higher)
    assert [e["size_bytes"] for e in front] == sorted(e["size_bytes"] for e in front)  # smallest first


def test_search_under_a_budget_picks_the_best_evaluated_recipe_and_measures_it(capsys, tmp_path):
    r = run_json(capsys, "search", "digits-mlp", "--candidates", "int8-weight-only,int4-weight-only,int2",
                 "--max-size-fraction", "0.3", "--cache-dir", str(tmp_path))
    fp32_bytes = r["fp32"]["size_bytes"]
    budget = math.floor(0.3 * fp32_bytes)
    assert r["goal"]["max_size_bytes"] == budget
    fits = [e for e in r["evaluated"] if e["size_bytes"] <= budget]
    assert r["met"] and len(fits) >= 3 and len({e["metric"] for e in fits}) >= 2  # a real choice to make
    best = max(fits, key=lambda e: (e["metric"], -e["size_bytes"]))
    assert (r["measured"]["metric"], r["measured"]["size_bytes"]) == (best["metric"], best["size_bytes"])
    assert sorted((e["size_bytes"], e["metric"]) for e in r["pareto"]) == brute_force_front(r["evaluated"])
    path = tmp_path / "chosen.json"
    path.write_text(json.dumps(r["recipe"]))
    again = run_json(capsys, "evaluate", "digits-mlp", "--recipe", str(path))
    assert again["quantized"]["metrics"]["accuracy"] == pytest.approx(r["measured"]["metric"], abs=1e-12)
    assert again["quantized"]["size_bytes"] == r["measured"]["size_bytes"] <= budget


# ---- roofline by hand ---------------------------------------------------------------------------
@pytest.mark.parametrize("units,runs_at", [({"fp32": 0.001, "fp16": 0.002}, "fp16"),
                                           ({"fp32": 0.001, "fp16": 0.002, "int8": 0.004}, "int8")])
def test_roofline_times_by_hand_and_the_fallback_precision(digits_mlp, units, runs_at):
    from qcore.analysis.roofline import roofline
    from qcore.recipe import preset

    prof = Profile("toy", "hand-made", 10.0, units)  # 10 GB/s; TOPS per precision
    r = as_dict(roofline(digits_mlp, preset("int8-static", digits_mlp.layer_shapes), prof, batch_size=2))
    rows = {row["layer"]: row for row in r["layers"]}
    assert set(rows) == set(SHAPES)
    for name, (c_out, c_in) in SHAPES.items():
        row = rows[name]
        weights = c_out * c_in * 1 + 4 * c_out  # int8 codes + one float32 scale per output channel
        nbytes = weights + 2 * (c_in * 1 + c_out * 4)  # per sample: int8 input, fp32 output
        ops = 2 * 2 * c_out * c_in  # 2 samples x 2 ops per multiply-add
        memory_ms = nbytes / 10e9 * 1e3
        compute_ms = ops / (units[runs_at] * 1e12) * 1e3
        assert (row["compute_precision"], row["runs_at"]) == ("int8", runs_at)
        assert (row["bytes"], row["ops"]) == (nbytes, ops)
        assert row["memory_ms"] == pytest.approx(memory_ms, rel=1e-12)
        assert row["compute_ms"] == pytest.approx(compute_ms, rel=1e-12)
        assert row["latency_ms"] == pytest.approx(max(memory_ms, compute_ms), rel=1e-12)
        assert row["bound"] == ("memory" if memory_ms >= compute_ms else "compute")
    assert r["total"]["latency_ms"] == pytest.approx(sum(row["latency_ms"] for row in rows.values()), rel=1e-12)
    fp32_bytes = sum(4 * co * ci + 2 * (4 * ci + 4 * co) for co, ci in SHAPES.values())  # no scales in fp32
    assert r["fp32_total"]["bytes"] == fp32_bytes
    assert any("no int8 units" in n for n in r["notes"]) == (runs_at != "int8")


# ---- sizes by hand ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,spec,expected", [
    ((128, 64), {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False},
     {"codes": 128 * 64 // 2, "scales": 128 * 2 * 4, "zero_points": 128 * 2 // 2}),  # 256 groups, 4-bit zero-points
    ((128, 64), {"format": "nf4"}, {"codes": 4096, "scales": 128 * 4, "zero_points": 0}),  # groups of 64
    ((64, 128), {"format": "int8", "granularity": "per_channel", "symmetric": False},
     {"codes": 8192, "scales": 64 * 4, "zero_points": 64}),
    ((10, 64), {"format": "fp8_e4m3", "granularity": "per_channel", "scaled": True},
     {"codes": 640, "scales": 40, "zero_points": 0}),
    ((10, 9), {"format": "int3", "granularity": "per_tensor"}, {"codes": math.ceil(90 * 3 / 8), "scales": 4, "zero_points": 0}),
    ((10, 96), {"format": "int4", "granularity": "per_group", "group_size": 64},  # fan-in 96: groups of 48
     {"codes": 480, "scales": 20 * 4, "zero_points": 0}),
    ((7, 5), {"format": "fp16"}, {"codes": 70, "scales": 0, "zero_points": 0}),
])
def test_weight_bytes_by_hand(shape, spec, expected):
    got = weight_bytes(shape, TensorSpec.from_dict(spec))
    assert got == {**expected, "total": sum(expected.values())}


# ---- latency statistics vs the statistics module ------------------------------------------------
def test_spread_and_speedup_match_the_statistics_module():
    from qcore.export.bench import speedup, spread

    base = [5.0, 3.0, 9.0, 4.0, 7.0, 6.0, 30.0, 5.5]  # an outlier round: the median ignores it
    other = [2.0, 1.5, 4.0, 2.5, 3.0, 2.0, 3.0, 2.75]
    s = spread(base)
    deciles = statistics.quantiles(base, n=10, method="inclusive")  # linear interpolation, like numpy's default
    assert s == {"median": statistics.median(base), "p10": pytest.approx(deciles[0], abs=1e-12),
                 "p90": pytest.approx(deciles[8], abs=1e-12), "runs": 8, "best": min(base)}
    assert s["median"] == 5.75 != statistics.mean(base)
    ratios = [b / o for b, o in zip(base, other)]
    r = speedup(base, other)
    assert r["median_ratio"] == pytest.approx(statistics.median(base) / statistics.median(other), abs=1e-12)
    q = statistics.quantiles(ratios, n=10, method="inclusive")
    assert (r["p10"], r["p90"], r["rounds"]) == (pytest.approx(q[0], abs=1e-12), pytest.approx(q[8], abs=1e-12), 8)

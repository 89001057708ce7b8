"""Sensitivity sweep speed: ``qcore.analysis.sensitivity.sweep`` next to the naive approach, in one run.

    python -m benchmarks.sensitivity [--quick] [--models digits-mlp,digits-cnn,minilm-l6]

For each model, every quantizable layer x 4 candidates (view "only", mode "both"):
- shared: what both approaches need first, on a fresh workload: FP32 reference outputs and
  calibration statistics;
- cold: shared + the sweep with an empty cache;
- cached: the same sweep again from memory, then from disk (memory cache cleared);
- naive: for each (layer, candidate) copy the model, quantize it (``Workload.simulate``) and run a
  full evaluation -- on the whole evaluation set (what a user would write), and on the same samples
  the sweep used (to separate the gain from reuse from the gain of sweeping a subset); plus shared.
  Ratios compare totals (naive + shared) / cold. On large models (``--naive-rows``) only some rows are timed and the total is
  **extrapolated** (mean time per row x rows), marked ``~`` in the table.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from qcore import zoo
from qcore.numerics.metrics import sqnr_db
from qcore.analysis.sensitivity import check_candidates, evenly_spaced, recipe_for, sweep
from qcore.analysis.sweep_cache import clear_memory_cache
from qcore.model.workload import Workload

CANDIDATES = ["int8-dynamic", "int8-static", "int4-weight-only", "nf4"]


def naive_seconds(w: Workload, rows: list[tuple[str, str]], index) -> tuple[float, dict]:
    """Wall time (s) of the naive sweep over ``rows`` (layer, candidate) on evaluation samples ``index``, and
    what it measured: {(layer, candidate): (headline metric, output SQNR dB)}."""
    data = w.evaluation.subset(index)
    reference = w.reference_outputs[index]
    measured = {}
    start = time.perf_counter()
    for layer, candidate in rows:
        out = w.run(w.simulate(recipe_for(w, layer, candidate)).model, data)
        measured[layer, candidate] = (w.task.metrics(out, reference, data.labels)[w.task.headline], sqnr_db(out, reference))
    return time.perf_counter() - start, measured


def bench_model(name: str, candidates: list[str], naive_rows: int | None) -> dict:
    import torch

    w = zoo.load(name)
    clear_memory_cache()
    start = time.perf_counter()
    w.reference_outputs, w.calibration_stats()
    shared = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        result = sweep(w, candidates, cache_dir=cache_dir)
        cold = shared + time.perf_counter() - start
        start = time.perf_counter()
        again = sweep(w, candidates, cache_dir=cache_dir)
        memory = time.perf_counter() - start
        clear_memory_cache()
        start = time.perf_counter()
        from_disk = sweep(w, candidates, cache_dir=cache_dir)
        disk = time.perf_counter() - start
    assert again == result == from_disk
    rows = [(r.layer, r.candidate) for r in result.rows if r.changed]
    timed = rows
    if naive_rows is not None and naive_rows < len(rows):  # evenly spread over layers and candidates
        step = len(rows) / naive_rows
        timed = [rows[int(i * step)] for i in range(naive_rows)]
    n_eval, n_sweep = result.evaluation_samples, result.samples
    seconds, naive = naive_seconds(w, timed, torch.arange(n_eval))
    full = shared + seconds * len(rows) / len(timed)
    subset_index = evenly_spaced(n_eval, n_sweep)  # the sweep's own samples
    assert len(subset_index) == n_sweep
    if n_sweep < n_eval:
        seconds, naive = naive_seconds(w, timed, subset_index)
        same = shared + seconds * len(rows) / len(timed)
    else:
        same = full
    # the sweep's numbers against the naive loop's (a second implementation: whole model simulated per row)
    swept = {(r["layer"], r["candidate"]): (r["metric"], r["sqnr_db"]) for r in result.to_dict()["rows"]}
    return {"model": name, "layers": len(w.layers), "runs": len(rows), "timed": len(timed),
            "samples": f"{n_sweep} of {n_eval}", "shared": shared, "cold": cold, "memory": memory, "disk": disk,
            "naive_full": full, "naive_same": same, "compared": len(naive),
            "max_metric_diff": max(abs(swept[k][0] - v[0]) for k, v in naive.items()),
            "max_sqnr_diff_db": max(abs(swept[k][1] - v[1]) for k, v in naive.items()),
            "min_sqnr_db": min(v[1] for v in naive.values())}


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits models only")
    ap.add_argument("--models", default="digits-mlp,digits-cnn,minilm-l6")
    ap.add_argument("--naive-rows", type=int, default=8, help="naive rows timed on minilm-l6 (then extrapolated)")
    return ap.parse_args(argv)


def measure(argv=None) -> list[dict]:
    """One row per model (``bench_model``: seconds, and the sweep-vs-naive agreement)."""
    args = _args(argv)
    models = ["digits-mlp", "digits-cnn"] if args.quick else args.models.split(",")
    candidates = check_candidates(CANDIDATES)
    return [bench_model(name, candidates, args.naive_rows if name == "minilm-l6" else None) for name in models]


def main(argv=None) -> str:
    import pandas as pd
    import torch

    candidates = check_candidates(CANDIDATES)
    table = []
    for r in measure(argv):
        mark = "~" if r["timed"] < r["runs"] else ""
        table.append({
            "model": r["model"], "layers x candidates": f"{r['layers']} x {len(candidates)} ({r['runs']} runs)",
            "sweep samples": r["samples"], "shared (s)": f"{r['shared']:.3g}", "cold sweep (s)": f"{r['cold']:.3g}",
            "from memory (ms)": f"{1e3 * r['memory']:.3g}", "from disk (ms)": f"{1e3 * r['disk']:.3g}",
            "naive, all samples (s)": f"{mark}{r['naive_full']:.3g}", "ratio": f"{mark}{r['naive_full'] / r['cold']:.1f}x",
            "naive, sweep's samples (s)": f"{mark}{r['naive_same']:.3g}",
            "ratio (same samples)": f"{mark}{r['naive_same'] / r['cold']:.1f}x",
            "max |sweep - naive| metric / SQNR dB": f"{r['max_metric_diff']:.2g} / {r['max_sqnr_diff_db']:.2g}",
            "_note": (f"naive time for {r['model']} extrapolated from {r['timed']} of {r['runs']} runs"
                      if mark else None)})
    notes = [t.pop("_note") for t in table]
    text = (f"Candidates: {', '.join(candidates)}; view `only`, mode `both`; {torch.get_num_threads()} torch threads. "
            "Both approaches first compute the FP32 reference outputs and calibration (`shared`, included in both "
            "totals); ratio = naive total / cold sweep total, measured side by side in this run.\n\n"
            + pd.DataFrame(table).to_markdown(index=False))
    text += "".join(f"\n\n~ {n} (mean time per run x runs): an extrapolation, not a measurement." for n in notes if n)
    print(text)
    return text


if __name__ == "__main__":
    main()

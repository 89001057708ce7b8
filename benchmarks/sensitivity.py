"""Sensitivity sweep speed: ``qcore.analysis.sensitivity.sweep`` next to the naive approach, in one run.

    python -m benchmarks.sensitivity [--quick] [--models digits-mlp,digits-cnn,minilm-l6] [--rounds 2] [--threads N]
                                     [--flops]

For each model, every quantizable layer x 4 candidates (view "only", mode "both"):
- shared: what both approaches need first, on a fresh workload: the calibration statistics (and the FP32
  reference outputs when the sweep uses every sample: the workload keeps them);
- cold: shared + the sweep with an empty cache (it computes its FP32 reference outputs on its samples);
- cached: the same sweep again from memory, then from disk (memory cache cleared);
- naive: the FP32 reference outputs on the sweep's samples (``sensitivity.sweep_reference``, as the sweep),
  then for each (layer, candidate) copy the model, quantize it (``Workload.simulate``) and run a
  full evaluation on the same samples the sweep used (and, when the sweep uses a subset, not on all
  samples: that would only add the gain of sweeping fewer samples); plus shared.
Every run is measured (nothing extrapolated); after one untimed warm-up of each (a one-candidate sweep, one
naive row), the cold sweep and the naive loop alternate for ``--rounds``
rounds and the table gives the median and the range of the per-round ratios, in wall time and in this
process's CPU time (less sensitive to other processes sharing the cores). Forward passes are counted while
timing: calls of the quantizable layers' ``forward`` and, for a model keeping its blocks in an
``nn.ModuleList`` (minilm-l6's 6 BertLayers), calls of the block's ``forward`` (a stacked run of 4 candidates'
copies of a batch counts once). ``--threads``: torch intra-op threads for the whole run (default: torch's own);
the 1-minute load average is printed before and after each model. ``--flops``: after the timed rounds, one more
cold sweep and naive loop (untimed) under ``torch.utils.flop_counter.FlopCounterMode``, which counts the FLOPs of
every matrix product (Linear layers, attention, convolutions) each computes: their ratio bounds the speed-up
that skipping work can give (the sweep computes only what follows each perturbed layer).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

from torch import nn

from qcore import zoo
from qcore.numerics.metrics import sqnr_db
from qcore.analysis.replay import call_order
from qcore.analysis.sensitivity import _sweep_index, check_candidates, evenly_spaced, recipe_for, sweep, sweep_reference
from qcore.analysis.sweep_cache import clear_memory_cache
from qcore.model.simulate import modules_by_name
from qcore.model.workload import Workload

CANDIDATES = ["int8-dynamic", "int8-static", "int4-weight-only", "nf4"]


@contextlib.contextmanager
def counting(classes):
    """Count calls of each class's ``forward`` (a replayed module's forward is replaced on the instance, so
    only computed calls count): yields {class name: calls}."""
    counts, real = {c.__name__: 0 for c in classes}, {c: c.forward for c in classes}

    def wrap(cls):
        def forward(self, *args, **kwargs):
            counts[cls.__name__] += 1
            return real[cls](self, *args, **kwargs)
        return forward

    for c in classes:
        c.forward = wrap(c)
    try:
        yield counts
    finally:
        for c in classes:
            c.forward = real[c]


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def naive_loop(w: Workload, rows: list[tuple[str, str]], index) -> dict:
    """The naive sweep over ``rows`` (layer, candidate) on evaluation samples ``index``: what it measured,
    {(layer, candidate): (headline metric, output SQNR dB)}."""
    data = w.evaluation.subset(index)
    reference = sweep_reference(w, index)
    measured = {}
    for layer, candidate in rows:
        out = w.run(w.simulate(recipe_for(w, layer, candidate)).model, data)
        measured[layer, candidate] = (w.task.metrics(out, reference, data.labels)[w.task.headline], sqnr_db(out, reference))
    return measured


def matmul_flops(fn) -> float:
    """FLOPs of the matrix products (mm, bmm, addmm, convolution, ...) that ``fn()`` computes."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def bench_model(name: str, candidates: list[str], rounds: int, flops: bool = False) -> dict:
    import torch

    w = zoo.load(name)
    load_before = os.getloadavg()[0]
    clear_memory_cache()
    _, _, per_sample = call_order(w.folded[0], w.layers, tuple(t[:2] for t in w.evaluation.inputs))
    every_sample = len(_sweep_index(len(w.evaluation), per_sample)) == len(w.evaluation)
    # the workload keeps its reference outputs on all samples: whoever runs first would pay for both
    _, shared, shared_cpu = _timed(lambda: (w.calibration_stats(), every_sample and w.reference_outputs))
    layer_classes = sorted({type(m) for m in modules_by_name(w.model, w.layers).values()}, key=lambda c: c.__name__)
    block_classes = sorted({type(b) for m in w.model.modules() if isinstance(m, nn.ModuleList) for b in m},
                           key=lambda c: c.__name__)
    classes = layer_classes + [c for c in block_classes if c not in layer_classes]
    with tempfile.TemporaryDirectory() as cache_dir:  # warm-up, untimed: lazy imports and first-call costs are
        first = sweep(w, candidates[:1], cache_dir=cache_dir)  # paid by neither approach's first timed run
        naive_loop(w, [(first.rows[0].layer, candidates[0])], evenly_spaced(first.evaluation_samples, first.samples))
    sweeps, naives, sweep_counts, naive_counts = [], [], {}, {}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache_dir:
            clear_memory_cache()
            with counting(classes) as sweep_counts:
                result, wall, cpu = _timed(lambda: sweep(w, candidates, cache_dir=cache_dir))
            sweeps.append((wall, cpu))
            if len(sweeps) == 1:
                again, memory, _ = _timed(lambda: sweep(w, candidates, cache_dir=cache_dir))
                clear_memory_cache()
                from_disk, disk, _ = _timed(lambda: sweep(w, candidates, cache_dir=cache_dir))
                assert again == result == from_disk
        rows = [(r.layer, r.candidate) for r in result.rows if r.changed]
        n_eval, n_sweep = result.evaluation_samples, result.samples
        subset_index = evenly_spaced(n_eval, n_sweep)  # the sweep's own samples
        assert len(subset_index) == n_sweep
        with counting(classes) as naive_counts:
            naive, wall, cpu = _timed(lambda: naive_loop(w, rows, subset_index))
        naives.append((wall, cpu))
    counted = {}
    if flops:
        with tempfile.TemporaryDirectory() as cache_dir:
            clear_memory_cache()
            counted = {"sweep_flops": matmul_flops(lambda: sweep(w, candidates, cache_dir=cache_dir)),
                       "naive_flops": matmul_flops(lambda: naive_loop(w, rows, subset_index)),
                       "forward_flops": matmul_flops(lambda: w.run(w.model, w.evaluation.subset(subset_index)))}
    ratios = [(shared + nw) / (shared + sw) for (sw, _), (nw, _) in zip(sweeps, naives)]
    cpu_ratios = [(shared_cpu + nc) / (shared_cpu + sc) for (_, sc), (_, nc) in zip(sweeps, naives)]
    # the sweep's numbers against the naive loop's (a second implementation: whole model simulated per row)
    swept = {(r["layer"], r["candidate"]): (r["metric"], r["sqnr_db"]) for r in result.to_dict()["rows"]}
    return {"model": name, "layers": len(w.layers), "runs": len(rows), "timed": len(rows), "rounds": rounds,
            "samples": f"{n_sweep} of {n_eval}", "shared": shared, "memory": memory, "disk": disk,
            "cold": shared + statistics.median(s for s, _ in sweeps),
            "cold_cpu": shared_cpu + statistics.median(c for _, c in sweeps),
            "naive_cpu": shared_cpu + statistics.median(c for _, c in naives),
            "load": (load_before, os.getloadavg()[0]),
            "naive_same": shared + statistics.median(n for n, _ in naives),
            "naive_full": shared + statistics.median(n for n, _ in naives) if n_sweep == n_eval else None,
            "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios)),
            "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratio_range": (min(cpu_ratios), max(cpu_ratios)),
            "sweep_forwards": dict(sweep_counts), "naive_forwards": dict(naive_counts),
            "blocks": [c.__name__ for c in block_classes], "compared": len(naive),
            "max_metric_diff": max(abs(swept[k][0] - v[0]) for k, v in naive.items()),
            "max_sqnr_diff_db": max(abs(swept[k][1] - v[1]) for k, v in naive.items()),
            "min_sqnr_db": min(v[1] for v in naive.values()), "threads": torch.get_num_threads(), **counted}


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits models only, one round")
    ap.add_argument("--models", default="digits-mlp,digits-cnn,minilm-l6")
    ap.add_argument("--rounds", type=int, default=2, help="alternating sweep / naive rounds per model")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--flops", action="store_true", help="count the matrix-product FLOPs of one more (untimed) "
                    "sweep and naive loop")
    return ap.parse_args(argv)


def measure(argv=None) -> list[dict]:
    """One row per model (``bench_model``: seconds, ratios, forward counts, and the sweep-vs-naive agreement)."""
    args = _args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = ["digits-mlp", "digits-cnn"] if args.quick else args.models.split(",")
    candidates = check_candidates(CANDIDATES)
    return [bench_model(name, candidates, 1 if args.quick else args.rounds, args.flops) for name in models]


def _forwards(counts: dict, names) -> str:
    return ", ".join(f"{counts[n]:,} {n}" for n in names if n in counts)


def main(argv=None) -> str:
    import pandas as pd

    candidates = check_candidates(CANDIDATES)
    table, rows = [], measure(argv)
    for r in rows:
        spread = f" ({r['ratio_range'][0]:.1f}–{r['ratio_range'][1]:.1f})" if r["rounds"] > 1 else ""
        cpu_spread = f" ({r['cpu_ratio_range'][0]:.1f}–{r['cpu_ratio_range'][1]:.1f})" if r["rounds"] > 1 else ""
        names = r["blocks"] or sorted(r["sweep_forwards"])
        table.append({
            "model": r["model"], "layers x candidates": f"{r['layers']} x {len(candidates)} ({r['runs']} runs)",
            "sweep samples": r["samples"], "shared (s)": f"{r['shared']:.3g}", "cold sweep (s)": f"{r['cold']:.3g}",
            "from memory (ms)": f"{1e3 * r['memory']:.3g}", "from disk (ms)": f"{1e3 * r['disk']:.3g}",
            "naive, sweep's samples (s)": f"{r['naive_same']:.3g}",
            "CPU s: sweep / naive": f"{r['cold_cpu']:.3g} / {r['naive_cpu']:.3g}",
            "load average": f"{r['load'][0]:.1f} → {r['load'][1]:.1f}",
            "ratio (same samples)": f"{r['ratio']:.1f}x{spread}", "CPU-time ratio": f"{r['cpu_ratio']:.1f}x{cpu_spread}",
            "forwards: sweep / naive": f"{_forwards(r['sweep_forwards'], names)} / {_forwards(r['naive_forwards'], names)}",
            "max |sweep - naive| metric / SQNR dB": f"{r['max_metric_diff']:.2g} / {r['max_sqnr_diff_db']:.2g}",
            **({"matmul GFLOP: sweep / naive (one forward)":
                f"{r['sweep_flops'] / 1e9:.1f} / {r['naive_flops'] / 1e9:.1f} ({r['forward_flops'] / 1e9:.2f})",
                "FLOP ratio": f"{r['naive_flops'] / r['sweep_flops']:.2f}x"} if "sweep_flops" in r else {})})
    text = (f"Candidates: {', '.join(candidates)}; view `only`, mode `both`; {rows[0]['threads']} torch threads; "
            f"{rows[0]['rounds']} alternating round(s) of cold sweep and naive loop, every run measured. Both approaches "
            "first compute the calibration statistics (`shared`, included in both totals) and each its FP32 reference "
            "outputs on the swept samples; ratio = naive "
            "total / cold sweep total on the same samples, median (range) over rounds, in wall time and in this process's "
            "CPU time. Forwards: calls of the repeated blocks' `forward` (an `nn.ModuleList`'s elements), else of the "
            "layers' (a stacked run of k candidates' copies of a batch counts once).\n\n"
            + pd.DataFrame(table).to_markdown(index=False))
    print(text)
    return text


if __name__ == "__main__":
    main()

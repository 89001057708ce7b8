"""Real execution on this CPU: the project's exports next to what users would otherwise run.

    python -m benchmarks.runtime [--quick] [--models digits-cnn,minilm-l6] [--threads N] [--batch-size N]

In one process and one run, on the same inputs and thread count, for each model:
- FP32 in ONNX Runtime (the baseline) and in torch (eager);
- the project's exports (``qcore.export.export``) executed by ONNX Runtime: int8-dynamic, int8-static,
  int8-static with symmetric (signed) activations, int4 weight-only (MatMulNBits where it applies);
- torch.ao ``quantize_dynamic`` (int8 Linear, fbgemm) and ONNX Runtime's own ``quantize_dynamic``.
Every row is timed in the same interleaved rounds (each round runs every row once, same inputs), so a
busy moment of a shared machine hits all rows alike. Columns: measured latency (median ms at batch 1
and at the batch size), speed-up against ONNX Runtime FP32 (ratio of medians, p10-p90 of the per-round
ratios), file size and its ratio to FP32 next to the recipe's physical limit (theoretical size / FP32),
and the headline metric on the evaluation set. Then a verdict line, and a roofline table of
*estimates* for the spec-sheet hardware profiles. Quick mode: digits-cnn only, shorter timing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings

import torch

from qcore import preset, zoo
from qcore.export import export, export_qdq
from qcore.analysis.roofline import roofline
from qcore.hardware import PROFILES
from qcore.recipe import Recipe
from qcore.export.bench import interleaved_times_ms, speedup, spread
from qcore.export.sessions import feed, run_onnx, session

warnings.filterwarnings("ignore")


def _metric(w, outputs) -> float:
    return w.task.metrics(outputs.float(), w.reference_outputs, w.evaluation.labels)[w.task.headline]


def model_rows(w, tmp: str, batch_size: int, threads: int, budget_s: float) -> list[dict]:
    """One row per way of running ``w``; every call of every row timed in the same interleaved rounds
    (``qcore.export.bench.interleaved_times_ms``), at batch 1 and at ``batch_size``."""
    torch.set_num_threads(threads)
    fp32_theory = w.size(Recipe(name="fp32"))["fp32_bytes"]
    rows, calls = [], []  # calls[i](data) runs row i on an input batch

    def onnx_row(tool, method, path, limit, note=""):
        sess = session(path, threads)
        rows.append({"tool": tool, "method": method, "size": os.path.getsize(path), "limit": limit,
                     head: _metric(w, run_onnx(sess, w, w.evaluation)), "note": note})
        calls.append(lambda data, s=sess: s.run(None, feed(w, data)))

    head = w.task.headline
    fp32_path = os.path.join(tmp, f"{w.name}.fp32.onnx")
    export_qdq(w, Recipe(name="fp32"), fp32_path)
    onnx_row("onnxruntime", "FP32", fp32_path, 1.0)
    symmetric = preset("int8-static", w.layer_shapes).to_dict()
    symmetric.update(name="int8-static-symmetric")
    symmetric["activations"]["symmetric"] = True
    for recipe in (preset("int8-dynamic", w.layer_shapes), preset("int8-static", w.layer_shapes),
                   Recipe.from_dict(symmetric), preset("int4-weight-only", w.layer_shapes)):
        path = os.path.join(tmp, f"{w.name}.{recipe.name}.onnx")
        r = export(w, recipe, "onnx", path)
        in_float = sum(row["executes"] == "float (dequantized)" for row in r.layers)
        onnx_row("qcore -> onnxruntime", recipe.name, path, r.theoretical_size_bytes / fp32_theory,
                 f"{in_float} of {len(r.layers)} layers run in float (dequantized)" if in_float else "")

    model = copy.deepcopy(w.model).eval()
    for method, m in (("FP32 (eager)", model),
                      ("quantize_dynamic (int8 Linear)",
                       torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8))):
        path = os.path.join(tmp, f"{w.name}.torch.pt")
        torch.save(m.state_dict(), path)
        rows.append({"tool": "torch", "method": method, "size": os.path.getsize(path), "limit": None,
                     head: _metric(w, w.run(m, w.evaluation)), "note": ""})
        calls.append(lambda data, m=m: m(*data.inputs))

    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = os.path.join(tmp, f"{w.name}.ort-dynamic.onnx")
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization's advice goes to the root logger
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(fp32_path, path, weight_type=QuantType.QInt8)
    root.setLevel(level)
    onnx_row("onnxruntime", "quantize_dynamic (defaults)", path, None)

    with torch.no_grad():
        for label, k in (("batch 1 ms", 1), ("batch B ms", batch_size)):
            data = w.evaluation.subset(slice(0, k))
            times = interleaved_times_ms({i: (lambda c=c, d=data: c(d)) for i, c in enumerate(calls)}, budget_s=budget_s)
            for i, row in enumerate(rows):
                row[label] = spread(times[i])["median"]
                if k == batch_size:
                    lat = spread(times[i])
                    row["p10-p90 B ms"] = f"{lat['p10']:.3g}-{lat['p90']:.3g}"
                    s = speedup(times[0], times[i])
                    row["speed-up"], row["speed-up p10-p90"] = s["median_ratio"], f"{s['p10']:.3g}-{s['p90']:.3g}"
    base = rows[0]
    for r in rows:
        r["size MiB"] = r.pop("size") / 2**20
        r["size / FP32"] = r["size MiB"] / base["size MiB"]
        r["physical limit"] = "n/a" if r["limit"] is None else f"{r['limit']:.3f}"
    return rows


def verdict(w, rows) -> str:
    head = w.task.headline
    ours = [r for r in rows if r["tool"].startswith("qcore") and r["method"].startswith("int8")]
    peers = [r for r in rows if "quantize_dynamic" in r["method"]]
    fast_ours, fast_peer = min(ours, key=lambda r: r["batch B ms"]), min(peers, key=lambda r: r["batch B ms"])
    acc_ours, acc_peer = max(ours, key=lambda r: r[head]), max(peers, key=lambda r: r[head])
    lines = ["(qcore exports compute the simulated model; the note says which layers ONNX Runtime runs in float.)"]
    speed_ok = fast_ours["batch B ms"] <= fast_peer["batch B ms"]
    lines.append(f"Speed: the fastest qcore int8 export ({fast_ours['method']}, {fast_ours['batch B ms']:.3g} ms) is "
                 f"{'at least as fast as' if speed_ok else 'SLOWER than'} the fastest peer ({fast_peer['tool']} "
                 f"{fast_peer['method']}, {fast_peer['batch B ms']:.3g} ms).")
    acc_ok = acc_ours[head] >= acc_peer[head] - 1e-9
    lines.append(f"Accuracy: the most accurate qcore int8 export ({acc_ours['method']}, {head} {acc_ours[head]:.4f}) is "
                 f"{'at least as accurate as' if acc_ok else 'LESS accurate than'} the best peer ({acc_peer['tool']} "
                 f"{acc_peer['method']}, {acc_peer[head]:.4f}).")
    return " ".join(lines)


def roofline_rows(w, batch_size: int) -> list[dict]:
    rows = []
    for key, prof in PROFILES.items():
        row = {"profile (estimate)": prof.name}
        for name in ("fp32", "fp16", "int8-static", "int4-weight-only"):
            r = roofline(w, preset(name, w.layer_shapes), key, batch_size=batch_size)
            row[f"{name} µs"] = 1e3 * r.total.latency_ms
        rows.append(row)
    return rows


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-cnn only, short timing (used by the test suite)")
    ap.add_argument("--models", default="digits-cnn,minilm-l6")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=8)
    return ap.parse_args(argv)


def measure(argv=None) -> list[dict]:
    """Per model: ``{"model", "metric" (headline name), "rows": model_rows (numbers: ms, MiB, ratios; "limit" =
    theoretical size / FP32 or None), "verdict", "roofline": roofline_rows at batch 1}``."""
    args = _args(argv)
    models = ["digits-cnn"] if args.quick else args.models.split(",")
    budget = 0.1 if args.quick else 1.5
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            w = zoo.load(name)
            rows = model_rows(w, tmp, args.batch_size, args.threads, budget)
            results.append({"model": name, "metric": w.task.headline, "rows": rows, "verdict": verdict(w, rows),
                            "roofline": roofline_rows(w, 1)})
    return results


def main(argv=None) -> str:
    import pandas as pd

    args = _args(argv)
    report = [f"ONNX Runtime and torch on this CPU, {args.threads} thread(s), batch size B = {args.batch_size}; latency is "
              "measured (warm-up, then every row timed in the same interleaved rounds, median; the speed-up is the ratio of "
              "medians against ONNX Runtime FP32, its spread the p10-p90 of per-round ratios); 'physical limit' is the "
              "recipe's theoretical size / FP32."]
    for r in measure(argv):
        name = r["model"]
        df = pd.DataFrame(r["rows"])
        cols = ["tool", "method", "batch 1 ms", "batch B ms", "p10-p90 B ms", "speed-up", "speed-up p10-p90",
                "size MiB", "size / FP32",
                "physical limit", r["metric"], "note"]
        report.append(f"#### {name}\n\n{df[cols].to_markdown(index=False, floatfmt='.4g')}\n\n{r['verdict']}\n")
        est = pd.DataFrame(r["roofline"])
        report.append(f"Roofline ESTIMATES for {name} at batch 1 (quantizable layers only; spec-sheet peaks, not "
                      f"measured):\n\n{est.to_markdown(index=False, floatfmt='.3g')}\n")
    text = "\n".join(report)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""Real pretrained models from pip wheels through inspect -> evaluate -> export -> run, as a user would.

    python -m benchmarks.real_models [--quick] [--models ocr-cls,magika] [--threads N]

The models and how each is turned into an upload (ONNX file from the wheel, or a ``.pt2`` exported from
the package's own ``nn.Module`` with the wheel's weights) and a data file are in ``tests/io/real_models.py``.
For each model, in this process, with the same functions the CLI calls:

- inspect  : ``load_workload(model, data)``; quantizable layers found and the share of all weights
             (floating-point values in the state dict) that they hold;
- evaluate : FP32 and the presets int8-dynamic, int8-static, int4-weight-only simulated
             (``Workload.evaluate``): headline metric and SQNR (dB) of the outputs against FP32;
- export   : ``qcore.export.export(..., "onnx")`` of each; file size (bytes) and the headline metric
             measured by running the file in ONNX Runtime;
- run      : the exported file at batch 1 and batch 8 in ONNX Runtime; batch-8 latency (median ms of
             interleaved rounds, FP32 and every preset's file in the same rounds).

A stage that fails ends that model's (or that preset's) row with the error's first line; nothing
crashes. Prints one Markdown table per stage and returns the rows. ``--quick``: the models listed in
``QUICK`` and a short timing budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "io"))
import real_models as registry  # noqa: E402  (tests/io/real_models.py: qcore-free, shared with the tests)

PRESETS = ["int8-dynamic", "int8-static", "int4-weight-only"]
QUICK = ["ocr-cls", "mtcnn-onet"]


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240] if text else ''}"


def _quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its warnings and prints (exporter chatter) held back."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def model_rows(m: registry.RealModel, tmp: Path, threads: int, budget_s: float) -> list[dict]:
    """One row for FP32 and one per preset: {model, recipe, stage reached, layers, quantizable share,
    metric, simulated, sqnr_db, onnxruntime, size_bytes, batch 1 / batch 8 ok, b8_ms, error}."""
    import torch

    from qcore.analysis.summary import layer_table
    from qcore.export import export
    from qcore.export.bench import interleaved_times_ms
    from qcore.export.sessions import feed, session
    from qcore.io.workload import load_workload
    from qcore.recipe import preset

    base = {"model": m.name, "kind": m.kind}
    try:
        model_path, data_path, _ = _quiet(m.build, m, tmp)
    except Exception as e:  # the package's class or torch.export failed: not qcore's doing, but recorded
        return [{**base, "recipe": "-", "stage": "build", "error": _line(e)}]
    try:
        w = _quiet(load_workload, str(model_path), str(data_path))
        rows = layer_table(w)
    except Exception as e:
        return [{**base, "recipe": "-", "stage": "inspect", "error": _line(e)}]
    total = sum(t.numel() for t in w.model.state_dict().values() if torch.is_floating_point(t))
    base.update(layers=len(rows), quantizable=sum(r["params"] for r in rows) / max(1, total), metric=w.task.headline)
    out, sessions = [], {}
    for name in ["fp32"] + PRESETS:
        row = {**base, "recipe": name, "stage": "evaluate"}
        out.append(row)
        try:
            recipe = preset(name, w.layer_shapes)
            r = _quiet(w.evaluate, recipe).quantized.metrics
            row.update(simulated=r[w.task.headline], sqnr_db=r.get("sqnr_db"), stage="export")
            path = tmp / f"{m.name}.{name}.onnx"
            rep = _quiet(export, w, recipe, "onnx", str(path))
            row.update(size_bytes=rep.file_size_bytes, onnxruntime=rep.metrics["onnxruntime"][w.task.headline],
                       stage="run")
            sess = session(str(path), threads)
            for n in (1, 8):
                sess.run(None, feed(w, w.evaluation.subset(slice(0, n))))
                row[f"batch {n}"] = "ok"
            sessions[name] = (sess, feed(w, w.evaluation.subset(slice(0, 8))))
            row["stage"] = "done"
        except Exception as e:
            row["error"] = _line(e)
    if sessions:
        times = interleaved_times_ms({k: (lambda s=s, f=f: s.run(None, f)) for k, (s, f) in sessions.items()},
                                     budget_s=budget_s, min_rounds=5)
        for row in out:
            if row["recipe"] in times:
                row["b8_ms"] = float(np.median(times[row["recipe"]]))
    return out


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, short timing")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(registry.BY_NAME)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else QUICK if args.quick else list(registry.BY_NAME)
    from qcore.hardware import cpu_features, cpu_name

    print(f"CPU: {cpu_name()}; flags: {', '.join(cpu_features()) or 'none found'}; {args.threads} threads\n")
    rows, models = [], []
    for name in names:
        m = registry.BY_NAME[name]
        if not m.installed():
            rows.append({"model": name, "recipe": "-", "stage": "build", "error": f"{m.package} is not installed"})
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            got = model_rows(m, Path(tmp), args.threads, 0.3 if args.quick else 1.0)
        rows += got
        held = " (held out of the tests)" if name == registry.HELD_OUT else ""
        models.append({"model": name + held, "package": f"{m.package}=={m.installed_version()}", "file": m.file,
                       "kind": m.kind, "output": m.output, "layers": got[0].get("layers"),
                       "quantizable": got[0].get("quantizable"), "seconds": time.perf_counter() - start})
    print(table(models, ["model", "package", "file", "kind", "output", "layers", "quantizable", "seconds"]))
    print()
    print(table(rows, ["model", "recipe", "stage", "metric", "simulated", "sqnr_db", "onnxruntime", "size_bytes",
                       "batch 1", "batch 8", "b8_ms", "error"]))
    print("\nstage: the last stage reached (done = inspected, evaluated, exported and run at batch 1 and 8); "
          "quantizable: share of the weights in layers the engine quantizes; b8_ms: median ONNX Runtime latency "
          "at batch 8 (ms); sizes in bytes on disk.")
    return rows


if __name__ == "__main__":
    main()

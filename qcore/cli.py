"""Command line: ``python -m qcore COMMAND ...``.

Every command prints a human-readable table, or with ``--json`` one JSON document on stdout.
User errors (bad file, bad recipe, unknown model) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import QcoreError


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    import pandas as pd

    if not rows:
        return "(none)"
    df = pd.DataFrame(rows)
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def resolve_workload(model: str, data: str | None = None, allow_pickle: bool = False, label_column: str | None = None):
    """A zoo name or a model file (plus optional data file) -> Workload."""
    from .zoo import ZOO, load

    if model in ZOO and data is None:
        return load(model)
    from .io.workload import load_workload

    return load_workload(model, data, allow_pickle=allow_pickle, label_column=label_column)


def _workload(args):
    return resolve_workload(args.model, getattr(args, "data", None), args.trust_pickle, getattr(args, "label_column", None))


def _recipe(args, workload):
    from .recipe import load_recipe

    if bool(args.preset) == bool(args.recipe):
        raise QcoreError("give exactly one of --preset NAME or --recipe FILE")
    return load_recipe(args.preset or args.recipe, workload.layer_shapes)


# ---- commands: each returns (json-able result, human-readable text) --------------------------
def cmd_formats(args):
    from .formats import FORMATS

    rows = [f.describe() for f in FORMATS.values()]
    return rows, _table(rows)


def cmd_models(args):
    from .size import float_bytes
    from .zoo import ZOO, load

    rows = []
    for name in ZOO:
        w = load(name)
        rows.append({"name": name, "params": sum(p.numel() for p in w.model.parameters()),
                     "fp32_size_bytes": float_bytes(w.model), "metric": w.task.headline,
                     "fp32_metric": w.fp32_metrics[w.task.headline], "layers": len(w.layers),
                     "description": w.description})
    return rows, _table(rows, ["name", "params", "fp32_size_bytes", "layers", "metric", "fp32_metric"])


def cmd_inspect(args):
    from .summary import layer_table

    w = _workload(args)
    rows = layer_table(w)
    result = {"model": w.name, "source": w.source, "notes": w.notes, "layers": rows,
              "calibration_samples": len(w.calibration), "evaluation_samples": len(w.evaluation)}
    text = f"{w.name} ({w.source}): {len(rows)} quantizable layers\n" + _table(
        [{**r, "weight_shape": "x".join(map(str, r["weight_shape"]))} for r in rows],
        ["name", "type", "weight_shape", "params", "share", "min", "max", "std", "max_over_std", "kurtosis"])
    return result, text + "".join(f"\nnote: {n}" for n in w.notes)


def cmd_evaluate(args):
    w = _workload(args)
    r = w.evaluate(_recipe(args, w))
    head = r["metric"]
    lines = [f"model {r['model']}  recipe {r['recipe']['name']}  headline metric: {head}"]
    keys = [k for k, v in r["quantized"]["metrics"].items() if isinstance(v, float)]
    rows = [{"": "fp32", "size": _mib(r["fp32"]["size_bytes"]), **{k: r["fp32"]["metrics"].get(k) for k in keys}},
            {"": "quantized", "size": _mib(r["quantized"]["size_bytes"]), **{k: r["quantized"]["metrics"][k] for k in keys}}]
    lines.append(_table(rows))
    lines += [f"folded {conv} + {bn}" for conv, bn in r["folded"]] + [f"note: {n}" for n in r["notes"]]
    return r, "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit code 2) instead of usage + error."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _progress(args):
    """A progress callback printing to stderr (so --json stdout stays clean)."""
    if args.json or not sys.stderr.isatty():
        return None
    return lambda frac, msg="": print(f"\r{100 * frac:5.1f}% {msg[:60]:<60}", end="", file=sys.stderr, flush=True)


def _candidates(args) -> list[str]:
    return [c.strip() for c in args.candidates.split(",") if c.strip()]


def cmd_sensitivity(args):
    from .sensitivity import sweep

    w = _workload(args)
    r = sweep(w, _candidates(args), mode=args.mode, view=args.view, progress=_progress(args), cache_dir=args.cache_dir)
    text = f"{r['model']}: {r['metric']} fp32 = {r['fp32_metric']:.4g}  (view {args.view}, mode {args.mode})\n"
    return r, text + _table(r["rows"], ["layer", "kind", "candidate", "changed", "weight_format", "input_format",
                                       "metric", "metric_drop", "sqnr_db", "layer_sqnr_db", "rmse_over_step",
                                       "clipped_fraction", "input_rmse_over_step", "input_clipped_fraction", "rank"]) \
        + "".join(f"\nnote: {n}" for n in r["notes"])


def cmd_search(args):
    from .search import search

    w = _workload(args)
    r = search(w, _candidates(args), max_size_fraction=args.max_size_fraction, max_size_bytes=args.max_size_bytes,
               min_metric=args.min_metric, progress=_progress(args), cache_dir=args.cache_dir)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(r["recipe"], indent=2))
    m, f = r["measured"], r["fp32"]
    text = (f"{r['model']}: chosen recipe measured {m['metric']:.4g} at {_mib(m['size_bytes'])} "
            f"(fp32 {f['metric']:.4g} at {_mib(f['size_bytes'])})" + (f"; written to {args.out}" if args.out else "")
            + ("" if r["met"] else "; the goal is NOT met")
            + "\nPareto front (measured):\n" + _table(r["pareto"], ["label", "size_bytes", "metric"])
            + "".join(f"\nnote: {n}" for n in r["notes"]))
    return r, text


def cmd_export(args):
    from .runtime import export

    w = _workload(args)
    r = export(w, _recipe(args, w), args.format, args.out)
    return r, "\n".join(f"{k}: {v}" for k, v in r.items())


def cmd_bench(args):
    from .runtime import bench

    w = _workload(args)
    r = bench(w, _recipe(args, w), batch_size=args.batch_size, threads=args.threads)
    return r, json.dumps(r, indent=2)


def _add_sweep_commands(command):
    c = command("sensitivity", cmd_sensitivity, "per-layer sensitivity to each candidate preset", model=True, data=True)
    c.add_argument("--candidates", required=True, help="comma-separated presets, e.g. int8-dynamic,int4-weight-only")
    c.add_argument("--mode", default="both", choices=["weights", "activations", "both"])
    c.add_argument("--view", default="only", choices=["only", "all_but"],
                   help="only: one layer quantized, rest FP32; all_but: everything quantized except one layer")
    c.add_argument("--cache-dir", default=os.environ.get("QCORE_CACHE_DIR"), help="on-disk sweep cache")
    c = command("search", cmd_search, "mixed-precision search under a size budget or a metric floor", model=True, data=True)
    c.add_argument("--candidates", required=True, help="comma-separated presets allowed per layer (fp32 always allowed)")
    goal = c.add_mutually_exclusive_group(required=True)
    goal.add_argument("--max-size-fraction", type=float, help="size budget as a fraction of FP32, e.g. 0.3")
    goal.add_argument("--max-size-bytes", type=int, help="size budget in bytes")
    goal.add_argument("--min-metric", type=float, help="smallest acceptable headline metric")
    c.add_argument("--out", help="write the chosen recipe JSON here")
    c.add_argument("--cache-dir", default=os.environ.get("QCORE_CACHE_DIR"), help="on-disk sweep cache")
    c = command("export", cmd_export, "export a model under a recipe (onnx or safetensors)", model=True, recipe=True, data=True)
    c.add_argument("--format", required=True, choices=["onnx", "safetensors"])
    c.add_argument("--out", required=True, help="output file path")
    c = command("bench", cmd_bench, "measure size, latency and metric in a real runtime", model=True, recipe=True, data=True)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qcore", description="Quantization Explorer engine")
    p.add_argument("--trust-pickle", action="store_true", default=os.environ.get("QCORE_TRUST_PICKLE") == "1",
                   help="allow loading pickled whole models (torch.save(model)); runs code from the file: "
                        "only for files you trust (env QCORE_TRUST_PICKLE=1 does the same)")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help, model=False, recipe=False, data=False):
        c = sub.add_parser(name, help=help, description=help)
        if model:
            c.add_argument("model", help="a zoo name (see `models`) or a model file (.pt2, .onnx, .pt/.ts, .safetensors)")
        if data:
            c.add_argument("--data", help="data file (.npz with x[,y], .pt tensors, .csv)")
            c.add_argument("--label-column", help="CSV: the column holding labels")
        if recipe:
            c.add_argument("--preset", help="a preset name (fp16, int8-static, ...)")
            c.add_argument("--recipe", help="a recipe JSON file")
        c.add_argument("--json", action="store_true", help="print JSON instead of a table")
        c.set_defaults(func=func)
        return c

    command("formats", cmd_formats, "every number format with bits, min/max and smallest step near zero")
    command("models", cmd_models, "the model zoo with parameters, FP32 size and FP32 metric")
    command("inspect", cmd_inspect, "quantizable layers of a model with weight statistics", model=True, data=True)
    command("evaluate", cmd_evaluate, "metrics and size of a model under a preset or recipe",
            model=True, recipe=True, data=True)
    for extra in _EXTRA_COMMANDS:
        extra(command)
    return p


# Functions that add more commands: each gets command(...) and adds arguments to what it returns.
_EXTRA_COMMANDS: list = [_add_sweep_commands]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result, text = args.func(args)
    except QcoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if args.json else text)
    return 0

"""Command line: ``python -m qcore COMMAND ...``.

Every command prints a human-readable table, or with ``--json`` one JSON document on stdout (the tables
are then never built: pandas is not even imported).
User errors (bad file, bad recipe, unknown model, an input too large for memory, an uploaded model the ONNX
exporter cannot convert) print exactly one line on stderr and exit with code 2. Warnings are held back
while a command runs, and so are torch's log lines (its loggers print straight to stderr otherwise:
"W1201 ... torchvision is not installed"), which become warnings of category ``LibraryLog``. After a
success the warnings are printed, except library chatter (those log lines, and deprecation warnings
raised inside installed packages, such as torch.export's pytree FutureWarnings); after a user error none
are; after an internal bug (a traceback, exit code 1) all are, before the traceback they may explain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

from qcore.cli_memory import add_command as add_memory_command  # the memory calculator's command, in its own module
from qcore.cli_qat import add_command as add_qat_command  # quantization-aware training's command, in its own module
from qcore.errors import QcoreError
from qcore.quiet import chatter, show_warnings, torch_logs_held_back

MAX_BATCH_SIZE = 65536  # bench --batch-size (it is clamped to the evaluation set anyway)
MAX_ERROR_CHARS = 1000  # an error line is cut here
# What torch (and ONNX Runtime) say when an allocation fails; MemoryError is Python's and numpy's.
_OUT_OF_MEMORY = re.compile(r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory)|std::bad_alloc"
                            r"|Failed to allocate memory")


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


def resolve_workload(model: str, data: str | None = None, allow_pickle: bool = False, label_column: str | None = None,
                     allow_no_data: bool = False, output_kind: str | None = None, batch_axes: list[str] | None = None):
    """A zoo name or a model file (plus optional data file) -> Workload (``allow_no_data``, ``output_kind``: see
    ``load_workload``; ``batch_axes``: the ``--batch-axis`` values, ``data.parse_batch_axes``)."""
    from qcore.zoo import ZOO, load

    if model in ZOO and data is None and output_kind is None and not batch_axes:
        return load(model)
    for what, path in (("model", model), ("data", data)):
        try:
            if path is not None:
                os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            pass  # the loaders name what exists
        except OSError as e:  # e.g. a name longer than the file system allows
            shown = path if len(path) <= 80 else path[:80] + "..."
            raise QcoreError(f"{what} path {shown!r} cannot be read ({e.strerror}); give a file path") from None
    from qcore.io.data import parse_batch_axes
    from qcore.io.workload import load_workload

    return load_workload(model, data, allow_pickle=allow_pickle, label_column=label_column, allow_no_data=allow_no_data,
                         output_kind=output_kind, batch_axes=parse_batch_axes(",".join(batch_axes or [])))


def _workload(args, allow_no_data: bool = False):
    return resolve_workload(args.model, getattr(args, "data", None), args.trust_pickle, getattr(args, "label_column", None),
                            allow_no_data, getattr(args, "output_kind", None), getattr(args, "batch_axis", None))


def _output_file(path: str) -> str:
    """Check ``--out`` before any work: a file path (not a directory or device) in a directory we can write,
    which is tested by creating a temporary file there."""
    import tempfile

    try:
        p = Path(path)
        if not path or p.is_dir():
            raise QcoreError(f"--out {path!r} is a directory; give a file path such as out/model.onnx")
        if p.exists() and not p.is_file():
            raise QcoreError(f"--out {path!r} exists and is not a regular file; give a file path")
        parent = p.resolve().parent
        if not parent.is_dir():
            raise QcoreError(f"the directory {parent} does not exist; create it or choose another --out")
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise QcoreError(f"--out {path[:200]!r} cannot be written ({e.strerror}); choose another path") from None
    return path


def _workload_and_recipe(args):
    """The workload and the recipe of --preset or --recipe. A recipe file is read and validated first, so
    a bad recipe fails before a large model is loaded; then it is checked against the model's layers."""
    from qcore.recipe import load_recipe

    if bool(args.preset) == bool(args.recipe):
        raise QcoreError("give exactly one of --preset NAME or --recipe FILE")
    recipe = load_recipe(args.recipe) if args.recipe else None
    w = _workload(args)
    if recipe is None:
        return w, load_recipe(args.preset, w.layer_shapes)
    recipe.check_against(w.layer_shapes)
    return w, recipe


# ---- commands: each returns (json-able result, human-readable text or a function building it) ----
def cmd_formats(args):
    from qcore.numerics.formats import FORMATS

    rows = [f.describe() for f in FORMATS.values()]
    return rows, lambda: _table(rows)


def cmd_models(args):
    from qcore.model.size import float_bytes
    from qcore.zoo import ZOO, load

    rows = []
    for name in ZOO:
        w = load(name)
        rows.append({"name": name, "params": sum(p.numel() for p in w.model.parameters()),
                     "fp32_size_bytes": float_bytes(w.model), "metric": w.task.headline,
                     "fp32_metric": w.fp32_metrics[w.task.headline], "layers": len(w.layers),
                     "description": w.description})
    return rows, lambda: _table(rows, ["name", "params", "fp32_size_bytes", "layers", "metric", "fp32_metric"])


def cmd_inspect(args):
    from qcore.analysis.summary import layer_table

    w = _workload(args, allow_no_data=True)  # layers and weight statistics need no input
    rows = layer_table(w)
    result = {"model": w.name, "source": w.source, "notes": w.notes, "layers": rows,
              "calibration_samples": len(w.calibration), "evaluation_samples": len(w.evaluation)}
    return result, lambda: f"{w.name} ({w.source}): {len(rows)} quantizable layers\n" + _table(
        [{**r, "weight_shape": "x".join(map(str, r["weight_shape"]))} for r in rows],
        ["name", "type", "weight_shape", "params", "share", "min", "max", "std", "max_over_std", "kurtosis"]) \
        + "".join(f"\nnote: {n}" for n in w.notes)


def _finetuned(args, w):
    """The workload itself, or with --weights the fine-tuned weights `qat --out` wrote for it."""
    if not getattr(args, "weights", None):
        return w
    from qcore.training import load_finetuned

    return load_finetuned(w, args.weights)


def cmd_evaluate(args):
    w, recipe = _workload_and_recipe(args)
    w = _finetuned(args, w)
    r = w.evaluate(recipe)
    lines = [f"model {r.model}  recipe {r.recipe['name']}  headline metric: {r.metric}"]
    keys = [k for k, v in r.quantized.metrics.items() if isinstance(v, float)]
    rows = [{"": "fp32", "size": _mib(r.fp32.size_bytes), **{k: r.fp32.metrics.get(k) for k in keys}},
            {"": "quantized", "size": _mib(r.quantized.size_bytes), **{k: r.quantized.metrics[k] for k in keys}}]
    lines += [f"folded {conv} + {bn}" for conv, bn in r.folded] + [f"note: {n}" for n in r.notes]
    return r.to_dict(), lambda: "\n".join(lines[:1] + [_table(rows)] + lines[1:])


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit code 2) instead of usage + error."""

    def error(self, message):
        _fail(f"{message} (see {self.prog} --help)")
        sys.exit(2)


def _fail(message: str) -> int:
    """Print ``message`` as the one error line (newlines folded, cut at MAX_ERROR_CHARS); return exit code 2."""
    line = re.sub(r"\s*[\r\n]+\s*", " ", message.strip())
    if len(line) > MAX_ERROR_CHARS:
        line = line[:MAX_ERROR_CHARS - 3] + "..."
    print(f"error: {line}", file=sys.stderr)
    return 2


def _count(limit: int):
    """An argparse type: a whole number from 1 to ``limit``."""
    def parse(text: str) -> int:
        if not (text.isdigit() and len(text) <= 12 and 1 <= int(text) <= limit):
            raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a whole number from 1 to {limit}")
        return int(text)
    return parse


def _progress(args):
    """A progress callback printing to stderr (so --json stdout stays clean)."""
    if args.json or not sys.stderr.isatty():
        return None
    return lambda frac, msg="": print(f"\r{100 * frac:5.1f}% {msg[:60]:<60}", end="", file=sys.stderr, flush=True)


def _candidates(args) -> list[str]:
    return [c.strip() for c in args.candidates.split(",") if c.strip()]


def cmd_sensitivity(args):
    from qcore.analysis.sensitivity import sweep

    w = _workload(args)
    r = sweep(w, _candidates(args), mode=args.mode, view=args.view, progress=_progress(args), cache_dir=args.cache_dir)
    text = (f"{r.model}: {r.metric} fp32 = {r.fp32_metric:.4g}, {'higher' if r.higher_is_better else 'lower'} is better; "
            f"metric_drop > 0 = worse  (view {args.view}, mode {args.mode})\n")
    return r.to_dict(), lambda: text + _table([row.to_dict() for row in r.rows], ["layer", "kind", "candidate", "changed", "weight_format", "input_format",
                                       "metric", "metric_drop", "sqnr_db", "layer_sqnr_db", "rmse_over_step",
                                       "clipped_fraction", "input_rmse_over_step", "input_clipped_fraction", "rank"]) \
        + "".join(f"\nnote: {n}" for n in r.notes)


def cmd_search(args):
    from qcore.analysis.search import search

    if args.out:
        _output_file(args.out)
    w = _workload(args)
    r = search(w, _candidates(args), max_size_fraction=args.max_size_fraction, max_size_bytes=args.max_size_bytes,
               min_metric=args.min_metric, progress=_progress(args), cache_dir=args.cache_dir)
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(r.recipe, indent=2))
        except OSError as e:
            raise QcoreError(f"--out {args.out!r} cannot be written ({e.strerror}); choose another path") from None
    m, f = r.measured, r.fp32
    return r.to_dict(), lambda: (
        f"{r.model}: chosen recipe measured {r.metric} {m.metric:.4g} "
        f"({'higher' if r.higher_is_better else 'lower'} is better) at {_mib(m.size_bytes)} "
        f"(fp32 {f.metric:.4g} at {_mib(f.size_bytes)})" + (f"; written to {args.out}" if args.out else "")
        + ("" if r.met else "; the goal is NOT met")
        + "\nPareto front (measured):\n" + _table(r.to_dict()["pareto"], ["label", "size_bytes", "metric"])
        + "".join(f"\nnote: {n}" for n in r.notes))


def cmd_export(args):
    from qcore.export import export

    _output_file(args.out)
    w, recipe = _workload_and_recipe(args)
    rep = export(_finetuned(args, w), recipe, args.format, args.out, args.runtime, args.precision)
    return rep.to_dict(), "\n".join([f"wrote {rep.path}"] + rep.summary_lines())


def cmd_bench(args):
    from qcore.export.bench import bench

    w, recipe = _workload_and_recipe(args)
    r = bench(w, recipe, args.batch_size, args.threads, runtime=args.runtime, precision=args.precision).to_dict()
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
    goal.add_argument("--min-metric", type=float, help="worst acceptable headline metric: a floor when higher "
                      "is better (accuracy), a ceiling when lower is better (perplexity)")
    c.add_argument("--out", help="write the chosen recipe JSON here")
    c.add_argument("--cache-dir", default=os.environ.get("QCORE_CACHE_DIR"), help="on-disk sweep cache")
    c = command("export", cmd_export, "export a model under a recipe (onnx, safetensors or an OpenVINO IR)", model=True, recipe=True, data=True)
    c.add_argument("--format", required=True, choices=["onnx", "safetensors", "openvino"], help="openvino: an IR (.xml + .bin)")
    c.add_argument("--out", required=True, help="output file path")
    _runtime_arguments(c, "also run the file in OpenVINO (onnxruntime always runs it)")
    c.add_argument("--weights", help="fine-tuned weights written by `qat --out DIR` (DIR/weights.safetensors)")
    c = command("bench", cmd_bench, "measure size, latency and metric in a real runtime", model=True, recipe=True, data=True)
    c.add_argument("--batch-size", type=_count(MAX_BATCH_SIZE), default=8)
    cores = os.cpu_count() or 1
    c.add_argument("--threads", type=_count(cores), default=None,
                   help=f"intra-op threads, at most this machine's {cores} cores (default: all cores)")
    _runtime_arguments(c, "which runtime runs both files (the same ONNX files either way)")


def _runtime_arguments(c, runtime_help: str) -> None:
    c.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"], help=runtime_help)
    c.add_argument("--precision", default="default", choices=["default", "f32", "bf16"], help="OpenVINO's "
                   "INFERENCE_PRECISION_HINT (default: bf16 on AMX/AVX-512 BF16 CPUs; f32: true FP32); reported")


def build_parser() -> argparse.ArgumentParser:
    from qcore.model.task import OUTPUT_KINDS

    p = _Parser(prog="python -m qcore", description="Quantization Explorer engine")
    p.add_argument("--trust-pickle", action="store_true", default=os.environ.get("QCORE_TRUST_PICKLE") == "1",
                   help="runs code from the file: allow pickled whole models (torch.save(model)) and TorchScript "
                        "archives (.pt/.ts from torch.jit.save), which are compiled code. Only for files you "
                        "trust; without it those are refused (env QCORE_TRUST_PICKLE=1 does the same)")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help, model=False, recipe=False, data=False):
        c = sub.add_parser(name, help=help, description=help)
        if model:
            c.add_argument("model", help="a zoo name (see `models`), a model file (.pt2, .onnx, .pt/.ts, .safetensors), or a "
                                         "Hugging Face causal-LM folder or .zip of one")
        if data:
            c.add_argument("--data", help="data file (.npz with x[,y], .pt tensors, .csv); a text file (.txt) for a Hugging "
                                          "Face language model")
            c.add_argument("--label-column", help="CSV: the column holding labels")
            c.add_argument("--output-kind", choices=list(OUTPUT_KINDS),
                           help="what the model's output is, which sets the headline metric (default: inferred from "
                                "a final Sigmoid/Softmax, the labels and the output shape): "
                                + "; ".join(f"{k}: {v}" for k, v in OUTPUT_KINDS.items()))
            c.add_argument("--batch-axis", action="append", metavar="INPUT=AXIS",
                           help="which axis of a data file's input counts its samples, e.g. state=1 for an LSTM state "
                                "(2, batch, 128); repeatable (default: axis 0, or the one axis as long as the first "
                                "input's batch); the exported file keeps that layout")
        if recipe:
            c.add_argument("--preset", help="a preset name (fp16, int8-static, ...)")
            c.add_argument("--recipe", help="a recipe JSON file")
        c.add_argument("--json", action="store_true", help="print JSON instead of a table")
        c.set_defaults(func=func)
        return c

    command("formats", cmd_formats, "every number format with bits, min/max and smallest step near zero")
    command("models", cmd_models, "the model zoo with parameters, FP32 size and FP32 metric")
    command("inspect", cmd_inspect, "quantizable layers of a model with weight statistics", model=True, data=True)
    c = command("evaluate", cmd_evaluate, "metrics and size of a model under a preset or recipe",
                model=True, recipe=True, data=True)
    c.add_argument("--weights", help="fine-tuned weights written by `qat --out DIR` (DIR/weights.safetensors)")
    for extra in _EXTRA_COMMANDS:
        extra(command)
    return p


# Functions that add more commands: each gets command(...) and adds arguments to what it returns.
_EXTRA_COMMANDS: list = [_add_sweep_commands, add_qat_command, add_memory_command]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # held back: a failure prints only its one line, a success no library chatter
    with warnings.catch_warnings(record=True) as caught, torch_logs_held_back():
        try:
            result, text = args.func(args)
        except QcoreError as e:
            return _fail(str(e))
        except (MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _OUT_OF_MEMORY.search(str(e)):
                show_warnings(caught)
                raise
            asked = re.search(r"tried to allocate (\d+) bytes", str(e))
            size = f" (it tried to allocate {int(asked[1]) / 2**30:.1f} GiB)" if asked else ""
            return _fail(f"ran out of memory while running {args.command}{size}; try a smaller input or recipe")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BaseException:  # an internal bug: its traceback follows, after the warnings that may explain it
            show_warnings(caught)
            raise
    show_warnings([w for w in caught if not chatter(w)])
    print(json.dumps(result, indent=2) if args.json else text() if callable(text) else text)
    return 0

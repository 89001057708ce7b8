"""Real low-precision execution: export a model under a recipe, run the file, measure it.

The simulation (``simulate``) predicts what quantization does; this module runs the file the export
wrote and puts both side by side, every number labelled with where it comes from:

- ``export(workload, recipe, "onnx" | "safetensors", out) -> ExportReport``: the file's size on disk
  next to the recipe's theoretical size, the task metrics measured by running the file in ONNX
  Runtime on the evaluation data next to the simulated ones, how each layer executes, and one line
  per gap between them (``differences``).

  ONNX: ``qcore.export.export_qdq`` writes the simulated model itself (the engine's codes, scales,
  zero-points and calibrated input ranges; no other tool re-quantizes anything). Every recipe the
  engine accepts exports; a layer ONNX Runtime cannot execute in low precision runs in float on the
  exact dequantized values, and its row says so and why.
  safetensors: ``quantized_safetensors`` (codes, scales, zero-points, static input ranges and the
  recipe); ``load_safetensors`` rebuilds the identical simulated model.

- ``bench(workload, recipe, batch_size, threads, budget_s)``: the FP32 and the quantized file timed in
  interleaved rounds (FP32, quantized, FP32, quantized, ... on the same inputs), so that a slow moment
  of a shared machine hits both alike; the speed-up is the ratio of the medians, with the p10-p90 of
  the per-round ratios as its spread.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qcore.errors import QcoreError
from qcore.export import export_qdq
from qcore.hardware import cpu_features, cpu_name
from qcore.export.safetensors import export_safetensors, load_safetensors  # noqa: F401 (part of this module's API)
from qcore.recipe import Recipe, preset
from qcore.model.size import weight_bytes

SIZE_TOLERANCE = 0.10  # file vs theoretical size: a larger relative gap is explained in ``differences``


@dataclass
class ExportReport:
    """What ``export`` wrote; every number says where it comes from.

    path, format                : the file, "onnx" | "safetensors"
    file_size_bytes             : the file on disk (os.path.getsize)
    theoretical_size_bytes      : the recipe's size (``workload.size``): codes at their bit width + scales +
                                  zero-points + every other tensor in float
    fp32_theoretical_size_bytes : the FP32 model's parameters and buffers
    fp32_file_size_bytes        : the FP32 model written by the same ONNX exporter (onnx only, else None)
    metric                      : the task's headline metric
    metrics                     : {"onnxruntime": task metrics of the file run in ONNX Runtime on the evaluation
                                  data (onnx only), "simulated": task metrics of ``workload.simulate(recipe)``}
    layers                      : per quantizable layer {layer, kind, weights, activations, executes, reason,
                                  stored_bytes, theoretical_bytes} (onnx only)
    differences                 : one line per gap: file vs theoretical size beyond 10 %, ONNX Runtime vs
                                  simulated headline metric beyond one evaluation sample
    notes                       : other remarks (layers running in float, CPU caveats)
    """

    path: str
    format: str
    file_size_bytes: int
    theoretical_size_bytes: int
    fp32_theoretical_size_bytes: int
    fp32_file_size_bytes: int | None
    metric: str
    metrics: dict
    layers: list[dict] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """What the file is, each number labelled (the Export page and ``export`` print exactly these lines)."""
        return summary_lines(self.to_dict())


def summary_lines(report: dict) -> list[str]:
    """``ExportReport.to_dict()`` -> labelled lines: file on disk vs theoretical size, the headline metric of
    the file run in ONNX Runtime vs the simulation, why they differ, which layers run in float in ONNX Runtime."""
    headline = report["metric"]
    lines = [f"file on disk: {report['file_size_bytes']:,} bytes (theoretical size {report['theoretical_size_bytes']:,} "
             f"bytes; FP32 {report['fp32_theoretical_size_bytes']:,} bytes)"]
    measured, simulated = report["metrics"].get("onnxruntime"), report["metrics"].get("simulated", {})
    if measured and headline in measured:
        lines.append(f"{headline}: {measured[headline]:.4f} measured by running this file in ONNX Runtime on the "
                     f"evaluation data; {simulated.get(headline, float('nan')):.4f} simulated")
    elif headline in simulated:
        lines.append(f"{headline}: {simulated[headline]:.4f} simulated (this format is not run by a runtime here)")
    lines += list(report.get("differences", [])) + list(report.get("notes", []))
    by_reason: dict[str, list[str]] = {}  # one line per reason, naming every layer it applies to
    for r in report.get("layers", []):
        if r.get("executes") == "float (dequantized)":
            by_reason.setdefault(r["reason"], []).append(r["layer"])
    lines += [f"{', '.join(names)} run{'s' if len(names) == 1 else ''} in float in ONNX Runtime: {reason}"
              for reason, names in by_reason.items()]
    return lines


@contextlib.contextmanager
def _onnx_exportable(workload):
    """ONNX export of the user's model: a TorchScript model cannot be traced by the exporter, and an uploaded
    model the exporter cannot convert (an operator without an ONNX function) is the model's problem, not a
    bug: either is one QcoreError line (CLI and app alike). A zoo model failing stays a traceback."""
    from torch.onnx import OnnxExporterError

    if workload.source == "torchscript":
        raise QcoreError(f"{workload.name} is a TorchScript model, which the ONNX exporter cannot trace, so an ONNX "
                         "export (or bench, which runs one) is not possible; export safetensors instead, or save the "
                         "model with torch.export.save (.pt2)")
    try:
        yield
    except OnnxExporterError as e:
        if workload.source == "zoo":
            raise
        cause = e
        while cause.__cause__ is not None:  # the exporter wraps the operator it could not convert
            cause = cause.__cause__
        text = str(cause).strip().splitlines()
        reason = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {text[0][:200]}" if text else type(cause).__name__)
        raise QcoreError(f"{workload.name} could not be converted to ONNX ({reason}), so an ONNX export (or bench, "
                         "which runs one) is not possible; replace that operator in the model, or export safetensors "
                         "instead") from None


def export(workload, recipe: Recipe, fmt: str, out: str) -> ExportReport:
    """Write ``workload``'s model under ``recipe`` to ``out`` as ``fmt`` and measure the file (see the
    module docstring and ``ExportReport``)."""
    if fmt not in ("onnx", "safetensors"):
        raise QcoreError(f"unknown export format {fmt!r}; use onnx or safetensors")
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise QcoreError(f"the directory {parent} does not exist; create it or choose another --out")
    out = str(out)
    head = workload.task.headline
    size = workload.size(recipe)
    simulated = workload.evaluate(recipe)["quantized"]["metrics"]
    if fmt == "safetensors":
        export_safetensors(workload, recipe, out)
        report = ExportReport(out, fmt, os.path.getsize(out), size["size_bytes"], size["fp32_bytes"], None, head,
                              {"simulated": simulated})
        if abs(report.file_size_bytes / size["size_bytes"] - 1) > SIZE_TOLERANCE:
            report.differences.append(
                f"the file is {report.file_size_bytes:,} B, {report.file_size_bytes / size['size_bytes'] - 1:+.0%} against the "
                f"theoretical {size['size_bytes']:,} B: safetensors "
                "stores codes below 8 bits packed but zero-points as int8, plus a JSON header (tensor index, recipe)")
        return report
    with _onnx_exportable(workload):
        written = export_qdq(workload, recipe, out)
    theory = {r["name"]: r["size_bytes"] for r in size["layers"]}
    layers = [{**row, "theoretical_bytes": theory[row["layer"]]} for row in written.layers]
    measured = workload.task.metrics(run_onnx(session(out, os.cpu_count() or 1), workload, workload.evaluation),
                                     workload.reference_outputs, workload.evaluation.labels)
    report = ExportReport(out, fmt, os.path.getsize(out), size["size_bytes"], size["fp32_bytes"],
                          _fp32_onnx_bytes(workload), head, {"onnxruntime": measured, "simulated": simulated},
                          layers, notes=list(written.notes))
    report.differences = (_size_differences(workload, recipe, report)
                          + _metric_differences(head, measured[head], simulated[head], len(workload.evaluation), layers))
    in_float = [r["layer"] for r in layers if r["executes"] == "float (dequantized)"]
    if in_float:
        report.notes.append(f"{len(in_float)} of {len(layers)} layers run in float in ONNX Runtime on their exact "
                            f"dequantized weights ({', '.join(in_float)}): see each layer's reason")
    if any(r["executes"] == "int8 kernel" for r in layers) and not _has_int8_dot_product():
        report.notes.append("this CPU has no VNNI/AMX int8 dot-product instructions: ONNX Runtime's int8 kernels use "
                            "AVX2 (vpmaddubsw), whose 16-bit intermediate sums can saturate")
    return report


def _fp32_onnx_bytes(workload) -> int:
    """Size of the FP32 model as written by the same exporter (its float graph is cached per workload)."""
    with tempfile.TemporaryDirectory() as tmp:
        return export_qdq(workload, preset("fp32"), os.path.join(tmp, "fp32.onnx")).size_bytes


def _has_int8_dot_product() -> bool:
    features = set(cpu_features())
    return "avx2" not in features or bool({"avx512_vnni", "avx_vnni", "amx_int8"} & features)


# ---- why two numbers differ ---------------------------------------------------------------------
def _size_differences(workload, recipe: Recipe, report: ExportReport) -> list[str]:
    """Where the file's bytes go when it is more than 10 % off the theoretical size: one line for the
    gap, one per layer stored wider (or narrower), one for everything outside the layers' weights."""
    file_b, theory_b = report.file_size_bytes, report.theoretical_size_bytes
    if abs(file_b / theory_b - 1) <= SIZE_TOLERANCE:
        return []
    lines = [f"the file is {file_b:,} B, {file_b / theory_b - 1:+.0%} against the theoretical {theory_b:,} B"]
    for row in report.layers:
        spec = recipe.plan(row["layer"]).weights
        theory = weight_bytes(workload.layer_shapes[row["layer"]], spec)
        stored = row["stored_bytes"]
        extra = stored["total"] - theory["total"]
        if abs(extra) <= max(32, 0.05 * theory["total"]):
            continue
        parts = [f"{role.replace('_', '-')} {stored[role]:,} vs {theory.get(role, 0):,} B ({_why_wider(role, row, spec)})"
                 for role in ("codes", "scales", "zero_points", "other") if stored[role] > theory.get(role, 0)]
        lines.append(f"{row['layer']}: {stored['total']:,} B stored vs {theory['total']:,} B theoretical "
                     f"({extra:+,} B); {row['weights']}" + (": " + "; ".join(parts) if parts else ""))
    import onnx

    tensors = sum(len(i.raw_data) or i.ByteSize() for i in onnx.load(report.path).graph.initializer)
    other = tensors - sum(r["stored_bytes"]["total"] for r in report.layers)
    rest_theory = theory_b - sum(r["theoretical_bytes"] for r in report.layers)
    lines.append(f"outside the layers' weights: {other:,} B of other tensors in the file (biases, input-quantizer "
                 f"constants) vs {rest_theory:,} B in theory (biases, norms, buffers), and {file_b - tensors:,} B of "
                 "graph (ops, names, protobuf framing) that the theoretical size does not count")
    return lines


def _why_wider(role: str, row: dict, spec) -> str:
    nbits = "MatMulNBits" in row["weights"]
    if role == "codes":
        slot = re.search(r"bits=(\d+)", row["weights"])
        if nbits and int(slot.group(1)) > spec.fmt.bits:
            return f"MatMulNBits has {slot.group(1)}-bit slots for {spec.fmt.bits}-bit codes"
        return ("padded to whole MatMulNBits blocks" if nbits else
                "ONNX integer types are 4, 8 or 16 bits wide, so narrower codes take the next container")
    if role == "scales":
        per = {"per_tensor": "tensor", "per_channel": "output channel",
               "per_group": f"group of {spec.group_size}"}[spec.granularity]
        return (f"MatMulNBits keeps one float32 scale per block along the input dimension, the recipe one per {per}"
                if nbits else f"float32 scales, one per {per}")
    if role == "zero_points":
        return ("MatMulNBits packs one per block" if nbits else "stored in a whole INT4/INT8 container") + \
            f"; the recipe counts them at {spec.fmt.bits} bits per {spec.granularity.removeprefix('per_')}"
    return "shapes and codebook constants for the decode ops"


def _metric_differences(head: str, measured: float, simulated: float, n_samples: int, layers: list[dict]) -> list[str]:
    """One line when ONNX Runtime's headline metric is more than one evaluation sample off the simulated one."""
    diff = measured - simulated
    if abs(diff) <= 1.0 / n_samples + 1e-12:
        return []
    kernels = [r["layer"] for r in layers if r["executes"] == "int8 kernel"]
    why = (f"{', '.join(kernels)} run in ONNX Runtime's fused int8 kernels, which quantize the bias to int32 and "
           "requantize the int32 sums where the simulation computes in float" if kernels else
           "every layer computes in float on the exact simulated values, so only float32 summation order differs")
    return [f"ONNX Runtime {head} {measured:.4f} vs simulated {simulated:.4f} ({diff:+.4f}, more than one of "
            f"{n_samples} evaluation samples): {why}"]


# ---- running a file ------------------------------------------------------------------------------
def input_names(workload) -> list[str]:
    return [f"input_{i}" for i in range(len(workload.calibration.inputs))]


def session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    # idle worker threads sleep instead of spinning: a spinning pool would steal the cores from the
    # other model timed right after it in an interleaved round
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def feed(workload, data) -> dict:
    """All of ``data`` as one ONNX Runtime input dict (one batch of len(data) samples)."""
    return {n: t.numpy() for n, t in zip(input_names(workload), data.inputs)}


def feeds(workload, data) -> list[dict]:
    """``data`` as ONNX Runtime input dicts in batches of workload.batch_size."""
    names = input_names(workload)
    return [{n: t.numpy() for n, t in zip(names, b)} for b in data.batches(workload.batch_size)]


def run_onnx(sess, workload, data) -> torch.Tensor:
    """Outputs of an ONNX Runtime session over ``data`` (batches of workload.batch_size), float32."""
    return torch.from_numpy(np.concatenate([sess.run(None, f)[0] for f in feeds(workload, data)])).float()


# ---- timing -------------------------------------------------------------------------------------
def interleaved_times_ms(runs: dict[str, Callable[[], object]], budget_s: float = 1.0, warmup: int = 3,
                         min_rounds: int = 20, max_rounds: int = 2000) -> dict[str, list[float]]:
    """Wall-clock milliseconds of each call in ``runs``, timed in rounds: every round calls each run once,
    in order (A, B, A, B, ...), so all see the same machine state. ``warmup`` untimed rounds, then at
    least ``min_rounds`` (more while within ``budget_s``, at most ``max_rounds``). {name: [ms per round]}."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def spread(values) -> dict:
    """{"median", "p10", "p90", "runs"} of a list of numbers."""
    p10, med, p90 = np.percentile(values, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90), "runs": len(values)}


def speedup(base_ms: list[float], other_ms: list[float]) -> dict:
    """``base`` over ``other`` from interleaved rounds: the ratio of the medians, and the p10 / p90 of the
    per-round ratios (each round's two runs saw the same machine state)."""
    ratios = np.asarray(base_ms) / np.asarray(other_ms)
    p10, p90 = np.percentile(ratios, [10, 90])
    return {"median_ratio": float(np.median(base_ms) / np.median(other_ms)), "p10": float(p10), "p90": float(p90),
            "rounds": len(ratios)}


# ---- measuring ----------------------------------------------------------------------------------
def versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count()}


def bench(workload, recipe: Recipe, batch_size: int = 8, threads: int | None = None, budget_s: float = 1.0) -> dict:
    """Export FP32 and ``recipe`` to ONNX, run both in ONNX Runtime on this CPU, and measure::

        {"model", "recipe", "backend", "threads", "batch_size", "metric", "timing",
         "cpu": {"name", "features"}, "versions",
         "fp32":      {"file_size_bytes", "theoretical_size_bytes", "latency_ms": {median, p10, p90, runs},
                       "metrics": {"onnxruntime", "simulated"}},      (headline metric values)
         "quantized": {... the same ...},
         "speedup": {"median_ratio" (FP32 median / quantized median), "p10", "p90" (per-round ratios), "rounds"},
         "layers", "differences", "notes"}                               (the quantized export's)

    Latency is measured at ``batch_size`` (the first samples of the evaluation data), both files
    interleaved round by round; nothing here is predicted.
    """
    if batch_size < 1 or (threads is not None and threads < 1):
        raise QcoreError("--batch-size and --threads must be positive integers")
    threads = threads or os.cpu_count() or 1
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the simulation runs with the same thread count
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return _bench(workload, recipe, batch_size, threads, budget_s, tmp)
    finally:
        torch.set_num_threads(torch_threads)


def _bench(workload, recipe: Recipe, batch_size: int, threads: int, budget_s: float, tmp: str) -> dict:
    head = workload.task.headline
    n = min(batch_size, len(workload.evaluation))
    inputs = feed(workload, workload.evaluation.subset(slice(0, n)))
    reports = {key: export(workload, r, "onnx", os.path.join(tmp, f"{key}.onnx"))
               for key, r in (("fp32", preset("fp32")), ("quantized", recipe))}
    sessions = {key: session(r.path, threads) for key, r in reports.items()}
    times = interleaved_times_ms({key: (lambda s=s: s.run(None, inputs)) for key, s in sessions.items()},
                                 budget_s=budget_s)
    result = {"model": workload.name, "recipe": recipe.name, "backend": "onnxruntime (CPUExecutionProvider)",
              "threads": threads, "batch_size": n, "metric": head,
              "timing": "interleaved rounds: FP32 then quantized, on the same inputs, after 3 warm-up rounds",
              "cpu": {"name": cpu_name(), "features": cpu_features()}, "versions": versions()}
    for key, r in reports.items():
        result[key] = {"file_size_bytes": r.file_size_bytes, "theoretical_size_bytes": r.theoretical_size_bytes,
                       "latency_ms": spread(times[key]),
                       "metrics": {source: m[head] for source, m in r.metrics.items()}}
    result["speedup"] = speedup(times["fp32"], times["quantized"])
    q = reports["quantized"]
    result.update(layers=q.layers, differences=q.differences, notes=q.notes)
    return result

"""Timing the FP32 and the quantized file on this CPU, in ONNX Runtime or OpenVINO: ``bench(...) -> BenchResult``.

Both files are timed in interleaved rounds (FP32, quantized, FP32, quantized, ... on the same inputs),
so that a slow moment of a shared machine hits both alike; each side reports its best, median and
p10-p90, the speed-up is the ratio of the medians, with the p10-p90 of the per-round ratios as its
spread. The runtime's execution precision is part of the result (OpenVINO's default runs float ops in
bf16 where the CPU has it). Nothing here is predicted.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qcore.errors import QcoreError
from qcore.export.report import export
from qcore.export.openvino import openvino_version, precision_label
from qcore.export.sessions import RUNTIMES, feed, fixed_batch, run_onnx, session
from qcore.hardware import cpu_features, cpu_name
from qcore.recipe import Recipe, preset


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
    """{"median", "p10", "p90", "runs", "best"} of a list of numbers (best: the smallest)."""
    p10, med, p90 = np.percentile(values, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90), "runs": len(values), "best": float(min(values))}


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
            "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "openvino": openvino_version()}



@dataclass(frozen=True)
class BenchSide:
    """One file of a bench: FP32 or quantized.

    file_size_bytes        : the file on disk
    theoretical_size_bytes : its recipe's size (``workload.size``)
    latency_ms             : ``spread`` of its per-round wall-clock times at the bench's batch size (ms)
    metrics                : the headline metric {"onnxruntime": the file run in ONNX Runtime on the
                             evaluation data, "simulated": ``workload.simulate``, and "openvino": the file
                             run in OpenVINO when that is the bench's runtime}
    """

    file_size_bytes: int
    theoretical_size_bytes: int
    latency_ms: dict
    metrics: dict


@dataclass(frozen=True)
class BenchResult:
    """What ``bench`` measured; ``to_dict()`` is the CLI's ``bench --json`` output.

    model, recipe, backend, threads : what ran where ("onnxruntime (CPUExecutionProvider)", intra-op threads)
    batch_size                      : samples per timed run (the first ones of the evaluation data)
    metric                          : the task's headline metric
    timing                          : how the rounds were run
    cpu, versions                   : {"name", "features"}; library versions, CPU name and cores
    fp32, quantized                 : ``BenchSide`` of each file
    speedup                         : ``speedup(fp32, quantized)``: {"median_ratio", "p10", "p90", "rounds"}
    layers, differences, notes      : the quantized export's (``ExportReport``)
    runtime                         : {"name": "onnxruntime" | "openvino", "precision": the float precision it
                                      executed in ("f32", "bf16", ...), "label": that said in words}
    language_model                  : for a causal LM, ``lm_timing``'s prefill and decode measurements, else None
    """

    model: str
    recipe: str
    backend: str
    threads: int
    batch_size: int
    metric: str
    timing: str
    cpu: dict
    versions: dict
    fp32: BenchSide
    quantized: BenchSide
    speedup: dict
    layers: list[dict]
    differences: list[str]
    notes: list[str]
    runtime: dict
    language_model: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def bench(workload, recipe: Recipe, batch_size: int = 8, threads: int | None = None,
          budget_s: float = 1.0, runtime: str = "onnxruntime", precision: str = "default") -> BenchResult:
    """Export FP32 and ``recipe`` to ONNX, run both in ``runtime`` ("onnxruntime" | "openvino", with OpenVINO's
    ``precision`` hint "default" | "f32" | "bf16") on this CPU with ``threads`` threads (default: all cores),
    and measure (``BenchResult``). Latency is measured at ``batch_size`` (the first samples of the evaluation
    data), both files interleaved round by round for at least ``budget_s`` seconds after 3 warm-up rounds;
    nothing here is predicted.
    """
    if batch_size < 1 or (threads is not None and threads < 1):
        raise QcoreError("--batch-size and --threads must be positive integers")
    if runtime not in RUNTIMES:
        raise QcoreError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    threads = threads or os.cpu_count() or 1
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the simulation runs with the same thread count
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return _bench(workload, recipe, batch_size, threads, budget_s, tmp, runtime, precision)
    finally:
        torch.set_num_threads(torch_threads)


def _bench(workload, recipe: Recipe, batch_size: int, threads: int, budget_s: float, tmp: str, runtime: str,
           precision: str) -> BenchResult:
    head = workload.task.headline
    n = min(batch_size, len(workload.evaluation))
    inputs = feed(workload, workload.evaluation.subset(slice(0, n)))
    reports = {key: export(workload, r, "onnx", os.path.join(tmp, f"{key}.onnx"))
               for key, r in (("fp32", preset("fp32")), ("quantized", recipe))}
    sessions = {key: session(r.path, threads, runtime, precision) for key, r in reports.items()}
    fixed = fixed_batch(sessions["quantized"], workload.evaluation.axis(0))
    if fixed is not None and fixed != n:
        raise QcoreError(f"the exported file runs only batches of {fixed} (the model's graph writes that size in; see "
                         f"the export notes), so it cannot be timed at batch {n}; use --batch-size {fixed}")
    times = interleaved_times_ms({key: (lambda s=s: s.run(None, inputs)) for key, s in sessions.items()},
                                 budget_s=budget_s)
    sides = {}
    for key, r in reports.items():
        metrics = {source: m[head] for source, m in r.metrics.items()}
        if runtime != "onnxruntime":  # the same file's metric in the runtime that was timed
            outputs = run_onnx(sessions[key], workload, workload.evaluation)
            metrics[runtime] = workload.task.metrics(outputs, workload.reference_outputs, workload.evaluation.labels)[head]
        sides[key] = BenchSide(r.file_size_bytes, r.theoretical_size_bytes, spread(times[key]), metrics)
    q = reports["quantized"]
    label = precision_label(sessions["quantized"])
    backend = "onnxruntime (CPUExecutionProvider)" if runtime == "onnxruntime" else f"openvino (CPU): {label}"
    return BenchResult(workload.name, recipe.name, backend, threads, n, head,
                       "interleaved rounds: FP32 then quantized, on the same inputs, after 3 warm-up rounds",
                       {"name": cpu_name(), "features": cpu_features()}, versions(), sides["fp32"], sides["quantized"],
                       speedup(times["fp32"], times["quantized"]), q.layers, q.differences, q.notes,
                       {"name": runtime, "precision": getattr(sessions["quantized"], "precision", "f32"),
                        "label": label},
                       lm_timing(workload, sessions, budget_s) if workload.task.kind == "causal-lm" else None)


PROMPT_TOKENS, NEW_TOKENS = 64, 16  # the LM bench's prompt (the first evaluation window's start) and decode length


def lm_timing(workload, sessions: dict, budget_s: float) -> dict:
    """A language model's speed at batch 1 in ONNX Runtime, FP32 and quantized interleaved as above:
    ``prefill_ms`` (``spread``) of one run over a ``PROMPT_TOKENS``-token prompt, and ``decode_tokens_per_s``
    of greedily adding ``NEW_TOKENS`` tokens. The exported graph has no KV cache (no past key/value inputs),
    so each new token re-runs the whole prefix: decode here is prefill of a growing prompt, slower than a
    runtime with a cache, and ``decode`` says so."""
    first = workload.evaluation.inputs[0][:1]
    prompt = first[:, :PROMPT_TOKENS].numpy()
    name = sessions["fp32"].get_inputs()[0].name

    def prefill(s):
        return lambda: s.run(None, {name: prompt})

    def decode(s):
        def run():
            ids = prompt
            for _ in range(NEW_TOKENS):
                logits = s.run(None, {name: ids})[0]
                ids = np.concatenate([ids, logits[:, -1:].argmax(-1).astype(ids.dtype)], axis=1)
        return run

    pre = interleaved_times_ms({k: prefill(s) for k, s in sessions.items()}, budget_s=budget_s)
    dec = interleaved_times_ms({k: decode(s) for k, s in sessions.items()}, budget_s=budget_s, warmup=1, min_rounds=3)
    return {"batch_size": 1, "prompt_tokens": int(prompt.shape[1]), "new_tokens": NEW_TOKENS,
            "prefill_ms": {k: spread(v) for k, v in pre.items()},
            "decode_tokens_per_s": {k: NEW_TOKENS * 1e3 / float(np.median(v)) for k, v in dec.items()},
            "prefill_speedup": speedup(pre["fp32"], pre["quantized"]),
            "decode_speedup": speedup(dec["fp32"], dec["quantized"]),
            "decode": "no KV cache in the exported graph: each new token re-runs the whole prefix (prompt + tokens so far)"}

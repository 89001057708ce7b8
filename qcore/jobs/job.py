"""A job: a named kind + JSON inputs + the workload it runs on; its key, its status and the limits it runs under.

A kind is a pair of functions registered in ``KINDS``: ``check(workload, inputs)`` raises ``QcoreError``
at submission (so a bad request fails in the page, not later in a worker) and ``run(workload, inputs,
progress, should_stop)`` returns a JSON-able dict. ``progress(fraction, message)`` takes a fraction in
[0, 1] and a one-line status; ``should_stop()`` is true once the job is cancelled or over its time limit.

The job key is the first 32 hex digits of a SHA-256 over canonical JSON of (kind, workload
``content_hash``, inputs, ``code_version``): the same request from any session, replica or machine
gets the same key, so it runs once. A workload is named by ``source`` (``"zoo:<name>"``, or
``"upload:<hash>"`` for a file held by one app process) and ``content_hash``; a worker loads zoo models
itself and refuses one whose files hash differently from the app's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from qcore import zoo
from qcore.analysis import search, sensitivity
from qcore.analysis.sweep_cache import code_version
from qcore.errors import QcoreError
from qcore.recipe import Recipe

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")  # states that count against the caps and that a new submission joins


class JobStopped(QcoreError):
    """The job was cancelled or passed its time limit (raised from ``progress`` inside the job)."""


@dataclass(frozen=True)
class Limits:
    """What protects a class. Caps count jobs queued or running; ``time_limit_s`` is wall seconds from the
    job's start; ``ttl_s`` how long records and results of finished jobs (and uploads, in the app) are kept."""
    workers: int = 2  # in-process backend: jobs run at once (RQ: the number of worker processes started)
    per_session: int = 2
    total: int = 16
    time_limit_s: float = 900.0
    ttl_s: float = 2 * 3600.0

    @classmethod
    def from_env(cls) -> "Limits":
        env = {"workers": "QCORE_JOB_WORKERS", "per_session": "QCORE_JOBS_PER_SESSION", "total": "QCORE_JOBS_TOTAL",
               "time_limit_s": "QCORE_JOB_TIME_LIMIT_S", "ttl_s": "QCORE_SESSION_TTL_S"}
        values = {}
        for name, var in env.items():
            if os.environ.get(var):
                kind = int if name in ("workers", "per_session", "total") else float
                try:
                    values[name] = kind(os.environ[var])
                except ValueError:
                    raise QcoreError(f"${var}={os.environ[var]!r} is not a number; set it to e.g. "
                                     f"{getattr(cls, name)!r} or unset it") from None
        return cls(**values)


@dataclass
class Status:
    """What a page shows of a job. ``fraction`` in [0, 1]; ``message`` one line; ``result`` only when done."""
    key: str
    kind: str
    state: str
    fraction: float = 0.0
    message: str = ""
    owner: str = ""
    result: dict | None = None
    attempt: int = 1

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE


@dataclass(frozen=True)
class JobSpec:
    """``kind`` (a key of ``KINDS``), ``workload`` ``{"source", "content_hash"}`` (or None for a kind that
    needs none) and ``inputs`` (JSON-able)."""
    kind: str
    workload: dict | None
    inputs: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        content = {"kind": self.kind, "workload": (self.workload or {}).get("content_hash"), "inputs": self.inputs,
                   "code": code_version()}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "workload": self.workload, "inputs": self.inputs}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        d = json.loads(text)
        return cls(d["kind"], d["workload"], d["inputs"])


def spec_for(kind: str, source: str | None, workload, inputs: dict) -> JobSpec:
    """The job ``kind`` on ``workload`` (named ``source``: ``"zoo:<name>"``/``"upload:<hash>"``), checked."""
    if kind not in KINDS:
        raise QcoreError(f"unknown job kind {kind!r}; kinds: {', '.join(KINDS)}")
    try:
        json.dumps(inputs, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise QcoreError(f"the {kind} job's inputs are not plain JSON ({e}); pass numbers, strings, lists") from None
    KINDS[kind][0](workload, inputs)
    ref = None if workload is None else {"source": source, "content_hash": workload.content_hash}
    return JobSpec(kind, ref, inputs)


# ---- the workload a worker runs on ------------------------------------------------------------
_ZOO: dict[str, object] = {}


def load_workload(ref: dict | None, local: dict | None = None):
    """The workload ``ref`` names: ``local[content_hash]`` when this process holds it (the in-process backend),
    else the zoo model (loaded once per process), checked against the app's ``content_hash``."""
    if ref is None:
        return None
    if local and ref["content_hash"] in local:
        return local[ref["content_hash"]]
    source = ref["source"] or ""
    if not source.startswith("zoo:"):
        raise QcoreError(f"this worker cannot load {source!r}: an uploaded model lives in the app process that "
                         "received it; run the job in-process (unset $QCORE_REDIS_URL) or use a zoo model")
    name = source[4:]
    if name not in _ZOO:
        _ZOO[name] = zoo.load(name)
    if _ZOO[name].content_hash != ref["content_hash"]:
        raise QcoreError(f"this worker's {name} files differ from the app's (content hash "
                         f"{_ZOO[name].content_hash[:12]} vs {ref['content_hash'][:12]}); install the same qcore on both")
    return _ZOO[name]


def reporter(report: Callable[[float, str], None], stopped: Callable[[], str | None]):
    """``(progress, should_stop)`` for a kind's ``run``: ``progress`` passes the fraction (clamped to [0, 1]) and
    message on, then raises ``JobStopped(reason)`` when ``stopped()`` names one; ``should_stop`` says whether it
    would (the engine's own loops check it between steps)."""
    def progress(fraction: float, message: str = "") -> None:
        report(min(max(float(fraction), 0.0), 1.0), str(message).splitlines()[0] if message else "")
        why = stopped()
        if why:
            raise JobStopped(why)
    return progress, lambda: bool(stopped())


def deadline_check(started: float, limits: Limits) -> str | None:
    if time.monotonic() - started > limits.time_limit_s:
        return (f"the job ran past its time limit of {limits.time_limit_s:g} s and was stopped; ask for fewer "
                "candidates or a smaller model, or raise $QCORE_JOB_TIME_LIMIT_S")
    return None


# ---- the kinds ------------------------------------------------------------------------------------
def _check_sweep(w, inputs: dict) -> None:
    sensitivity.check_candidates(inputs.get("candidates"))
    if inputs.get("mode", "both") not in sensitivity.MODES:
        raise QcoreError(f"unknown mode {inputs.get('mode')!r}; use one of {', '.join(sensitivity.MODES)}")
    if inputs.get("view", "only") not in sensitivity.VIEWS:
        raise QcoreError(f"unknown view {inputs.get('view')!r}; use one of {', '.join(sensitivity.VIEWS)}")


def _run_sweep(w, inputs: dict, progress, should_stop) -> dict:
    return sensitivity.sweep(w, inputs["candidates"], inputs.get("mode", "both"), inputs.get("view", "only"),
                             progress=progress, should_stop=should_stop).to_dict()


GOALS = ("max_size_fraction", "max_size_bytes", "min_metric")


def _check_search(w, inputs: dict) -> None:
    sensitivity.check_candidates(inputs.get("candidates"))
    goals = [g for g in GOALS if inputs.get(g) is not None]
    if len(goals) != 1 or not isinstance(inputs[goals[0]], (int, float)):
        raise QcoreError(f"a search needs exactly one numeric goal of {', '.join(GOALS)}; got {goals or 'none'}")


def _run_search(w, inputs: dict, progress, should_stop) -> dict:
    goal = {g: inputs[g] for g in GOALS if inputs.get(g) is not None}
    return search.search(w, inputs["candidates"], **goal, progress=progress, should_stop=should_stop).to_dict()


def _checked_recipe(w, inputs: dict) -> Recipe:
    """The job's ``inputs["recipe"]``, read and checked against ``w``'s layers (one-line errors)."""
    recipe = Recipe.from_dict(inputs.get("recipe") or {})
    recipe.check_against(w.layer_shapes)
    return recipe


def _check_layer(w, inputs: dict, where: str) -> str:
    """The job's ``inputs["layer"]``, one of ``w``'s quantizable layers (``where``: the page that lists them)."""
    if inputs.get("layer") not in w.layer_shapes:
        raise QcoreError(f"{w.name} has no quantizable layer {inputs.get('layer')!r}; pick one {where} lists")
    return inputs["layer"]


def _check_evaluate(w, inputs: dict) -> None:
    _checked_recipe(w, inputs)


def _run_evaluate(w, inputs: dict, progress, should_stop) -> dict:
    return w.evaluate(Recipe.from_dict(inputs["recipe"]), progress=lambda f: progress(f, "evaluating"),
                      should_stop=should_stop).to_dict()


def _check_qat(w, inputs: dict) -> None:
    from qcore.training import qat, transport

    recipe = _checked_recipe(w, inputs)
    qat.check_recipe(w, recipe, transport.config_from(inputs).learn_scales)


def _run_qat(w, inputs: dict, progress, should_stop) -> dict:
    """A QAT run (``qcore.training.finetune``); the result carries the fine-tuned weights (``training.transport``)."""
    from qcore.training import finetune, transport

    config = transport.config_from(inputs)

    def report(fraction: float, row) -> None:  # row: an EpochRow after each epoch (epoch 0 = PTQ), None per step
        if row is None:
            return progress(fraction, "training")
        done = "PTQ evaluated" if row.epoch == 0 else f"epoch {row.epoch} of {config.epochs}"
        progress(fraction, f"{done}: {w.task.headline} {row.metric:.4f}")
    result = finetune(w, Recipe.from_dict(inputs["recipe"]), config, progress=report, should_stop=should_stop)
    return transport.to_json(result, w)


def _check_remedy(w, inputs: dict) -> None:
    from qcore.analysis.remedies import REMEDIES

    recipe = _checked_recipe(w, inputs)
    if inputs.get("name") not in REMEDIES:
        raise QcoreError(f"unknown remedy {inputs.get('name')!r}; remedies: {', '.join(REMEDIES)}")
    REMEDIES[inputs["name"]].apply(w, recipe, _check_layer(w, inputs, "the Sensitivity page"))  # a remedy that does not fit the layer: one line, now


def _run_remedy(w, inputs: dict, progress, should_stop) -> dict:
    """``analysis.remedies.try_remedy`` (a PTQ algorithm on one layer, before and after); its recipe as JSON."""
    from qcore.analysis.remedies import try_remedy

    out = try_remedy(w, Recipe.from_dict(inputs["recipe"]), inputs["layer"], inputs["name"], progress, should_stop)
    return {**out, "recipe": out["recipe"].to_dict()}


PREVIEWS = ("smoothquant", "cle")  # the Activations/Weights pages' "Try SmoothQuant" / "Try cross-layer equalization"


def _check_preview(w, inputs: dict) -> None:
    from qcore.analysis import transform_remedies

    recipe = _checked_recipe(w, inputs)
    if inputs.get("name") not in PREVIEWS:
        raise QcoreError(f"unknown transform preview {inputs.get('name')!r}; previews: {', '.join(PREVIEWS)}")
    layer = _check_layer(w, inputs, "the page")
    if inputs["name"] == "smoothquant":  # a fold, or a Mul where none reaches; neither: one line, now
        transform_remedies.smoothquant_fold_or_mul(w, recipe, layer)
    else:
        transform_remedies.group_of(w, layer, inputs["name"])  # no group: one line, now


def _run_preview(w, inputs: dict, progress, should_stop) -> dict:
    """``transform_remedies.smoothquant_preview`` / ``cle_preview`` on one layer; its recipe as JSON."""
    from qcore.analysis import transform_remedies

    progress(0.0, f"simulating the recipe with and without {inputs['name']}")
    compute = {"smoothquant": transform_remedies.smoothquant_preview, "cle": transform_remedies.cle_preview}
    out = compute[inputs["name"]](w, Recipe.from_dict(inputs["recipe"]), inputs["layer"])
    return {**out, "recipe": out["recipe"].to_dict()}


BENCH_RUNTIMES = {"onnxruntime": ("default",), "openvino": ("default", "f32", "bf16")}


def _check_bench(w, inputs: dict) -> None:
    _checked_recipe(w, inputs)
    runtime, precision = inputs.get("runtime", "onnxruntime"), inputs.get("precision", "default")
    if precision not in BENCH_RUNTIMES.get(runtime, ()):
        raise QcoreError(f"cannot time with runtime {runtime!r} at precision {precision!r}; use one of "
                         + ", ".join(f"{r} ({'/'.join(p)})" for r, p in BENCH_RUNTIMES.items()))
    if not isinstance(inputs.get("batch_size", 1), int) or not 1 <= inputs.get("batch_size", 1) <= 256:
        raise QcoreError(f"the timing's batch size must be a whole number from 1 to 256; got {inputs.get('batch_size')!r}")


def _run_bench(w, inputs: dict, progress, should_stop) -> dict:
    """``export.bench.bench`` of FP32 and the recipe, measured where the job runs, with the torch threads this
    process was given (a worker's pinned threads; in-process, fewer while several jobs run): the result's
    ``cpu`` and ``threads`` say which machine and how many threads."""
    import torch

    from qcore.export.bench import bench

    progress(0.0, "exporting and timing")
    return bench(w, Recipe.from_dict(inputs["recipe"]), batch_size=inputs.get("batch_size", 1),
                 threads=torch.get_num_threads(), runtime=inputs.get("runtime", "onnxruntime"),
                 precision=inputs.get("precision", "default")).to_dict()


KINDS: dict[str, tuple[Callable, Callable]] = {  # kind -> (check at submission, run in the worker)
    "sweep": (_check_sweep, _run_sweep),
    "search": (_check_search, _run_search),
    "evaluate": (_check_evaluate, _run_evaluate),
    "qat": (_check_qat, _run_qat),
    "remedy": (_check_remedy, _run_remedy),
    "bench": (_check_bench, _run_bench),
    "preview": (_check_preview, _run_preview),
}

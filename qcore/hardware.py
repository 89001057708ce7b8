"""Hardware targets and a roofline ESTIMATE of latency per precision.

``PROFILES`` holds public spec-sheet figures (dense peak throughput per precision, memory bandwidth)
for a few targets; ``probe()`` measures this machine briefly. ``roofline(workload, recipe, profile)``
estimates each layer's time as ``max(bytes moved / bandwidth, operations / peak throughput)``: a
layer is memory-bound when its weights and activations take longer to move than to multiply.
This is why INT8 can be 4x smaller but not 4x faster where the chip has no faster int8 units.

Every number ``roofline`` returns is an **estimate** (labelled so); only ``runtime.bench`` measures.
Units: bandwidth in GB/s (1e9 bytes/s), throughput in TOPS (1e12 operations/s, a multiply-add = 2).
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .errors import QcoreError
from .recipe import Recipe
from .simulate import modules_by_name, temporary_hooks
from .size import weight_bytes


@dataclass(frozen=True)
class Profile:
    """A compute target: memory bandwidth (GB/s), dense peak TOPS per precision, and where the
    numbers come from. A precision missing from ``peak_tops`` has no dedicated units on the part."""

    name: str
    kind: str
    memory_bandwidth_gb_s: float
    peak_tops: dict = field(default_factory=dict)
    source: str = ""
    measured: bool = False


PROFILES: dict[str, Profile] = {
    "h100-sxm": Profile("NVIDIA H100 SXM5 80GB", "datacenter GPU", 3350.0,
                        {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9},
                        "NVIDIA H100 Tensor Core GPU datasheet (dense figures, i.e. half the 'with sparsity' ones); "
                        "Hopper has no INT4 tensor-core mode"),
    "rtx-4090": Profile("NVIDIA GeForce RTX 4090", "consumer GPU", 1008.0,
                        {"fp32": 82.6, "fp16": 165.2, "bf16": 165.2, "fp8": 330.3, "int8": 660.6, "int4": 1321.2},
                        "NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4090 column (dense; FP16/BF16/FP8 with "
                        "FP32 accumulate)"),
    "apple-m3": Profile("Apple M3 (10-core GPU, 16-core Neural Engine)", "laptop SoC", 100.0,
                        {"fp32": 3.5, "fp16": 3.5, "int8": 18.0},
                        "Apple M3 announcement (Oct 2023): 100 GB/s unified memory, Neural Engine 18 TOPS (used for "
                        "int8); GPU fp32/fp16 derived from 10 cores x 128 ALUs x 2 x 1.38 GHz"),
    "raspberry-pi-5": Profile("Raspberry Pi 5 (BCM2712, 4x Cortex-A76 2.4 GHz)", "single-board computer", 17.1,
                              {"fp32": 0.154, "fp16": 0.307, "int8": 0.614},
                              "Raspberry Pi 5 product brief (LPDDR4X-4267, 32-bit bus = 17.1 GB/s); peaks derived from "
                              "Arm Cortex-A76 Software Optimization Guide: 2 x 128-bit NEON pipes (FMA, SDOT) x 4 cores"),
}

# A precision the target has no units for runs at the next wider one it has.
_FALLBACK = {"int4": "int8", "int8": "fp16", "fp8": "fp16", "bf16": "fp16", "fp16": "fp32", "tf32": "fp32"}


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ort_matmul(n: int, int8: bool):
    """A call running one (n x n) matmul in ONNX Runtime -- the runtime the exported models use:
    fp32 MatMul, or uint8 x int8 -> int32 MatMulInteger."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a_type, b_type, y_type = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if int8 else (TensorProto.FLOAT,) * 3
    graph = helper.make_graph([helper.make_node("MatMulInteger" if int8 else "MatMul", ["a", "b"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", a_type, [n, n]),
                               helper.make_tensor_value_info("b", b_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if int8:
        feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    else:
        feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    return lambda: sess.run(None, feed)


@lru_cache(maxsize=1)
def probe() -> Profile:
    """This machine, measured (about 1 s): memory bandwidth from copying a 32 MiB buffer (read + write)
    and the throughput of ONNX Runtime's 512x512 fp32 MatMul and int8 MatMulInteger (int32
    accumulate). Best of a few repeats each."""
    src = torch.ones(8 * 2**20, dtype=torch.float32)  # 32 MiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), 3) / 1e9
    n = 512
    peak = {name: 2 * n**3 / _best_seconds(ort_matmul(n, name == "int8")) / 1e12 for name in ("fp32", "int8")}
    return Profile(f"this machine ({cpu_name()}, {torch.get_num_threads()} threads)", "CPU", bandwidth, peak,
                   "measured by qcore.hardware.probe(): 32 MiB copy, ONNX Runtime 512x512 MatMul (fp32) and "
                   "MatMulInteger (int8)", measured=True)


_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16")


def cpu_features() -> list[str]:
    """The CPU flags (from /proc/cpuinfo) that decide low-precision speed: AVX2, AVX-512, VNNI
    (int8 dot products), AMX, Arm dot-product ... (empty where /proc/cpuinfo is unavailable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return [f for f in _FEATURES if f in flags]


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def get_profile(profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile in ("this-machine", "this machine"):
        return probe()
    if profile not in PROFILES:
        raise QcoreError(f"unknown hardware profile {profile!r}; available: {', '.join(PROFILES)}, this-machine")
    return PROFILES[profile]


def _precision(fmt: str) -> str:
    return {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "nf4": "int4"}.get(fmt, fmt)


def compute_precision(kind: str, plan) -> str:
    """The arithmetic a layer needs: integer when weights *and* inputs are integers (the wider of the
    two), fp8 when both are fp8, otherwise the input's float format (weight-only formats are expanded
    to the activation precision before multiplying)."""
    w = _precision(plan.weights.format) if plan.weights else "fp32"
    a = _precision(plan.activations.format) if plan.activations and kind != "Embedding" else "fp32"
    bits = {"int2": 2, "int3": 3, "int4": 4, "int5": 5, "int6": 6, "int7": 7, "int8": 8, "int16": 16}
    if w in bits and a in bits:
        width = max(bits[w], bits[a])
        return "int4" if width <= 4 else "int8" if width <= 8 else "fp32"
    if w == a == "fp8":
        return "fp8"
    return a if a in ("fp16", "bf16", "fp8") else "fp32"


def _peak(profile: Profile, precision: str) -> tuple[str, float]:
    p = precision
    while p not in profile.peak_tops:
        p = _FALLBACK.get(p, "fp32")
        if p == "fp32" and "fp32" not in profile.peak_tops:
            raise QcoreError(f"profile {profile.name!r} has no fp32 throughput")
    return p, profile.peak_tops[p]


def _layer_work(workload) -> dict[str, dict]:
    """Per layer, for one sample: multiply-accumulates, input and output element counts (one forward
    pass of the first calibration sample, recorded with hooks; cached on the workload)."""
    if "_layer_work" in workload.__dict__:
        return workload.__dict__["_layer_work"]
    model = copy.deepcopy(workload.folded[0])  # hooks go on a private copy: the workload's model is shared
    found = {}

    def recorder(name):
        def hook(m, args, out):
            kind = workload.layers[name].kind
            if kind == "Embedding":
                macs = 0
            elif kind == "Linear":
                macs = out.numel() * m.weight.shape[1]
            else:  # conv: every output element costs C_in/groups * kernel multiply-adds
                macs = out.numel() * m.weight[0].numel()
            found[name] = {"macs": macs, "in": args[0].numel(), "out": out.numel()}
        return hook

    hooks = [(mod, recorder(name)) for name, mod in modules_by_name(model, workload.layers).items()]
    with temporary_hooks(post=hooks), torch.no_grad():
        model(*(t[:1] for t in workload.calibration.inputs))
    workload.__dict__["_layer_work"] = found
    return found


def roofline(workload, recipe: Recipe, profile="this-machine", batch_size: int = 1) -> dict:
    """Latency ESTIMATE of ``workload``'s quantizable layers under ``recipe`` on ``profile``::

        {"label": "estimate", "profile", "profile_source", "batch_size",
         "layers": [{"layer", "compute_precision", "runs_at", "bytes", "ops", "memory_ms", "compute_ms",
                     "latency_ms", "bound", "label": "estimate"}],
         "total": {"bytes", "ops", "latency_ms", "label"}, "fp32_total": {...}, "notes"}

    bytes = weights at the recipe's size (codes + scales) + inputs at their precision + fp32 outputs;
    ops = 2 x multiply-accumulates. Layers not found by the single forward pass are skipped.
    """
    prof = get_profile(profile)
    recipe.check_against(workload.layer_shapes)
    work = _layer_work(workload)
    rows, totals = [], {}
    for label, rec in (("total", recipe), ("fp32_total", Recipe(name="fp32"))):
        t_bytes = t_ops = t_ms = 0.0
        for name, w in work.items():
            plan = rec.plan(name)
            kind = workload.layers[name].kind
            prec = compute_precision(kind, plan)
            runs_at, tops = _peak(prof, prec)
            a = plan.activations if kind != "Embedding" else None
            in_bytes = w["in"] * (4 if kind == "Embedding" else (a.fmt.bits / 8 if a and a.format != "fp32" else 4))
            nbytes = weight_bytes(workload.layer_shapes[name], plan.weights)["total"] + batch_size * (in_bytes + 4 * w["out"])
            ops = 2.0 * w["macs"] * batch_size
            memory_ms = nbytes / (prof.memory_bandwidth_gb_s * 1e9) * 1e3
            compute_ms = ops / (tops * 1e12) * 1e3
            ms = max(memory_ms, compute_ms)
            t_bytes, t_ops, t_ms = t_bytes + nbytes, t_ops + ops, t_ms + ms
            if label == "total":
                rows.append({"layer": name, "compute_precision": prec, "runs_at": runs_at, "bytes": int(nbytes),
                             "ops": int(ops), "memory_ms": memory_ms, "compute_ms": compute_ms, "latency_ms": ms,
                             "bound": "memory" if memory_ms >= compute_ms else "compute", "label": "estimate"})
        totals[label] = {"bytes": int(t_bytes), "ops": int(t_ops), "latency_ms": t_ms, "label": "estimate"}
    notes = ["estimate: roofline (max of memory time and compute time per layer) over the quantizable layers only; "
             "ignores caches, kernel launch/dispatch overhead, other ops (attention, norms) and achievable-vs-peak gaps"]
    fell_back = sorted({(r["compute_precision"], r["runs_at"]) for r in rows if r["compute_precision"] != r["runs_at"]})
    notes += [f"{prof.name} has no {p} units: those layers are estimated at its {q} rate" for p, q in fell_back]
    return {"label": "estimate", "profile": prof.name, "profile_source": prof.source, "measured_profile": prof.measured,
            "batch_size": batch_size, "layers": rows, **totals, "notes": notes}

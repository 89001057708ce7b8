"""Hardware: this CPU (name, instruction-set features, a brief throughput probe) and reference targets.

``PROFILES`` holds public spec-sheet figures (dense peak throughput per precision, memory bandwidth)
for a few targets; ``probe()`` measures this machine briefly; ``cpu_features()`` reads /proc/cpuinfo
(reported with every latency figure). The roofline estimate built on these is ``analysis.roofline``.
Units: bandwidth in GB/s (1e9 bytes/s), throughput in TOPS (1e12 operations/s, a multiply-add = 2).
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from qcore.errors import QcoreError


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

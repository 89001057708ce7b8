"""Why isn't it faster? Where a runtime spends its time on an exported file, from the runtime's own profiler.

- ``ort_profile``: ONNX Runtime's profiler (``SessionOptions.enable_profiling``): one event per executed node
  of its *optimized* graph (fused kernels such as QLinearMatMul or MatMulNBits appear as themselves);
- ``openvino_profile``: OpenVINO's performance counters (``PERF_COUNT``): per executed node, the kernel
  it chose (``exec_type``, e.g. ``brgemm_avx512_amx_I8``), whose name says the precision it ran in.

Both return ``group_ops`` rows: per op type, the total time (ms per run, summed over that op's nodes), its
share, how many nodes, and the precision it computed in ("int8", "int4/int8 weights, float compute",
"bf16", "f32", "data movement"): the time that is not in int8 kernels is what a quantized recipe cannot
speed up. Times are measured on this CPU (averaged over ``runs`` calls after one warm-up call).

``openvino_kernels`` lists, without timing, the kernel OpenVINO compiled for each matrix product
(FullyConnected = a Linear, MatMul, Convolution, and ``Subgraph``: a fused attention block) and the precision
it reads its input in: which of the file's matrix products its low-precision transformations turned into int8.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

# ONNX Runtime op types that compute with integer inputs and weights
ORT_INT8_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul"}
ORT_NBITS_OPS = {"MatMulNBits", "GatherBlockQuantized"}
_MOVES = {"Reshape", "Transpose", "Gather", "Concat", "Slice", "Squeeze", "Unsqueeze", "Shape", "Cast", "Expand",
          "Identity", "Flatten", "Split", "Reorder", "Convert"}


def _ort_precision(op: str) -> str:
    if op in ORT_INT8_OPS:
        return "int8"
    if op in ORT_NBITS_OPS:
        return "int4/int8 weights, float compute"
    if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        return "(de)quantize"
    return "data movement" if op in _MOVES else "f32"


def _openvino_precision(node_type: str, exec_type: str) -> str:
    e = exec_type.lower()
    if node_type in _MOVES or e in ("undef", "unknown_undef", ""):
        return "data movement"
    for tag, name in (("i8", "int8"), ("u8", "int8"), ("bf16", "bf16"), ("f16", "f16"), ("f32", "f32")):
        if e.endswith(tag) or f"_{tag}" in e:
            return name
    return exec_type


def group_ops(events: list[tuple[str, str, float]], runs: int) -> list[dict]:
    """``events`` (op type, precision, microseconds) summed over ``runs`` calls -> rows per (op, precision):
    {"op", "precision", "nodes" (events per run, rounded up: a node OpenVINO runs in only some calls counts),
    "ms" (per run), "share"}, largest first."""
    total_us: dict = defaultdict(float)
    count: dict = defaultdict(int)
    for op, precision, us in events:
        total_us[(op, precision)] += us
        count[(op, precision)] += 1
    everything = sum(total_us.values()) or 1.0
    rows = [{"op": op, "precision": p, "nodes": -(-count[(op, p)] // runs), "ms": us / runs / 1e3,
             "share": us / everything}
            for (op, p), us in total_us.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def ort_profile(path: str, feed: dict, threads: int = 1, runs: int = 10) -> list[dict]:
    """``group_ops`` of ONNX Runtime running ``path`` on ``feed`` ``runs`` times (its default optimizations)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        opts.enable_profiling, opts.profile_file_prefix = True, os.path.join(tmp, "profile")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        sess.run(None, feed)  # warm-up: its events are dropped below
        with open(sess.end_profiling()) as f:
            warm = sum(1 for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            nodes = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes = nodes[warm:]  # the first run of the second session is its warm-up
    return group_ops([(e["args"]["op_name"], _ort_precision(e["args"]["op_name"]), float(e["dur"])) for e in nodes],
                     runs)


def openvino_profile(path: str, feed: dict, threads: int = 1, runs: int = 10, precision: str = "default") -> list[dict]:
    """``group_ops`` of OpenVINO running ``path`` on ``feed`` ``runs`` times, from its performance counters."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    request = ov.Core().compile_model(path, "CPU", config).create_infer_request()
    request.infer(feed)
    events = []
    for _ in range(runs):
        request.infer(feed)
        events += [(p.node_type, _openvino_precision(p.node_type, p.exec_type), p.real_time.total_seconds() * 1e6)
                   for p in request.profiling_info if p.status == p.Status.EXECUTED]
    return group_ops(events, runs)


_MATRIX_OPS = ("FullyConnected", "MatMul", "Convolution", "Deconvolution", "Subgraph")


def openvino_kernels(path: str, feed: dict, threads: int = 1, precision: str = "default") -> list[dict]:
    """Per matrix product of OpenVINO's compiled graph of ``path``, in execution order, after one call on
    ``feed`` (a file with a dynamic batch gets its kernels at the first call): {"node" (its name in the
    compiled graph), "op" (layer type), "kernel" (e.g. ``brgemm_avx512_amx_i8``), "precision" (what the kernel
    computes in, as in ``openvino_profile``: "int8", "bf16", "f32")}, read from the compiled model's runtime
    graph (``get_runtime_model``)."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(path, "CPU", config)
    compiled.create_infer_request().infer(feed)
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, kernel = info["layerType"].astype(str), info["primitiveType"].astype(str)
        if kind in _MATRIX_OPS:
            rows.append({"node": op.get_friendly_name(), "op": kind, "kernel": kernel,
                         "precision": _openvino_precision(kind, kernel)})
    return rows

"""Real low-precision execution: export a model under a recipe, run it, measure it.

The simulation (``simulate``) shows what quantization does to accuracy; this module shows what a
real runtime makes of the same recipe -- file size on disk, latency, and whether the real model
computes what the simulation predicted.

ONNX export, layer by layer (the *path* of each layer, see ``layer_path``):

- ``int8-static``  : W8A8 with fixed activation ranges -> ONNX Runtime ``quantize_static`` (QDQ), its
                     calibration run over the workload's calibration data, but every layer input's
                     scale / zero-point overridden with the project's own calibrated values so that
                     percentile / MSE / entropy ranges carry over exactly;
- ``int8-dynamic`` : W8A8 with per-batch activation ranges -> ``quantize_dynamic`` (MatMulInteger /
                     ConvInteger behind DynamicQuantizeLinear);
- ``int8-weight``  : int8 weights, float activations -> int8 initializer + DequantizeLinear (also
                     Embedding tables, whose inputs are indices);
- ``int4-weight``  : 4-bit weight-only Linear -> ``MatMulNBits`` (``matmul_nbits_quantizer``);
- ``fp16`` / ``bf16`` : weights stored in half precision (+ Cast), inputs rounded through a Cast pair;
- ``float``        : the layer stays FP32.

Weights are exported *already rounded* to the recipe's grid (the simulated model's weights), so
ONNX Runtime's min-max weight quantizers recover the same codes and scales. A layer whose format
no installed runtime executes (int2/3/5/6/7, int16, NF4, FP8 on this CPU, ...) is kept in FP32 in the
ONNX file and listed in ``unsupported`` with the reason and its theoretical size.

The exported file computes the simulated model (checked op by op in the tests). What ONNX Runtime's
*optimised* kernels then compute can differ: on x86 CPUs without VNNI, its fused uint8 x int8 kernels
saturate 16-bit intermediate sums. ``bench`` measures that gap next to the simulated metric.

The safetensors export (``quantized_safetensors``) holds what the simulation holds -- integer codes,
scales, zero-points, static input ranges -- plus the recipe JSON; ``load_safetensors`` rebuilds the
identical simulated model from it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import QcoreError
from .formats import FORMATS
from .hardware import cpu_features, cpu_name, ort_matmul
from .recipe import LayerPlan, Recipe
from .simulate import input_quantizer, modules_by_name
from .size import weight_bytes
from .quantized_safetensors import export_safetensors, load_safetensors  # noqa: F401 (part of this module's API)

# ---- which layers a runtime executes ---------------------------------------------------------
_NO_KERNEL = {
    "int16": "ONNX Runtime has no int16 MatMul/Conv kernels on CPU",
    "nf4": "NF4 needs a codebook-lookup kernel (bitsandbytes, CUDA only); no installed CPU runtime executes it",
    "fp8_e4m3": "FP8 arithmetic needs FP8 units (NVIDIA Hopper/Ada, Intel Gaudi); this CPU has none and "
                "ONNX Runtime's CPU provider has no FP8 MatMul/Conv",
    "fp8_e5m2": "FP8 arithmetic needs FP8 units (NVIDIA Hopper/Ada); this CPU has none and ONNX Runtime's CPU "
                "provider has no FP8 MatMul/Conv",
}


def layer_path(kind: str, plan: LayerPlan) -> tuple[str | None, str]:
    """How the ONNX export executes one layer of ``kind`` under ``plan``: ``(path, "")`` or
    ``(None, reason)`` when no installed runtime executes it (see the module docstring)."""
    w, a = plan.weights, plan.activations
    if kind == "Embedding":
        a = None  # its inputs are token indices: never quantized
    wf = "fp32" if w is None else w.format
    af = "fp32" if a is None else a.format
    if wf == "fp32" and af == "fp32":
        return "float", ""
    if wf in ("fp16", "bf16") and af in (wf, "fp32"):
        if w.scaled or (a is not None and a.scaled):
            return None, f"scaled {wf} (a scale per channel on top of the cast) has no runtime kernel; use a plain cast"
        return wf, ""
    if wf == "int8" and w.granularity in ("per_tensor", "per_channel") and w.axis == 0:
        if af == "fp32":
            return "int8-weight", ""
        if af == "int8" and not a.dynamic:
            return "int8-static", ""
        if af == "int8" and not a.symmetric and a.range == "minmax":
            if kind.startswith("Conv") and w.granularity == "per_channel":
                return None, ("ONNX Runtime's dynamic ConvInteger takes one weight scale per tensor; per-channel "
                              "dynamic convolutions exist only in simulation (int8-static runs them per channel)")
            return "int8-dynamic", ""
        if af == "int8":
            return None, ("ONNX Runtime's dynamic int8 is affine min-max per tensor; this recipe asks for "
                          f"{'symmetric' if a.symmetric else a.range} dynamic activations")
    if wf == "int4" and af == "fp32" and kind == "Linear":
        block = w.group_size if w.granularity == "per_group" else None
        if w.granularity == "per_channel" or (block >= 16 and block & (block - 1) == 0):
            return "int4-weight", ""
        return None, f"MatMulNBits needs 4-bit groups of a power of two >= 16, not {w.group_size}"
    if wf in _NO_KERNEL:
        return None, _NO_KERNEL[wf]
    if af in _NO_KERNEL:
        return None, f"activations: {_NO_KERNEL[af]}"
    if FORMATS[wf].family == "int" and wf not in ("int4", "int8"):
        return None, (f"no runtime kernel for {wf}: ONNX Runtime executes int8 (and 4-bit weight-only MatMul); "
                      "sub-8-bit widths other than 4 exist only in simulation")
    return None, (f"no ONNX Runtime kernel for {wf} weights with {af} activations on a {kind} layer (it executes "
                  "int8 weights per tensor or per output channel with int8 or float inputs, 4-bit weight-only Linear "
                  "layers, and fp16/bf16 storage)")


def layer_paths(workload, recipe: Recipe) -> dict[str, tuple[str | None, str]]:
    recipe.check_against(workload.layer_shapes)
    return {n: layer_path(i.kind, recipe.plan(n)) for n, i in workload.layers.items()}


def unsupported_layers(workload, recipe: Recipe) -> list[dict]:
    """``[{"layer", "format", "reason", "theoretical_size_bytes"}]`` for each layer the ONNX export
    cannot execute as the recipe says (it keeps them in FP32); format is ``weights/activations``."""
    return [{"layer": name, "format": _formats(recipe.plan(name)), "reason": reason,
             "theoretical_size_bytes": weight_bytes(workload.layer_shapes[name], recipe.plan(name).weights)["total"]}
            for name, (path, reason) in layer_paths(workload, recipe).items() if path is None]


def _formats(plan: LayerPlan) -> str:
    return f"{plan.weights.format if plan.weights else 'fp32'}/{plan.activations.format if plan.activations else 'fp32'}"


def executable_recipe(workload, recipe: Recipe) -> Recipe:
    """``recipe`` with every layer the ONNX export cannot execute set to FP32: what the exported
    file computes (its simulation is the reference for the exported model's outputs)."""
    for row in unsupported_layers(workload, recipe):
        recipe = recipe.with_layer(row["layer"], None)
    return recipe


# ---- ONNX -------------------------------------------------------------------------------------
def input_names(workload) -> list[str]:
    return [f"input_{i}" for i in range(len(workload.calibration.inputs))]


def export_float_onnx(model: torch.nn.Module, workload, path: str) -> None:
    """``model`` as FP32 ONNX (TorchScript exporter, opset 17) with inputs input_0.., a dynamic batch
    dimension (and sequence dimension for token inputs), and Gemm rewritten as MatMul + Add."""
    import onnx

    example = tuple(t[:2] for t in workload.calibration.inputs)
    names = input_names(workload)
    axes = {n: {0: "batch", **({1: "seq"} if t.dim() == 2 and not t.is_floating_point() else {})}
            for n, t in zip(names, example)}
    model = _without_hooks(model)
    with torch.no_grad():
        torch.onnx.export(model, example, path, input_names=names, output_names=["output"],
                          dynamic_axes={**axes, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    proto = onnx.load(path)
    _gemm_to_matmul(proto)
    onnx.save(proto, path)


def _without_hooks(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        m._forward_pre_hooks.clear()
    return model


def _gemm_to_matmul(proto) -> None:
    """Gemm(A, B, C; transB=1) with constant B -> MatMul(A, B^T) + C, keeping the node name, so that
    ONNX Runtime's integer MatMul kernels (dynamic int8, MatMulNBits) apply to every Linear."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            b = np.ascontiguousarray(b.T)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(b, node.input[1]))
        if len(node.input) > 2 and node.input[2]:
            mid = node.output[0] + "_matmul"
            nodes.append(helper.make_node("MatMul", node.input[:2], [mid], name=node.name))
            nodes.append(helper.make_node("Add", [mid, node.input[2]], list(node.output), name=node.name + "_bias"))
        else:
            nodes.append(helper.make_node("MatMul", node.input[:2], list(node.output), name=node.name))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


_WEIGHT_INPUT = {"Conv": 1, "MatMul": 1, "Gather": 0}


def layer_nodes(proto, weights: dict[str, np.ndarray]) -> dict[str, object]:
    """Map layer names to the ONNX nodes that use their weights, by *value*: a node's constant weight
    input equals the layer's weight (MatMul holds it transposed). Robust to the exporter's naming;
    a layer whose weight appears in no node (or in several) is left out."""
    from onnx import numpy_helper

    def key(a: np.ndarray):
        return a.shape, hash(np.ascontiguousarray(a, dtype=np.float32).tobytes())

    by_value: dict = {}
    for name, w in weights.items():
        by_value.setdefault(key(w), []).append(name)
    inits = {i.name: i for i in proto.graph.initializer}
    found: dict[str, list] = {}
    for node in proto.graph.node:
        idx = _WEIGHT_INPUT.get(node.op_type)
        if idx is None or len(node.input) <= idx or node.input[idx] not in inits:
            continue
        a = numpy_helper.to_array(inits[node.input[idx]])
        if node.op_type == "MatMul" and a.ndim == 2:
            a = a.T
        for layer in by_value.get(key(a), []):
            found.setdefault(layer, []).append(node)
    return {layer: nodes[0] for layer, nodes in found.items() if len(nodes) == 1}


@contextlib.contextmanager
def quiet_quantizers():
    """Silence onnxruntime.quantization's advice on the root logger and its calibrators' prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _quantize_static(src: str, dst: str, workload, recipe, layers: list[str], nodes: dict) -> None:
    """QDQ int8 for ``layers`` (all with the same weight granularity and activation symmetry)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = workload.calibration_stats()
    plan = recipe.plan(layers[0])
    act_type = QuantType.QInt8 if plan.activations.symmetric else QuantType.QUInt8
    overrides = {}
    for name in layers:
        hook = input_quantizer(name, workload.layers[name].kind, recipe.plan(name).activations, calib)
        if hook is None:  # never reached by calibration data: nothing to fix its range with
            continue
        q = hook.quantize(torch.zeros(1))
        zp = 0 if q.zero_point is None else int(q.zero_point[0]) + (0 if plan.activations.symmetric else 128)
        overrides[nodes[name].input[0]] = [{"scale": np.array(q.scale[0], dtype=np.float32),
                                            "zero_point": np.array(zp, dtype=np.int8 if plan.activations.symmetric else np.uint8)}]

    class Reader(CalibrationDataReader):  # the workload's calibration batches, one pass
        def __init__(self):
            self.batches = iter(feeds(workload, workload.calibration))

        def get_next(self):
            return next(self.batches, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=plan.weights.granularity == "per_channel",
                    activation_type=act_type, weight_type=QuantType.QInt8,
                    nodes_to_quantize=[nodes[n].name for n in layers],
                    extra_options={"TensorQuantOverrides": overrides, "QuantizeBias": False, "DedicatedQDQPair": True,
                                   "WeightSymmetric": plan.weights.symmetric, "ActivationSymmetric": plan.activations.symmetric,
                                   "OpTypesToExcludeOutputQuantization": ["Conv", "MatMul", "Gemm"]})


def _quantize_dynamic(src: str, dst: str, workload, recipe, layers: list[str], nodes: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = recipe.plan(layers[0]).weights
    quantize_dynamic(src, dst, per_channel=w.granularity == "per_channel", weight_type=QuantType.QInt8,
                     nodes_to_quantize=[nodes[n].name for n in layers], extra_options={"WeightSymmetric": w.symmetric})


def _quantize_int4(src: str, dst: str, workload, recipe, layers: list[str], nodes: dict) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    w = recipe.plan(layers[0]).weights
    quant = mnb.MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=w.group_size if w.granularity == "per_group" else 128,
                                     is_symmetric=w.symmetric, channel_wised_quantize=w.granularity == "per_channel",
                                     nodes_to_include=[nodes[n].name for n in layers], op_types_to_quantize=("MatMul",))
    quant.process()
    quant.model.save_model_to_file(dst)


def _weight_only_and_half(proto, workload, recipe, groups: dict, node_names: dict[str, str]) -> None:
    """In place: int8 weight-only layers get int8 codes + DequantizeLinear; fp16/bf16 layers get
    half-precision weights + Cast, and their float inputs a round trip through a Cast pair."""
    from onnx import TensorProto, helper, numpy_helper

    from .quantize import quantize

    inits = {i.name: i for i in proto.graph.initializer}
    by_name = {n.name: n for n in proto.graph.node}
    modules = modules_by_name(workload.folded[0], workload.layers)  # quantized from FP32, as the simulation does
    new_nodes, new_inits, before, after = [], [], {}, {}
    for path in ("int8-weight", "fp16", "bf16"):
        for name in groups.get(path, []):
            node, plan = by_name[node_names[name]], recipe.plan(name)
            idx = _WEIGHT_INPUT[node.op_type]
            w_name = node.input[idx]
            transposed = node.op_type == "MatMul"
            if path == "int8-weight":
                q = quantize(modules[name].weight.detach(), plan.weights)
                codes = q.codes.to(torch.int8).numpy()
                codes = np.ascontiguousarray(codes.T if transposed else codes)
                axis = 1 if transposed else 0
                scale = q.scale.numpy().astype(np.float32)
                zp = (q.zero_point if q.zero_point is not None else torch.zeros_like(q.scale)).to(torch.int8).numpy()
                if node.op_type == "Gather" and plan.weights.granularity == "per_channel":
                    # an embedding table: look the int8 rows up first, then dequantize only those rows,
                    # (code - zero_point) * scale, instead of the whole table on every run
                    ids, out, p = node.input[1], node.output[0], node.name + "_rows"
                    new_inits += [numpy_helper.from_array(codes, w_name + "_q"), numpy_helper.from_array(scale, p + "_scale"),
                                  numpy_helper.from_array(zp.astype(np.float32), p + "_zp"),
                                  numpy_helper.from_array(np.array([-1], dtype=np.int64), p + "_last")]
                    after[node.name] = [
                        helper.make_node("Cast", [p + "_codes"], [p + "_float"], to=TensorProto.FLOAT),
                        helper.make_node("Gather", [p + "_zp", ids], [p + "_zp_rows"]),
                        helper.make_node("Unsqueeze", [p + "_zp_rows", p + "_last"], [p + "_zp_col"]),
                        helper.make_node("Sub", [p + "_float", p + "_zp_col"], [p + "_shifted"]),
                        helper.make_node("Gather", [p + "_scale", ids], [p + "_scale_rows"]),
                        helper.make_node("Unsqueeze", [p + "_scale_rows", p + "_last"], [p + "_scale_col"]),
                        helper.make_node("Mul", [p + "_shifted", p + "_scale_col"], [out])]
                    node.input[0], node.output[0] = w_name + "_q", p + "_codes"
                    continue
                if plan.weights.granularity == "per_tensor":
                    scale, zp = scale.reshape(()), zp.reshape(())
                new_inits += [numpy_helper.from_array(codes, w_name + "_q"), numpy_helper.from_array(scale, w_name + "_scale"),
                              numpy_helper.from_array(zp, w_name + "_zp")]
                new_nodes.append(helper.make_node("DequantizeLinear", [w_name + "_q", w_name + "_scale", w_name + "_zp"],
                                                  [w_name + "_dq"], name=node.name + "_weight_dq", axis=axis))
            else:
                arr = numpy_helper.to_array(inits[w_name])
                dtype = TensorProto.FLOAT16 if path == "fp16" else TensorProto.BFLOAT16
                half = torch.from_numpy(arr.copy()).to(torch.float16 if path == "fp16" else torch.bfloat16)
                t = helper.make_tensor(w_name + "_q", dtype, arr.shape, half.view(torch.int16).numpy().tobytes(), raw=True)
                new_inits.append(t)
                new_nodes.append(helper.make_node("Cast", [w_name + "_q"], [w_name + "_dq"], to=TensorProto.FLOAT,
                                                  name=node.name + "_weight_cast"))
                if plan.activations is not None and node.op_type != "Gather":
                    x = node.input[0]
                    before.setdefault(node.name, []).extend([
                        helper.make_node("Cast", [x], [x + f"_{name}_half"], to=dtype, name=node.name + "_in_cast"),
                        helper.make_node("Cast", [x + f"_{name}_half"], [x + f"_{name}_back"], to=TensorProto.FLOAT,
                                         name=node.name + "_in_cast_back")])
                    node.input[0] = x + f"_{name}_back"
            node.input[idx] = w_name + "_dq"
    ordered = list(new_nodes)
    for node in proto.graph.node:
        ordered += before.get(node.name, []) + [node] + after.get(node.name, [])
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)
    proto.graph.initializer.extend(new_inits)
    used = {i for n in proto.graph.node for i in n.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


# The ONNX Runtime quantizer applying each path; each call takes layers sharing one setting.
ORT_QUANTIZERS = {"int8-static": _quantize_static, "int8-dynamic": _quantize_dynamic, "int4-weight": _quantize_int4}


def export_onnx(workload, recipe: Recipe, out: str) -> dict:
    """Write ``recipe`` applied to ``workload`` as an ONNX model ONNX Runtime executes; see module docstring."""
    import onnx

    paths = layer_paths(workload, recipe)
    model = _without_hooks(workload.simulate(recipe).model)
    float_modules = modules_by_name(workload.folded[0], workload.layers)
    with torch.no_grad():  # layers no runtime executes stay FP32
        for name, mod in modules_by_name(model, workload.layers).items():
            if paths[name][0] is None:
                mod.weight.copy_(float_modules[name].weight)
    weights = {n: m.weight.detach().numpy() for n, m in modules_by_name(model, workload.layers).items()}
    with tempfile.TemporaryDirectory() as tmp:
        current = os.path.join(tmp, "float.onnx")
        export_float_onnx(model, workload, current)
        nodes = layer_nodes(onnx.load(current), weights)
        for name, (path, _) in paths.items():
            if path not in (None, "float") and name not in nodes:
                paths[name] = (None, "its weight was not found in the exported ONNX graph (the exporter rewrote it)")
        groups: dict[tuple, list[str]] = {}  # (path, shared setting) -> layers
        for name, (path, _) in paths.items():
            plan = recipe.plan(name)
            setting = (plan.weights.granularity, plan.weights.symmetric, plan.weights.group_size,
                       plan.activations.symmetric if plan.activations else None) if path in ORT_QUANTIZERS else None
            if path not in (None, "float"):
                groups.setdefault((path, setting), []).append(name)
        for step, ((path, _), layers) in enumerate(groups.items()):
            if path in ORT_QUANTIZERS:
                nxt = os.path.join(tmp, f"step{step}.onnx")
                with quiet_quantizers():
                    ORT_QUANTIZERS[path](current, nxt, workload, recipe, layers, nodes)
                current = nxt
        proto = onnx.load(current)
        plain = {path: layers for (path, _), layers in groups.items() if path not in ORT_QUANTIZERS}
        if plain:
            _weight_only_and_half(proto, workload, recipe, plain, {n: node.name for n, node in nodes.items()})
        onnx.save(proto, out)
    unsupported = [{"layer": n, "format": _formats(recipe.plan(n)), "reason": reason,
                    "theoretical_size_bytes": weight_bytes(workload.layer_shapes[n], recipe.plan(n).weights)["total"]}
                   for n, (path, reason) in paths.items() if path is None]
    return {"unsupported": unsupported, "paths": {n: p or "fp32 (unsupported)" for n, (p, _) in paths.items()}}


# ---- one entry point for both formats --------------------------------------------------------
EXPORTERS = {"onnx": export_onnx, "safetensors": export_safetensors}


def export(workload, recipe: Recipe, fmt: str, out: str) -> dict:
    """Export ``workload``'s model under ``recipe`` to ``out``::

        {"path", "format", "size_bytes" (file on disk), "theoretical_size_bytes" (the recipe's),
         "fp32_theoretical_size_bytes", "unsupported": [{"layer", "format", "reason", "theoretical_size_bytes"}],
         "paths": {layer: how it runs} (onnx), "notes": [...]}
    """
    if fmt not in EXPORTERS:
        raise QcoreError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORTERS)}")
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise QcoreError(f"the directory {parent} does not exist; create it or choose another --out")
    info = EXPORTERS[fmt](workload, recipe, str(out))
    size = workload.size(recipe)
    notes = []
    if info["unsupported"]:
        notes.append(f"{len(info['unsupported'])} layer(s) no installed runtime executes as the recipe says are kept "
                     "in FP32 in this file; their theoretical size is listed, their low-precision latency would be an estimate")
    if fmt == "onnx" and any(p in ("fp16", "bf16") for p in info.get("paths", {}).values()):
        notes.append("fp16/bf16 layers are stored in half precision but computed in fp32 by ONNX Runtime's CPU provider")
    return {"path": str(out), "format": fmt, "size_bytes": os.path.getsize(out),
            "theoretical_size_bytes": size["size_bytes"], "fp32_theoretical_size_bytes": size["fp32_bytes"], **info,
            "notes": notes}


# ---- measuring ---------------------------------------------------------------------------------
def versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count()}


def session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def feeds(workload, data) -> list[dict]:
    names = input_names(workload)
    return [{n: t.numpy() for n, t in zip(names, b)} for b in data.batches(workload.batch_size)]


def run_onnx(sess, workload, data) -> torch.Tensor:
    """Outputs of an ONNX Runtime session over ``data`` (batches of workload.batch_size), float32."""
    return torch.from_numpy(np.concatenate([sess.run(None, f)[0] for f in feeds(workload, data)])).float()


def latency_ms(run, warmup: int = 3, min_runs: int = 10, max_runs: int = 200, budget_s: float = 1.0) -> dict:
    """Wall-clock milliseconds of ``run()``: ``warmup`` untimed calls, then at least ``min_runs`` timed
    calls (more while within ``budget_s``); median, 10th and 90th percentile."""
    for _ in range(warmup):
        run()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    p10, med, p90 = np.percentile(times, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90), "runs": len(times)}


def peak_memory_bytes(fn) -> int | None:
    """Peak resident memory *added* while ``fn()`` runs (Linux: VmHWM after resetting it through
    /proc/self/clear_refs, minus VmRSS before), or None where that is not measurable."""
    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return None

    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    peak = status("VmHWM")
    return None if peak is None or before is None else max(peak - before, 0)


def bench(workload, recipe: Recipe, batch_size: int = 8, threads: int | None = None, budget_s: float = 1.0) -> dict:
    """Export FP32 and ``recipe`` to ONNX, run both in ONNX Runtime on this CPU, and measure::

        {"model", "recipe", "backend", "threads", "batch_size", "metric",
         "fp32": {"size_bytes", "theoretical_size_bytes", "latency_ms": {median, p10, p90, runs},
                  "latency_ms_batch1", "peak_memory_bytes", "metric"},
         "quantized": {... same ..., "metric_simulated", "metric_measured", "metric_difference",
                       "metric_simulated_as_exported", "max_abs_output_difference"},
         "speedup" (fp32 median / quantized median at batch_size), "unsupported": [...],
         "paths": {layer: how it runs}, "versions", "cpu_features", "notes"}

    Latency is measured (warm-up, then repeated runs); nothing here is predicted.
    """
    if batch_size < 1 or (threads is not None and threads < 1):
        raise QcoreError("--batch-size and --threads must be positive integers")
    threads = threads or os.cpu_count() or 1
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the simulation and export run with the same thread count
    try:
        return _bench(workload, recipe, batch_size, threads, budget_s)
    finally:
        torch.set_num_threads(torch_threads)


def _bench(workload, recipe: Recipe, batch_size: int, threads: int, budget_s: float) -> dict:
    head = workload.task.headline
    simulated = workload.evaluate(recipe)["quantized"]["metrics"][head]
    runnable = executable_recipe(workload, recipe)
    sim_runnable = workload.run(workload.simulate(runnable).model, workload.evaluation)
    n = min(batch_size, len(workload.evaluation))
    one, batch = (feeds(workload, workload.evaluation.subset(slice(0, k)))[0] for k in (1, n))
    result = {"model": workload.name, "recipe": recipe.name, "backend": "onnxruntime (CPUExecutionProvider)",
              "threads": threads, "batch_size": n, "metric": head}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {key: os.path.join(tmp, f"{key}.onnx") for key in ("fp32", "quantized")}
        export_float_onnx(workload.folded[0], workload, paths["fp32"])
        infos = {"fp32": {"theoretical_size_bytes": workload.size(recipe)["fp32_bytes"]},
                 "quantized": export(workload, recipe, "onnx", paths["quantized"])}
        ort_matmul(8, int8=False)()  # ONNX Runtime's one-time set-up stays out of the peaks
        alive = []  # both sessions stay loaded, so the second cannot reuse the first one's memory
        for key, path in paths.items():
            info = infos[key]
            holder = {}

            def load_and_run():
                holder["session"] = session(path, threads)
                holder["session"].run(None, batch)

            peak = peak_memory_bytes(load_and_run)
            sess = holder["session"]
            alive.append(sess)
            outputs = run_onnx(sess, workload, workload.evaluation)
            measured = workload.task.metrics(outputs, workload.reference_outputs, workload.evaluation.labels)[head]
            row = {"size_bytes": os.path.getsize(path), "theoretical_size_bytes": info["theoretical_size_bytes"],
                   "latency_ms": latency_ms(lambda: sess.run(None, batch), budget_s=budget_s),
                   "latency_ms_batch1": latency_ms(lambda: sess.run(None, one), budget_s=budget_s),
                   "peak_memory_bytes": peak}
            if key == "fp32":
                row["metric"] = measured
            else:
                as_exported = workload.task.metrics(sim_runnable, workload.reference_outputs, workload.evaluation.labels)[head]
                row.update({"metric_simulated": simulated, "metric_measured": measured,
                            "metric_difference": measured - simulated, "metric_simulated_as_exported": as_exported,
                            "max_abs_output_difference": float((outputs - sim_runnable).abs().max())})
                result.update(unsupported=info["unsupported"], paths=info["paths"], notes=list(info["notes"]))
            result[key] = row
    result["speedup"] = result["fp32"]["latency_ms"]["median"] / result["quantized"]["latency_ms"]["median"]
    result["versions"], result["cpu_features"] = versions(), cpu_features()
    if result["unsupported"]:
        from .hardware import roofline

        est = roofline(workload, recipe, "this-machine", batch_size=n)
        result["estimate"] = {"label": "estimate", "latency_ms": est["total"]["latency_ms"],
                              "fp32_latency_ms": est["fp32_total"]["latency_ms"],
                              "note": "roofline estimate for the full recipe on this machine's measured bandwidth and "
                                      "throughput (not a measurement)"}
    affine = any(p in ("int8-static", "int8-dynamic") and not recipe.plan(n).activations.symmetric
                 for n, p in result["paths"].items())
    no_vnni = "avx2" in result["cpu_features"] and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(result["cpu_features"])
    if affine and no_vnni:
        result["notes"].append("this CPU has no VNNI/AMX int8 dot-product instructions: ONNX Runtime's uint8 x int8 "
                               "kernels use AVX2 (vpmaddubsw), whose 16-bit intermediate sums can saturate -- a documented "
                               "source of gaps between simulated and measured results; symmetric (signed int8) static "
                               "activations avoid it here")
    return result

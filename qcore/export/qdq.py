"""ONNX export whose file *is* the simulation.

``export_qdq(workload, recipe, path)`` writes the quantized model the engine simulates, using the
engine's own numbers -- never re-quantizing a float graph with another tool:

1. the FP32 graph, built once per workload, batch dimension dynamic: an uploaded ONNX model's own
   graph (``OnnxModule.source``; each layer's weight input replaced by the simulated model's weight,
   upgraded to opset 21 if older, checked at batch 1 and 8, a note if a Reshape fixes the batch);
   any other model's BatchNorm-folded copy (``workload.folded[0]``) exported with
   ``torch.onnx.export(dynamo=True)`` at opset 21 (a ``.pt2`` program's unflattened module too),
   without the exporter's BatchNorm fusion when the simulation kept a BatchNorm;
2. each quantized layer's weight initializer is replaced by what ``quantize(weight, spec)`` returns,
   stored as compactly as ONNX allows and decoded by graph ops to the simulated weight, bit for bit:

   ===========================  =====================================================================
   weights                      written as
   ===========================  =====================================================================
   int2..int8 on a Linear,      ``MatMulNBits`` (bits 2 / 4 / 8; codes + 2^(bits-1), scales per block
   float inputs                 of a power of two >= 16 along K) when every block lies in one engine block
   int2..int16 otherwise        integer codes (INT4 container for <= 4 bits, INT8, INT16) + ``DequantizeLinear``
                                per tensor, per axis, or blocked (``block_size``, opset 21) on the
                                (C_out, fan_in) view, then ``Reshape`` back
   fp16 / bf16 / fp8            values in that type + ``Cast`` (+ ``Mul`` by the scale when ``scaled``)
   nf4                          4-bit codebook indices (UINT4) + ``Gather`` from the 16 levels + ``Mul``
   ===========================  =====================================================================

3. each quantized layer input gets the simulation's input quantizer (``simulate.input_quantizer``)
   written as ops on that layer's input edge only: static int -> ``QuantizeLinear``/``DequantizeLinear``
   with the calibrated scale / zero-point (``Clip`` on the codes below 8 bits); dynamic -> the range
   method as ops over the whole batch (ReduceMin/ReduceMax, TopK for percentile, 50 candidate clips
   for MSE), then the format's scale / zero-point formula, then Q/DQ with run-time scale; float
   formats -> ``Clip`` + ``Cast`` pair (``Div``/``Mul`` by the scale when scaled).

What ONNX Runtime then executes is read back from its optimized graph, not guessed: a layer is
"int8 kernel" when its weight codes feed a fused integer op (QLinearConv, QLinearMatMul, QGemm, ...),
"MatMulNBits" when it is one, else "float (dequantized)" with the reason.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
import weakref
from dataclasses import asdict, dataclass, field

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qcore.errors import QcoreError
from qcore.numerics.formats import NF4_CODEBOOK, CodebookFormat, FloatFormat, IntFormat
from qcore.numerics.granularity import fan_in, from_blocks
from qcore.model.onnx_graph import OnnxModule
from qcore.numerics.quantize import QuantizedTensor, quantize
from qcore.numerics.ranges import MSE_GRID
from qcore.recipe import Recipe
from qcore.numerics.spec import TensorSpec
from qcore.model.simulate import input_quantizer, needs_calibration
from qcore.export.graph import GraphEditor

OPSET = 21
_TINY = float(torch.finfo(torch.float32).tiny)
# ONNX element type and numpy dtype holding a float format's values
_FLOAT_TYPES = {"fp16": (TensorProto.FLOAT16, np.float16), "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
                "fp8_e4m3": (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
                "fp8_e5m2": (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2)}
# Fused integer ops of ONNX Runtime's optimized graph, and what they mean for a layer
_INT_KERNELS = {"QLinearConv": "int8 kernel", "QLinearMatMul": "int8 kernel", "QGemm": "int8 kernel",
                "MatMulIntegerToFloat": "int8 kernel", "ConvInteger": "int8 kernel", "MatMulInteger": "int8 kernel",
                "DynamicQuantizeMatMul": "int8 kernel", "MatMulNBits": "MatMulNBits",
                "GatherBlockQuantized": "quantized Gather"}


@dataclass
class OnnxExport:
    """An exported file and what each layer became.

    path       : the .onnx file
    size_bytes : its size on disk (os.path.getsize)
    opset      : ONNX opset of the default domain
    layers     : per quantizable layer ``{layer, kind, weights, activations, executes, reason, stored_bytes}``
                 (executes: "int8 kernel" | "MatMulNBits" | "float (dequantized)" | "float";
                 stored_bytes: {codes, scales, zero_points, other, total} of its weight's initializers)
    notes      : file-level remarks (containers wider than the format, ...)
    """

    path: str
    size_bytes: int
    opset: int
    layers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- 1. the float graph ----------------------------------------------------------------------------
@dataclass
class FloatGraph:
    """The FP32 graph the export edits: ``proto`` (inputs ``input_0..``, output ``output``, batch
    dimension dynamic), each layer's weight initializer as ``(name, stored transposed?)`` and notes."""

    proto: onnx.ModelProto
    weights: dict[str, tuple[str, bool]]
    notes: list[str]


_FLOAT_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def float_graph(workload) -> FloatGraph:
    """The folded FP32 model as ONNX: an uploaded ONNX model's own graph (``_uploaded_graph``), any
    other model exported with ``torch.onnx.export(dynamo=True)`` (``_exported_graph``). Built once
    per workload; returns a fresh copy to edit."""
    if workload not in _FLOAT_GRAPHS:
        model = workload.folded[0]
        modules = dict(model.named_modules())

        def located(proto, names):
            ed = GraphEditor(proto)
            _gemm_to_matmul(ed)
            ed.finish()
            return {name: _weight_initializer(ed, name, modules[name].weight.detach().float().numpy(), names.get(name))
                    for name in workload.layers}

        if isinstance(model, OnnxModule):
            proto, notes, names = _uploaded_graph(workload)
            weights = located(proto, names)
        else:
            proto, notes = _exported_graph(workload, optimize=True), []
            try:
                weights = located(proto, {})
            except QcoreError:  # the optimizer fused a BatchNorm the simulation keeps into a conv's weight
                proto = _exported_graph(workload, optimize=False)
                weights = located(proto, {})
        _FLOAT_GRAPHS[workload] = (proto.SerializeToString(), weights, notes)
    data, weights, notes = _FLOAT_GRAPHS[workload]
    return FloatGraph(onnx.load_from_string(data), dict(weights), list(notes))


def _exported_graph(workload, optimize: bool) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` of the folded model at opset 21, batch (and the sequence
    length of token inputs) dynamic. ``optimize=False`` replaces the exporter's optimizer by constant
    folding alone: its rewrite rules fuse a BatchNorm the simulation kept (one outside an
    ``nn.Sequential``) into the conv's weight, and the file must hold the weights the simulation quantizes."""
    import inspect

    import onnx_ir.passes.common as ir_passes
    import onnxscript.optimizer

    model = workload.folded[0]
    example = tuple(t[:2] for t in workload.calibration.inputs)
    dims = tuple({0: torch.export.Dim.DYNAMIC, **({1: torch.export.Dim.DYNAMIC}
                  if t.dim() == 2 and not t.is_floating_point() else {})} for t in example)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values()):
        dims = (dims,)  # forward(*args) (an unflattened .pt2 program): the inputs are one tuple argument
    exporter_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" and similar chatter
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own pytree deprecation inside export (it deep-copies TreeSpecs), not a call of ours
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            program = torch.onnx.export(model, example, dynamo=True, opset_version=OPSET, dynamic_shapes=dims,
                                        verbose=False, optimize=optimize)
    finally:
        exporter_log.setLevel(level)
    if not optimize:
        onnxscript.optimizer.fold_constants(program.model)
        onnxscript.optimizer.remove_unused_nodes(program.model)
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(program.model)
    proto = program.model_proto
    ed = GraphEditor(proto)
    _rename_io(ed)
    ed.finish()
    _strip(proto)
    return proto


def _uploaded_graph(workload) -> tuple[onnx.ModelProto, list[str], dict[str, str]]:
    """An uploaded ONNX model's own graph (``OnnxModule.source``), each layer's weight input replaced
    by the simulated model's weight (read in the node's orientation), its first output only, upgraded
    to opset 21 if older, the batch dimension made dynamic and checked at batch 1 and 8. Returns
    (graph, notes, each layer's weight initializer)."""
    model = workload.folded[0]
    proto = onnx.load_from_string(model.source)
    ed = GraphEditor(proto)
    modules = dict(model.named_modules())
    names = {}
    for name, src in model.layer_sources.items():
        node = ed.nodes[src.node_index]
        assert node.name == src.node_name, (node.name, src)
        weight = modules[name].weight.detach().float().numpy()
        names[name] = node.input[src.weight_input] = ed.const(
            np.ascontiguousarray(weight.T if src.transposed else weight), f"{name}.weight")
    del proto.graph.output[1:]  # the engine scores the first output
    ed.prune()  # the source weights (and what folded them at import) are no longer read
    for name, init in names.items():  # "fc.weight_1" -> "fc.weight" once the source's "fc.weight" is gone
        if init != f"{name}.weight" and f"{name}.weight" not in ed.inits and ed.producer(f"{name}.weight") is None:
            ed.rename_value(init, f"{name}.weight")
            names[name] = f"{name}.weight"
    weights = set(ed.inits)
    for i in [i for i in proto.graph.input if i.name in weights]:  # initializers as inputs: constants
        proto.graph.input.remove(i)
    ed.finish()
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < OPSET:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, OPSET)
        except Exception as e:  # noqa: BLE001 -- an operator without an adapter to opset 21
            raise QcoreError(f"the uploaded ONNX model (opset {opset}) cannot be upgraded to opset {OPSET}, which "
                             f"the quantized file needs ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             f"export it again with opset_version={OPSET}") from None
    proto.ir_version = max(proto.ir_version, 10)  # INT4 / UINT4 initializers and opset 21 need IR 10
    batch = "batch"
    for v in [*(i for i in proto.graph.input), proto.graph.output[0]]:
        dims = v.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value"):
            dims[0].dim_param = batch  # a oneof with dim_value: setting it clears the fixed size
    ed = GraphEditor(proto)
    _rename_io(ed)
    ed.finish()
    _strip(proto)
    return proto, _batch_notes(proto, workload), names


def _rename_io(ed: GraphEditor) -> None:
    """Graph inputs -> ``input_0..``, the first output -> ``output`` (what ``runtime.feeds`` passes);
    a value of the source graph already holding one of those names is renamed out of the way."""
    graph = ed.graph
    io = [i.name for i in graph.input if i.name not in ed.inits] + [graph.output[0].name]
    targets = [f"input_{i}" for i in range(len(io) - 1)] + ["output"]
    for k, name in enumerate(io):
        ed.rename_value(name, f"__qcore_io_{k}")
    used = {n for node in ed.nodes for n in [*node.input, *node.output]} | set(ed.inits)
    for k, target in enumerate(targets):
        if target in used:
            ed.rename_value(target, ed.fresh(f"{target}_source"))
        ed.rename_value(f"__qcore_io_{k}", target)


def _strip(proto: onnx.ModelProto) -> None:
    """Drop what is bytes, not model: exporter stack traces and module scopes, recorded shapes of values
    the export rewrites (ONNX Runtime infers them), model metadata."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    del proto.metadata_props[:]


def _batch_notes(proto: onnx.ModelProto, workload) -> list[str]:
    """Run the float graph at batch 1 and 8 in ONNX Runtime; a note for each batch it does not run
    (a Reshape or Expand in the source graph with the batch size written in)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    notes = []
    for b in (1, 8):
        feed = {f"input_{i}": t[torch.arange(b) % len(t)].numpy() for i, t in enumerate(workload.calibration.inputs)}
        try:
            out = sess.run(None, feed)[0]
            problem = None if out.shape[:1] == (b,) else f"gives an output of shape {out.shape}"
        except Exception as e:  # noqa: BLE001 -- ONNX Runtime's error for a shape the graph fixes
            problem = f"fails ({str(e).splitlines()[0][:160]})"
        if problem:
            notes.append(f"the uploaded graph {problem} at batch {b}: it hard-codes the batch size (a Reshape or "
                         "Expand with a fixed first dimension), so the file runs only the batch size it was "
                         "exported with; export the source model with a dynamic batch dimension")
    return notes


def _gemm_to_matmul(ed: GraphEditor) -> None:
    """Gemm(A, W, b; transB=1) with constant W -> MatMul(A, W^T) + b: ONNX Runtime fuses QDQ int8
    MatMul (QLinearMatMul, MatMulIntegerToFloat) but not QDQ Gemm. W^T keeps W's initializer name."""
    from onnx import numpy_helper

    for node in list(ed.nodes):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in ed.inits or attrs.get("transA", 0)
                or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        w = node.input[1]
        ed.inits[w].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(ed.array(w).T), w))
        has_bias = len(node.input) > 2 and node.input[2]
        out = ed.fresh(f"{node.output[0]}_matmul") if has_bias else node.output[0]
        ed.replace(node, helper.make_node("MatMul", list(node.input[:2]), [out], name=node.name))
        if has_bias:
            ed.nodes.insert(ed.nodes.index(ed.producer(out)) + 1,
                            helper.make_node("Add", [out, node.input[2]], list(node.output), name=node.name + "_bias"))


def _weight_initializer(ed: GraphEditor, layer: str, weight: np.ndarray, known: str | None = None) -> tuple[str, bool]:
    """(initializer name, stored transposed?) of ``layer``'s weight: ``known`` (an upload's), else by
    parameter name, else by value."""
    by_name = [known] if known else [f"{layer}.weight"] * (f"{layer}.weight" in ed.inits) + list(ed.inits)
    for init_name in by_name:
        a = ed.array(init_name)
        if a.shape == weight.shape and np.array_equal(a, weight):
            return init_name, False
        if a.ndim == 2 and a.shape == weight.shape[::-1] and np.array_equal(a.T, weight):
            return init_name, True
    raise QcoreError(f"the ONNX export found no weight for layer {layer!r}; the exporter renamed or folded it")


# ---- 2. weights ------------------------------------------------------------------------------------
def _full(q: QuantizedTensor, per_block: torch.Tensor | None, shape) -> np.ndarray | None:
    """A per-block value (scale or zero-point) broadcast to every element of the weight."""
    if per_block is None:
        return None
    blocks = q._blocks(torch.zeros(shape))
    return from_blocks(per_block[:, None].expand_as(blocks), tuple(shape), q.spec.granularity, q.spec.axis).numpy()


def _scale_view(ed, values: str, q: QuantizedTensor, shape, out: str, before=None) -> str:
    """``values * scale`` in the engine's block view (per_group: (C_out, fan_in/g, g)) -> ``out`` of ``shape``."""
    s = q.spec
    if q.scale is None:
        return ed.node("Reshape", [values, ed.const(np.array(shape, np.int64), "shape")], "w", before, output=out)
    if s.granularity == "per_tensor":
        return ed.node("Mul", [values, ed.const(q.scale.numpy().reshape(()), "scale")], "w", before, output=out)
    if s.granularity == "per_channel":
        b = [1] * len(shape)
        b[s.axis] = shape[s.axis]
        return ed.node("Mul", [values, ed.const(q.scale.numpy().reshape(b), "scale")], "w", before, output=out)
    groups = (shape[0], fan_in(shape) // s.group_size, 1)
    scaled = ed.node("Mul", [values, ed.const(q.scale.numpy().reshape(groups), "scale")], "w", before)
    return ed.node("Reshape", [scaled, ed.const(np.array(shape, np.int64), "shape")], "w", before, output=out)


def _stored_shape(q: QuantizedTensor, shape) -> tuple[int, ...]:
    s = q.spec
    return (shape[0], fan_in(shape) // s.group_size, s.group_size) if s.granularity == "per_group" else tuple(shape)


def _int_container(bits: int):
    return ml_dtypes.int4 if bits <= 4 else np.int8 if bits <= 8 else np.int16


def _dequantize_linear(ed, q: QuantizedTensor, shape, out: str, transposed: bool = False) -> str:
    """Integer codes + DequantizeLinear (per tensor / per axis / blocked on the (C_out, fan_in) view);
    ``transposed``: a 2-D weight stored as W^T (codes, scales and the axis transposed with it)."""
    s, dtype = q.spec, _int_container(q.spec.fmt.bits)
    codes = q.codes.numpy().astype(np.int64)
    zp = None if q.zero_point is None else q.zero_point.numpy().astype(np.int64)
    scale = q.scale.numpy()
    attrs: dict = {}
    if s.granularity == "per_tensor":
        scale, zp = scale.reshape(()), None if zp is None else zp.reshape(())
    elif s.granularity == "per_channel":
        attrs["axis"] = s.axis % len(shape)
    else:
        rows = (shape[0], fan_in(shape))
        codes = codes.reshape(rows)
        scale = scale.reshape(rows[0], -1)
        zp = None if zp is None else zp.reshape(rows[0], -1)
        attrs.update(axis=1, block_size=s.group_size)
    if transposed:
        codes, shape = codes.T, tuple(shape)[::-1]
        if s.granularity != "per_tensor":
            attrs["axis"] = 1 - attrs["axis"]
        if s.granularity == "per_group":
            scale, zp = scale.T, None if zp is None else zp.T
    inputs = [ed.const(codes.astype(dtype), "codes"), ed.const(scale, "scale")]
    if zp is not None:
        inputs.append(ed.const(zp.astype(dtype), "zero_point"))
    if codes.shape == tuple(shape):
        ed.node("DequantizeLinear", inputs, "w", output=out, **attrs)
    else:
        w = ed.node("DequantizeLinear", inputs, "w", **attrs)
        ed.node("Reshape", [w, ed.const(np.array(shape, np.int64), "shape")], "w", output=out)
    return inputs[0]


def _decode_weight(ed, q: QuantizedTensor, shape, out: str, transposed: bool = False) -> tuple[str, str]:
    """Graph ops computing ``q.dequantize()`` (the simulated weight) into value ``out``; returns
    (what is stored, the initializer holding the codes)."""
    fmt = q.spec.fmt
    if isinstance(fmt, IntFormat):
        container = {ml_dtypes.int4: "INT4", np.int8: "INT8", np.int16: "INT16"}[_int_container(fmt.bits)]
        return f"{fmt.name} codes as {container} + DequantizeLinear", _dequantize_linear(ed, q, shape, out, transposed)
    stored = q.codes.numpy().reshape(_stored_shape(q, shape))
    if isinstance(fmt, FloatFormat):
        codes = ed.const(stored.astype(_FLOAT_TYPES[fmt.name][1]), "values")
        values = ed.node("Cast", [codes], "w", to=TensorProto.FLOAT)
        what = f"{fmt.name} values + Cast" + (" + Mul(scale)" if q.scale is not None else "")
    elif isinstance(fmt, CodebookFormat):
        codes = ed.const(stored.astype(np.uint8).astype(ml_dtypes.uint4), "indices")
        index = ed.node("Cast", [codes], "w", to=TensorProto.INT32)
        values = ed.node("Gather", [ed.const(np.array(NF4_CODEBOOK, np.float32), "codebook"), index], "w")
        what = "nf4 indices as UINT4 + Gather(codebook) + Mul(scale)"
    else:
        raise AssertionError(fmt)
    _scale_view(ed, values, q, shape, out)
    return what, codes


def _nbits_block(q: QuantizedTensor, K: int) -> int | None:
    """The largest MatMulNBits block (power of two in [16, 256]) inside which the engine's scale and
    zero-point of a (N, K) weight are constant, or None."""
    N = q.shape[0]
    scale = _full(q, q.scale, q.shape)
    zp = _full(q, q.zero_point, q.shape)
    for b in (256, 128, 64, 32, 16):
        if b > max(16, 2 ** math.ceil(math.log2(K))):
            continue
        kb = -(-K // b)
        ok = True
        for t in (scale, zp):
            if t is None:
                continue
            padded = np.concatenate([t, np.repeat(t[:, -1:], kb * b - K, axis=1)], axis=1).reshape(N, kb, b)
            ok &= bool((padded == padded[:, :, :1]).all())
        if ok:
            return b
    return None


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values (..., m) packed ``8 // bits`` per byte along the last axis, low-order bits first."""
    per = 8 // bits
    m = values.shape[-1]
    v = np.concatenate([values, np.zeros(values.shape[:-1] + (-m % per,), values.dtype)], axis=-1).astype(np.uint8)
    v = v.reshape(values.shape[:-1] + (-1, per))
    return sum((v[..., j] << (bits * j)) for j in range(per)).astype(np.uint8)


def _matmul_nbits(ed, q: QuantizedTensor, a: str, bias: str | None, out: str, before, block: int):
    """MatMulNBits(A, packed codes, scales, zero-points, bias) computing A @ W^T (+ bias), W (N, K)."""
    bits = {2: 2, 3: 4, 4: 4}.get(q.spec.fmt.bits, 8)
    offset = 2 ** (bits - 1)  # unsigned code = signed code + offset; MatMulNBits' default zero-point
    N, K = q.shape
    kb = -(-K // block)
    zp = _full(q, q.zero_point, q.shape)
    zp_full = np.zeros((N, K)) if zp is None else zp
    u = (q.codes.numpy() + offset).astype(np.int64)
    pad = (zp_full[:, -1:] + offset).astype(np.int64).repeat(kb * block - K, axis=1)  # padding decodes to 0
    u = np.concatenate([u, pad], axis=1).reshape(N, kb, block)
    scales = np.concatenate([_full(q, q.scale, q.shape), np.zeros((N, kb * block - K), np.float32)], 1)
    scales = scales.reshape(N, kb, block)[:, :, 0].astype(np.float32)
    inputs = [a, ed.const(_pack(u, bits), "codes_packed"), ed.const(scales, "scales")]
    if zp is not None:
        zpb = np.concatenate([zp_full, np.zeros((N, kb * block - K))], 1).reshape(N, kb, block)[:, :, 0]
        inputs.append(ed.const(_pack((zpb + offset).astype(np.int64), bits), "zero_points"))
    else:
        inputs.append("")
    inputs += ["", bias] if bias else []
    return helper.make_node("MatMulNBits", inputs, [out], name=ed.fresh(f"{out}/MatMulNBits"), domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=0), bits


# ---- 3. layer inputs -------------------------------------------------------------------------------
def _c(ed, value, hint="c") -> str:
    return ed.const(np.array(value, np.float32), hint)


def _range_ops(ed, x: str, spec: TensorSpec, fmt, before) -> tuple[str, str]:
    """(lo, hi) over the whole tensor ``x`` for ``spec.range``, as graph ops (scalars, float32)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "range", before, **kw)  # noqa: E731
    flat = n("Reshape", [x, ed.const(np.array([-1], np.int64), "flat")])
    method = "minmax" if spec.range == "moving_average" else spec.range
    if method == "minmax" or method == "mse":
        lo, hi = n("ReduceMin", [flat], keepdims=0), n("ReduceMax", [flat], keepdims=0)
        if spec.symmetric:
            amax = n("Max", [n("Abs", [lo]), n("Abs", [hi])])
            lo, hi = n("Neg", [amax]), amax
        return (lo, hi) if method == "minmax" else _mse_ops(ed, flat, lo, hi, spec, fmt, before)
    if method == "percentile":
        p = spec.percentile / 100.0

        def quantile(v: str, q: float) -> str:  # k-th smallest, k = clamp(ceil(round(q * n, 9)), 1, n)
            size = n("Size", [v])
            qn = n("Mul", [n("Cast", [size], to=TensorProto.DOUBLE), ed.const(np.array(q), "q")])
            e9 = ed.const(np.array(1e9), "e9")
            k = n("Cast", [n("Ceil", [n("Div", [n("Round", [n("Mul", [qn, e9])]), e9])])], to=TensorProto.INT64)
            k = n("Max", [n("Min", [k, size]), ed.const(np.array(1, np.int64), "one")])
            smallest = ed.node("TopK", [v, n("Reshape", [k, ed.const(np.array([1], np.int64), "k")])], "range",
                               before, n_outputs=2, largest=0)
            return n("ReduceMax", [smallest], keepdims=0)

        if spec.symmetric:
            amax = quantile(n("Abs", [flat]), p)
            return n("Neg", [amax]), amax
        return quantile(flat, 1.0 - p), quantile(flat, p)
    raise QcoreError(f"dynamic activations with range {spec.range!r} cannot be written as ONNX ops yet (the "
                     "histogram search has no graph form); use minmax, percentile or mse for dynamic inputs, "
                     "or a static range")


def _safe(ed, s: str, before) -> str:
    """formats._safe_scale: scales below float32's smallest normal (or infinite) become 1."""
    ok = ed.node("And", [ed.node("GreaterOrEqual", [s, _c(ed, _TINY)], "scale", before),
                         ed.node("Not", [ed.node("IsInf", [s], "scale", before)], "scale", before)], "scale", before)
    return ed.node("Where", [ok, s, _c(ed, 1.0)], "scale", before)


def _params_ops(ed, lo: str, hi: str, spec: TensorSpec, fmt, before) -> tuple[str, str | None]:
    """(scale, zero_point as float or None) from a range, ``fmt.encode``'s formula as ops (any shape)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "qparams", before, **kw)  # noqa: E731
    if isinstance(fmt, FloatFormat):
        amax = n("Max", [n("Abs", [lo]), n("Abs", [hi])])
        return _safe(ed, n("Div", [amax, _c(ed, fmt.max_value)]), before), None
    if spec.symmetric:
        amax = n("Max", [n("Abs", [lo]), n("Abs", [hi])])
        return _safe(ed, n("Div", [amax, _c(ed, float(fmt.qmax))]), before), None
    lo, hi = n("Min", [lo, _c(ed, 0.0)]), n("Max", [hi, _c(ed, 0.0)])
    span = _c(ed, float(fmt.qmax - fmt.qmin))
    scale = _safe(ed, n("Sub", [n("Div", [hi, span]), n("Div", [lo, span])]), before)
    zp = n("Round", [n("Sub", [_c(ed, float(fmt.qmin)), n("Div", [lo, scale])])])
    return scale, n("Clip", [zp, _c(ed, float(fmt.qmin)), _c(ed, float(fmt.qmax))])


def _fake_quant_ops(ed, x: str, scale: str, zp: str | None, fmt, before) -> str:
    """Quantize-dequantize ``x`` with broadcastable scale / zero-point, as float ops (the MSE search)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "mse", before, **kw)  # noqa: E731
    if isinstance(fmt, FloatFormat):
        onnx_type = _FLOAT_TYPES[fmt.name][0]
        m = fmt.max_value
        v = n("Clip", [n("Div", [x, scale]), _c(ed, -m), _c(ed, m)])
        return n("Mul", [n("Cast", [n("Cast", [v], to=onnx_type)], to=TensorProto.FLOAT), scale])
    ratio = n("Div", [n("Cast", [x], to=TensorProto.DOUBLE), n("Cast", [scale], to=TensorProto.DOUBLE)])
    q = n("Cast", [n("Round", [ratio])], to=TensorProto.FLOAT)
    if zp is not None:
        q = n("Add", [q, zp])
    q = n("Clip", [q, _c(ed, float(fmt.qmin)), _c(ed, float(fmt.qmax))])
    return n("Mul", [q if zp is None else n("Sub", [q, zp]), scale])


def _mse_ops(ed, flat: str, lo0: str, hi0: str, spec, fmt, before) -> tuple[str, str]:
    """ranges.mse as ops: MSE_GRID shrunken copies of the min-max range side by side, the first of the
    smallest squared errors wins (ties keep the wider range, as the engine's strict ``<``)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "mse", before, **kw)  # noqa: E731
    alphas = ed.const((np.arange(MSE_GRID, 0, -1, dtype=np.float32) / np.float32(MSE_GRID)).reshape(-1, 1), "alpha")
    lo, hi = n("Mul", [lo0, alphas]), n("Mul", [hi0, alphas])  # (G, 1)
    scale, zp = _params_ops(ed, lo, hi, spec, fmt, before)
    row = n("Unsqueeze", [flat, ed.const(np.array([0], np.int64), "axis0")])  # (1, n)
    xq = _fake_quant_ops(ed, row, scale, zp, fmt, before)  # (G, n)
    d = n("Sub", [n("Cast", [xq], to=TensorProto.DOUBLE), n("Cast", [row], to=TensorProto.DOUBLE)])
    err = n("ReduceSum", [n("Mul", [d, d]), ed.const(np.array([1], np.int64), "axis1")], keepdims=0)  # (G,)
    best = n("ArgMin", [err], axis=0, keepdims=0)
    pick = lambda t: n("Gather", [n("Reshape", [t, ed.const(np.array([-1], np.int64), "flat")]), best])  # noqa: E731
    return pick(lo), pick(hi)


def _quantize_input(ed, x: str, iq, before) -> tuple[str, str]:
    """The simulation's input quantizer ``iq`` on value ``x`` as ops before node ``before``:
    (output value, description)."""
    spec, fmt = iq.spec, iq.spec.fmt
    n = lambda op, ins, **kw: ed.node(op, ins, "input_q", before, **kw)  # noqa: E731
    static = not spec.dynamic and iq.lo is not None
    if isinstance(fmt, FloatFormat) and not spec.scaled:  # a plain saturating cast
        m = fmt.max_value
        v = n("Clip", [x, _c(ed, -m), _c(ed, m)])
        return n("Cast", [n("Cast", [v], to=_FLOAT_TYPES[fmt.name][0])], to=TensorProto.FLOAT), f"{fmt.name} Cast pair"
    if static:
        qt = quantize(torch.zeros(1), spec, iq.lo, iq.hi)
        scale = _c(ed, float(qt.scale[0]), "input_scale")
        zp = None if qt.zero_point is None else float(qt.zero_point[0])
    else:
        lo, hi = _range_ops(ed, x, spec, fmt, before)
        scale, zp = _params_ops(ed, lo, hi, spec, fmt, before)
    how = f"static (calibrated {spec.range})" if static else f"dynamic ({spec.range} per batch)"
    if isinstance(fmt, FloatFormat):
        return _fake_quant_ops(ed, x, scale, None, fmt, before), f"{fmt.name} scaled {how}: Div/Cast/Mul"
    container, onnx_type = (np.int8, TensorProto.INT8) if fmt.bits <= 8 else (np.int16, TensorProto.INT16)
    if zp is None:
        zp = ed.const(np.array(0, container), "input_zero_point")
    elif static:
        zp = ed.const(np.array(zp, container), "input_zero_point")
    else:
        zp = n("Cast", [zp], to=onnx_type)
    codes = n("QuantizeLinear", [x, scale, zp])
    if fmt.bits not in (8, 16):
        codes = n("Clip", [codes, ed.const(np.array(fmt.qmin, container), "qmin"),
                           ed.const(np.array(fmt.qmax, container), "qmax")])
    return n("DequantizeLinear", [codes, scale, zp]), f"{fmt.name} {how}: QuantizeLinear/DequantizeLinear"


# ---- the export ------------------------------------------------------------------------------------
def _compute_node(ed, weight_value: str):
    """The Gemm / MatMul / Conv / Gather reading ``weight_value`` (through a Transpose if any)."""
    for node in ed.consumers(weight_value):
        if node.op_type == "Transpose":
            return _compute_node(ed, node.output[0])
        if node.op_type in ("Gemm", "MatMul", "Conv", "Gather"):
            return node
    return None


def export_qdq(workload, recipe: Recipe, path: str) -> OnnxExport:
    """Write ``workload``'s model under ``recipe`` to ``path`` as ONNX holding exactly the simulated
    model (see the module docstring); returns what was written and what ONNX Runtime executes."""
    recipe.check_against(workload.layer_shapes)
    calib = workload.calibration_stats() if needs_calibration(recipe, workload.layers) else None
    graph = float_graph(workload)
    proto = graph.proto
    ed = GraphEditor(proto)
    modules = dict(workload.folded[0].named_modules())
    rows, notes, codes_of = [], list(graph.notes), {}
    for name, info in workload.layers.items():
        plan = recipe.plan(name)
        weight = modules[name].weight.detach().float()
        init, transposed = graph.weights[name]
        node = _compute_node(ed, init)
        row = {"layer": name, "kind": info.kind, "weights": "fp32", "activations": "fp32", "executes": "float",
               "reason": "kept in FP32 by the recipe"}
        iq = input_quantizer(name, info.kind, plan.activations, calib)
        data_input = None if node is None or node.op_type == "Gather" else 0
        if iq is not None and data_input is not None:
            new_input, row["activations"] = _quantize_input(ed, node.input[data_input], iq, node)
            node.input[data_input] = new_input
        elif plan.activations is not None and info.kind != "Embedding" and plan.activations.format != "fp32":
            row["activations"] = "fp32 (layer not reached by the calibration data: the simulation leaves it float)"
        w = plan.weights
        before_weight = set(ed.inits)
        if w is not None and w.format != "fp32":
            q = quantize(weight, w)
            # a Linear as MatMul(A, W^T): MatMulNBits unless int8 weights meet int8 static inputs (QDQ fuses those)
            nbits_ok = (node is not None and node.op_type == "MatMul" and transposed and node.input[1] == init
                        and isinstance(w.fmt, IntFormat) and w.fmt.bits <= 8
                        and not (w.fmt.bits == 8 and iq is not None and not iq.spec.dynamic and iq.spec.format == "int8"))
            block = _nbits_block(q, weight.shape[1]) if nbits_ok else None
            ed.drop_initializer(init)
            if block is not None:
                new, bits = _matmul_nbits(ed, q, node.input[0], None, node.output[0], node, block)
                ed.replace(node, new)
                row["weights"] = f"{w.format} codes packed in MatMulNBits (bits={bits}, block_size={block})"
                codes_of[name] = new.input[1]
            elif isinstance(w.fmt, IntFormat):  # DequantizeLinear reads transposed codes directly
                row["weights"], codes_of[name] = _decode_weight(ed, q, tuple(weight.shape), init, transposed)
            else:
                out = ed.fresh(f"{init}_dequantized") if transposed else init
                row["weights"], codes_of[name] = _decode_weight(ed, q, tuple(weight.shape), out)
                if transposed:
                    ed.node("Transpose", [out], "w", output=init, perm=[1, 0])
            if isinstance(w.fmt, IntFormat) and w.fmt.bits not in (4, 8, 16) and block is None:
                notes.append(f"{name}: {w.format} codes are stored in a {'4' if w.fmt.bits < 4 else '8'}-bit "
                             "container (ONNX has no narrower integer type), so the file is larger than the "
                             "theoretical size")
        row["stored_bytes"] = _stored_bytes(ed, set(ed.inits) - before_weight) if set(ed.inits) - before_weight \
            else {"codes": weight.numel() * 4, "scales": 0, "zero_points": 0, "other": 0, "total": weight.numel() * 4}
        rows.append(row)
    ed.finish()
    opset = max([OPSET] + [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")])
    others = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx", "com.microsoft")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1), *others])
    onnx.save(proto, path)
    _executes(path, rows, codes_of, recipe)
    return OnnxExport(path, os.path.getsize(path), opset, rows, notes)


def _stored_bytes(ed, names: set[str]) -> dict:
    """Bytes of the initializers holding one layer's weight, by role (from the names ``const`` gave
    them): codes (codes / values / indices), scales, zero_points, other (shapes, codebook), total."""
    roles = {"codes": 0, "scales": 0, "zero_points": 0, "other": 0}
    for name in names:
        role = ("codes" if name.startswith(("codes", "values", "indices")) else "scales" if name.startswith("scale")
                else "zero_points" if name.startswith("zero_point") else "other")
        roles[role] += len(ed.inits[name].raw_data) or ed.array(name).nbytes  # raw_data: 4-bit types packed
    return {**roles, "total": sum(roles.values())}


# ---- what ONNX Runtime makes of it -----------------------------------------------------------------
def _executes(path: str, rows: list[dict], codes_of: dict[str, str], recipe: Recipe) -> None:
    """Fill ``executes``/``reason`` of each row from ONNX Runtime's optimized graph of ``path``."""
    import onnxruntime as ort

    if not codes_of:  # nothing quantized: nothing for ONNX Runtime to fuse
        return
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    ops_reading = {}
    for node in optimized.graph.node:
        for i in node.input:
            ops_reading.setdefault(i, []).append(node.op_type)
    for row in rows:
        codes = codes_of.get(row["layer"])
        if codes is None:
            continue
        kernels = [_INT_KERNELS[op] for op in ops_reading.get(codes, []) if op in _INT_KERNELS]
        if kernels:
            row["executes"], row["reason"] = kernels[0], ""
            continue
        row["executes"] = "float (dequantized)"
        row["reason"] = _why_float(recipe.plan(row["layer"]), row["kind"])


def _why_float(plan, kind: str) -> str:
    """Why ONNX Runtime runs this layer in float (the file still holds the exact quantized values)."""
    w, a = plan.weights, plan.activations
    fam = w.fmt.family
    if fam == "codebook":
        return "NF4 needs a codebook-lookup kernel; ONNX Runtime's CPU provider has none, so it dequantizes at load"
    if fam == "float":
        return (f"ONNX Runtime's CPU provider has no {w.format} MatMul/Conv; the stored {w.format} weight is cast "
                "to float32")
    if w.fmt.bits == 16:
        return "ONNX Runtime has no int16 MatMul/Conv kernels on CPU"
    if kind == "Embedding":
        return "the table is dequantized before the Gather (no quantized Gather for this layout)"
    if a is None or a.format == "fp32":
        return (f"{w.format} weight-only: ONNX Runtime fuses weight-only integers only as MatMulNBits on a Linear "
                "with blocks of a power of two >= 16 inside one scale; here the weight is dequantized")
    if a.dynamic:
        return ("dynamic activations are written with the engine's own per-batch range formula; ONNX Runtime "
                "fuses only constant scales, so the layer computes on dequantized values")
    if kind == "Linear" and a.format == "int8" and w.format == "int8":
        return ("ONNX Runtime's MatMulAddFusion (level 1) turns the QDQ MatMul + bias Add into a float Gemm before "
                "its QDQ fusions run, so the Linear computes in float on the exact dequantized values (with "
                "disabled_optimizers=['MatMulAddFusion'] it becomes MatMulIntegerToFloat)")
    if a.format != "int8" or w.format != "int8":
        return (f"ONNX Runtime's integer kernels take int8 (or uint8) weights and inputs; {w.format} weights with "
                f"{a.format} inputs run as float on the exact quantized values")
    return ("ONNX Runtime fuses a QDQ Conv into QLinearConv only when its output is quantized again by the next "
            "layer's input; this one's output feeds a float op, so it computes in float on the dequantized values")

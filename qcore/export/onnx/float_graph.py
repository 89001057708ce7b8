"""The FP32 ONNX graph the export edits, built once per workload, batch dimension dynamic.

An uploaded ONNX model's own graph (``OnnxModule.source``; each layer's weight input replaced by the
simulated model's weight, upgraded to opset 21 if older); any other model's BatchNorm-folded copy (``workload.folded[0]``) exported with
``torch.onnx.export(dynamo=True)`` at opset 21 (a ``.pt2`` program's unflattened module too), without the
exporter's BatchNorm fusion when the simulation kept a BatchNorm. Inputs are named ``input_0..``, the
first output ``output``; a Gemm with a constant weight becomes MatMul (+ Add), which ONNX Runtime fuses.

A layer's weight sits in the graph in its operator's layout (``graph_weight``): a ConvTranspose's as
(C_in, C_out / groups, k...), an ONNX LSTM / GRU matrix as its W or R initializer (directions, G * H, in);
a torch LSTM / GRU is exported unrolled (the engine's ``recurrent`` cell: one MatMul per matrix and time
step, sharing one weight initializer), so the file has the sequence length of the calibration data.

Either graph then gets a dynamic batch (``_free_batch``): shapes that write the traced batch read the batch
of the run, checked in ONNX Runtime at 1, B and 8; a graph that still fixes it is declared at B, with a note.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper

from qcore.errors import QcoreError
from qcore.export.graph import GraphEditor
from qcore.model.first_output import FirstOutput
from qcore.model.conv_transpose import ConvTransposeLayer, to_transposed
from qcore.model.onnx_graph import OnnxModule
from qcore.model.workload import Workload

OPSET = 21


@dataclass
class FloatGraph:
    """The FP32 graph the export edits: ``proto`` (inputs ``input_0..``, output ``output``, batch
    dimension dynamic), each layer's weight initializer as ``(name, orientation)`` and notes; orientation
    False: as the layer holds it, True: W^T (2-D), "graph": the operator's layout (``graph_weight``)."""

    proto: onnx.ModelProto
    weights: dict[str, tuple[str, bool]]
    notes: list[str]


_FLOAT_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # float model -> its graph


def source_model(workload, recipe=None):
    """The float model an export of ``recipe`` writes: the folded model, or its copy with the recipe's
    SmoothQuant/AWQ/CLE scales folded into the LayerNorm/Linear/Conv weights (``Workload.transformed``)."""
    done = None if recipe is None else workload.transformed(recipe)
    return workload.folded[0] if done is None else done.model


def float_graph(workload, recipe=None) -> FloatGraph:
    """The FP32 model ``recipe`` quantizes (``source_model``) as ONNX: an uploaded ONNX model's own graph
    (``_uploaded_graph``), any other model exported with ``torch.onnx.export(dynamo=True)``
    (``_exported_graph``). Built once per float model; returns a fresh copy to edit."""
    model = source_model(workload, recipe)
    if model not in _FLOAT_GRAPHS:
        modules = dict(model.named_modules())

        def located(proto, names):
            ed = GraphEditor(proto)
            _gemm_to_matmul(ed)
            ed.finish()
            found = {}  # a weight another layer already claimed is not matched by value again (a tied LM head)
            for name in workload.layers:
                found[name] = _weight_initializer(ed, name, modules[name], names.get(name), {i for i, _ in found.values()})
            return found

        if isinstance(model, OnnxModule):
            proto, notes, names = _uploaded_graph(workload, model)
            weights = located(proto, names)
        else:
            proto, notes = _exported_graph(workload, model, optimize=True)
            try:
                weights = located(proto, {})
            except QcoreError:  # the optimizer fused a BatchNorm the simulation keeps into a conv's weight
                proto, notes = _exported_graph(workload, model, optimize=False)
                weights = located(proto, {})
        _FLOAT_GRAPHS[model] = (proto.SerializeToString(), weights, notes)
    data, weights, notes = _FLOAT_GRAPHS[model]
    return FloatGraph(onnx.load_from_string(data), dict(weights), list(notes))


def _exported_graph(workload, model, optimize: bool) -> tuple[onnx.ModelProto, list[str]]:
    """``torch.onnx.export(dynamo=True)`` of the folded model at opset 21, batch (and the sequence
    length of token inputs) dynamic unless the model fixes them (``Dim.AUTO``: a program saved at a
    fixed batch specializes it; the file is then declared at that batch and a note says so).
    ``optimize=False`` replaces the exporter's optimizer by constant folding alone: its rewrite rules
    fuse a BatchNorm the simulation kept (one outside an ``nn.Sequential``) into the conv's weight, and
    the file must hold the weights the simulation quantizes. Returns (graph, notes)."""
    import inspect

    import onnx_ir.passes.common as ir_passes
    import onnxscript.optimizer
    from torch.onnx import OnnxExporterError

    if isinstance(model, FirstOutput):  # the file keeps every output the model returns; the first is the scored one
        model = model.inner

    data = workload.calibration

    def exported(batch: int):
        # each input's batch on its own axis (``Data.batch_axes``: an LSTM state (2, batch, H) has 1); token ids'
        # length (axis 1 of a 2-D integer input batched on 0) is dynamic too
        example = data.subset(torch.arange(batch) % len(data)).inputs
        dims = tuple({data.axis(k): torch.export.Dim.AUTO, **({1: torch.export.Dim.AUTO} if t.dim() == 2 and
                      not t.is_floating_point() and data.axis(k) == 0 else {})} for k, t in enumerate(example))
        if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values()):
            dims = (dims,)  # forward(*args) (an unflattened .pt2 program): the inputs are one tuple argument
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own pytree deprecation inside export (it deep-copies TreeSpecs), not a call of ours
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            return torch.onnx.export(model, example, dynamo=True, opset_version=OPSET, dynamic_shapes=dims,
                                     verbose=False, optimize=optimize)

    exporter_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" and similar chatter
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        try:
            program = exported(2)
        except OnnxExporterError:
            # a program that runs only one batch size (the loader's ``workload.batch_size``) traced at it
            if workload.batch_size in (2, Workload.batch_size) or workload.batch_size > len(workload.calibration):
                raise
            program = exported(workload.batch_size)
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
    return _free_batch(proto, workload)


def _uploaded_graph(workload, model) -> tuple[onnx.ModelProto, list[str], dict[str, str]]:
    """An uploaded ONNX model's own graph (``OnnxModule.source``), each layer's weight input replaced
    by the simulated model's weight (read in the node's orientation), its first output only, upgraded
    to opset 21 if older, the batch dimension made dynamic and checked at batch 1 and 8. Returns
    (graph, notes, each layer's weight initializer)."""
    proto = onnx.load_from_string(model.source)
    ed = GraphEditor(proto)
    modules = dict(model.named_modules())
    names = {}
    for name, src in model.layer_sources.items():
        node = ed.nodes[src.node_index]
        assert node.name == src.node_name, (node.name, src)
        weight = graph_weight(modules[name])
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
    ed = GraphEditor(proto)
    _rename_io(ed)
    ed.finish()
    _strip(proto)
    return (*_free_batch(proto, workload), names)


def _rename_io(ed: GraphEditor) -> None:
    """Graph inputs -> ``input_0..``, the first output -> ``output`` (what ``runtime.feeds`` passes);
    a value of the source graph already holding one of those names is renamed out of the way."""
    graph = ed.graph
    io = [i.name for i in graph.input if i.name not in ed.inits] + [graph.output[0].name]
    targets = [f"input_{i}" for i in range(len(io) - 1)] + ["output"]
    for k, name in enumerate(io):
        ed.rename_value(name, f"__qcore_graph_io_{k}")
    used = {n for node in ed.nodes for n in [*node.input, *node.output]} | set(ed.inits)
    for k, target in enumerate(targets):
        if target in used:
            ed.rename_value(target, ed.fresh(f"{target}_source"))
        ed.rename_value(f"__qcore_graph_io_{k}", target)


def _strip(proto: onnx.ModelProto) -> None:
    """Drop what is bytes, not model: exporter stack traces and module scopes, recorded shapes of values
    the export rewrites (ONNX Runtime infers them), model metadata."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    del proto.metadata_props[:]


def _declared_batch(proto: onnx.ModelProto, axis: int = 0) -> int | None:
    """The batch size the graph declares (its first input's batch ``axis``, else its output's first dimension),
    or None when both are symbolic (or not a positive size: some exporters write 0 or -1 for "unknown")."""
    for v, a in ((proto.graph.input[0], axis), (proto.graph.output[0], 0)):
        dims = v.type.tensor_type.shape.dim
        if len(dims) > a and dims[a].HasField("dim_value") and dims[a].dim_value > 0:
            return dims[a].dim_value
    return None


def _declare_batch(proto: onnx.ModelProto, batch: int | str, axes: tuple[int, ...] = ()) -> None:
    """Declare the batch dimension of every graph input (input k's is ``axes[k]``, default 0: ``Data.batch_axes``)
    and the output's first as ``batch`` (a size or a name)."""
    for k, v in enumerate([*proto.graph.input, proto.graph.output[0]]):
        dims = v.type.tensor_type.shape.dim
        axis = axes[k] if k < len(axes) and k < len(proto.graph.input) else 0
        if len(dims) > axis:
            if isinstance(batch, int):
                dims[axis].dim_value = batch  # dim_value and dim_param are a oneof: setting one clears the other
            else:
                dims[axis].dim_param = batch


def _batch_from_input(proto: onnx.ModelProto, size: int, axis: int = 0) -> int:
    """Rewrite each constant shape that writes the traced batch ``size`` first (the shape of a Reshape,
    Expand, or ConstantOfShape: ``torch.onnx.export`` at a fixed batch folds ``x.view(x.size(0), -1)``
    to ``[2, -1]``) to ``Concat(Shape(input_0)[axis:axis + 1], rest)``, the batch of the run (``axis``: input_0's
    batch axis). Returns how many."""
    ed = GraphEditor(proto)
    shape_inputs = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}
    batch, rewritten = None, 0
    for node in list(ed.nodes):
        k = shape_inputs.get(node.op_type)
        if k is None or node.input[k] not in ed.inits:
            continue
        value = ed.array(node.input[k])
        if value.ndim != 1 or len(value) < 1 or int(value[0]) != size:
            continue
        if batch is None:
            batch = ed.node("Shape", ["input_0"], "batch", None, start=axis, end=axis + 1)
        rest = ed.const(value[1:].astype(np.int64), "shape_rest")
        node.input[k] = ed.node("Concat", [batch, rest], "shape", node, axis=0)
        rewritten += 1
    ed.finish()
    return rewritten


def _free_batch(proto: onnx.ModelProto, workload) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with a dynamic batch dimension where it can have one: shapes that write the batch size B
    it was traced at (``_declared_batch``) rewritten (``_batch_from_input``), then checked in ONNX Runtime -- at batch 1,
    B and 8 each sample's output must be the one the source graph gives at batch B. If they are not,
    the source graph is kept with its inputs and output declared at batch B, and a note says so."""
    data = workload.calibration
    fixed = _declared_batch(proto, data.axis(0))
    source = proto.SerializeToString()
    rewritten = _batch_from_input(proto, fixed, data.axis(0)) if fixed else 0
    _declare_batch(proto, "batch", data.batch_axes)
    if fixed is None or fixed > len(data):
        return proto, _batch_notes(proto, workload)
    sample = lambda b: {f"input_{i}": t.numpy()  # noqa: E731
                        for i, t in enumerate(data.subset(torch.arange(b) % fixed).inputs)}
    reference = _run(source, sample(fixed))
    problem = None
    for b in sorted({1, fixed, 8}):
        out = _run(proto.SerializeToString(), sample(b))
        expected = reference[np.arange(b) % fixed] if not isinstance(reference, str) else None
        if isinstance(out, str):
            problem = f"fails at batch {b} ({out})"
        elif expected is None or out.shape != expected.shape or not np.allclose(
                out, expected, rtol=1e-3, atol=1e-4 * (1 + float(np.abs(expected).max()))):
            problem = f"gives other outputs at batch {b} than at batch {fixed}"
        if problem:
            break
    if problem is None:
        return proto, [f"the model's graph was traced at batch {fixed}: {rewritten} shape(s) writing {fixed} now "
                       f"read the batch of each run, so the file runs any batch size (checked at 1, {fixed} and 8)"
                       ] if rewritten else []
    fixed_proto = onnx.load_from_string(source)
    _declare_batch(fixed_proto, fixed, data.batch_axes)
    return fixed_proto, [f"the model's graph hard-codes batch {fixed} and {problem} even with the shapes that write "
                         f"{fixed} rewritten, so the file is declared and runs at batch {fixed} only; export the source "
                         "model with a dynamic batch dimension to run other batch sizes"]


def _run(model: bytes, feed: dict) -> np.ndarray | str:
    """The first output of ``model`` in ONNX Runtime on ``feed``, or ONNX Runtime's error (one line)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    except Exception as e:  # noqa: BLE001 -- ONNX Runtime's error for a shape the graph fixes
        return str(e).splitlines()[0][:160]


def _batch_notes(proto: onnx.ModelProto, workload) -> list[str]:
    """Run the float graph at batch 1 and 8 in ONNX Runtime; a note for each batch it does not run
    (a Reshape or Expand in the source graph with the batch size written in)."""
    notes = []
    for b in (1, 8):
        data = workload.calibration.subset(torch.arange(b) % len(workload.calibration))  # each input on its batch axis
        feed = {f"input_{i}": t.numpy() for i, t in enumerate(data.inputs)}
        out = _run(proto.SerializeToString(), feed)
        problem = f"fails ({out})" if isinstance(out, str) else \
            None if out.shape[:1] == (b,) else f"gives an output of shape {out.shape}"
        if problem:
            notes.append(f"the uploaded graph {problem} at batch {b}: it hard-codes the batch size (a Reshape or "
                         "Expand with a fixed first dimension), so the file runs only the batch size it was "
                         "exported with; export the source model with a dynamic batch dimension")
    return notes


def _gemm_to_matmul(ed: GraphEditor) -> None:
    """Gemm(A, W, b; transB=1) with constant W -> MatMul(A, W^T) + b: ONNX Runtime fuses QDQ int8
    MatMul (QLinearMatMul, MatMulIntegerToFloat) but not QDQ Gemm. W^T keeps W's initializer name."""
    from onnx import numpy_helper

    transposed = set()  # a weight several Gemms share is transposed once
    for node in list(ed.nodes):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in ed.inits or attrs.get("transA", 0)
                or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        w = node.input[1]
        if w not in transposed:
            ed.inits[w].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(ed.array(w).T), w))
            transposed.add(w)
        has_bias = len(node.input) > 2 and node.input[2]
        out = ed.fresh(f"{node.output[0]}_matmul") if has_bias else node.output[0]
        ed.replace(node, helper.make_node("MatMul", list(node.input[:2]), [out], name=node.name))
        if has_bias:
            ed.nodes.insert(ed.nodes.index(ed.producer(out)) + 1,
                            helper.make_node("Add", [out, node.input[2]], list(node.output), name=node.name + "_bias"))


def graph_weight(module) -> np.ndarray:
    """A layer's weight (float32) in its ONNX operator's layout: a ``ConvTransposeLayer``'s as (C_in,
    C_out / groups, k...), a matrix of an imported LSTM / GRU as its W / R (``graph_shape``), else as held."""
    weight = module.weight.detach().float()
    if isinstance(module, ConvTransposeLayer):
        weight = to_transposed(weight, module.groups)
    elif getattr(module, "graph_shape", None) is not None:
        weight = weight.reshape(module.graph_shape)
    return weight.numpy()


def _weight_initializer(ed: GraphEditor, layer: str, module, known: str | None = None,
                        taken=frozenset()) -> tuple[str, bool | str]:
    """(initializer name, orientation: see ``FloatGraph``) of ``layer``'s weight: ``known`` (an upload's),
    else by parameter name, else by value among the initializers not ``taken`` by other layers."""
    weight, in_graph = module.weight.detach().float().numpy(), graph_weight(module)
    by_name = [known] if known else [f"{layer}.weight"] * (f"{layer}.weight" in ed.inits) + [
        i for i in ed.inits if i not in taken]
    for init_name in by_name:
        a = ed.array(init_name)
        if a.shape == weight.shape and np.array_equal(a, weight):
            return init_name, False
        if a.ndim == 2 and a.shape == weight.shape[::-1] and np.array_equal(a.T, weight):
            return init_name, True
        if a.shape == in_graph.shape and np.array_equal(a, in_graph):
            return init_name, "graph"
    raise QcoreError(f"the ONNX export found no weight for layer {layer!r}; the exporter renamed or folded it")

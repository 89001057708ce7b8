"""ONNX proto -> ``OnnxModule`` (``convert``), plus what the loader reads from the graph before building it.

Why not a converter library: onnx2torch needs torchvision, which does not import beside this torch.
``convert`` walks the nodes in file order: a weighted node becomes a layer (``layers``), named by its
source module path (``names``); a node whose inputs are all constants is evaluated once at import
(constant folding, within ``fold.FoldBudget``), so weight transposes and shape arithmetic on constants
cost nothing at run time; every other node becomes a ``Step`` of the executable graph. An operator not
in ``OPS`` raises ``QcoreError`` naming it and its node. ``input_shapes`` refuses absurd declared inputs
(``MAX_SAMPLE_ELEMENTS``).
"""

from __future__ import annotations

import math

import torch

from qcore import limits
from qcore.errors import QcoreError
from qcore.io.onnx.fold import FoldBudget
from qcore.io.onnx.layers import bias_add, layer_for
from qcore.io.onnx.names import layer_names, module_path_from_metadata, module_path_from_node_name
from qcore.io.onnx.proto import all_tensors, attrs as node_attrs, tensor
from qcore.model.onnx_graph import LayerSource, OnnxModule, Step, quoted
from qcore.model.onnx_ops import DTYPES, OPS, SUPPORTED_OPS

MIN_OPSET = 11
SUPPORTED = tuple(sorted(SUPPORTED_OPS + ("If", "LSTM", "GRU")))  # OPS plus what only ``layers`` or ``If`` run
MAX_SAMPLE_ELEMENTS = 2**26  # one declared graph input, per sample (no batch dim): 64 Mi values, 256 MiB float32


def _where(node, index: int) -> str:
    return f"node {node.name!r}" if node.name else f"node #{index}"


def convert(model, max_bytes: int | None = None) -> OnnxModule:
    """An ``OnnxModule`` computing what the ``onnx.ModelProto`` ``model`` computes (float32).

    ``max_bytes``: the upload limit the folding budget derives from (default ``limits.MAX_UPLOAD_BYTES``).
    ``model`` must hold all its data: a tensor referring to an external file is refused here (files
    load theirs with ``qcore.io.onnx.file.load_onnx_file``, which checks where they are)."""
    from onnx import TensorProto

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise QcoreError(f"the ONNX model uses opset {opset}; the importer needs opset {MIN_OPSET} or newer: "
                         "re-export with torch.onnx.export(..., opset_version=17)")
    for t, where in all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise QcoreError(f"the ONNX model's {where} keeps its data in an external file; save it as one "
                             "self-contained .onnx file (torch.onnx.export(..., external_data=False))")
    if graph.sparse_initializer:
        raise QcoreError(f"the ONNX model stores {quoted(graph.sparse_initializer[0].values.name)} as a sparse "
                         "initializer, which the importer does not read; save its weights dense")
    budget = FoldBudget.for_upload(limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes)
    consts: dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        t = tensor(init, f"initializer {quoted(init.name)}")
        if t.dtype in (torch.float16, torch.bfloat16, torch.float64):
            raise QcoreError(f"the ONNX model stores weight {init.name!r} as {t.dtype}; export it in float32 "
                             "(the engine simulates lower precisions itself)")
        consts[init.name] = t
    inputs = [i.name for i in graph.input if i.name not in consts]
    layers, candidates, sources = [], [], []
    readers: dict[str, list] = {}
    for node in graph.node:
        for n in node.input:
            readers.setdefault(n, []).append(node)
    outputs = {o.name for o in graph.output}
    absorbed: set[int] = set()  # the Adds of MatMul + bias, which run inside their Linear

    def walk(nodes, main: bool) -> list[Step]:
        """The steps of ``nodes`` (the main graph's, or a branch's: ``main`` False), folding constants into
        ``consts`` and adding layers; a branch's layers have no ``LayerSource`` (an export keeps them as they are)."""
        steps = []
        for index, node in enumerate(nodes):
            where = _where(node, index)
            if id(node) in absorbed:
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED:
                domain = f" from domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
                raise QcoreError(f"ONNX operator {node.op_type!r}{domain} ({where}) is not supported by the importer; "
                                 "export the model as a torch.export program (.pt2) instead, or with a different "
                                 f"opset or options that avoid it. Supported: {', '.join(SUPPORTED)}")
            attrs = {**node_attrs(node), "_opset": opset, "_n_out": len(node.output)}
            names = list(node.input)
            if node.op_type == "If":
                steps += _if(node, names, attrs, where)
                continue
            layer = layer_for(node, names, consts, attrs)
            if layer is not None:
                path = (layer.weight[:-len(".weight")] if layer.weight.endswith(".weight") else
                        module_path_from_metadata(node) or module_path_from_node_name(node.name))
                candidates.append((path, node.name or f"{node.op_type}_{index}"))
                layers.append(layer.module)
                weight_input, data_input = (0, 1) if node.op_type == "Gather" else (1, 0)
                transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0))
                sources.append(LayerSource(index, node.name, weight_input, data_input, transposed)
                               if main and hasattr(layer.module, "weight") else None)
                out = list(node.output)
                add = bias_add(node, layer.module, readers, outputs, consts)
                if add is not None:  # MatMul + Add(bias): the bias is the Linear's (and counts with it)
                    absorbed.add(id(add))
                    out = list(add.output)
                steps.append(Step(node.op_type, node.name, layer.inputs, out, layer=str(len(layers) - 1),
                                  pre_pad=layer.pre_pad, post_pad=layer.post_pad))
                continue
            if node.op_type not in OPS:
                raise QcoreError(f"{node.op_type} ({where}) has weights computed at run time; the importer "
                                 f"supports {node.op_type} with constant weights")
            if all(not n or n in consts for n in names):
                xs = [consts[n] if n else None for n in names]
                try:  # constant folding: the node's value is the same for every input
                    budget.charge(node.op_type, xs, attrs, where)
                    out = OPS[node.op_type](xs, attrs)
                except QcoreError:
                    raise
                except Exception as e:
                    raise QcoreError(f"ONNX operator {node.op_type!r} ({where}) failed on its constant inputs "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the file may be corrupted") from None
                consts.update((n, v) for n, v in zip(node.output, out if isinstance(out, tuple) else (out,)) if n)
                continue
            steps.append(Step(node.op_type, node.name, names, list(node.output), attrs))
        return steps

    def branch(g) -> tuple[list[Step], list[str]]:
        for init in g.initializer:
            consts[init.name] = tensor(init, f"initializer {quoted(init.name)}")
        return walk(g.node, main=False), [o.name for o in g.output]

    def _if(node, names, attrs, where) -> list[Step]:
        """A constant condition inlines the taken branch (its outputs copied to the If's); otherwise both
        branches become step lists of one ``If`` step."""
        graphs = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
        if names[0] in consts:
            taken = graphs["then_branch" if bool(consts[names[0]].reshape(-1)[0]) else "else_branch"]
            steps, results = branch(taken)
            for out, result in zip(node.output, results):
                if result in consts:
                    consts[out] = consts[result]
                else:
                    steps.append(Step("Identity", node.name, [result], [out], attrs))
            return steps
        taken, other = branch(graphs["then_branch"]), branch(graphs["else_branch"])
        return [Step("If", node.name, names[:1], list(node.output), attrs, branches=(taken, other))]

    steps = walk(graph.node, main=True)
    names = layer_names(candidates)
    every = list(_all_steps(steps))
    for s in every:
        if s.layer is not None:
            s.layer = names[int(s.layer)]
    used = {n for s in every for n in s.inputs} | {o.name for o in graph.output}
    used |= {n for s in every if s.branches for _, outs in s.branches for n in outs}
    kept = {n: t for n, t in consts.items() if n in used}
    # The source model's other weights: float initializers (not folded values, not scalars the exporter
    # lifted) read at run time, except BatchNormalization's running statistics (buffers in torch too).
    statistics = {n for s in every if s.op == "BatchNormalization" for n in s.inputs[3:5]}
    initializers = {i.name for i in graph.initializer}
    weights = frozenset(n for n, t in kept.items() if n in initializers and n not in statistics
                        and torch.is_floating_point(t) and t.dim() >= 1)
    return OnnxModule(inputs, [o.name for o in graph.output], steps, dict(zip(names, layers)), kept, weights,
                      model.SerializeToString(), {n: s for n, s in zip(names, sources) if s is not None}).eval()


def _all_steps(steps):
    """Every step, the ones inside If branches included (depth first)."""
    for s in steps:
        yield s
        for branch, _ in s.branches or ():
            yield from _all_steps(branch)


def input_shapes(model) -> list[tuple[str, tuple[int | None, ...], torch.dtype]]:
    """(name, shape, dtype) of each graph input that is not a weight; unknown/symbolic dims are None.
    QcoreError if one declares more than ``MAX_SAMPLE_ELEMENTS`` values per sample (batch dim excluded)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if tt.elem_type not in DTYPES:
            raise QcoreError(f"ONNX input {i.name!r} has element type {tt.elem_type}, which the importer cannot feed")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        per_sample = math.prod(d or 1 for d in dims[1:])
        if per_sample > MAX_SAMPLE_ELEMENTS:
            raise QcoreError(f"ONNX input {quoted(i.name)} declares {per_sample:,} values per sample "
                             f"(shape {str(dims)[:100]}), above the limit of {MAX_SAMPLE_ELEMENTS:,}; "
                             "export the model with the input shape it really takes")
        out.append((i.name, dims, DTYPES[tt.elem_type]))
    return out


def embedding_sizes(model) -> dict[str, int]:
    """Graph input -> rows of the constant table it indexes with Gather (token ids: the vocabulary size)."""
    sizes = {i.name: i.dims[0] for i in model.graph.initializer if len(i.dims) == 2}
    return {n.input[1]: sizes[n.input[0]] for n in model.graph.node
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in sizes}

"""Inlining an ``If`` whose condition is a constant into the graph itself, before it is converted.

A model that branches on a scalar input -- silero-vad's ``If(sr == 16000)`` picks the 16 kHz or the 8 kHz
network -- has a constant condition once that input is bound to its value (``file._bind_scalars``). The
converter would fold it as well; inlining it in the ``ModelProto`` means the graph an export edits
(``OnnxModule.source``) holds the taken branch's layers in its main graph, where every layer has its
place (``LayerSource``) and gets its quantized weight (the branch's ``Constant`` nodes become initializers,
as the main graph holds weights). The other branch is dropped.

The condition is evaluated with ``onnx.reference`` on its constant cone only (sizes the graph declares count as
constants: an LSTM state declared (2, batch, 128) has 2 layers): at most ``MAX_CONE_NODES`` nodes
over initializers of at most ``MAX_CONE_ELEMENTS`` values each (an untrusted file cannot make this costly);
a condition outside those bounds, one that reads an input, or a branch whose names clash with the main
graph's leaves the ``If`` to the converter.
"""

from __future__ import annotations

MAX_CONE_NODES, MAX_CONE_ELEMENTS = 32, 4096
WEIGHT_CONE_NODES, WEIGHT_CONE_ELEMENTS = 128, 2**24  # a weight computed from constants: ~64 MiB of float32 at most
WEIGHT_INPUTS = {"LSTM": (1, 2, 3), "GRU": (1, 2, 3), "Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (1,)}


def _static_dims(proto) -> dict[str, tuple[int | None, ...]]:
    """Each value's declared dims (graph inputs, and what ONNX shape inference finds), None where symbolic."""
    import onnx

    try:
        values = list(onnx.shape_inference.infer_shapes(proto).graph.value_info)
    except Exception:  # noqa: BLE001 -- shapes it cannot infer: only the graph inputs' are used
        values = []
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
            for v in [*proto.graph.input, *values] if v.type.tensor_type.HasField("shape")}


def _constant_value(graph, name: str, producers: dict, inits: dict, dims: dict, max_nodes: int = MAX_CONE_NODES,
                    max_elements: int = MAX_CONE_ELEMENTS):
    """The value of ``name`` if it depends on initializers and declared sizes only (within the bounds above;
    ``Gather(Shape(x), i)`` of a size ``dims`` knows, say silero-vad's ``state.shape[0] == 2``), else None."""
    import math

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper, reference

    cone, todo, leaves = [], [name], {}
    while todo:
        n = todo.pop()
        if n in inits:
            max_elements -= math.prod(inits[n].dims)
            if max_elements < 0:
                return None
            leaves[n] = inits[n]
            continue
        node = producers.get(n)
        if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                               for a in node.attribute) or len(cone) >= max_nodes:
            return None  # a graph input, or a node with subgraphs, or too much work
        shape = producers.get(node.input[0]) if node.op_type == "Gather" else None
        if shape is not None and shape.op_type == "Shape" and not shape.attribute and n not in leaves:
            index = _constant_value(graph, node.input[1], producers, inits, dims)
            known = dims.get(shape.input[0])
            if index is None or known is None:
                return None
            picked = np.asarray(known, dtype=object)[np.asarray(index, np.int64)]
            if any(d is None for d in np.asarray(picked).reshape(-1)):
                return None  # a symbolic size (the batch): not a constant
            leaves[n] = numpy_helper.from_array(np.asarray(picked, np.int64), n)
            continue
        if node not in cone:
            cone.append(node)
            todo += [i for i in node.input if i]
    if name in leaves and not cone:
        return numpy_helper.to_array(leaves[name])
    order = [node for node in graph.node if node in cone]  # the graph's (topological) order
    out = helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
    model = helper.make_model(helper.make_graph(order, "cone", [], [out], list(leaves.values())),
                              opset_imports=[helper.make_opsetid("", 17)])
    try:
        return reference.ReferenceEvaluator(model).run(None, {})[0]
    except Exception:  # noqa: BLE001 -- an op the reference cannot run: the converter decides
        return None


def inline_constant_ifs(proto) -> list[str]:
    """Replace every main-graph ``If`` with a constant condition by the nodes of the branch it takes (their
    initializers joining the main graph's, an Identity per output), until none is left. Returns notes."""
    import numpy as np
    from onnx import helper

    graph, notes = proto.graph, []
    dims = _static_dims(proto)
    while True:
        inits = {i.name: i for i in graph.initializer}
        producers = {o: node for node in graph.node for o in node.output}
        for index, node in enumerate(graph.node):
            if node.op_type != "If":
                continue
            value = _constant_value(graph, node.input[0], producers, inits, dims)
            if value is None:
                continue
            taken = "then_branch" if bool(np.asarray(value).reshape(-1)[0]) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == taken)
            defined = set(inits) | set(producers) | {i.name for i in graph.input}
            if {o for n in branch.node for o in n.output} & defined or {i.name for i in branch.initializer} & defined:
                continue
            constants = [n for n in branch.node
                         if n.op_type == "Constant" and [a.name for a in n.attribute] == ["value"]]
            for c in constants:  # a branch's weights are Constant nodes; in the main graph they are initializers
                graph.initializer.append(c.attribute[0].t)
                graph.initializer[-1].name = c.output[0]
            inlined = [n for n in branch.node if n not in constants] + [
                helper.make_node("Identity", [r.name], [o], name=f"{node.name}_{k}")
                for k, (r, o) in enumerate(zip(branch.output, node.output))]
            nodes = list(graph.node)
            del graph.node[:]
            graph.node.extend(nodes[:index] + inlined + nodes[index + 1:])
            graph.initializer.extend(branch.initializer)
            notes.append(f"the If {node.name!r} has a constant condition (scalar inputs, declared sizes): its "
                         f"{taken.split('_')[0]} branch is the model, the other is dropped")
            break
        else:
            return notes


def fold_weight_inputs(proto) -> None:
    """Make each weight a layer reads (``WEIGHT_INPUTS``: an LSTM's W, R, B; a Conv's or Gemm's weight) an
    initializer when the graph computes it from constants -- silero-vad reorders its LSTM gates with Slice
    and Concat -- so the graph an export edits holds the weight it quantizes (within ``WEIGHT_CONE_*``)."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: node for node in graph.node for o in node.output}
    for node in graph.node:
        for k in WEIGHT_INPUTS.get(node.op_type, ()):
            if k >= len(node.input) or not node.input[k] or node.input[k] in inits:
                continue
            value = _constant_value(graph, node.input[k], producers, inits, {}, WEIGHT_CONE_NODES, WEIGHT_CONE_ELEMENTS)
            if value is not None:
                name = node.input[k]
                inits[name] = numpy_helper.from_array(value, name)
                graph.initializer.append(inits[name])
                del_producer = producers.pop(name)
                del_producer.output[list(del_producer.output).index(name)] = ""  # the node no longer writes it

"""Reading an untrusted ``onnx.ModelProto``: every tensor it holds, tensors and node attributes as torch values.

Nothing here follows an external-data reference (``qcore.io.onnx.file`` checks and inlines those first).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from qcore.errors import QcoreError
from qcore.model.onnx_graph import quoted

NARROW_INTS = {"int4": np.int8, "uint4": np.uint8, "int2": np.int8, "uint2": np.uint8}


def all_tensors(model) -> Iterator[tuple[object, str]]:
    """Every ``TensorProto`` in an ``onnx.ModelProto`` with where it sits ("initializer 'fc.weight'",
    "attribute 'value' of node 'c1'"): the main graph, training graphs, local functions and every
    subgraph of every node (If/Loop/Scan bodies), however deeply nested (walked with a stack)."""
    graphs = [model.graph, *(g for t in model.training_info for g in (t.initialization, t.algorithm))]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            for t in graph.initializer:
                yield t, f"initializer {quoted(t.name)}"
            for sparse in graph.sparse_initializer:
                yield sparse.values, f"sparse initializer {quoted(sparse.values.name)}"
                yield sparse.indices, f"sparse initializer {quoted(sparse.values.name)}"
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for a in node.attribute:
            where = f"attribute {quoted(a.name)} of node {quoted(node.name or node.op_type)}"
            sparse = [*([a.sparse_tensor] if a.HasField("sparse_tensor") else []), *a.sparse_tensors]
            for t in [*([a.t] if a.HasField("t") else []), *a.tensors, *(x for sp in sparse for x in (sp.values, sp.indices))]:
                yield t, where
            graphs.extend([*([a.g] if a.HasField("g") else []), *a.graphs])


def tensor(proto, where: str) -> torch.Tensor:
    """A ``TensorProto`` held in the file -> torch tensor (never read from another file)."""
    from onnx import numpy_helper

    try:
        a = np.array(numpy_helper.to_array(proto))
    except Exception as e:  # noqa: BLE001 -- whatever fails to parse in an untrusted tensor is the file's fault
        raise QcoreError(f"the ONNX model's {where} is not a valid tensor ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file may be corrupted") from None
    if a.dtype.name in NARROW_INTS:  # 4-bit / 2-bit codes (ml_dtypes): the same integers in 8 bits
        a = a.astype(NARROW_INTS[a.dtype.name])
    try:
        return torch.from_numpy(a)
    except TypeError:
        raise QcoreError(f"the ONNX model's {where} holds {a.dtype.name} values, which the importer does not read; "
                         "store it in float32 (the engine simulates lower precisions itself)") from None


def attrs(node) -> dict:
    """The node's attributes as Python/torch values (subgraphs left out)."""
    from onnx import AttributeProto, helper

    out = {}
    for a in node.attribute:
        if a.type == AttributeProto.TENSOR:
            out[a.name] = tensor(a.t, f"attribute {quoted(a.name)} of node {quoted(node.name or node.op_type)}")
        elif a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            continue  # If's branches: read by the importer from the node itself
        else:
            value = helper.get_attribute_value(a)
            out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


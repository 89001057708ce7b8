"""Quantized ONNX files in: the stored integer weights decoded to float once, at load, before ``convert``.

A quantized export (``python -m qcore export``, ONNX Runtime's quantizer, ...) stores a weight as integer codes
plus scales (and zero-points) and decodes it in the graph. The engine's layers hold float weights, so this pass
decodes each into a float32 initializer -- the layer becomes an ordinary Linear / Conv / Embedding whose weight
lies exactly on the file's grid -- and rewrites the nodes around it (main graph):

- ``DequantizeLinear`` of constant codes (per tensor, per axis, blocked)     -> the decoded initializer;
- ``MatMulNBits`` (com.microsoft; 2/4/8-bit codes packed low bits first along K, one scale per block, zero-points
  packed the same way, default ``2**(bits-1)``)  -> ``MatMul`` by the decoded W^T (+ ``Add`` of its bias); with
  ``accuracy_level`` 4 ONNX Runtime quantizes A to int8 per block first (``qcore.model.int8_compute``), written
  here as standard ops in front of the MatMul;
- ``GatherBlockQuantized`` (com.microsoft; 4-bit codes in blocks along ``quantize_axis``; uint8 data is packed two
  per byte with a default zero-point of 8, int4 data has 0)  -> ``Gather`` of the decoded table;
- a lookup on codes: ``Gather`` of an integer table followed by elementwise decoding (Cast, Sub, Mul, Add,
  DequantizeLinear on the last axis) whose other inputs are constants or rows gathered with the same ids  ->
  ``Gather`` of the table that chain computes on every row (a lookup commutes with an elementwise decode).

Activation quantization -- QuantizeLinear -> DequantizeLinear of a run-time value, with fixed scales or scales the
graph computes; DynamicQuantizeLinear -- stays in the graph and runs as ONNX defines it
(``qcore.model.onnx_quant_ops``), so the imported model computes what the file computes. Decoded values count
against the folding budget (``fold.FOLDED_TOTAL_UPLOADS`` x the upload limit, in float32 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from qcore.errors import QcoreError
from qcore.io.onnx.fold import FOLDED_TOTAL_UPLOADS
from qcore.io.onnx.proto import attrs as node_attrs, tensor
from qcore.limits import human_size
from qcore.model.onnx_graph import fresh_name, quoted
from qcore.model.onnx_ops import OPS
from qcore.model.onnx_quant_ops import dequantize_linear
from qcore.numerics.packing import unpack_low_first

CODE_TYPES = ("int8", "uint8", "int16", "uint16", "int32", "int4", "uint4")  # DequantizeLinear codes decoded at load
DECODE_OPS = ("Cast", "Sub", "Mul", "Add", "DequantizeLinear")  # elementwise: they commute with a row lookup
MOVE_OPS = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten")  # a weight's format passes through
MAX_LISTED = 4  # layer names listed per format in a note


@dataclass
class Decoded:
    """What ``decode_quantized`` found: value name -> the stored format it was decoded from, the activation
    quantizers that stay in the graph, and the layers whose input is quantized to int8 per block at run time."""

    formats: dict[str, str] = field(default_factory=dict)
    fixed_activations: int = 0
    computed_activations: int = 0
    int8_compute: list[str] = field(default_factory=list)

    def notes(self, proto, layer_sources: dict) -> list[str]:
        """Short notes for the Model page / ``inspect``: which layers' weights the file stored as which format."""
        by_format: dict[str, list[str]] = {}
        for name, source in layer_sources.items():
            fmt = self.formats.get(proto.graph.node[source.node_index].input[source.weight_input])
            if fmt is not None:
                by_format.setdefault(fmt, []).append(name)
        notes = []
        if by_format:
            parts = [f"{', '.join(names[:MAX_LISTED])}{f' +{len(names) - MAX_LISTED} more' if len(names) > MAX_LISTED else ''}"
                     f": {fmt}" for fmt, names in by_format.items()]
            notes.append("the file is already quantized: stored codes decoded to float at load, the weights lie on the "
                         f"file's grid -- {'; '.join(parts)}")
        if self.fixed_activations or self.computed_activations:
            notes.append(f"the file quantizes activations, run as written: {self.fixed_activations} QuantizeLinear with "
                         f"fixed scales, {self.computed_activations} with scales computed at run time" + (
                             " (from the whole batch: a sample's output depends on the batch it runs in, as in the file)"
                             if self.computed_activations else ""))
        if self.int8_compute:
            notes.append(f"MatMulNBits accuracy_level 4: {len(self.int8_compute)} layers' inputs quantized to int8 per "
                         "block at run time, as ONNX Runtime does")
        return notes


class _Graph:
    """The main graph being rewritten: its initializers (by name), fresh names, the decoding budget."""

    def __init__(self, proto, limit: int):
        from onnx import numpy_helper

        self.proto, self.graph, self.numpy_helper = proto, proto.graph, numpy_helper
        self.inits = {i.name: i for i in self.graph.initializer}
        self.used = set(self.inits) | {i.name for i in self.graph.input} | {o.name for o in self.graph.output} | {
            o for n in self.graph.node for o in n.output}
        self.budget, self.limit = FOLDED_TOTAL_UPLOADS * limit, FOLDED_TOTAL_UPLOADS * limit
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    def fresh(self, base: str) -> str:
        return fresh_name(base, self.used)

    def array(self, name: str, where: str) -> np.ndarray:
        try:
            return np.array(self.numpy_helper.to_array(self.inits[name]))
        except Exception as e:  # noqa: BLE001 -- an untrusted tensor that does not parse is the file's fault
            raise QcoreError(f"the ONNX model's initializer {quoted(name)} ({where}) is not a valid tensor "
                             f"({type(e).__name__}); the file may be corrupted") from None

    def add(self, value: torch.Tensor, name: str, where: str) -> str:
        """``value`` (float32) as the initializer ``name``, charged to the budget."""
        self.budget -= value.numel() * 4
        if self.budget < 0:
            raise QcoreError(f"decoding the stored weights ({where}) would take more than {human_size(self.limit)} "
                             "of float32 at load; the file is malformed or built to exhaust memory")
        init = self.numpy_helper.from_array(value.to(torch.float32).numpy(), name)
        self.graph.initializer.append(init)
        self.inits[name] = init
        self.used.add(name)
        return name

    def const(self, value: np.ndarray, base: str) -> str:
        init = self.numpy_helper.from_array(np.asarray(value), self.fresh(base))
        self.graph.initializer.append(init)
        self.inits[init.name] = init
        return init.name


def _where(node, index: int) -> str:
    return f"node {quoted(node.name)}" if node.name else f"node #{index}"


def _codes(a: np.ndarray, what: str, where: str) -> torch.Tensor:
    if a.dtype.name not in CODE_TYPES:
        raise QcoreError(f"{what} ({where}) stores {a.dtype.name} codes; the importer decodes integer codes "
                         f"({', '.join(CODE_TYPES)}) only")
    return torch.from_numpy(a.astype(np.int32))


def _scale(a: np.ndarray, what: str, where: str) -> torch.Tensor:
    if a.dtype != np.float32:
        raise QcoreError(f"{what} ({where}) has {a.dtype.name} scales; the importer reads float32 scales only")
    return torch.from_numpy(a)


def _decode(fn, what: str, where: str):
    try:
        return fn()
    except (ValueError, RuntimeError, IndexError) as e:
        raise QcoreError(f"{what} ({where}) does not decode: {str(e).splitlines()[0][:200]}; the file is malformed") from None


def _granularity(scale_shape, block: int, axis: int) -> str:
    if math.prod(scale_shape) == 1:
        return "per-tensor"
    return f"blocks of {block} along axis {axis}" if block else f"per-channel, axis {axis}"


def _dequantize(g: _Graph, node, where: str) -> str:
    """Decode a DequantizeLinear of constants into the initializer of its output; returns the stored format."""
    a = node_attrs(node)
    axis, block = a.get("axis", 1), a.get("block_size", 0)
    x = g.array(node.input[0], where)
    codes = _codes(x, "DequantizeLinear", where)
    scale = _scale(g.array(node.input[1], where), "DequantizeLinear", where)
    zp = _codes(g.array(node.input[2], where), "DequantizeLinear", where) if len(node.input) > 2 and node.input[2] else None
    value = _decode(lambda: dequantize_linear(codes, scale, zp, axis, block), "DequantizeLinear", where)
    g.add(value, node.output[0], where)
    return f"{x.dtype.name} codes, {_granularity(scale.shape, block, axis)}"


def _int8_compute(g: _Graph, a: str, K: int, block: int, where: str) -> tuple[list, str]:
    """Standard ops quantizing A (..., K) to int8 per block of ``block`` along K, then back to float:
    ``scale = max|a| / 127``, ``q = clip(round(a * (1 / scale)), -127, 127)`` (0 where the scale is 0)."""
    from onnx import helper

    nodes = []

    def op(kind, inputs, **kw):
        nodes.append(helper.make_node(kind, inputs, [g.fresh(f"{a}/int8_compute")], name=g.fresh(f"{where}/{kind}"), **kw))
        return nodes[-1].output[0]

    f = lambda v: g.const(np.array(v, np.float32), "c")  # noqa: E731
    blocks = op("Reshape", [a, g.const(np.array([-1, K // block, block], np.int64), "shape")])
    axes = {"axes": [-1]} if g.opset < 18 else {}
    amax = op("ReduceMax", [op("Abs", [blocks])] + ([] if axes else [g.const(np.array([-1], np.int64), "axes")]),
              keepdims=1, **axes)
    scale = op("Div", [amax, f(127)])
    inverse = op("Where", [op("Greater", [scale, f(0)]), op("Reciprocal", [scale]), f(0)])
    q = op("Clip", [op("Round", [op("Mul", [blocks, inverse])]), f(-127), f(127)])
    return nodes, op("Reshape", [op("Mul", [q, scale]), op("Shape", [a])])


def _matmul_nbits(g: _Graph, node, where: str, readers: dict, dec: Decoded) -> list:
    """MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?) -> [int8-compute ops], MatMul(A, W^T)[, Add(bias)]."""
    from onnx import helper

    a = node_attrs(node)
    names = list(node.input) + [""] * (6 - len(node.input))
    for k, role in ((1, "B"), (2, "scales"), (3, "zero_points")):
        if names[k] and names[k] not in g.inits:
            raise QcoreError(f"MatMulNBits ({where}) computes its {role} at run time; the importer needs them constant")
    if names[4]:
        raise QcoreError(f"MatMulNBits ({where}) has a g_idx input (act-order); the importer does not support it")
    try:
        K, N, bits, block = a["K"], a["N"], a.get("bits", 4), a["block_size"]
    except KeyError as e:
        raise QcoreError(f"MatMulNBits ({where}) lacks its {e.args[0]!r} attribute; the file is malformed") from None
    if bits not in (2, 4, 8) or block < 1 or K < 1 or N < 1:
        raise QcoreError(f"MatMulNBits ({where}) has bits={bits}, block_size={block}; the importer decodes 2, 4 "
                         "or 8 bits in blocks of >= 1")
    kb = -(-K // block)
    packed = g.array(names[1], where)
    scales = _scale(g.array(names[2], where), "MatMulNBits", where)
    if packed.dtype != np.uint8 or packed.size != N * kb * block * bits // 8 or scales.numel() != N * kb:
        raise QcoreError(f"MatMulNBits ({where}): B {packed.dtype.name} {packed.shape} or scales {tuple(scales.shape)} "
                         f"do not fit K={K}, N={N}, bits={bits}, block_size={block}; the file is malformed")
    codes = torch.from_numpy(unpack_low_first(packed.reshape(N, -1), bits, K).astype(np.int32))
    if names[3]:
        zp = g.array(names[3], where)
        if zp.dtype != np.uint8 or zp.size != N * -(-kb * bits // 8):
            raise QcoreError(f"MatMulNBits ({where}) has zero_points {zp.dtype.name} {zp.shape}; the importer reads "
                             "uint8 zero-points packed per row only")
        zp = torch.from_numpy(unpack_low_first(zp.reshape(N, -1), bits, kb).astype(np.int32))
    else:
        zp = torch.full((N, kb), 2 ** (bits - 1), dtype=torch.int32)
    w = _decode(lambda: dequantize_linear(codes, scales.reshape(N, kb), zp, 1, block), "MatMulNBits", where)
    out = node.output[0]
    bias = names[5] or next((r.input[1 - list(r.input).index(out)] for r in readers.get(out, [])
                             if r.op_type == "Add" and len(readers[out]) == 1 and out in r.input[:2]), "")
    stem = bias[:-len(".bias")] if bias.endswith(".bias") else out
    weight = g.add(w.T.contiguous(), g.fresh(f"{stem}.weight"), where)
    dec.formats[weight] = f"{bits}-bit codes, blocks of {block} along K, MatMulNBits"
    nodes, x = [], names[0]
    if a.get("accuracy_level", 0) == 4 and K % block == 0:
        nodes, x = _int8_compute(g, x, K, block, node.name or out)
        dec.int8_compute.append(node.name or out)
    if names[5]:
        product = g.fresh(f"{out}/matmul")
        return nodes + [helper.make_node("MatMul", [x, weight], [product], name=node.name),
                        helper.make_node("Add", [product, names[5]], [out], name=g.fresh(f"{node.name}/bias"))]
    return nodes + [helper.make_node("MatMul", [x, weight], [out], name=node.name)]


def _gather_block_quantized(g: _Graph, node, where: str, dec: Decoded):
    """GatherBlockQuantized(data, indices, scales, zero_points?) -> Gather(decoded table, indices)."""
    from onnx import helper

    a = node_attrs(node)
    names = list(node.input) + [""] * (4 - len(node.input))
    if not all(n in g.inits for n in (names[0], names[2], *([names[3]] if names[3] else []))):
        raise QcoreError(f"GatherBlockQuantized ({where}) computes its table at run time; the importer needs it constant")
    bits, block = a.get("bits", 4), a.get("block_size", 128)
    data = g.array(names[0], where)
    scales = _scale(g.array(names[2], where), "GatherBlockQuantized", where)
    zp = g.array(names[3], where) if names[3] else None
    if data.dtype == np.uint8 and bits in (4, 8):  # MatMulNBits' convention: packed along the last axis, zero-point 2**(bits-1)
        data = unpack_low_first(data, bits, data.shape[-1] * 8 // bits)
        zp = (np.full(scales.shape, 2 ** (bits - 1), np.int32) if zp is None
              else unpack_low_first(zp, bits, scales.shape[-1]).reshape(scales.shape))
    elif data.dtype.name not in ("int4", "uint4") or bits != 4:
        raise QcoreError(f"GatherBlockQuantized ({where}) has {data.dtype.name} data with bits={bits}; the importer "
                         "reads int4/uint4 data, or uint8 packed 4- or 8-bit data")
    axis = a.get("quantize_axis", 1)
    codes = torch.from_numpy(data.astype(np.int32))
    z = None if zp is None else torch.from_numpy(np.asarray(zp).astype(np.int32))
    table = _decode(lambda: dequantize_linear(codes, scales, z, axis, block), "GatherBlockQuantized", where)
    name = g.add(table, g.fresh(f"{node.output[0]}.weight"), where)
    dec.formats[name] = f"{bits}-bit codes, blocks of {block}, GatherBlockQuantized"
    return helper.make_node("Gather", [name, names[1]], list(node.output), name=node.name, axis=a.get("gather_axis", 0))


def _lookup_cone(g: _Graph, gather, readers: dict, producers: dict, outputs: set) -> tuple[list, str] | None:
    """The nodes decoding the rows ``gather`` looks up in an integer table (see the module docstring) and the
    float value they end in, or None."""
    ids, cone, value = gather.input[1], [gather], gather.output[0]

    def same_lookup(name):
        p = producers.get(name)
        return (p is not None and p.op_type == "Gather" and list(p.input[1:]) == [ids] and p.input[0] in g.inits
                and node_attrs(p).get("axis", 0) == 0 and len(readers.get(name, [])) == 1)

    while value not in outputs and len(readers.get(value, [])) == 1:
        r = readers[value][0]
        if r.domain not in ("", "ai.onnx") or r.op_type not in DECODE_OPS or len(r.output) != 1:
            break
        others = [i for i in r.input if i and i != value]
        if r.op_type == "DequantizeLinear" and node_attrs(r).get("axis", 1) != -1 and any(
                g.inits[i].dims and math.prod(g.inits[i].dims) > 1 if i in g.inits else True for i in others):
            break  # a per-axis scale on another axis than the last: not a row-wise decode
        if not all((i in g.inits and len(g.inits[i].dims) <= 1) or same_lookup(i) for i in others):
            break
        cone += [producers[i] for i in others if i not in g.inits] + [r]
        value = r.output[0]
    return (cone, value) if len(cone) > 1 else None


def _lookups_on_codes(g: _Graph, dec: Decoded) -> None:
    """Replace each lookup on codes by a Gather of the decoded table (evaluated with every row id)."""
    from onnx import TensorProto, helper

    integer = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT4, TensorProto.UINT4}
    outputs = {o.name for o in g.graph.output}
    readers: dict[str, list] = {}
    for n in g.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    producers = {o: n for n in g.graph.node for o in n.output}
    replaced: dict[int, object] = {}  # id(first node of a cone) -> its Gather; other cone nodes -> None
    for index, node in enumerate(g.graph.node):
        if (node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or id(node) in replaced
                or node.input[0] not in g.inits or node.input[1] in g.inits or node_attrs(node).get("axis", 0) != 0
                or g.inits[node.input[0]].data_type not in integer or len(g.inits[node.input[0]].dims) != 2):
            continue
        found = _lookup_cone(g, node, readers, producers, outputs)
        if found is None:
            continue
        cone, value = found
        where, rows = _where(node, index), g.inits[node.input[0]].dims[0]
        env = {node.input[1]: torch.arange(rows)}
        for n in (m for m in g.graph.node if any(m is c for c in cone)):
            xs = [env[i] if i in env else tensor(g.inits[i], f"initializer {quoted(i)}") if i else None for i in n.input]
            env[n.output[0]] = _decode(lambda: OPS[n.op_type](xs, {**node_attrs(n), "_opset": g.opset, "_n_out": 1}),
                                       f"the lookup on codes at {n.op_type}", where)
        table = env[value]
        if not torch.is_floating_point(table) or table.dtype != torch.float32 or table.dim() < 2:
            continue
        name = g.add(table, g.fresh(f"{value}.weight"), where)
        codes = np.dtype(helper.tensor_dtype_to_np_dtype(g.inits[node.input[0]].data_type)).name
        dec.formats[name] = f"{codes} codes, rows decoded per lookup in the file"
        replaced.update({id(c): None for c in cone})
        replaced[id(node)] = helper.make_node("Gather", [name, node.input[1]], [value], name=node.name, axis=0)
    if replaced:
        nodes = [replaced.get(id(n), n) for n in g.graph.node]
        del g.graph.node[:]
        g.graph.node.extend(n for n in nodes if n is not None)


def _read_names(graph) -> set[str]:
    """Every value name a node reads, in the graph and in its subgraphs (which may read the outer scope)."""
    names, todo = set(), [graph]
    while todo:
        gr = todo.pop()
        for n in gr.node:
            names.update(n.input)
            todo += [a.g for a in n.attribute if a.HasField("g")] + [s for a in n.attribute for s in a.graphs]
        names.update(o.name for o in gr.output)
    return names


def decode_quantized(proto, limit: int) -> Decoded:
    """Rewrite ``proto``'s main graph in place as the module docstring says; ``limit`` is the upload limit in bytes.
    Initializers only the replaced nodes read are dropped. Returns what was decoded (for the notes)."""
    g, dec = _Graph(proto, limit), Decoded()
    readers: dict[str, list] = {}
    for n in g.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    nodes, before = [], set(g.inits)
    for index, node in enumerate(list(g.graph.node)):
        where, default = _where(node, index), node.domain in ("", "ai.onnx")
        if default and node.op_type == "DequantizeLinear" and all(not n or n in g.inits for n in node.input):
            dec.formats[node.output[0]] = _dequantize(g, node, where)
            continue
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            nodes += _matmul_nbits(g, node, where, readers, dec)
            continue
        if node.domain == "com.microsoft" and node.op_type == "GatherBlockQuantized":
            nodes.append(_gather_block_quantized(g, node, where, dec))
            continue
        if default and node.op_type == "QuantizeLinear":
            zp = node.input[2] if len(node.input) > 2 else ""
            narrow = zp in g.inits and g.inits[zp].data_type not in (2, 3, 5)  # uint8, int8, int16
            if narrow or node_attrs(node).get("output_dtype", 0) not in (0, 2, 3, 5):
                raise QcoreError(f"QuantizeLinear ({where}) quantizes to a type other than uint8/int8/int16; the "
                                 "importer runs those three only")
            fixed = all(n in g.inits for n in node.input[1:] if n)
            dec.fixed_activations += fixed
            dec.computed_activations += not fixed
        if default and node.op_type == "DynamicQuantizeLinear":
            dec.computed_activations += 1
        nodes.append(node)
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    _lookups_on_codes(g, dec)
    read = _read_names(g.graph)
    dropped = {n for n in before if n not in read and n in g.inits} if dec.formats else set()
    for values in (g.graph.initializer, g.graph.input):
        keep = [v for v in values if v.name not in dropped]
        del values[:]
        values.extend(keep)
    for node in g.graph.node:  # a decoded weight keeps its format through reshapes and transposes
        if node.op_type in MOVE_OPS and node.input and node.input[0] in dec.formats:
            dec.formats[node.output[0]] = dec.formats[node.input[0]]
    return dec

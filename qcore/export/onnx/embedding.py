"""An embedding table with integer weights, looked up on its codes: only the rows a batch reads are decoded.

The simulation's Embedding computes ``dq(W)[ids]`` with ``dq(W) = (q - z) * s`` (one scale per tensor,
per row, per column, or per group of ``g`` along a row). A lookup commutes with the decode, so the file
computes the same value as ``decode(q[ids], s[ids], z[ids])``:

- int2..int4 codes in groups of a power of two >= 16 along each row (or one scale per row of such a
  width): ONNX Runtime's ``GatherBlockQuantized`` (com.microsoft; INT4 data, float32 scales, INT4
  zero-points), which gathers packed 4-bit rows and decodes them in one kernel;
- int8 / int16 codes: ``Gather`` of the codes' rows (and of the scales' and zero-points' rows), then
  ``DequantizeLinear`` (per tensor, per column, blocked along the row) or ``(q - z) * s`` (one scale
  per row, which DequantizeLinear cannot broadcast).

The table's codes stay in the file at their container width (4 bits packed, 8 or 16), so an int4 file
is close to the theoretical size, and no call dequantizes the whole table. ``gather_codes`` returns
None for layouts neither form covers (int4 codes with another layout, float formats, codebooks): those
tables are decoded whole before the ``Gather``, as before.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from qcore.export.onnx.weights import ELEMENT_TYPES, decoder
from qcore.numerics.quantize import QuantizedTensor


def _block(q: QuantizedTensor, width: int) -> int | None:
    """GatherBlockQuantized's block size along a row of ``width`` for ``q``'s layout, or None."""
    s = q.spec
    size = s.group_size if s.granularity == "per_group" else width if (s.granularity == "per_channel"
                                                                        and s.axis % 2 == 0) else None
    ok = size is not None and size >= 16 and size & (size - 1) == 0 and width % size == 0
    return size if ok else None


def gather_codes(ed, q: QuantizedTensor, node) -> tuple[object, str, str] | None:
    """Replace the ``Gather(table, ids)`` ``node`` (table (V, D) at input 0, gathered along axis 0) by a
    lookup on ``q``'s codes. Returns (the new node, what is stored, the codes' initializer), or None
    when this layout has no code-level lookup here (see the module docstring)."""
    fmt, s = q.spec.fmt, q.spec
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if decoder(fmt) != "DequantizeLinear" or attrs.get("axis", 0) != 0 or q.codes.dim() != 2:
        return None
    V, D = q.shape
    ids, out = node.input[1], node.output[0]
    rows = -1 if s.granularity == "per_group" else 1  # scales per row: D / g, or 1
    scale = q.scale.numpy().astype(np.float32)
    zp = None if q.zero_point is None else q.zero_point.numpy().astype(np.int64)
    if fmt.onnx_type == "INT4":
        block = _block(q, D)
        if block is None:
            return None
        dtype = ELEMENT_TYPES["INT4"][0]
        codes = ed.const(q.codes.numpy().astype(np.int64).astype(dtype), "codes")
        inputs = [codes, ids, ed.const(scale.reshape(V, D // block), "scale")]
        if zp is not None:
            inputs.append(ed.const(zp.reshape(V, D // block).astype(dtype), "zero_point"))
        new = helper.make_node("GatherBlockQuantized", inputs, [out], name=ed.fresh(f"{node.name}/quantized"),
                               domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=4)
        return new, f"{fmt.name} codes as INT4 in GatherBlockQuantized (block_size={block})", codes
    dtype = ELEMENT_TYPES[fmt.onnx_type][0]
    n = lambda op, ins, **kw: ed.node(op, ins, "embedding", node, **kw)  # noqa: E731
    codes = ed.const(q.codes.numpy().astype(np.int64).astype(dtype), "codes")
    picked = n("Gather", [codes, ids], axis=0)  # (..., D) codes of the rows looked up
    if s.granularity == "per_tensor":
        inputs = [picked, ed.const(scale.reshape(()), "scale")]
        inputs += [] if zp is None else [ed.const(zp.reshape(()).astype(dtype), "zero_point")]
        new = helper.make_node("DequantizeLinear", inputs, [out], name=ed.fresh(f"{node.name}/dequantize"))
    elif s.granularity == "per_channel" and s.axis % 2 == 1:  # one scale per column: per-axis on the last axis
        inputs = [picked, ed.const(scale, "scale")] + ([] if zp is None else [ed.const(zp.astype(dtype), "zero_point")])
        new = helper.make_node("DequantizeLinear", inputs, [out], name=ed.fresh(f"{node.name}/dequantize"), axis=-1)
    elif s.granularity == "per_group":  # blocked along the row: the rows' scales (..., D / g)
        inputs = [picked, n("Gather", [ed.const(scale.reshape(V, rows), "scale"), ids], axis=0)]
        if zp is not None:
            inputs.append(n("Gather", [ed.const(zp.reshape(V, rows).astype(dtype), "zero_point"), ids], axis=0))
        new = helper.make_node("DequantizeLinear", inputs, [out], name=ed.fresh(f"{node.name}/dequantize"),
                               axis=-1, block_size=s.group_size)
    else:  # one scale (and zero-point) per row: (q - z) * s with the rows' (..., 1)
        values = n("Cast", [picked], to=TensorProto.FLOAT)
        if zp is not None:
            zrow = n("Gather", [ed.const(zp.reshape(V, 1).astype(dtype), "zero_point"), ids], axis=0)
            values = n("Sub", [values, n("Cast", [zrow], to=TensorProto.FLOAT)])
        srow = n("Gather", [ed.const(scale.reshape(V, 1), "scale"), ids], axis=0)
        new = helper.make_node("Mul", [values, srow], [out], name=ed.fresh(f"{node.name}/dequantize"))
    return new, f"{fmt.name} codes as {fmt.onnx_type}, rows gathered then dequantized", codes

"""Weight encoders: a layer's ``QuantizedTensor`` stored as compactly as ONNX allows and decoded by graph
ops to the simulated weight, bit for bit:

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

Which row applies is read from the format's traits (``decoder``), the element type from its
``onnx_type`` (``ELEMENT_TYPES``). Initializers are named by role (``codes``/``values``/``indices``,
``scale``, ``zero_point``), which ``stored_bytes`` counts.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import torch
from onnx import TensorProto, helper

from qcore.errors import QcoreError
from qcore.numerics.granularity import fan_in, from_blocks
from qcore.numerics.packing import pack_low_first
from qcore.numerics.quantize import QuantizedTensor

# A format's ``onnx_type`` -> (numpy / ml_dtypes dtype holding its codes in an initializer, bits per element)
ELEMENT_TYPES = {"INT4": (ml_dtypes.int4, 4), "UINT4": (ml_dtypes.uint4, 4), "INT8": (np.int8, 8),
                 "INT16": (np.int16, 16), "FLOAT16": (np.float16, 16), "BFLOAT16": (ml_dtypes.bfloat16, 16),
                 "FLOAT8E4M3FN": (ml_dtypes.float8_e4m3fn, 8), "FLOAT8E5M2": (ml_dtypes.float8_e5m2, 8)}


def decoder(fmt) -> str:
    """The op turning a format's stored codes into its values, from its traits: "DequantizeLinear" for a
    uniform integer grid whose step is the scale (x = (q - z) * s), "Gather" for indices into a codebook,
    "Cast" for values of an ONNX float type (then * s when scaled)."""
    if fmt.step_is_scale:
        return "DequantizeLinear"
    if fmt.codebook:
        return "Gather"
    if fmt.can_be_scaled:
        return "Cast"
    raise QcoreError(f"the {fmt.name} format has no ONNX form (neither an integer grid, a codebook nor a float "
                     "type); export safetensors instead")


def _full(q: QuantizedTensor, per_block: torch.Tensor | None, shape) -> np.ndarray | None:
    """A per-block value (scale or zero-point) broadcast to every element of the weight."""
    if per_block is None:
        return None
    blocks = q._blocks(torch.zeros(shape))
    return from_blocks(per_block[:, None].expand_as(blocks), tuple(shape), q.spec.granularity, q.spec.axis).numpy()


def _param_shape(q: QuantizedTensor, shape) -> tuple[int, ...]:
    """The broadcast shape of a per-block scale / zero-point against the weight in its block view
    (per_tensor: (), per_channel: 1 except ``shape[axis]``, per_group: (C_out, fan_in/g, 1))."""
    s = q.spec
    if s.granularity == "per_tensor":
        return ()
    if s.granularity == "per_channel":
        b = [1] * len(shape)
        b[s.axis] = shape[s.axis]
        return tuple(b)
    return (shape[0], fan_in(shape) // s.group_size, 1)


def _scale_view(ed, values: str, q: QuantizedTensor, shape, out: str, before=None) -> str:
    """``values * scale`` in the engine's block view (per_group: (C_out, fan_in/g, g)) -> ``out`` of ``shape``."""
    if q.scale is None:
        return ed.node("Reshape", [values, ed.const(np.array(shape, np.int64), "shape")], "w", before, output=out)
    scale = ed.const(q.scale.numpy().reshape(_param_shape(q, shape)), "scale")
    if q.spec.granularity != "per_group":
        return ed.node("Mul", [values, scale], "w", before, output=out)
    scaled = ed.node("Mul", [values, scale], "w", before)
    return ed.node("Reshape", [scaled, ed.const(np.array(shape, np.int64), "shape")], "w", before, output=out)


def _stored_shape(q: QuantizedTensor, shape) -> tuple[int, ...]:
    s = q.spec
    return (shape[0], fan_in(shape) // s.group_size, s.group_size) if s.granularity == "per_group" else tuple(shape)


def _dequantize_linear(ed, q: QuantizedTensor, shape, out: str, transposed: bool = False) -> str:
    """Integer codes + DequantizeLinear (per tensor / per axis / blocked on the (C_out, fan_in) view);
    ``transposed``: a 2-D weight stored as W^T (codes, scales and the axis transposed with it)."""
    s, dtype = q.spec, ELEMENT_TYPES[q.spec.fmt.onnx_type][0]
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


def decode_weight(ed, q: QuantizedTensor, shape, out: str, transposed: bool = False) -> tuple[str, str]:
    """Graph ops computing ``q.dequantize()`` (the simulated weight) into value ``out``; returns
    (what is stored, the initializer holding the codes)."""
    fmt = q.spec.fmt
    op, dtype = decoder(fmt), ELEMENT_TYPES[fmt.onnx_type][0]
    if op == "DequantizeLinear":
        return f"{fmt.name} codes as {fmt.onnx_type} + DequantizeLinear", _dequantize_linear(ed, q, shape, out, transposed)
    stored = q.codes.numpy().reshape(_stored_shape(q, shape))
    if op == "Cast":
        codes = ed.const(stored.astype(dtype), "values")
        values = ed.node("Cast", [codes], "w", to=TensorProto.FLOAT)
        what = f"{fmt.name} values + Cast" + (" + Mul(scale)" if q.scale is not None else "")
    else:
        codes = ed.const(stored.astype(np.uint8).astype(dtype), "indices")
        index = ed.node("Cast", [codes], "w", to=TensorProto.INT32)
        values = ed.node("Gather", [ed.const(np.array(fmt.codebook, np.float32), "codebook"), index], "w")
        what = f"{fmt.name} indices as {fmt.onnx_type} + Gather(codebook) + Mul(scale)"
    _scale_view(ed, values, q, shape, out)
    return what, codes


def decode_at_load(ed, q: QuantizedTensor, shape, out: str) -> tuple[str, str]:
    """``decode_weight`` of an integer grid as ``Cast`` / ``Sub`` / ``Mul`` instead of ``DequantizeLinear``:
    the same float32 values ((q - z) * s, each step exact or one float32 rounding, as DequantizeLinear),
    but ONNX Runtime constant-folds these ops when it loads the file, while it keeps every
    DequantizeLinear for its QDQ fusions and runs it at each call. A layer it computes in float anyway
    (a Conv with dynamic inputs, ``dynamic_conv``) so gets a constant float weight, with the float Conv's
    fusions (BatchNormalization, activation) and blocked layout, while the file keeps the int8 codes."""
    fmt = q.spec.fmt
    codes = ed.const(q.codes.numpy().reshape(_stored_shape(q, shape)).astype(ELEMENT_TYPES[fmt.onnx_type][0]),
                     "codes")
    values = ed.node("Cast", [codes], "w", to=TensorProto.FLOAT)
    if q.zero_point is not None:
        zp = ed.const(q.zero_point.numpy().reshape(_param_shape(q, shape)).astype(ELEMENT_TYPES[fmt.onnx_type][0]),
                      "zero_point")
        values = ed.node("Sub", [values, ed.node("Cast", [zp], "w", to=TensorProto.FLOAT)], "w")
    _scale_view(ed, values, q, shape, out)
    return f"{fmt.name} codes as {fmt.onnx_type} + Cast/Mul (constant-folded at load)", codes


def nbits_block(q: QuantizedTensor, K: int) -> int | None:
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


def matmul_nbits(ed, q: QuantizedTensor, a: str, bias: str | None, out: str, before, block: int,
                 int8_compute: bool = False):
    """MatMulNBits(A, packed codes, scales, zero-points, bias) computing A @ W^T (+ bias), W (N, K); with
    ``int8_compute`` accuracy_level=4: A quantized to int8 per block of ``block`` (``qcore.model.int8_compute``)."""
    bits = next(slot for slot in (2, 4, 8) if slot >= q.spec.fmt.bits)  # MatMulNBits' code widths
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
    inputs = [a, ed.const(pack_low_first(u, bits), "codes_packed"), ed.const(scales, "scales")]
    if zp is not None:
        zpb = np.concatenate([zp_full, np.zeros((N, kb * block - K))], 1).reshape(N, kb, block)[:, :, 0]
        inputs.append(ed.const(pack_low_first((zpb + offset).astype(np.int64), bits), "zero_points"))
    else:
        inputs.append("")
    inputs += ["", bias] if bias else []
    return helper.make_node("MatMulNBits", inputs, [out], name=ed.fresh(f"{out}/MatMulNBits"), domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block,
                            accuracy_level=4 if int8_compute else 0), bits



def stored_bytes(ed, names: set[str]) -> dict:
    """Bytes of the initializers holding one layer's weight, by role (from the names ``const`` gave
    them): codes (codes / values / indices), scales, zero_points, other (shapes, codebook), total."""
    roles = {"codes": 0, "scales": 0, "zero_points": 0, "other": 0}
    for name in names:
        role = ("codes" if name.startswith(("codes", "values", "indices")) else "scales" if name.startswith("scale")
                else "zero_points" if name.startswith("zero_point") else "other")
        roles[role] += len(ed.inits[name].raw_data) or ed.array(name).nbytes  # raw_data: 4-bit types packed
    return {**roles, "total": sum(roles.values())}

"""``export_qdq(workload, recipe, path)``: the ONNX file whose graph *is* the simulation.

The FP32 graph (``float_graph``) with each quantized layer's weight initializer replaced by what
the simulation applied (``Simulation.weights``: the codes and scales of nearest rounding or of GPTQ/AdaRound;
``weights``) and each quantized layer input given the simulation's
input quantizer (``activations``) -- the engine's own numbers, never a float graph re-quantized by
another tool. An imported ONNX LSTM / GRU whose matrices' inputs are quantized is first written as its
unrolled cell (``recurrent``), so each step's input and hidden state can be.

What ONNX Runtime then executes is read back from its optimized graph, not guessed: a layer is
"int8 kernel" when its weight codes feed a fused integer op (QLinearConv, QLinearMatMul, QGemm, ...),
"MatMulNBits" when it is one, "quantized Gather" when an embedding is looked up on its codes
(``embedding``), else "float (dequantized)" with the reason (``policy.why_float``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcore.errors import QcoreError
from qcore.export.graph import GraphEditor
from qcore.export.onnx import dynamic_conv
from qcore.export.onnx.activations import quantize_input
from qcore.export.onnx.embedding import gather_codes
from qcore.export.onnx.float_graph import OPSET, float_graph, source_model
from qcore.export.onnx.recurrent import unroll_recurrent
from qcore.export.onnx.weights import ELEMENT_TYPES, decode_weight, decoder, matmul_nbits, nbits_block, stored_bytes
from qcore.export.policy import uses_matmul_nbits, why_float
from qcore.model.int8_compute import int8_compute_block
from qcore.model.conv_transpose import ConvTransposeLayer
from qcore.model.simulate import input_quantizer, modules_by_name, needs_calibration
from qcore.model.input_scale import input_scales
from qcore.recipe import Recipe

# Fused integer ops of ONNX Runtime's optimized graph, and what they mean for a layer
_INT_KERNELS = {"QLinearConv": "int8 kernel", "QLinearMatMul": "int8 kernel", "QGemm": "int8 kernel",
                "MatMulIntegerToFloat": "int8 kernel", "ConvInteger": "int8 kernel", "MatMulInteger": "int8 kernel",
                "DynamicQuantizeMatMul": "int8 kernel", "MatMulNBits": "MatMulNBits",
                "GatherBlockQuantized": "quantized Gather", "Gather": "quantized Gather"}


@dataclass
class OnnxExport:
    """An exported file and what each layer became.

    path       : the .onnx file
    size_bytes : its size on disk (os.path.getsize)
    opset      : ONNX opset of the default domain
    layers     : per quantizable layer ``{layer, kind, weights, activations, executes, reason, stored_bytes}``
                 (executes: "int8 kernel" | "MatMulNBits" | "quantized Gather" | "float (dequantized)" | "float";
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


def _compute_nodes(ed, weight_value: str) -> list:
    """The Gemm / MatMul / Conv / ConvTranspose / Gather / LSTM / GRU nodes reading ``weight_value``
    (through a Transpose, Reshape or Slice if any): one for most layers, one per time step (and direction)
    for the matrices of an unrolled recurrent layer."""
    found = []
    for node in ed.consumers(weight_value):
        if node.op_type in ("Transpose", "Reshape", "Slice"):
            found += _compute_nodes(ed, node.output[0])
        elif node.op_type in ("Gemm", "MatMul", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU"):
            found.append(node)
    return found


def export_qdq(workload, recipe: Recipe, path: str) -> OnnxExport:
    """Write ``workload``'s model under ``recipe`` to ``path`` as ONNX holding exactly the simulated
    model (see the module docstring); returns what was written and what ONNX Runtime executes."""
    plans = recipe.resolve(workload.layer_shapes)
    calib = workload.calibration_of(recipe) if needs_calibration(recipe, workload.layers) else None
    graph = float_graph(workload, recipe)
    proto = graph.proto
    ed = GraphEditor(proto)
    modules = dict(source_model(workload, recipe).named_modules())
    iqs = {name: input_quantizer(name, info.kind, plans[name].activations, calib) for name, info in workload.layers.items()}
    notes = list(graph.notes) + unroll_recurrent(ed, graph.weights, source_model(workload, recipe), workload,
                                                 {name for name, iq in iqs.items() if iq is not None})
    sim = workload.simulate(recipe)
    simulated = sim.weights  # the file holds exactly the codes that were simulated
    _write_corrected_biases(ed, sim, recipe)
    rows, codes_of = [], {}
    smoothed, muls = input_scales(source_model(workload, recipe)), []  # SmoothQuant's Mul ops (no fold reached)
    for name, info in workload.layers.items():
        plan = plans[name]
        weight = modules[name].weight.detach().float()
        init, transposed = graph.weights[name]
        nodes = _compute_nodes(ed, init)
        node = nodes[0] if nodes else None
        row = {"layer": name, "kind": info.kind, "weights": "fp32", "activations": "fp32", "executes": "float",
               "reason": "kept in FP32 by the recipe"}
        iq = iqs[name]
        data_input = None if node is None or node.op_type in ("Gather", "LSTM", "GRU") else 0
        assert iq is None or data_input is not None, f"{name}: a quantized input on a {node.op_type} node"
        if name in smoothed and data_input is not None:
            _smoothing_mul(ed, nodes, data_input, smoothed[name].numpy())
            muls.append(name)
        if dynamic_conv.fits(node, plan.weights, iq) and len(nodes) == 1 and node.input[1] == init:  # decoded at load
            ed.drop_initializer(init)
            row["activations"], row["weights"], stored = dynamic_conv.write(ed, node, iq, simulated[name])
            codes_of[name], row["stored_bytes"] = stored[0], stored_bytes(ed, set(stored))
            rows.append(row)
            continue
        if iq is not None and data_input is not None:
            for n in nodes:  # each time step of an unrolled recurrent matrix: the same quantizer
                new_input, row["activations"] = quantize_input(ed, n.input[data_input], iq, n)
                n.input[data_input] = new_input
        elif plan.activations is not None and info.kind != "Embedding" and plan.activations.fmt.quantizes:
            row["activations"] = "fp32 (layer not reached by the calibration data: the simulation leaves it float)"
        w = plan.weights
        before_weight = set(ed.inits)
        if w is not None and w.fmt.quantizes:
            q = simulated[name]
            # a Linear as MatMul(A, W^T) reading the weight directly
            nbits_ok = (len(nodes) == 1 and node.op_type == "MatMul" and transposed is True and node.input[1] == init
                        and uses_matmul_nbits(w, iq))
            block = nbits_block(q, weight.shape[1]) if nbits_ok else None
            act_block = int8_compute_block(info.kind, w)
            if act_block is not None and block is not None:
                block = act_block  # the kernel quantizes the input per weight block: the simulation's blocks
            elif act_block is not None:
                notes.append(f"{name}: int8 compute is simulated but the layer is not a MatMulNBits in the file, "
                             "which computes it in float")
            lookup = (gather_codes(ed, q, node) if len(nodes) == 1 and node.op_type == "Gather" and not transposed
                      and node.input[0] == init else None)
            ed.drop_initializer(init)
            if lookup is not None:  # an embedding looked up on its codes
                new, row["weights"], codes_of[name] = lookup
                ed.replace(node, new)
            elif block is not None:
                new, bits = matmul_nbits(ed, q, node.input[0], None, node.output[0], node, block, act_block is not None)
                ed.replace(node, new)
                row["weights"] = f"{w.format} codes packed in MatMulNBits (bits={bits}, block_size={block})"
                if act_block is not None:
                    row["activations"] = f"int8 per block of {block} along K, at run time (int8 compute)"
                codes_of[name] = new.input[1]
            elif transposed == "graph":  # decoded in the layer's layout, then moved into the operator's
                decoded = ed.fresh(f"{init}_dequantized")
                row["weights"], codes_of[name] = decode_weight(ed, q, tuple(weight.shape), decoded)
                _to_graph_layout(ed, decoded, modules[name], init)
            elif decoder(w.fmt) == "DequantizeLinear":  # it reads transposed codes directly
                row["weights"], codes_of[name] = decode_weight(ed, q, tuple(weight.shape), init, transposed)
            else:
                out = ed.fresh(f"{init}_dequantized") if transposed else init
                row["weights"], codes_of[name] = decode_weight(ed, q, tuple(weight.shape), out)
                if transposed:
                    ed.node("Transpose", [out], "w", output=init, perm=[1, 0])
            container_bits = ELEMENT_TYPES[w.fmt.onnx_type][1]
            if w.fmt.bits < container_bits and block is None:
                notes.append(f"{name}: {w.format} codes are stored in a {container_bits}-bit "
                             "container (ONNX has no narrower integer type), so the file is larger than the "
                             "theoretical size")
        row["stored_bytes"] = stored_bytes(ed, set(ed.inits) - before_weight) if set(ed.inits) - before_weight \
            else {"codes": weight.numel() * 4, "scales": 0, "zero_points": 0, "other": 0, "total": weight.numel() * 4}
        rows.append(row)
    if smoothed:
        notes.append(f"SmoothQuant adds {len(muls)} Mul op(s) to the graph, each layer's input times 1/s per channel "
                     f"before it is quantized ({', '.join(muls[:4])}{' ...' if len(muls) > 4 else ''}): the layers "
                     "no fold reaches")
    ed.finish()
    opset = max([OPSET] + [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")])
    others = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx", "com.microsoft")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1), *others])
    onnx.save(proto, path)
    _executes(path, rows, codes_of, plans)
    return OnnxExport(path, os.path.getsize(path), opset, rows, notes)



def _smoothing_mul(ed, nodes, data_input: int, inv: np.ndarray) -> None:
    """Each compute node's data input times ``inv`` (SmoothQuant's 1/s, (C,) float32) before it is quantized:
    ``torch.onnx.export`` traced the layer's ``InputScale`` as a Mul by an initializer equal to it (kept); a graph
    without it (an uploaded ONNX model's own) gets the Mul written here."""
    for n in nodes:
        p = ed.producer(n.input[data_input])
        if p is not None and p.op_type == "Mul" and any(
                i in ed.inits and np.array_equal(ed.array(i).reshape(-1), inv) for i in p.input):
            continue
        n.input[data_input] = ed.node("Mul", [n.input[data_input], ed.const(inv, "smooth")], "smooth", n)


def _write_corrected_biases(ed, sim, recipe: Recipe) -> None:
    """Bias correction's biases (``Simulation.bias_corrected``) into their initializers ``<layer>.bias``."""
    if not any(t.name == "bias_correction" for t in recipe.transforms):
        return
    for name, mod in modules_by_name(sim.model, sim.bias_corrected).items():
        init = ed.inits.get(f"{name}.bias")
        if init is None:
            raise QcoreError(f"layer {name!r}: the ONNX graph has no initializer {name}.bias to hold its corrected "
                             "bias; export without bias_correction")
        init.CopyFrom(numpy_helper.from_array(mod.bias.detach().numpy().astype(np.float32), init.name))


def _to_graph_layout(ed, value: str, module, out: str) -> None:
    """Graph ops moving ``value`` (a weight in the layer's layout) into its operator's layout ``out``
    (``float_graph.graph_weight``): ConvTranspose (C_out, C_in/g, k...) -> (C_in, C_out/g, k...) by
    Reshape (g, C_out/g, C_in/g, k...), Transpose of the middle two axes, Reshape; a recurrent matrix
    (directions * G * H, in) -> W / R (directions, G * H, in) by Reshape."""
    shape = lambda dims: ed.const(np.array(dims, np.int64), "shape")  # noqa: E731
    if isinstance(module, ConvTransposeLayer):
        c_out, in_per_group, *k = module.weight.shape
        g = module.groups
        grouped = ed.node("Reshape", [value, shape([g, c_out // g, in_per_group, *k])], "w")
        moved = ed.node("Transpose", [grouped], "w", perm=[0, 2, 1, *range(3, 3 + len(k))])
        ed.node("Reshape", [moved, shape([g * in_per_group, c_out // g, *k])], "w", output=out)
    else:
        ed.node("Reshape", [value, shape(list(module.graph_shape))], "w", output=out)


# Why ONNX Runtime computes these layer kinds in float whatever their format
_FLOAT_KINDS = {
    "ConvTranspose1d": "ONNX Runtime has no integer ConvTranspose kernel on CPU: it computes in float on the exact "
                       "dequantized weight",
    "ConvTranspose2d": "ONNX Runtime has no integer ConvTranspose kernel on CPU: it computes in float on the exact "
                       "dequantized weight",
    "LSTM": "a recurrent matrix: ONNX Runtime computes the LSTM (its ONNX LSTM operator, or the unrolled cell's "
            "per-step MatMuls) in float on the exact dequantized weight",
    "GRU": "a recurrent matrix: ONNX Runtime computes the GRU (its ONNX GRU operator, or the unrolled cell's "
           "per-step MatMuls) in float on the exact dequantized weight",
}


# ---- what ONNX Runtime makes of it -----------------------------------------------------------------
def _executes(path: str, rows: list[dict], codes_of: dict[str, str], plans) -> None:
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
        row["reason"] = _FLOAT_KINDS.get(row["kind"]) or why_float(plans[row["layer"]], row["kind"])

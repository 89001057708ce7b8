"""An imported ONNX ``LSTM`` / ``GRU`` node written as its cell unrolled over time, so the file quantizes
what the simulation quantizes.

The ONNX operators run their time loop inside: nothing can go between a step's input x_t or hidden
state h_{t-1} and the matrix that multiplies it. The simulation runs the same cell step by step
(``qcore.model.onnx_graph.OnnxLSTM`` / ``OnnxGRU``), and its input quantizers see each step's x_t (on
``weight_ih``) and h_{t-1} (on ``weight_hh``; a GRU without ``linear_before_reset`` also r * h_{t-1}).
``unroll_recurrent`` replaces each node whose matrices have quantized inputs by that cell as graph ops,
in the simulation's order, per direction d and time step t:

    x_t = Gather(X, t)                                 (batch, input)
    gx  = MatMul(x_t, W_d^T) + Wb_d                    one MatMul per call of ``weight_ih``
    gh  = MatMul(h, R_d^T) + Rb_d                      one MatMul per call of ``weight_hh``
    LSTM (gates i, o, f, c):  i = sigmoid(gx_i + gh_i [+ P_i c]), f = sigmoid(gx_f + gh_f [+ P_f c]) (1 - i with
          input_forget), c' = f c + i tanh(gx_c + gh_c), o = sigmoid(gx_o + gh_o [+ P_o c']), h' = o tanh(c')
    GRU (gates z, r, h):      z, r = sigmoid(gx_z + gh_z), sigmoid(gx_r + gh_r);
          n = tanh(gx_h + r gh_h) (linear_before_reset) or tanh(gx_h + [MatMul(r h, R_d^T) + Rb_d]_h);
          h' = (1 - z) n + z h

(``clip`` clamps each pre-activation; a node with ``sequence_lens`` is refused.) Each MatMul then gets
the layer's input quantizer in ``export_qdq`` like any other MatMul, so a dynamic range is the range of
that step's x_t or h_{t-1} over the batch and a static one the calibrated constant: the file computes
the simulation. The weights become ``<layer>.weight`` as
W^T (input, directions * G * H) read by MatMul directly (a ``Slice`` per direction when
bidirectional), the biases ``<layer>.bias`` (directions * G * H).

The unrolled graph has the number of steps the calibration data gives the node (``sequence_lengths``),
as a torch LSTM's export has: a note says so.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from qcore.errors import QcoreError
from qcore.model.onnx_graph import OnnxGRU, OnnxLSTM

RECURRENT = (OnnxLSTM, OnnxGRU)


def sequence_lengths(workload, model) -> dict[str, int]:
    """Module path -> the number of time steps each ``OnnxLSTM`` / ``OnnxGRU`` of ``model`` runs on the
    first calibration sample (its X's axis 0, or 1 with ``layout=1``)."""
    found, hooks = {}, []

    def record(path, module, args) -> None:  # a pre-hook returning a value would replace the inputs
        found.setdefault(path, int(args[0].shape[1 if module.layout else 0]))

    for path, module in model.named_modules():
        if isinstance(module, RECURRENT):
            hooks.append(module.register_forward_pre_hook(lambda m, args, path=path: record(path, m, args)))
    try:
        workload.run(model, workload.calibration.subset(torch.arange(1)))
    finally:
        for h in hooks:
            h.remove()
    return found


def unroll_recurrent(ed, weights: dict, model, workload, quantized: set[str]) -> list[str]:
    """Replace, in the graph being edited (``ed``), each ONNX LSTM / GRU node of ``model`` (an
    ``OnnxModule``) with a matrix in ``quantized`` (layers whose input the recipe quantizes) by its
    unrolled cell; ``weights`` (``FloatGraph.weights``: layer -> (initializer, orientation)) is updated
    to the new W^T / R^T initializers. Returns notes for the file."""
    rnns = {path: m for path, m in model.named_modules() if isinstance(m, RECURRENT)
            and {f"{path}.weight_ih", f"{path}.weight_hh"} & quantized}
    if not rnns:
        return []
    nodes = {path: next((n for n in ed.nodes if n.op_type == m.KIND and n.input[1] == weights[f"{path}.weight_ih"][0]),
                        None) for path, m in rnns.items()}
    for path, node in nodes.items():
        if node is not None and len(node.input) > 4 and node.input[4]:
            raise QcoreError(f"the ONNX {node.op_type} node {node.name!r} takes sequence_lens, which the unrolled export "
                             "does not write; keep its layers' activations fp32 (weight-only)")
    steps, notes = sequence_lengths(workload, model), []
    for path, module in rnns.items():
        ih, hh, node = f"{path}.weight_ih", f"{path}.weight_hh", nodes[path]
        if node is None or path not in steps:
            raise QcoreError(f"layer {ih!r}: its ONNX {module.KIND} node is not run by the calibration data (or not "
                             "found in the graph), so the file cannot be unrolled over its time steps; keep this "
                             "layer's activations fp32 (weight-only)")
        cell = _Cell(ed, node, module, steps[path])
        for name, matrix in ((ih, module.weight_ih), (hh, module.weight_hh)):
            weights[name] = (cell.weight(name, matrix), True)
        cell.write()
        notes.append(f"{path}: the ONNX {module.KIND} node is written as its cell unrolled over {steps[path]} time "
                     "step(s) (the calibration data's sequence length), so each step's input and hidden state are "
                     "quantized as the simulation does; the file runs that sequence length only")
    return notes


class _Cell:
    """Builds the unrolled graph of one node (see the module docstring) and puts it where the node was."""

    def __init__(self, ed, node, module, seq: int):
        self.ed, self.node, self.m, self.seq = ed, node, module, seq
        self.new: list = []
        self.w: dict = {}  # "ih" / "hh" -> (W^T initializer, bias initializer); ("ih", d) -> direction d's slices
        self.dirs = module.weight_ih.directions
        self.gh = module.GATES * module.hidden

    def op(self, op: str, inputs: list[str], hint: str = "rnn", n_outputs: int = 1, **attrs):
        outs = [self.ed.fresh(f"{self.node.name or self.m.KIND}/{hint}") for _ in range(n_outputs)]
        self.new.append(helper.make_node(op, inputs, outs, name=self.ed.fresh(f"{self.node.name}/{hint}/{op}"), **attrs))
        return outs[0] if n_outputs == 1 else outs

    def const(self, value, hint: str) -> str:
        return self.ed.const(np.asarray(value), hint)

    def weight(self, layer: str, matrix) -> str:
        """``<layer>.weight`` = W^T (in, directions * G * H) and ``<layer>.bias`` initializers; returns the first."""
        w = self.const(np.ascontiguousarray(matrix.weight.detach().float().numpy().T), f"{layer}.weight")
        b = self.const(matrix.bias.detach().float().numpy(), f"{layer}.bias")
        self.w["ih" if layer.endswith("weight_ih") else "hh"] = (w, b)
        return w

    def linear(self, x: str, which: str, d: int) -> str:
        """x @ W_d^T + b_d for matrix ``which`` ("ih" / "hh") of direction d: (batch, G * H)."""
        w, b = self.w[which]
        if self.dirs > 1:  # direction d's G * H columns of W^T and entries of the bias, sliced once
            if (which, d) not in self.w:
                rows = lambda axis: dict(starts=[d * self.gh], ends=[(d + 1) * self.gh], axes=[axis])  # noqa: E731
                self.w[which, d] = (self.op("Slice", [w, *self._ints(**rows(1))], "w_direction"),
                                    self.op("Slice", [b, *self._ints(**rows(0))], "b_direction"))
            w, b = self.w[which, d]
        return self.op("Add", [self.op("MatMul", [x, w], f"{which}_matmul"), b], f"{which}_bias")

    def _ints(self, **lists) -> list[str]:
        return [self.const(np.array(v, np.int64), k) for k, v in lists.items()]

    def clipped(self, v: str) -> str:
        if self.m.clip is None:
            return v
        c = float(self.m.clip)
        return self.op("Clip", [v, self.const(np.float32(-c), "clip_lo"), self.const(np.float32(c), "clip_hi")])

    def state(self, index: int, d: int) -> str:
        """Direction d's initial state from node input ``index`` (initial_h: 5, initial_c: 6), or zeros."""
        batch_axis = 0 if self.m.layout else 1
        name = self.node.input[index] if len(self.node.input) > index else ""
        if name:
            return self.op("Gather", [name, self.const(np.int64(d), "direction")], "state0", axis=1 - batch_axis)
        batch = self.op("Shape", [self.node.input[0]], "batch", start=batch_axis, end=batch_axis + 1)
        shape = self.op("Concat", [batch, self.const(np.array([self.m.hidden], np.int64), "hidden")], "zeros", axis=0)
        return self.op("ConstantOfShape", [shape], "zeros", value=helper.make_tensor("z", 1, [1], [0.0]))

    def lstm_step(self, x: str, h: str, c: str, d: int) -> tuple[str, str]:
        m = self.m
        gates = self.op("Add", [self.linear(x, "ih", d), self.linear(h, "hh", d)], "gates")
        gi, go, gf, gc = self.op("Split", [gates], "gate", n_outputs=4, axis=-1, num_outputs=4)
        peep = None
        if len(self.node.input) > 7 and self.node.input[7]:
            peep = [self.const(p.numpy().astype(np.float32), "peephole") for p in m.peephole[d].detach().chunk(3)]

        def with_peephole(g: str, k: int, cell: str) -> str:  # the gate's pre-activation + P_k * c (k: i 0, o 1, f 2)
            return g if peep is None else self.op("Add", [g, self.op("Mul", [peep[k], cell])])

        i = self.op("Sigmoid", [self.clipped(with_peephole(gi, 0, c))], "i")
        f = self.op("Sub", [self.const(np.float32(1.0), "one"), i], "f") if m.input_forget else \
            self.op("Sigmoid", [self.clipped(with_peephole(gf, 2, c))], "f")
        g = self.op("Tanh", [self.clipped(gc)], "g")
        c_new = self.op("Add", [self.op("Mul", [f, c]), self.op("Mul", [i, g])], "c")
        o = self.op("Sigmoid", [self.clipped(with_peephole(go, 1, c_new))], "o")
        return self.op("Mul", [o, self.op("Tanh", [c_new])], "h"), c_new

    def gru_step(self, x: str, h: str, d: int) -> str:
        xz, xr, xh = self.op("Split", [self.linear(x, "ih", d)], "x_gate", n_outputs=3, axis=-1, num_outputs=3)
        hz, hr, hh = self.op("Split", [self.linear(h, "hh", d)], "h_gate", n_outputs=3, axis=-1, num_outputs=3)
        z = self.op("Sigmoid", [self.clipped(self.op("Add", [xz, hz]))], "z")
        r = self.op("Sigmoid", [self.clipped(self.op("Add", [xr, hr]))], "r")
        if self.m.linear_before_reset:
            reset = self.op("Mul", [r, hh], "reset")
        else:  # R_h (r * h) + Rb_h: the whole R on r * h (the simulation's second call of weight_hh), its h rows
            reset = self.op("Split", [self.linear(self.op("Mul", [r, h], "rh"), "hh", d)], "rh_gate", n_outputs=3,
                            axis=-1, num_outputs=3)[2]
        n = self.op("Tanh", [self.clipped(self.op("Add", [xh, reset]))], "n")
        one = self.const(np.float32(1.0), "one")
        return self.op("Add", [self.op("Mul", [self.op("Sub", [one, z]), n]), self.op("Mul", [z, h])], "h")

    def write(self) -> None:
        """The cell over every step and direction, the node's outputs (Y, Y_h[, Y_c]) in its layout."""
        m, node, lstm = self.m, self.node, isinstance(self.m, OnnxLSTM)
        time_axis = 1 if m.layout else 0
        xs = [self.op("Gather", [node.input[0], self.const(np.int64(t), "t")], "x_t", axis=time_axis)
              for t in range(self.seq)]
        ys, finals = [], []  # ys[d][t]: (batch, H); finals[d]: (h, c)
        for d in range(self.dirs):
            h, c = self.state(5, d), (self.state(6, d) if lstm else None)
            out = [None] * self.seq
            reverse = m.direction == "reverse" or d == 1
            for t in (reversed(range(self.seq)) if reverse else range(self.seq)):
                h, c = self.lstm_step(xs[t], h, c, d) if lstm else (self.gru_step(xs[t], h, d), None)
                out[t] = h
            ys.append(out)
            finals.append((h, c))
        # Y (seq, dirs, batch, H), layout 1: (batch, seq, dirs, H); Y_h, Y_c (dirs, batch, H), layout 1: (batch, dirs, H)
        state_axis = 1 if m.layout else 0
        axis = lambda k: self.const(np.array([k], np.int64), "axis")  # noqa: E731
        outputs = list(node.output) + [""] * 3
        if outputs[0]:
            steps = [self.op("Concat", [self.op("Unsqueeze", [ys[d][t], axis(state_axis)]) for d in range(self.dirs)],
                             "y_t", axis=state_axis) for t in range(self.seq)]
            self.new.append(helper.make_node("Concat", [self.op("Unsqueeze", [s, axis(time_axis)]) for s in steps],
                                             [outputs[0]], name=self.ed.fresh(f"{node.name}/Y"), axis=time_axis))
        for k, out in ((0, outputs[1]), (1, outputs[2] if lstm else "")):
            if out:
                self.new.append(helper.make_node(
                    "Concat", [self.op("Unsqueeze", [finals[d][k], axis(state_axis)]) for d in range(self.dirs)],
                    [out], name=self.ed.fresh(f"{node.name}/Y_{'hc'[k]}"), axis=state_axis))
        i = self.ed.nodes.index(node)
        self.ed.nodes[i:i + 1] = self.new
        for name in {n for n in node.input[1:] if n in self.ed.inits}:  # W, R, B, P: now held as W^T, R^T, biases
            if not self.ed.consumers(name) and name not in {o.name for o in self.ed.graph.output}:
                self.ed.drop_initializer(name)

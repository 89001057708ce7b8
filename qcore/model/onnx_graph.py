"""An ONNX graph as an ``nn.Module``: ``OnnxModule`` runs the nodes in the file's order.

Quantization finds layers by module type, so the weighted nodes are real modules (``nn.Linear``,
``nn.Conv1d``/``nn.Conv2d``, ``nn.ConvTranspose1d``/``2d``, ``nn.Embedding``, ``OnnxLSTM``/``OnnxGRU``, named
by their source module paths) and every other node
a ``Step`` running a torch function of ``qcore.model.onnx_ops.OPS``. The source graph's other weights
(LayerNorm's scale and bias, ...) are parameters, so the module counts what the source model counts;
the module keeps the source graph and each layer's place in it (``LayerSource``), which
``qcore.export`` rewrites. ``forward`` returns the graph's first output, ``run`` all of them.

Control flow: an ``If`` whose condition is a constant is inlined at import (the taken branch's nodes
become steps); otherwise its ``Step`` holds both branches as step lists and runs the one the condition
picks at run time (branches read the outer values by name). Recurrent layers (``OnnxLSTM``, ``OnnxGRU``)
are modules holding their two weight matrices (W, R) as layers, in ONNX's gate order.

The importer (``io.onnx.convert``) builds one from an (untrusted) file. At run time the operators
whose output size the graph's values decide (``RUN_CHECKED``) are checked before they allocate: one
tensor above ``MAX_RUN_TENSOR_BYTES`` is one ``QcoreError`` line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qcore.errors import QcoreError
from qcore.model.onnx_ops import OPS, RUN_CHECKED, output_sizes
from qcore.model.recurrent import RecurrentMatrix

MAX_RUN_TENSOR_BYTES = 2**31  # one tensor a RUN_CHECKED operator creates at run time: 2 GiB


def quoted(text: str) -> str:
    """A name from the file for a one-line message: repr (escapes newlines), at most ~80 characters."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def fresh_name(base: str, used: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... -- the first not in ``used`` (a graph's value and node names), which
    it joins: a name for a value or node added to an ONNX graph."""
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name



@dataclass
class Step:
    """One node to run: its operator, input/output value names, attributes, and the layer it calls (if any)."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    layer: str | None = None
    pre_pad: list[int] | None = None  # Conv with asymmetric pads: F.pad before the conv layer
    post_pad: list[int] | None = None  # ConvTranspose with asymmetric pads: F.pad (negative: crop) after it
    branches: tuple | None = None  # If: ((then steps, then outputs), (else steps, else outputs))


class _OnnxRNN(nn.Module):
    """Shared by ``OnnxLSTM`` and ``OnnxGRU``: the ONNX node's W, R, B as two quantizable layers
    (``qcore.model.recurrent.RecurrentMatrix``, one layer per weight matrix, as torch's unrolled LSTM/GRU).

    ``weight_ih.weight`` (num_directions * G * hidden, input) is ONNX's W (num_directions, G * hidden,
    input) with the directions stacked, ``weight_hh.weight`` (num_directions * G * hidden, hidden) R, their
    biases the two halves of B; gates in ONNX order (LSTM iofc, G = 4; GRU zrh, G = 3); ``graph_shape``
    of each matrix is the ONNX initializer's shape. ``forward(X, sequence_lens, initial_h[, initial_c])``
    with X (seq, batch, input) (``layout=1``: (batch, seq, input)) returns ONNX's (Y, Y_h[, Y_c]):
    Y (seq, num_directions, batch, hidden), Y_h (num_directions, batch, hidden). A batch entry's steps
    at or beyond its ``sequence_lens`` leave its state unchanged and output zeros."""

    GATES, KIND = 0, ""

    def __init__(self, w, r, b, attrs: dict):
        super().__init__()
        dirs, gh = w.shape[0], w.shape[1]
        self.hidden, self.direction = gh // self.GATES, attrs.get("direction", "forward")
        self.layout, self.clip = attrs.get("layout", 0), attrs.get("clip")
        b = torch.zeros(dirs, 2 * gh, dtype=w.dtype) if b is None else b
        self.weight_ih = RecurrentMatrix(w.reshape(dirs * gh, -1), b[:, :gh].reshape(-1), self.KIND, dirs)
        self.weight_hh = RecurrentMatrix(r.reshape(dirs * gh, -1), b[:, gh:].reshape(-1), self.KIND, dirs)
        self.weight_ih.graph_shape, self.weight_hh.graph_shape = tuple(w.shape), tuple(r.shape)

    def forward(self, x, lens=None, h0=None, c0=None):
        if self.layout:  # batch first: X (batch, seq, input), initial states (batch, dirs, hidden)
            x, h0, c0 = (None if v is None else v.transpose(0, 1) for v in (x, h0, c0))
        seq, batch = x.shape[:2]
        lens = torch.full((batch,), seq) if lens is None else lens
        ys, hs, cs = [], [], []
        for d in range(self.weight_ih.directions):
            reverse = self.direction == "reverse" or d == 1
            h = torch.zeros(batch, self.hidden, dtype=x.dtype) if h0 is None else h0[d]
            c = torch.zeros(batch, self.hidden, dtype=x.dtype) if c0 is None else c0[d]
            out = [None] * seq
            for t in (reversed(range(seq)) if reverse else range(seq)):
                h_new, c_new = self.cell(x[t], h, c, d)
                live = (t < lens).reshape(batch, 1)
                h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
                out[t] = torch.where(live, h_new, torch.zeros_like(h_new))
            ys.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        y, h, c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
        if self.layout:  # batch first: Y (batch, seq, dirs, hidden), Y_h (batch, dirs, hidden)
            y, h, c = y.permute(2, 0, 1, 3), h.transpose(0, 1), c.transpose(0, 1)
        return (y, h, c) if self.GATES == 4 else (y, h)

    def _clipped(self, v):
        return v if self.clip is None else v.clamp(-self.clip, self.clip)


class OnnxLSTM(_OnnxRNN):
    """ONNX LSTM (default activations sigmoid/tanh/tanh), ``peephole`` (num_directions, 3 * hidden) in
    iof order; ``input_forget`` couples the forget gate to 1 - input gate."""

    GATES, KIND = 4, "LSTM"

    def __init__(self, w, r, b, p, attrs: dict):
        super().__init__(w, r, b, attrs)
        self.input_forget = bool(attrs.get("input_forget", 0))
        p = torch.zeros(w.shape[0], 3 * self.hidden, dtype=w.dtype) if p is None else p
        self.peephole = nn.Parameter(p.clone(), False)

    def cell(self, x, h, c, d):
        (xi, xo, xf, xc), (hi, ho, hf, hc) = self.weight_ih(x, d).chunk(4, -1), self.weight_hh(h, d).chunk(4, -1)
        pi, po, pf = self.peephole[d].chunk(3)
        i = torch.sigmoid(self._clipped(xi + hi + pi * c))
        f = 1 - i if self.input_forget else torch.sigmoid(self._clipped(xf + hf + pf * c))
        c = f * c + i * torch.tanh(self._clipped(xc + hc))
        o = torch.sigmoid(self._clipped(xo + ho + po * c))
        return o * torch.tanh(c), c


class OnnxGRU(_OnnxRNN):
    """ONNX GRU (default activations sigmoid/tanh); ``linear_before_reset`` applies the reset gate
    after R_h (as torch's GRU does) instead of before it."""

    GATES, KIND = 3, "GRU"

    def __init__(self, w, r, b, attrs: dict):
        super().__init__(w, r, b, attrs)
        self.linear_before_reset = bool(attrs.get("linear_before_reset", 0))

    def cell(self, x, h, c, d):
        (xz, xr, xh), (hz, hr, hh) = self.weight_ih(x, d).chunk(3, -1), self.weight_hh(h, d).chunk(3, -1)
        z = torch.sigmoid(self._clipped(xz + hz))
        r = torch.sigmoid(self._clipped(xr + hr))
        if self.linear_before_reset:
            candidate = xh + r * hh
        else:  # R_h (r * h) + Rb_h: the h rows of R applied to r * h (its input hook sees r * h too)
            candidate = xh + self.weight_hh(r * h, d).chunk(3, -1)[2]
        candidate = torch.tanh(self._clipped(candidate))
        return (1 - z) * candidate + z * h, c


@dataclass(frozen=True)
class LayerSource:
    """Where a layer's weight sits in the source graph (what an export rewrites): the compute node
    (its index in ``graph.node`` and name), which of its inputs is the weight and which the data, and
    whether the node reads the weight transposed (MatMul and Gemm without transB hold W^T, (in, out))."""

    node_index: int
    node_name: str
    weight_input: int
    data_input: int
    transposed: bool


class OnnxModule(nn.Module):
    """Runs the converted graph: ``forward(*inputs)`` takes the graph inputs in file order and
    returns its first output. Layers are submodules (dotted paths); the other weights of the source
    graph (``parameters``: float initializers of rank >= 1 that run-time nodes read, e.g. LayerNorm's
    scale and bias) are parameters of ``constants``, every other constant a buffer there -- so
    ``model.parameters()`` counts what the source model's parameters counted.

    ``source``: the serialized ``ModelProto`` (external data already inlined and checked) and
    ``layer_sources`` each layer's ``LayerSource``: an export rewrites that graph itself."""

    def __init__(self, input_names, output_names, steps, layers: dict[str, nn.Module], constants: dict,
                 parameters: frozenset = frozenset(), source: bytes | None = None,
                 layer_sources: dict[str, LayerSource] | None = None):
        super().__init__()
        self.input_names, self.output_names, self.steps = list(input_names), list(output_names), steps
        self.source, self.layer_sources = source, dict(layer_sources or {})
        for path, module in layers.items():
            parent = self
            *parents, leaf = path.split(".")
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, module)
        self.constants = nn.Module()
        self._constant_keys = {}
        for i, (name, value) in enumerate(constants.items()):
            if name in parameters:
                self.constants.register_parameter(f"c{i}", nn.Parameter(value, requires_grad=False))
            else:
                self.constants.register_buffer(f"c{i}", value)
            self._constant_keys[name] = f"c{i}"

    def forward(self, *inputs):
        return self.run(*inputs)[0]

    def run(self, *inputs) -> tuple:
        """All the graph's outputs, in file order."""
        if len(inputs) != len(self.input_names):
            raise QcoreError(f"the ONNX model takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        env.update({n: getattr(self.constants, k) for n, k in self._constant_keys.items()})
        self._execute(self.steps, env)
        return tuple(env[n] for n in self.output_names)

    def _execute(self, steps: list[Step], env: dict) -> None:
        """Run ``steps`` in order, adding the values they compute to ``env``."""
        for s in steps:
            xs = [env[n] if n else None for n in s.inputs]
            if s.branches is not None:  # If: the branch the condition picks, in a scope that sees env
                branch, names = s.branches[0 if bool(xs[0].reshape(-1)[0]) else 1]
                scope = dict(env)
                self._execute(branch, scope)
                out = tuple(scope[n] for n in names)
            elif s.layer is not None:
                x = xs[0] if s.pre_pad is None else F.pad(xs[0], s.pre_pad)
                layer = self.get_submodule(s.layer)
                if isinstance(layer, nn.Embedding):
                    x = torch.where(x < 0, x + layer.num_embeddings, x).long()
                out = layer(x, *xs[1:])
                out = out if s.post_pad is None else F.pad(out, s.post_pad)
            else:
                if s.op in RUN_CHECKED and any(math.prod(shape) * per_value > MAX_RUN_TENSOR_BYTES
                                               for shape, per_value in output_sizes(s.op, xs, s.attrs)):
                    raise QcoreError(f"ONNX operator {s.op!r} (node {quoted(s.name)}) would create a tensor above "
                                     f"{MAX_RUN_TENSOR_BYTES / 2**30:.1f} GiB at run time; check the input shapes, or "
                                     "the file is built to exhaust memory")
                out = OPS[s.op](xs, s.attrs)
            outs = out if isinstance(out, tuple) else (out,)
            env.update((n, v) for n, v in zip(s.outputs, outs) if n)


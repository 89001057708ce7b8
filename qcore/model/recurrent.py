"""Recurrent layers (LSTM, GRU) as quantizable layers: one layer per weight matrix, an unrolled cell.

**One layer per weight matrix.** A recurrent layer computes, at each time step t, gate pre-activations
``x_t @ W_ih^T + b_ih`` and ``h_{t-1} @ W_hh^T + b_hh``. Each of these matrices is a ``RecurrentMatrix``
(an ``nn.Linear`` of kind "LSTM" or "GRU", weight (G * H, I) or (G * H, H), G = 4 gates for LSTM, 3 for
GRU), called once per time step with that step's input. So recipes, sizes, sensitivity, search and
export see them as layers like any other (``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``, ...), and
the simulation's input pre-hook on a matrix quantizes what it multiplies:

- on ``weight_ih``: the layer input x_t (static range from calibration over every step; dynamic: the
  range of each step's x_t);
- on ``weight_hh``: the hidden state h_{t-1} (the recurrent state: torch's fused ``nn.LSTM`` cannot
  quantize it per step, the unrolled cell does).

Per-channel weight scales are per row of the (G * H, in) matrix: one scale per gate row.

``unroll(model)`` replaces each ``nn.LSTM`` / ``nn.GRU`` in place by ``UnrolledLSTM`` / ``UnrolledGRU``, the
same computation as a readable Python loop over time steps and layers (torch's gate order: LSTM
i, f, g, o; GRU r, z, n), equal to torch's fused kernels in float to ~1e-6. Supported: any number of
layers, bidirectional, ``batch_first``, with or without bias, an initial state; not supported
(left as torch's module, so not a layer): ``proj_size`` and ``PackedSequence`` inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from qcore.errors import QcoreError


class RecurrentMatrix(nn.Linear):
    """One weight matrix of a recurrent layer with its bias: ``weight`` (directions * G * H, in), ``bias``
    (directions * G * H) or None. ``forward(x, direction)`` returns ``x @ W_d^T + b_d`` for ``direction`` d's
    block of rows (torch modules hold one direction per matrix; ONNX's W and R hold all directions)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, directions: int = 1):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        self.kind, self.directions = kind, directions
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)

    def forward(self, x: torch.Tensor, direction: int = 0) -> torch.Tensor:
        rows = self.weight.shape[0] // self.directions
        block = slice(direction * rows, (direction + 1) * rows)
        y = x @ self.weight[block].T
        return y if self.bias is None else y + self.bias[block]


class _Unrolled(nn.Module):
    """Shared by ``UnrolledLSTM`` / ``UnrolledGRU``: torch's ``nn.LSTM`` / ``nn.GRU`` interface (input
    (seq, batch, in), or (batch, seq, in) with ``batch_first``, or unbatched (seq, in)), its weights as
    ``RecurrentMatrix`` children named as torch names the parameters (``weight_ih_l0``, ``weight_hh_l0_reverse``)."""

    KIND, GATES = "", 0

    def __init__(self, rnn: nn.RNNBase, outputs: int | tuple[int, ...] | None = None):
        """``outputs`` None: torch's return value; else the items of the flat (output, h_n[, c_n]) to return
        (an index: that one tensor; a tuple: a list of them), as a ``torch.export`` graph of the layer returns."""
        super().__init__()
        self.outputs = outputs
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.batch_first, self.bidirectional = rnn.batch_first, rnn.bidirectional
        for k in range(self.num_layers):
            for suffix in ("", "_reverse") if self.bidirectional else ("",):
                for m in ("ih", "hh"):
                    name = f"weight_{m}_l{k}{suffix}"
                    bias = getattr(rnn, f"bias_{m}_l{k}{suffix}") if rnn.bias else None
                    self.add_module(name, RecurrentMatrix(getattr(rnn, name).detach(),
                                                          None if bias is None else bias.detach(), self.KIND))

    def forward(self, x: torch.Tensor, *args):
        """torch's ``forward(x, hx=None)``. A leaf of a ``torch.export`` graph (``outputs`` set) is called
        with the graph's size symbols after x: they are ignored (its states start at zero)."""
        hx = args[0] if args and self.outputs is None else None
        if not isinstance(x, torch.Tensor):
            raise QcoreError(f"the {self.KIND} got a {type(x).__name__} (a PackedSequence?); the engine runs "
                             "recurrent layers on padded tensors only")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = None if hx is None else tuple(h.unsqueeze(1) for h in _states(hx))
        elif self.batch_first:
            x = x.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        zeros = x.new_zeros(self.num_layers * dirs, x.shape[1], self.hidden_size)
        states = _states(hx) if hx is not None else (zeros,) * (2 if self.GATES == 4 else 1)
        finals = []
        for k in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(("", "_reverse")[:dirs]):
                ih, hh = self._modules[f"weight_ih_l{k}{suffix}"], self._modules[f"weight_hh_l{k}{suffix}"]
                state = tuple(s[k * dirs + d] for s in states)
                steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
                ys = [None] * x.shape[0]
                for t in steps:
                    state = self.cell(ih(x[t]), hh, state)
                    ys[t] = state[0]
                outs.append(torch.stack(ys))
                finals.append(state)
            x = torch.cat(outs, -1)  # (seq, batch, dirs * hidden): the next layer's input
        final = tuple(torch.stack([f[i] for f in finals]) for i in range(len(finals[0])))
        if unbatched:
            x, final = x.squeeze(1), tuple(f.squeeze(1) for f in final)
        elif self.batch_first:
            x = x.transpose(0, 1)
        if self.outputs is not None:
            flat = (x, *final)
            return flat[self.outputs] if isinstance(self.outputs, int) else [flat[i] for i in self.outputs]
        return x, (final if self.GATES == 4 else final[0])


def _states(hx) -> tuple:
    return tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)


class UnrolledLSTM(_Unrolled):
    """``nn.LSTM`` step by step: gates = W_ih x_t + b_ih + W_hh h + b_hh, split i, f, g, o;
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g); h' = sigmoid(o) * tanh(c')."""

    KIND, GATES = "LSTM", 4

    def cell(self, gx, hh: RecurrentMatrix, state):
        h, c = state
        i, f, g, o = (gx + hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class UnrolledGRU(_Unrolled):
    """``nn.GRU`` step by step: (r, z, n) rows of W_ih x_t + b_ih and of W_hh h + b_hh;
    r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z); n = tanh(x_n + r * h_n); h' = (1 - z) * n + z * h."""

    KIND, GATES = "GRU", 3

    def cell(self, gx, hh: RecurrentMatrix, state):
        (h,) = state
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = hh(h).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * h,)


UNROLLED = {nn.LSTM: UnrolledLSTM, nn.GRU: UnrolledGRU}


def unroll(model: nn.Module) -> list[str]:
    """Replace every ``nn.LSTM`` / ``nn.GRU`` of ``model`` (in place) by its unrolled equivalent; returns
    their module paths. One with ``proj_size`` stays torch's (its weight matrices are then not layers)."""
    done = []
    for name, module in list(model.named_modules()):
        cls = UNROLLED.get(type(module))
        if cls is None or getattr(module, "proj_size", 0):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not name:
            raise QcoreError("the model is itself an nn.LSTM / nn.GRU; wrap it in a module that returns one tensor")
        parent._modules[leaf] = cls(module)
        done.append(name)
    return done

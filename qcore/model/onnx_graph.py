"""An ONNX graph as an ``nn.Module``: ``OnnxModule`` runs the nodes in the file's order.

Quantization finds layers by module type, so the weighted nodes are real modules (``nn.Linear``,
``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, named by their source module paths) and every other node
a ``Step`` running a torch function of ``qcore.model.onnx_ops.OPS``. The source graph's other weights
(LayerNorm's scale and bias, ...) are parameters, so the module counts what the source model counts;
the module keeps the source graph and each layer's place in it (``LayerSource``), which
``qcore.export`` rewrites. The module returns the graph's first output.

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

MAX_RUN_TENSOR_BYTES = 2**31  # one tensor a RUN_CHECKED operator creates at run time: 2 GiB


def quoted(text: str) -> str:
    """A name from the file for a one-line message: repr (escapes newlines), at most ~80 characters."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))



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
        if len(inputs) != len(self.input_names):
            raise QcoreError(f"the ONNX model takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        env.update({n: getattr(self.constants, k) for n, k in self._constant_keys.items()})
        for s in self.steps:
            xs = [env[n] if n else None for n in s.inputs]
            if s.layer is not None:
                x = xs[0] if s.pre_pad is None else F.pad(xs[0], s.pre_pad)
                layer = self.get_submodule(s.layer)
                if isinstance(layer, nn.Embedding):
                    x = torch.where(x < 0, x + layer.num_embeddings, x).long()
                out = layer(x)
            else:
                if s.op in RUN_CHECKED and any(math.prod(shape) * per_value > MAX_RUN_TENSOR_BYTES
                                               for shape, per_value in output_sizes(s.op, xs, s.attrs)):
                    raise QcoreError(f"ONNX operator {s.op!r} (node {quoted(s.name)}) would create a tensor above "
                                     f"{MAX_RUN_TENSOR_BYTES / 2**30:.1f} GiB at run time; check the input shapes, or "
                                     "the file is built to exhaust memory")
                out = OPS[s.op](xs, s.attrs)
            outs = out if isinstance(out, tuple) else (out,)
            env.update((n, v) for n, v in zip(s.outputs, outs) if n)
        return env[self.output_names[0]]


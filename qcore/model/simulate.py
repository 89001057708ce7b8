"""Simulated (fake) quantization of a whole model under a recipe.

One mechanism for every kind of model the engine loads (``nn.Module`` zoo models, modules built
from ONNX, unflattened ``torch.export`` programs): quantizable layers are found by what they
compute, then on a *copy* of the model

- each layer's weight is replaced by ``fake_quantize(weight, plan.weights)`` (done once), and
- a forward pre-hook fake-quantizes the layer's input: with the range fixed by calibration
  (static) or computed from each batch (dynamic).

A weight spec whose ``rounding`` is gptq or adaround is rounded from the layer's inputs on calibration
data (``qcore.model.rounding``); ``Simulation.weights`` holds every quantized weight as the
``QuantizedTensor`` applied (codes, scales, zero-points), which is what the exporters write.

The original model is never modified. Conv+BatchNorm pairs are folded first (the folded conv is
what an inference runtime would quantize); ``Simulation.folded`` reports which. In the same step
``nn.LSTM`` / ``nn.GRU`` become their unrolled equivalents (``qcore.model.recurrent``): each weight matrix
is a layer whose input hook sees every time step's input or hidden state.

Weight layouts: Linear (out, in), Conv (C_out, C_in / groups, k...) -- grouped and depthwise convs too:
per_channel is one scale per output channel, fan-in C_in / groups * k --, recurrent matrices
(directions * G * H, in). torch's ConvTranspose holds (C_in, C_out / groups, k...) (output channel on
axis 1); the preparing step turns it into a ``conv_transpose.ConvTransposeLayer`` holding the Conv layout
(C_out, C_in / groups, k...), so per_channel follows its output channel too. GPT-2's ``Conv1D`` holds
(in, out); the preparing step turns it into the ``nn.Linear`` (out, in) it computes (``gpt2_conv1d``).

A weight spec with ``compute: int8`` adds one more pre-hook to its Linear layers: the input quantized per block
as ONNX Runtime's int8-compute kernel does (``qcore.model.int8_compute``).

The input hooks go on the copy only (see ``qcore.model.hooks``: hooks always go on a private copy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.model.calibrate import entropy_clip_note
from qcore.model.conv_transpose import ConvTransposeLayer, use_weight_layout
from qcore.model.gpt2_conv1d import use_linear_layout
from qcore.model.int8_compute import Int8ComputeInput, int8_compute_block
from qcore.model.recurrent import RecurrentMatrix, unroll
from qcore.model.bias_targets import bias_targets
from qcore.algorithms.bias_correction import corrected_bias
from qcore.numerics.quantize import QuantizedTensor, check_finite, quantize
from qcore.recipe import Recipe
from qcore.numerics.spec import TensorSpec

if TYPE_CHECKING:
    from qcore.model.calibrate import ActivationStats

# Module types whose weight is quantized, and the op each computes (a RecurrentMatrix: its layer's kind).
LAYER_TYPES = {nn.Linear: "Linear", nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Embedding: "Embedding"}
# Leaf modules of unflattened torch.export programs carry their op in a graph instead of a type.
_GRAPH_OPS = {"aten.linear.default": "Linear", "aten.conv1d.default": "Conv1d", "aten.conv1d.padding": "Conv1d",
              "aten.conv2d.default": "Conv2d", "aten.conv2d.padding": "Conv2d", "aten.embedding.default": "Embedding"}


def _graph_kind(module: nn.Module) -> str | None:
    """The op of a graph-carrying leaf module (unflattened torch.export): exactly one kind of weighted
    op, whose data input is the module's first input (the tensor the input hooks see)."""
    calls = [n for n in module.graph.nodes if n.op == "call_function" and str(n.target) in _GRAPH_OPS]
    kinds = {_GRAPH_OPS[str(n.target)] for n in calls}
    if len(kinds) != 1 or any(isinstance(c, nn.Module) for c in module.children()):
        return None
    kind = kinds.pop()
    first = next((n for n in module.graph.nodes if n.op == "placeholder"), None)
    data_arg = 1 if kind == "Embedding" else 0
    return kind if all(len(n.args) > data_arg and n.args[data_arg] is first for n in calls) else None


def layer_kind(module: nn.Module) -> str | None:
    """'Linear' | 'Conv1d' | 'Conv2d' | 'ConvTranspose1d' | 'ConvTranspose2d' | 'Embedding' | 'LSTM' | 'GRU'
    for a quantizable layer, else None."""
    if isinstance(module, (RecurrentMatrix, ConvTransposeLayer)):
        return module.kind
    for cls, kind in LAYER_TYPES.items():
        if isinstance(module, cls):
            return kind
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    if isinstance(module, torch.jit.ScriptModule):  # TorchScript keeps the class name, not the class
        kind = getattr(module, "original_name", None)
        return kind if kind in LAYER_TYPES.values() else None
    if isinstance(getattr(module, "graph", None), torch.fx.Graph):
        return _graph_kind(module)
    return None


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: module path, op kind, weight shape, parameter count (weight + bias)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int


def find_layers(model: nn.Module) -> dict[str, LayerInfo]:
    """Every quantizable layer of ``model`` by module path, in definition order."""
    found = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not name:
            continue
        bias = getattr(module, "bias", None)
        params = module.weight.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
        found[name] = LayerInfo(name, kind, tuple(module.weight.shape), params)
    return found


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold each Conv directly followed by a BatchNorm inside an ``nn.Sequential`` into the conv,
    in place (eval-mode statistics); the BatchNorm becomes Identity. Returns the (conv, bn) names.
    Also replaces each ``nn.LSTM`` / ``nn.GRU`` by its unrolled equivalent (``recurrent.unroll``) and each
    ``nn.ConvTranspose1d`` / ``2d`` by a ``ConvTransposeLayer`` (weight in the Conv layout) and each GPT-2
    ``Conv1D`` by its ``nn.Linear`` (``gpt2_conv1d``): the forms whose weights (and hidden state) the engine
    quantizes."""
    unroll(model)
    use_weight_layout(model)
    use_linear_layout(model)
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, (nn.Conv1d, nn.Conv2d)) and isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
                parent._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
                parent._modules[b] = nn.Identity()
                prefix = f"{parent_name}." if parent_name else ""
                folded.append((prefix + a, prefix + b))
    return folded


def modules_by_name(model: nn.Module, names) -> dict[str, nn.Module]:
    table = dict(model.named_modules())
    return {n: table[n] for n in names}


class InputQuantizer:
    """Forward pre-hook that fake-quantizes a layer's first input.

    Static: the range (lo, hi) is fixed (from calibration). Dynamic: chosen per call from the batch.
    """

    def __init__(self, name: str, spec: TensorSpec, lo: float | None = None, hi: float | None = None):
        self.name, self.spec, self.lo, self.hi = name, spec, lo, hi

    def __call__(self, module, args):
        x = args[0]
        if not torch.is_floating_point(x):
            return None
        check_finite(x, f"the input of layer {self.name!r}")
        xq = self.quantize(x).dequantize()
        return (xq.to(x.dtype),) + tuple(args[1:])

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """``x`` quantized with the fixed range (static) or a range taken from ``x`` itself (dynamic)."""
        if self.spec.dynamic or self.lo is None:
            return quantize(x, self.spec)
        return quantize(x, self.spec, self.lo, self.hi)


def input_quantizer(name: str, kind: str, spec: TensorSpec | None,
                    calibration: dict[str, ActivationStats] | None) -> InputQuantizer | None:
    """The pre-hook quantizing the input of layer ``name`` (of ``kind``) under ``spec``, or None when
    nothing is quantized: no spec, fp32, an Embedding (its inputs are indices), or a static spec for a
    layer the calibration data never reached."""
    if spec is None or kind == "Embedding" or spec.format == "fp32":
        return None
    if spec.dynamic or not spec.fmt.uses_range(spec.scaled):
        return InputQuantizer(name, spec)
    stats = (calibration or {}).get(name)
    if stats is None or stats.numel == 0:
        return None  # never reached by the calibration data: nothing to quantize it with
    lo, hi = stats.static_range(spec.fmt, spec)
    return InputQuantizer(name, spec, lo, hi)


@dataclass
class Simulation:
    """A fake-quantized copy of a model and what was done to it; ``weights``: layer -> the quantized weight
    applied (its codes and scales as nearest rounding or the recipe's rounding algorithm chose them)."""

    model: nn.Module
    recipe: Recipe
    folded: list[tuple[str, str]] = field(default_factory=list)
    weight_quantized: list[str] = field(default_factory=list)
    activation_quantized: list[str] = field(default_factory=list)
    weights: dict[str, QuantizedTensor] = field(default_factory=dict)
    bias_corrected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # transforms' skipped layers and why


def needs_calibration(recipe: Recipe, layer_names) -> bool:
    return any((p := recipe.plan(n).activations) is not None and not p.dynamic and p.fmt.uses_range(p.scaled)
               for n in layer_names)


def simulate(model: nn.Module, recipe: Recipe, calibration: dict[str, ActivationStats] | None = None,
             fold: bool = True, quantized_weights: dict[str, QuantizedTensor] | None = None,
             calibration_batches: list[tuple] | None = None,
             input_means: dict[str, torch.Tensor] | None = None) -> Simulation:
    """A fake-quantized copy of ``model`` under ``recipe`` (``model`` itself is only read: the
    copy is taken first, and its weights and input hooks are this simulation's own).

    ``calibration`` (from ``calibrate`` on the *folded* FP32 model) is required when any layer has
    static activation quantization. ``quantized_weights`` (layer -> ``QuantizedTensor``) lets a caller
    reuse weights it already quantized (a workload's cached GPTQ/AdaRound roundings); missing ones are
    computed, a GPTQ/AdaRound one from ``calibration_batches`` (model inputs), required then.
    ``input_means`` (layer -> mean input per channel, ``transforms.input_stats``) is needed by a recipe with
    bias correction, applied to each targeted layer right after its weight is quantized.
    """
    q = copy.deepcopy(model).eval()
    folded = fold_batchnorm(q) if fold else []
    layers = find_layers(q)
    plans = recipe.resolve({n: i.weight_shape for n, i in layers.items()})
    if calibration is None and needs_calibration(recipe, layers):
        raise QcoreError("this recipe has static activation quantization: calibration data is needed "
                         "(provide a data file, or use dynamic activations)")
    sim = Simulation(q, recipe, folded)
    given = dict(quantized_weights or {})
    from qcore.model.rounding import Rounder, rounding_specs

    kinds, modules = {n: i.kind for n, i in layers.items()}, modules_by_name(q, layers)
    rounded = {n: s for n, s in rounding_specs(recipe, plans, kinds, modules).items() if n not in given}
    if rounded:
        if calibration_batches is None:
            raise QcoreError(f"this recipe rounds layer {next(iter(rounded))!r} with {next(iter(rounded.values())).rounding}, "
                             "which learns from calibration data: provide a data file, or use rounding nearest")
        given.update(Rounder(q, kinds, lambda: calibration_batches).weights(rounded))
    corrected, sim.notes = bias_targets(recipe, kinds, modules, plans)
    clipped: dict[str, float] = {}  # layer -> share of its calibration input energy the entropy range clips
    if corrected and input_means is None:
        raise QcoreError("this recipe has bias_correction: the layers' mean inputs over calibration data are needed "
                         "(simulate it through its Workload, or remove bias_correction)")
    for name, module in modules.items():
        plan = plans[name]
        if plan.weights is not None and plan.weights.format != "fp32":
            qt = given.get(name)
            if qt is None:
                check_finite(module.weight, f"the weight of layer {name!r}")
                try:  # nearest (also where a default GPTQ/AdaRound rounding does not apply: an Embedding)
                    qt = quantize(module.weight, replace(plan.weights, rounding="nearest", gptq=None, adaround=None))
                except QcoreError as e:  # e.g. a range search too big for this layer: say which layer
                    raise QcoreError(f"layer {name!r}: {e}") from None
            with torch.no_grad():
                w = qt.dequantize().reshape(module.weight.shape)
                if name in corrected and name in (input_means or {}):
                    module.bias.copy_(corrected_bias(module.bias, module.weight, w, input_means[name],
                                                     getattr(module, "groups", 1)))
                    sim.bias_corrected.append(name)
                module.weight.copy_(w)
            sim.weights[name] = qt
            sim.weight_quantized.append(name)
        hook = input_quantizer(name, layers[name].kind, plan.activations, calibration)
        if hook is not None:
            module.register_forward_pre_hook(hook)
            sim.activation_quantized.append(name)
            if plan.activations.range == "entropy" and hook.lo is not None:
                clipped[name] = calibration[name].clipped_energy(float(hook.lo), float(hook.hi))
        block = int8_compute_block(layers[name].kind, plan.weights)
        if block is not None:  # weight-only int8 compute: the kernel's own input quantization, last
            module.register_forward_pre_hook(Int8ComputeInput(name, block))
        elif plan.weights is not None and plan.weights.compute == "int8" and layers[name].kind != "Embedding":
            sim.notes.append(f"{name}: computes in float (int8 compute needs a Linear with a group size of "
                             "16, 32, 64, 128 or 256)")
    note = entropy_clip_note(clipped)
    if note:
        sim.notes.append(note)
    return sim


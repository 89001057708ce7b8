"""An unflattened ``.pt2`` program given back the module types BatchNorm folding and layer discovery look for
(``aten.lstm`` / ``aten.gru`` leaves become the engine's unrolled cells, ``qcore.model.recurrent``)."""

from __future__ import annotations

import operator
from collections import OrderedDict

import torch
from torch import nn

from qcore.model.recurrent import UNROLLED


_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)  # aten.convNd(input, weight, bias, stride, padding, dilation, groups)


def _as_torch_module(leaf: nn.Module) -> nn.Module | None:
    """An unflattened leaf whose graph is one ``aten.conv1d/2d`` or inference ``aten.batch_norm`` call on
    its own parameters, rebuilt as the ``nn.Conv1d/2d`` / ``nn.BatchNorm1d/2d`` it was (same tensors)."""
    graph = getattr(leaf, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or next(leaf.children(), None) is not None:
        return None
    calls = [n for n in graph.nodes if n.op == "call_function"]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(calls) != 1 or len(placeholders) != 1 or output.args[0] is not calls[0] or calls[0].kwargs:
        return None
    call, target = calls[0], str(calls[0].target)

    def value(a):
        return getattr(leaf, a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a
    args = [value(a) for a in call.args]
    if args[0] is not placeholders[0] or not all(isinstance(a, (torch.Tensor, int, float, bool, list, tuple, type(None)))
                                                 for a in args[1:]):
        return None
    rank = {"aten.conv1d.default": 1, "aten.conv2d.default": 2}.get(target)
    if rank is not None:
        _, w, bias, stride, padding, dilation, groups = args + list(_CONV_DEFAULTS[len(args):])
        module = (nn.Conv1d if rank == 1 else nn.Conv2d)(
            w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias is not None)
        state = {"weight": w} if bias is None else {"weight": w, "bias": bias}
    elif target == "aten.batch_norm.default" and len(args) >= 8 and args[5] is False and all(
            isinstance(t, torch.Tensor) for t in args[1:5]):
        gamma, beta, mean, var = args[1:5]
        module = nn.BatchNorm2d(len(mean), eps=args[7], momentum=args[6])
        state = {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}
    else:
        return None
    module.load_state_dict(state, strict=False)
    return module.eval()


def _as_recurrent(leaf: nn.Module) -> nn.Module | None:
    """An unflattened leaf whose graph is one ``aten.lstm.input`` / ``aten.gru.input`` call on its own
    parameters from zero initial states (``aten.zeros``, sized by the batch symbols the leaf may take after
    its input), returning items of its result: rebuilt as the ``nn.LSTM`` / ``nn.GRU`` it was (same
    tensors), unrolled, returning the same items."""
    graph = getattr(leaf, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or next(leaf.children(), None) is not None:
        return None
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    rnns = [n for n in nodes if str(n.target) in ("aten.lstm.input", "aten.gru.input")]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(rnns) != 1 or not placeholders or rnns[0].kwargs:
        return None
    call = rnns[0]
    if len(call.args) != 9 or call.args[0] is not placeholders[0]:
        return None
    x, hx, params, has_biases, num_layers, _dropout, _train, bidirectional, batch_first = call.args
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    if not all(isinstance(h, torch.fx.Node) and str(h.target) == "aten.zeros.default" for h in hx):
        return None
    if any(user not in hx for size in placeholders[1:] for user in size.users):  # sizes only size the states
        return None
    if not all(isinstance(p, torch.fx.Node) and p.op == "get_attr" for p in params):
        return None
    getitems = [n for n in nodes if n not in rnns and n not in hx]
    if not all(n.target is operator.getitem and n.args[0] is call for n in getitems):
        return None
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    items = [out] if isinstance(out, torch.fx.Node) else list(out)
    if not all(n in getitems for n in items):
        return None
    outputs = items[0].args[1] if isinstance(out, torch.fx.Node) else tuple(n.args[1] for n in items)
    lstm = str(call.target) == "aten.lstm.input"
    tensors = {p.target: getattr(leaf, p.target) for p in params}
    w_ih = tensors["weight_ih_l0"]
    cls = nn.LSTM if lstm else nn.GRU
    rnn = cls(w_ih.shape[1], w_ih.shape[0] // (4 if lstm else 3), num_layers=num_layers, bias=has_biases,
              batch_first=batch_first, bidirectional=bidirectional)
    if set(tensors) != {n for n, _ in rnn.named_parameters()}:
        return None
    rnn.load_state_dict(tensors)
    return UNROLLED[cls](rnn.eval(), outputs)


def _is_chain(module: nn.Module) -> bool:
    """True if ``module``'s graph calls its children once each, in order, each on the previous output."""
    graph, names = getattr(module, "graph", None), list(module._modules)
    if not isinstance(graph, torch.fx.Graph) or not names:
        return False
    nodes = list(graph.nodes)
    if [n.op for n in nodes] != ["placeholder"] + ["call_module"] * len(names) + ["output"]:
        return False
    calls = nodes[1:-1]
    return ([n.target for n in calls] == names and all(n.args == (prev,) and not n.kwargs for prev, n in zip(nodes, calls))
            and nodes[-1].args[0] is calls[-1])


def restore_module_types(root: nn.Module) -> None:
    """Give an unflattened program back the module types BatchNorm folding looks for: Conv and BatchNorm
    leaves become ``nn.Conv*d`` / ``nn.BatchNorm2d``, and a container that just chains its children becomes
    an ``nn.Sequential`` -- so a ``.pt2`` CNN is folded exactly like the source model."""
    deepest_first = sorted(root.named_modules(), key=lambda item: -len(item[0].split(".")) if item[0] else 0)
    for _, parent in deepest_first:
        for name, child in list(parent.named_children()):
            restored = _as_torch_module(child)
            restored = _as_recurrent(child) if restored is None else restored
            if restored is None and _is_chain(child) and child is not root:
                restored = nn.Sequential(OrderedDict(child._modules))
            if restored is not None:
                setattr(parent, name, restored)

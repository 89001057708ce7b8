"""torch.export programs (``.pt2``) -> an ``nn.Module`` whose layers keep the source module paths.

``torch.export.load`` can unpickle objects and evaluate strings (symbolic shape expressions), so an
untrusted archive is screened first (``screen``): it is refused if it holds pickled payloads, compiled
AOTInductor binaries, guard code, or calls anything but ATen/prims ops and plain arithmetic.

``torch.export.unflatten`` rebuilds the module tree (``features.0``, ``classifier.1``) with graph-carrying
leaves. ``load`` then gives Conv and BatchNorm leaves back their ``nn`` types and chains back their
``nn.Sequential`` type, so BatchNorm folding and layer discovery treat the program like the source model.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import QcoreError
from .limits import reading
from .models import InputSpec, LoadedModel

_SAFE_TARGET = re.compile(r"^(torch\.ops\.(aten|prims|higher_order)\.\w+(\.\w+)?|torch\.sym_\w+|"
                          r"math\.(ceil|floor|trunc|sqrt|pow|exp|log|isnan|isinf))$")
_SAFE_OPERATOR = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt",
                  "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "getitem", "lshift", "rshift"}
_SYMPY_NAMES = {"Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "Eq", "Ne",
                "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality",
                "Unequality", "And", "Or", "Not", "true", "false", "oo", "FloorDiv", "ModularIndexing", "Where",
                "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
                "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt", "TruncToFloat", "Identity", "RoundToInt"}
_SYMPY_KEYWORDS = {"positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite", "nonzero",
                   "zero", "even", "odd", "commutative"}
_SAFE_AST = (ast.Expression, ast.Load, ast.UnaryOp, ast.BinOp, ast.USub, ast.UAdd, ast.Add, ast.Sub, ast.Mult,
             ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


def _safe_expr(text: str) -> bool:
    """True if a symbolic-shape expression (which torch.export.load hands to sympy, i.e. to eval) is
    only sympy constructors of numbers and symbols, e.g. "Mul(Integer(2), Symbol('s0', positive=True))"."""
    if len(text) > 10_000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            ok = node.id in _SYMPY_NAMES or re.fullmatch(r"[a-z]+\d+", node.id) is not None
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name)
        elif isinstance(node, ast.keyword):
            ok = node.arg in _SYMPY_KEYWORDS
        elif isinstance(node, ast.Constant):
            v = node.value
            ok = isinstance(v, (bool, int, float)) or (isinstance(v, str) and re.fullmatch(r"[A-Za-z]\w*", v) is not None)
        else:
            ok = isinstance(node, _SAFE_AST)
        if not ok:
            return False
    return True


def screen(p: Path) -> None:
    """Refuse a .pt2 archive holding anything torch.export.load would unpickle or execute."""
    def refuse(what):
        raise QcoreError(f"{p.name} {what}, which the engine does not load from an untrusted file; save a plain "
                         "program (torch.export.save of torch.export.export(model, ...)), or use --trust-pickle "
                         "(QCORE_TRUST_PICKLE=1) for a file you trust")

    with zipfile.ZipFile(p) as zf:
        names = zf.namelist()
        formats = [n for n in names if n.endswith("archive_format")]
        if not formats or zf.read(formats[0]).strip() != b"pt2":
            raise QcoreError(f"{p.name} is not a torch.export archive (no pt2 archive_format entry); "
                             "save the program with torch.export.save(ep, 'model.pt2')")
        root = formats[0][:-len("archive_format")]
        rel = [n[len(root):] for n in names if n.startswith(root)]
        if any(r.startswith("data/aotinductor/") or r.endswith((".so", ".dll", ".dylib")) for r in rel):
            refuse("contains compiled AOTInductor code")
        if "models/model.json" not in rel:
            raise QcoreError(f"{p.name} has no program named 'model'; save it with torch.export.save(ep, path)")
        for r in rel:
            if r.endswith("_config.json") and r.startswith(("data/weights/", "data/constants/")):
                for fqn, meta in json.loads(zf.read(root + r)).get("config", {}).items():
                    if meta.get("use_pickle") or (r.startswith("data/constants/")
                                                  and not str(meta.get("path_name", "")).startswith("tensor_")):
                        refuse(f"stores {fqn!r} as a pickled object")
            elif r.startswith(("data/weights/", "data/constants/")) and r.endswith(".pt"):
                refuse("stores its weights in the legacy pickled format")
        sample = f"{root}data/sample_inputs/model.pt"
        if sample in names:
            try:
                torch.load(io.BytesIO(zf.read(sample)), weights_only=True)
            except Exception:
                refuse("has example inputs that only load as a pickle")
        program = json.loads(zf.read(root + "models/model.json"))
    if program.get("guards_code"):
        refuse("contains guard code")
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            target = item.get("target")
            if isinstance(target, str) and "inputs" in item and "outputs" in item:
                op = target.split(".", 1)[1] if target.startswith("_operator.") else None
                if "__" in target or not (_SAFE_TARGET.match(target) or op in _SAFE_OPERATOR):
                    refuse(f"calls {target!r}")
            if isinstance(item.get("expr_str"), str) and not _safe_expr(item["expr_str"]):
                refuse(f"has a symbolic shape expression that is not plain arithmetic ({item['expr_str'][:60]!r})")
            if item.get("custom_obj_values"):
                refuse("contains custom (script) objects")
            stack.extend(item.values())


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


def _restore_module_types(root: nn.Module) -> None:
    """Give an unflattened program back the module types BatchNorm folding looks for: Conv and BatchNorm
    leaves become ``nn.Conv*d`` / ``nn.BatchNorm2d``, and a container that just chains its children becomes
    an ``nn.Sequential`` -- so a ``.pt2`` CNN is folded exactly like the source model."""
    deepest_first = sorted(root.named_modules(), key=lambda item: -len(item[0].split(".")) if item[0] else 0)
    for _, parent in deepest_first:
        for name, child in list(parent.named_children()):
            restored = _as_torch_module(child)
            if restored is None and _is_chain(child) and child is not root:
                restored = nn.Sequential(OrderedDict(child._modules))
            if restored is not None:
                setattr(parent, name, restored)


def load(p: Path, allow_pickle: bool) -> tuple[torch.export.ExportedProgram, nn.Module]:
    """(program, module): the screened, loaded program and its unflattened module tree with restored types.

    The module's graphs lose their traced fake tensors (symbolic batch sizes cannot be deep-copied);
    the program keeps them (input shapes and dtypes)."""
    if not allow_pickle:
        screen(p)
    ep = torch.export.load(str(p))
    module = torch.export.unflatten(ep)
    module.check_input_constraints = False  # the loader probes batch sizes and checks data shapes itself
    _restore_module_types(module)
    for sub in module.modules():
        if isinstance(getattr(sub, "graph", None), torch.fx.Graph):
            for node in sub.graph.nodes:
                node.meta = {k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta}
    return ep, module.eval()


def load_pt2_file(p: Path, allow_pickle: bool) -> LoadedModel:
    with reading(p.name, "the file is truncated or corrupted, or was saved by an incompatible torch version; "
                          "save it again with torch.export.save"):
        ep, module = load(p, allow_pickle)
    args, kwargs = ep.example_inputs if ep.example_inputs else ((), {})
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    fakes = [placeholders[name].meta.get("val") for name in ep.graph_signature.user_inputs]
    if kwargs or not fakes or not all(isinstance(f, torch.Tensor) for f in fakes):
        raise QcoreError(f"{p.name}: the program must take tensors as positional inputs; export it with "
                         "torch.export.export(model, (x,)) (no keyword or non-tensor inputs)")
    specs, batch = [], 1
    for i, fake in enumerate(fakes):
        example = args[i] if i < len(args) and isinstance(args[i], torch.Tensor) else None
        dims = [d if isinstance(d, int) else None for d in fake.shape]
        if not dims:
            raise QcoreError(f"{p.name}: input {i} is a scalar; the engine needs a batch dimension first")
        shape = tuple(example.shape[1:]) if example is not None else tuple(d or 1 for d in dims[1:])
        dynamic = frozenset(j for j, d in enumerate(dims[1:]) if d is None)
        int_range = (int(example.min()), int(example.max())) if example is not None and example.numel() \
            and not torch.is_floating_point(example) else (0, 1)
        specs.append(InputSpec(shape, dynamic, fake.dtype, int_range))
        batch = dims[0] if i == 0 and dims[0] else batch
    return LoadedModel(module, "torch.export", specs, batch)


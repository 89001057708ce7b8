"""torch.export programs (``.pt2``) -> an ``nn.Module`` whose layers keep the source module paths.

``torch.export.load`` trusts its archive: it deserializes *every* program in it, loads pickled weights,
constants and sample inputs with ``torch.load(weights_only=False)``, hands symbolic shape expressions to
``sympy.sympify`` (i.e. ``eval``) and resolves any ``torch.*`` name as an operator. So an untrusted archive
never reaches it. ``sanitized_copy`` reads every member itself and writes a new archive holding only what
a plain program needs -- one program (``models/model.json``), its weights and constants as raw tensor
bytes, no sample inputs, no guard code, no extra members -- after checking that:

- the archive holds exactly one program and no pickles, compiled code (AOTInductor) or custom objects;
- every JSON member is below ``MAX_JSON_BYTES`` and ``MAX_JSON_DEPTH`` levels, its integers within int64;
- every raw tensor's dtype, layout, device and (size, stride, offset) fit the bytes of its record;
- every graph node calls a pure tensor operator (``_ATEN_OPS``, ``_PRIMS_OPS``) whose schema writes no
  argument (no ``out=``, no in-place), or plain arithmetic on sizes (``_operator``, ``math``, ``torch.sym_*``),
  or one of the two wrappers export emits around ``no_grad``/``autocast`` blocks;
- literal sizes in the graph allocate at most ``MAX_LITERAL_ELEMENTS`` elements;
- every symbolic expression is one of the sympy constructors torch writes, with literals of at most
  62 bits, small literal exponents and constant parts below ``MAX_EXPR_BITS`` bits (``_check_expr``).

Sample inputs are ignored: input shapes and dtypes come from the graph's placeholders (``load_pt2_file``).

``torch.export.unflatten`` rebuilds the module tree (``features.0``, ``classifier.1``) with graph-carrying
leaves. ``load`` then gives Conv and BatchNorm leaves back their ``nn`` types and chains back their
``nn.Sequential`` type, so BatchNorm folding and layer discovery treat the program like the source model.
"""

from __future__ import annotations

import ast
import json
import math
import re
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.limits import reading
from qcore.io.models import InputSpec, LoadedModel

MAX_JSON_BYTES = 64 * 2**20  # model.json of a 6-layer transformer is 0.5 MiB
MAX_JSON_DEPTH = 64  # nesting levels; a plain program has ~10, each no_grad/autocast block adds ~8
MAX_LITERAL_ELEMENTS = 2**28  # elements a literal size in the graph may allocate (1 GiB of float32)
MAX_SAMPLE_ELEMENTS = 2**24  # elements of one declared input sample (e.g. 3x2048x2048)
MAX_EXPR_CHARS, MAX_EXPR_DEPTH, MAX_EXPR_BITS = 10_000, 32, 4096
_INT64 = 2**63

# Pure tensor operators, by ATen name (any overload whose schema writes no argument).
_ATEN_OPS = frozenset("""
    conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d
    linear addmm mm bmm matmul baddbmm addmv mv dot einsum outer t numpy_T
    add sub rsub mul div true_divide floor_divide remainder fmod neg abs sign reciprocal pow sqrt rsqrt square
    exp exp2 expm1 log log2 log10 log1p sin cos tan asin acos atan atan2 sinh cosh erf erfc erfinv
    floor ceil round trunc frac clamp clamp_min clamp_max clip minimum maximum fmin fmax lerp addcmul addcdiv
    eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_xor
    bitwise_not __and__ __or__ __xor__ isnan isinf isfinite nan_to_num where masked_fill
    relu relu6 gelu silu sigmoid tanh hardsigmoid hardswish hardtanh leaky_relu elu selu celu mish softplus
    prelu _prelu_kernel glu threshold log_sigmoid_forward
    softmax _softmax log_softmax _log_softmax logsumexp dropout feature_dropout alpha_dropout
    batch_norm _native_batch_norm_legit_no_training layer_norm native_layer_norm group_norm native_group_norm
    instance_norm rms_norm
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d adaptive_max_pool1d
    adaptive_max_pool2d upsample_nearest1d upsample_nearest2d upsample_linear1d upsample_bilinear2d
    upsample_bicubic2d pixel_shuffle pixel_unshuffle
    mean sum prod amax amin max min argmax argmin var std var_mean std_mean norm linalg_vector_norm
    cumsum cumprod any all topk sort argsort
    view reshape _unsafe_view flatten unflatten permute transpose movedim contiguous clone alias detach
    lift_fresh_copy expand expand_as squeeze unsqueeze cat concat stack split split_with_sizes chunk unbind
    slice select narrow index index_select gather embedding repeat tile flip roll tril triu
    constant_pad_nd pad reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d
    arange full full_like zeros zeros_like ones ones_like new_zeros new_ones new_full scalar_tensor
    to _to_copy type_as copy scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
    sym_size sym_numel sym_stride sym_storage_offset _assert_scalar _assert_tensor_metadata
    sym_constrain_range sym_constrain_range_for_size
""".split())
_PRIMS_OPS = frozenset("convert_element_type broadcast_in_dim squeeze view_of iota".split())
# torch.export writes ``lift_fresh_copy`` + ``detach_`` for a tensor literal: detach_ only drops autograd state.
_INPLACE_EXCEPTIONS = frozenset({"aten.detach_"})
_DENIED = re.compile(r"file|save|load|storage|set_|print|pin_memory|share_memory")  # never, whatever the list says
_HIGHER_ORDER_OPS = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast"})  # no_grad/autocast blocks
_OPERATOR_FUNCS = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq",
                             "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "getitem",
                             "lshift", "rshift"})
_MATH_FUNCS = frozenset({"ceil", "floor", "trunc", "sqrt", "pow", "exp", "log", "isnan", "isinf"})
_SYM_FUNCS = frozenset({"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"})
_POWERS = frozenset({"_operator.pow", "_operator.lshift", "math.pow"})  # need a small literal second argument

# The sympy constructors torch's serializer writes (sympy.srepr) and torch.utils._sympy.functions.
# torch._export.serde.schema.ScalarType codes of the real-number dtypes (layout 7 is strided).
_DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
           7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}
_STRIDED = 7

_EXPR_CALLS = frozenset("""
    Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs Equality Unequality StrictLessThan LessThan
    StrictGreaterThan GreaterThan And Or Not FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt
    FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv TruncToFloat TruncToInt
    RoundToInt RoundDecimal ToFloat Identity
""".split())
_EXPR_NAMES = frozenset({"true", "false", "oo"})
_EXPR_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")  # s0, s77, u3, ...
_SYMBOL_BITS = 62  # a symbol (a size) is counted as a 62-bit number


class _Refused(Exception):
    """Why an archive is refused (completed into one QcoreError line by ``sanitized_copy``)."""


def _int_literal(node: ast.AST) -> int | None:
    """n for ``n``, ``-n``, ``Integer(n)`` or ``Integer(-n)``; else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" \
            and len(node.args) == 1 and not node.keywords:
        node = node.args[0]
    sign = -1 if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) else 1
    node = node.operand if sign == -1 else node
    return sign * node.value if isinstance(node, ast.Constant) and type(node.value) is int else None


def _expr_bits(node: ast.AST, depth: int = 0) -> int:
    """An upper bound on log2 |value| of a parsed symbolic expression; _Refused if it is not one."""
    if depth > MAX_EXPR_DEPTH:
        raise _Refused("nested too deeply")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value.bit_length() > _SYMBOL_BITS:
            raise _Refused(f"has an integer literal above 2**{_SYMBOL_BITS}")
        return node.value.bit_length()
    if isinstance(node, ast.Name) and node.id in _EXPR_NAMES:
        return 1
    if isinstance(node, ast.Name) and _SYMBOL_NAME.fullmatch(node.id):
        return _SYMBOL_BITS
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _EXPR_CALLS):
        raise _Refused(f"uses {ast.unparse(node)[:40]!r}, which is not a sympy constructor torch writes")
    f, args = node.func.id, node.args
    if any(not (isinstance(k.value, ast.Constant) and (type(k.value.value) is bool or
                                                     (k.arg == "precision" and type(k.value.value) is int
                                                      and 0 < k.value.value <= 113)))
           for k in node.keywords):
        raise _Refused(f"passes a keyword to {f} that is not a flag")
    if f == "Symbol":
        if len(args) != 1 or not (isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
                                  and _SYMBOL_NAME.fullmatch(args[0].value)):
            raise _Refused("names a symbol unlike s0")
        return _SYMBOL_BITS
    if f == "Float":
        text = args[0].value if len(args) == 1 and isinstance(args[0], ast.Constant) else None
        if not (isinstance(text, str) and re.fullmatch(r"-?\d+(\.\d*)?(e[-+]?\d+)?", text)
                and math.isfinite(float(text)) and abs(float(text)) < 2.0**_SYMBOL_BITS):
            raise _Refused("has a float literal that is not a plain number below 2**62")
        return _SYMBOL_BITS
    if f in ("Integer", "Rational") and not all(isinstance(a, (ast.Constant, ast.UnaryOp)) for a in args):
        raise _Refused(f"builds an {f} from an expression")
    bits = [_expr_bits(a, depth + 1) for a in args]
    if f in _EXPR_POWERS or f == "LShift":
        exponent = _int_literal(args[1]) if len(args) == 2 else None
        if exponent is None or abs(exponent) > (64 if f == "LShift" else 16):
            raise _Refused(f"raises to a power that is not a small integer literal ({f})")
        total = bits[0] + exponent if f == "LShift" else bits[0] * max(abs(exponent), 1)
    elif f == "Mul":
        total = sum(bits)
    else:
        total = max(bits, default=1) + len(bits).bit_length()
    if total > MAX_EXPR_BITS:
        raise _Refused(f"evaluates to a number above 2**{MAX_EXPR_BITS}")
    return total


def _check_expr(text) -> None:
    """Refuse a symbolic shape expression (which torch hands to sympy.sympify, i.e. eval) unless it is
    built of the constructors torch writes, e.g. "Mul(Integer(2), Symbol('s0', positive=True))"."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        raise _Refused("has a symbolic shape expression that is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Refused(f"has a symbolic shape expression that does not parse ({text[:60]!r})") from None
    try:
        _expr_bits(tree.body)
    except _Refused as e:
        raise _Refused(f"has a symbolic shape expression that is not plain arithmetic: it {e} ({text[:60]!r})") \
            from None


def _json(zf: zipfile.ZipFile, name: str):
    """A JSON member parsed with bounded size, nesting depth and integers."""
    if zf.getinfo(name).file_size > MAX_JSON_BYTES:
        raise _Refused(f"has a {name.split('/')[-1]} above {MAX_JSON_BYTES // 2**20} MiB")
    return _parse_json(zf.read(name), name.split("/")[-1])


def _parse_json(raw: bytes | str, what: str):
    raw = raw.encode() if isinstance(raw, str) else raw
    if len(raw) > MAX_JSON_BYTES:
        raise _Refused(f"has a {what} above {MAX_JSON_BYTES // 2**20} MiB")
    brackets = np.frombuffer(re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b"", raw), np.uint8)
    depth = np.cumsum(np.isin(brackets, (91, 123)).astype(np.int32) - np.isin(brackets, (93, 125)))
    if depth.size and depth.max() > MAX_JSON_DEPTH:
        raise _Refused(f"has a {what} nested more than {MAX_JSON_DEPTH} levels deep")

    def bounded_int(digits: str) -> int:
        if len(digits) > 20 or not -_INT64 <= int(digits) < _INT64:
            raise _Refused(f"has an integer in {what} outside int64 ({digits[:30]}...)")
        return int(digits)
    try:
        return json.loads(raw, parse_int=bounded_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise _Refused(f"has a {what} that is not valid JSON ({str(e).splitlines()[0][:80]})") from None


def _check_target(target) -> None:
    """Refuse a node target unless it is a pure operator (see the module docstring)."""
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", target):
        raise _Refused(f"calls {str(target)[:80]!r}")
    parts = target.split(".")
    if target.startswith("torch.ops.") and len(parts) == 5 and parts[2] in ("aten", "prims"):
        ns, name, overload = parts[2:]
        allowed = _ATEN_OPS if ns == "aten" else _PRIMS_OPS
        if _DENIED.search(name) or (name not in allowed and f"{ns}.{name}" not in _INPLACE_EXCEPTIONS):
            raise _Refused(f"calls {target!r}, which is not on the engine's list of pure tensor operators")
        try:
            schema = getattr(getattr(getattr(torch.ops, ns), name), overload)._schema
        except (AttributeError, RuntimeError):
            raise _Refused(f"calls {target!r}, an operator this torch version does not have") from None
        writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if (writes or overload == "out" or overload.endswith("_out")) and f"{ns}.{name}" not in _INPLACE_EXCEPTIONS:
            raise _Refused(f"calls {target!r}, which writes into its argument {(writes or ['out'])[0]!r} "
                           "(in-place or out=)")
        return
    ok = ((target.startswith("torch.ops.higher_order.") and len(parts) == 4 and parts[3] in _HIGHER_ORDER_OPS)
          or (parts[0] == "_operator" and len(parts) == 2 and parts[1] in _OPERATOR_FUNCS)
          or (parts[0] == "math" and len(parts) == 2 and parts[1] in _MATH_FUNCS)
          or (parts[0] == "torch" and len(parts) == 2 and parts[1] in _SYM_FUNCS))
    if not ok:
        raise _Refused(f"calls {target!r}, which is not on the engine's list of pure tensor operators")


def _literal_ints(arg: dict) -> list[int]:
    """The literal integers of an argument: ``as_int``, ``as_sym_int``, ``as_ints`` or ``as_sym_ints``."""
    values = arg.get("as_ints", arg.get("as_sym_ints", [arg]))
    values = [v.get("as_int", v.get("as_sym_int")) if isinstance(v, dict) else v for v in
              (values if isinstance(values, list) else [])]
    values = [v.get("as_int") if isinstance(v, dict) else v for v in values]
    return [v for v in values if type(v) is int]


def _product_above(values, limit: float) -> bool:
    total = 1
    for v in values:
        total *= max(abs(v), 1)
        if total > limit:
            return True
    return False


def _check_node(node: dict) -> None:
    """The node's target, and the work its literal arguments ask for."""
    target, inputs = node["target"], node.get("inputs")
    _check_target(target)
    args = [(i.get("name"), i["arg"]) for i in (inputs if isinstance(inputs, list) else [])
            if isinstance(i, dict) and isinstance(i.get("arg"), dict)]
    for name, arg in args:
        if "as_ints" in arg or "as_sym_ints" in arg:
            if _product_above(_literal_ints(arg), MAX_LITERAL_ELEMENTS):
                raise _Refused(f"asks {target!r} for a size of more than {MAX_LITERAL_ELEMENTS:,} elements ({name})")
        factors = arg.get("as_floats")
        if name == "scale_factors" and isinstance(factors, list) and _product_above(map(float, factors), 1024):
            raise _Refused(f"asks {target!r} to upsample by more than 1024x")
    if target.startswith("torch.ops.aten.arange."):
        ends = [v for _, arg in args for v in (_literal_ints(arg) + [arg.get("as_float")])
                if isinstance(v, (int, float))]
        if any(abs(v) > MAX_LITERAL_ELEMENTS for v in ends):
            raise _Refused(f"asks {target!r} for more than {MAX_LITERAL_ELEMENTS:,} elements")
    if target in _POWERS:
        exponent = _literal_ints(args[1][1]) if len(args) == 2 else []
        if len(exponent) != 1 or abs(exponent[0]) > 64:
            raise _Refused(f"calls {target!r} with an exponent that is not a small integer literal")


def _check_program(program: dict) -> dict:
    """The program (models/model.json) checked node by node, without guard code or metadata
    torch would parse (JSON strings, operator names) beyond the stack trace and module paths."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _Refused("has a program without a graph")
    program["guards_code"] = []  # never run: the loader checks input shapes itself
    program["graph_module"]["metadata"] = {}
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))  # first node first: the refusal names the first offender
            continue
        if not isinstance(item, dict):
            continue
        if "target" in item:  # a graph node (the only schema type with a target)
            _check_node(item)
            meta = item.get("metadata")
            item["metadata"] = {k: v for k, v in (meta if isinstance(meta, dict) else {}).items()
                                if k in ("stack_trace", "nn_module_stack") and isinstance(v, str)}
        if "as_operator" in item:
            _check_target(item["as_operator"])
        if item.get("as_custom_obj") is not None or item.get("custom_obj_values"):
            raise _Refused("contains custom (script) objects")
        if "expr_str" in item:
            _check_expr(item["expr_str"])
        for key in ("in_spec", "out_spec"):
            if isinstance(item.get(key), str):
                _parse_json(item[key], key)
        stack.extend(reversed(item.values()))
    return program


def _check_payloads(zf: zipfile.ZipFile, root: str, kind: str) -> tuple[dict, list[str]]:
    """(config, records) of data/{kind}/model_{kind}_config.json: every entry a raw tensor whose
    (sizes, strides, offset) fit its record; ``records`` are the archive members it reads."""
    name = f"{root}data/{kind}/model_{kind}_config.json"
    if name not in zf.namelist():
        raise _Refused(f"has no {kind} table (data/{kind}/model_{kind}_config.json)")
    config = _json(zf, name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _Refused(f"has a {kind} table without entries")
    prefix = "weight_" if kind == "weights" else "tensor_"
    sizes_of = {i.filename: i.file_size for i in zf.infolist()}  # inflated bytes, checked by zip_members
    records = set()
    for fqn, meta in entries.items():
        path = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False or not isinstance(path, str) \
                or not re.fullmatch(prefix + r"\d+", path):
            raise _Refused(f"stores {fqn!r} as a pickled object")
        t = meta["tensor_meta"] if isinstance(meta.get("tensor_meta"), dict) else {}
        device = t["device"] if isinstance(t.get("device"), dict) else {}
        dims = [t.get("sizes"), t.get("strides"), [t.get("storage_offset")]]
        dims = [[d.get("as_int") if isinstance(d, dict) else None for d in (ds if isinstance(ds, list) else [None])]
                for ds in dims]
        dtype = _DTYPES.get(t.get("dtype"))
        if dtype is None or t.get("layout") != _STRIDED or device.get("type") != "cpu" or \
                len(dims[0]) != len(dims[1]) or not all(isinstance(v, int) and 0 <= v < _INT64 for d in dims for v in d):
            raise _Refused(f"stores {fqn!r} as something other than a plain CPU tensor with fixed sizes")
        (sizes, strides, (offset,)) = dims
        if _product_above(sizes, MAX_LITERAL_ELEMENTS):
            raise _Refused(f"declares {fqn!r} with more than {MAX_LITERAL_ELEMENTS:,} elements")
        record = f"{root}data/{kind}/{path}"
        nbytes = sizes_of.get(record, -1)
        needed = 0 if 0 in sizes else (offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1) * dtype.itemsize
        if nbytes < needed or nbytes % dtype.itemsize:
            raise _Refused(f"stores {fqn!r} in {max(nbytes, 0)} bytes, fewer than its sizes need ({needed})")
        records.add(record)
    return config, sorted(records)


def sanitized_copy(p: Path, folder: Path) -> Path:
    """``folder``/model.pt2: the parts of archive ``p`` a plain program needs, each checked (module
    docstring); QcoreError (one line) if anything in ``p`` would be unpickled, executed or unbounded."""
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            formats = [n for n in names if n.endswith("archive_format") and n.count("/") == 1]
            if len(formats) != 1 or zf.read(formats[0]).strip() != b"pt2":
                raise QcoreError(f"{p.name} is not a torch.export archive (no pt2 archive_format entry); "
                                 "save the program with torch.export.save(ep, 'model.pt2')")
            root = formats[0][:-len("archive_format")]
            rel = [n[len(root):] for n in names if n.startswith(root)]
            if any(r.startswith(("data/aotinductor/", "data/executorch/", "data/mtia"))
                   or r.endswith((".so", ".dll", ".dylib")) for r in rel):
                raise _Refused("contains compiled code (AOTInductor)")
            programs = [r for r in rel if r.startswith("models/") and not r.endswith("/")]
            if not programs:
                raise QcoreError(f"{p.name} has no program named 'model'; save it with torch.export.save(ep, path)")
            if programs != ["models/model.json"]:
                raise _Refused(f"holds {len(programs)} programs ({', '.join(programs)[:80]}), not one named 'model'")
            if any(r.startswith(("data/weights/", "data/constants/")) and r.endswith((".pt", ".pkl")) for r in rel):
                raise _Refused("stores its weights in the legacy pickled format")
            if (root + "archive_version") in names and zf.read(root + "archive_version").strip() != b"0":
                raise _Refused("has an archive version this torch does not read")
            program = _check_program(_json(zf, root + "models/model.json"))
            (weights, weight_records), (constants, constant_records) = (_check_payloads(zf, root, k)
                                                                         for k in ("weights", "constants"))
            from torch.export.pt2_archive._package import PT2ArchiveWriter

            out = folder / "model.pt2"
            with PT2ArchiveWriter(str(out)) as writer:
                writer.write_string("models/model.json", json.dumps(program))
                writer.write_string("data/weights/model_weights_config.json", json.dumps(weights))
                writer.write_string("data/constants/model_constants_config.json", json.dumps(constants))
                for record in weight_records + constant_records:
                    writer.write_bytes(record[len(root):], zf.read(record))
                writer.write_bytes("data/sample_inputs/model.pt", b"")  # empty: no example inputs
            return out
    except _Refused as e:
        raise QcoreError(f"{p.name} {e}, so it is refused (nothing in an untrusted .pt2 may run); save a plain "
                         "program with torch.export.save(torch.export.export(model, (x,)), path), or, for a file you "
                         "trust, use the CLI with --trust-pickle (QCORE_TRUST_PICKLE=1)") from None


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
    """(program, module): the loaded program and its unflattened module tree with restored types.
    Untrusted (``allow_pickle=False``): torch only sees ``sanitized_copy(p)``; trusted: ``p`` itself.

    The module's graphs lose their traced fake tensors (symbolic batch sizes cannot be deep-copied);
    the program keeps them (input shapes and dtypes)."""
    with tempfile.TemporaryDirectory(prefix="qcore-pt2-") as folder:
        source = p if allow_pickle else sanitized_copy(p, Path(folder))
        from torch.export.pt2_archive._package import load_pt2  # torch.export.load minus its legacy retry

        programs = load_pt2(str(source)).exported_programs
        if "model" not in programs:
            raise QcoreError(f"{p.name} has no program named 'model'; save it with torch.export.save(ep, path)")
        ep = programs["model"]
    module = torch.export.unflatten(ep)
    module.check_input_constraints = False  # the loader probes batch sizes and checks data shapes itself
    _restore_module_types(module)
    for sub in module.modules():
        if isinstance(getattr(sub, "graph", None), torch.fx.Graph):
            for node in sub.graph.nodes:
                node.meta = {k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta}
    return ep, module.eval()


def _hint(d) -> int | None:
    """A dimension's size: itself if static, the traced example size if symbolic (None if unknown)."""
    if isinstance(d, int):
        return d
    hint = d.node.hint if isinstance(d, torch.SymInt) else None
    return int(hint) if isinstance(hint, int) else None


def _int_range(ep: torch.export.ExportedProgram, placeholder: torch.fx.Node) -> tuple[int, int]:
    """Synthetic values for an integer input: valid row indices of the Embedding table it indexes
    (token ids below the vocabulary size), else 0..1 (masks, flags)."""
    for user in placeholder.users:
        if user.target is torch.ops.aten.embedding.default and user.args[1] is placeholder:
            table = user.args[0].meta.get("val")
            if isinstance(table, torch.Tensor) and isinstance(table.shape[0], int) and table.shape[0] > 0:
                return 0, table.shape[0] - 1
    return 0, 1


def load_pt2_file(p: Path, allow_pickle: bool) -> LoadedModel:
    """A ``.pt2`` file -> ``LoadedModel``; input specs from the graph's placeholders (sample inputs are
    never read): per-sample shape with symbolic sizes at their traced example value, dtype, int range."""
    with reading(p.name, "the file is truncated or corrupted, or was saved by an incompatible torch version; "
                          "save it again with torch.export.save"):
        ep, module = load(p, allow_pickle)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = [placeholders[name] for name in ep.graph_signature.user_inputs]
    fakes = [n.meta.get("val") for n in user]
    in_spec = ep.call_spec.in_spec  # (args, kwargs)
    keywords = in_spec is not None and in_spec.num_children == 2 and in_spec.child(1).num_children > 0
    if keywords or not fakes or not all(isinstance(f, torch.Tensor) for f in fakes):
        raise QcoreError(f"{p.name}: the program must take tensors as positional inputs; export it with "
                         "torch.export.export(model, (x,)) (no keyword or non-tensor inputs)")
    specs, batch = [], 1
    for i, (node, fake) in enumerate(zip(user, fakes)):
        dims = [_hint(d) for d in fake.shape]
        if not dims:
            raise QcoreError(f"{p.name}: input {i} is a scalar; the engine needs a batch dimension first")
        shape = tuple(d or 1 for d in dims[1:])
        if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise QcoreError(f"{p.name}: input {i} declares {math.prod(shape):,} elements per sample {shape}, above "
                             f"the limit of {MAX_SAMPLE_ELEMENTS:,}; export the model with a smaller example input")
        dynamic = frozenset(j for j, d in enumerate(fake.shape[1:]) if not isinstance(d, int))
        int_range = (0, 1) if torch.is_floating_point(fake) else _int_range(ep, node)
        specs.append(InputSpec(shape, dynamic, fake.dtype, int_range))
        if i == 0 and isinstance(fake.shape[0], int):
            batch = fake.shape[0]
    return LoadedModel(module, "torch.export", specs, batch)

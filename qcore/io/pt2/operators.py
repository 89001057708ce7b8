"""What a node of an untrusted ``.pt2`` graph may call, and the work its literal arguments may ask for.

A node calls a pure tensor operator (``ATEN_OPS``, ``PRIMS_OPS``) whose schema writes no argument (no
``out=``, no in-place), or plain arithmetic on sizes (``_operator``, ``math``, ``torch.sym_*``), or one of
the two wrappers export emits around ``no_grad``/``autocast`` blocks; literal sizes allocate at most
``MAX_LITERAL_ELEMENTS`` elements.
"""

from __future__ import annotations

import re

import torch

from qcore.io.pt2 import Refused

MAX_LITERAL_ELEMENTS = 2**28  # elements a literal size in the graph may allocate (1 GiB of float32)

# Pure tensor operators, by ATen name (any overload whose schema writes no argument).
ATEN_OPS = frozenset("""
    conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d
    linear addmm mm bmm matmul baddbmm addmv mv dot einsum outer t numpy_T lstm gru
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
PRIMS_OPS = frozenset("convert_element_type broadcast_in_dim squeeze view_of iota".split())
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


def check_target(target) -> None:
    """Refuse a node target unless it is a pure operator (see the module docstring)."""
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", target):
        raise Refused(f"calls {str(target)[:80]!r}")
    parts = target.split(".")
    if target.startswith("torch.ops.") and len(parts) == 5 and parts[2] in ("aten", "prims"):
        ns, name, overload = parts[2:]
        allowed = ATEN_OPS if ns == "aten" else PRIMS_OPS
        if _DENIED.search(name) or (name not in allowed and f"{ns}.{name}" not in _INPLACE_EXCEPTIONS):
            raise Refused(f"calls {target!r}, which is not on the engine's list of pure tensor operators")
        try:
            schema = getattr(getattr(getattr(torch.ops, ns), name), overload)._schema
        except (AttributeError, RuntimeError):
            raise Refused(f"calls {target!r}, an operator this torch version does not have") from None
        writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if (writes or overload == "out" or overload.endswith("_out")) and f"{ns}.{name}" not in _INPLACE_EXCEPTIONS:
            raise Refused(f"calls {target!r}, which writes into its argument {(writes or ['out'])[0]!r} "
                           "(in-place or out=)")
        return
    ok = ((target.startswith("torch.ops.higher_order.") and len(parts) == 4 and parts[3] in _HIGHER_ORDER_OPS)
          or (parts[0] == "_operator" and len(parts) == 2 and parts[1] in _OPERATOR_FUNCS)
          or (parts[0] == "math" and len(parts) == 2 and parts[1] in _MATH_FUNCS)
          or (parts[0] == "torch" and len(parts) == 2 and parts[1] in _SYM_FUNCS))
    if not ok:
        raise Refused(f"calls {target!r}, which is not on the engine's list of pure tensor operators")


def _literal_ints(arg: dict) -> list[int]:
    """The literal integers of an argument: ``as_int``, ``as_sym_int``, ``as_ints`` or ``as_sym_ints``."""
    values = arg.get("as_ints", arg.get("as_sym_ints", [arg]))
    values = [v.get("as_int", v.get("as_sym_int")) if isinstance(v, dict) else v for v in
              (values if isinstance(values, list) else [])]
    values = [v.get("as_int") if isinstance(v, dict) else v for v in values]
    return [v for v in values if type(v) is int]


def product_above(values, limit: float) -> bool:
    total = 1
    for v in values:
        total *= max(abs(v), 1)
        if total > limit:
            return True
    return False


def check_node(node: dict) -> None:
    """The node's target, and the work its literal arguments ask for."""
    target, inputs = node["target"], node.get("inputs")
    check_target(target)
    args = [(i.get("name"), i["arg"]) for i in (inputs if isinstance(inputs, list) else [])
            if isinstance(i, dict) and isinstance(i.get("arg"), dict)]
    for name, arg in args:
        if "as_ints" in arg or "as_sym_ints" in arg:
            if product_above(_literal_ints(arg), MAX_LITERAL_ELEMENTS):
                raise Refused(f"asks {target!r} for a size of more than {MAX_LITERAL_ELEMENTS:,} elements ({name})")
        factors = arg.get("as_floats")
        if name == "scale_factors" and isinstance(factors, list) and product_above(map(float, factors), 1024):
            raise Refused(f"asks {target!r} to upsample by more than 1024x")
    if target.startswith("torch.ops.aten.arange."):
        ends = [v for _, arg in args for v in (_literal_ints(arg) + [arg.get("as_float")])
                if isinstance(v, (int, float))]
        if any(abs(v) > MAX_LITERAL_ELEMENTS for v in ends):
            raise Refused(f"asks {target!r} for more than {MAX_LITERAL_ELEMENTS:,} elements")
    if target in _POWERS:
        exponent = _literal_ints(args[1][1]) if len(args) == 2 else []
        if len(exponent) != 1 or abs(exponent[0]) > 64:
            raise Refused(f"calls {target!r} with an exponent that is not a small integer literal")

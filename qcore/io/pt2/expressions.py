"""The grammar of symbolic shape expressions a ``.pt2`` program may hold.

torch hands each expression to ``sympy.sympify`` (i.e. ``eval``), so ``check_expr`` parses it with
``ast`` and accepts only the sympy constructors torch's serializer writes, with literals of at most
62 bits, small literal exponents and constant parts below ``MAX_EXPR_BITS`` bits.
"""

from __future__ import annotations

import ast
import math
import re

from qcore.io.pt2 import Refused

MAX_EXPR_CHARS, MAX_EXPR_DEPTH, MAX_EXPR_BITS = 10_000, 32, 4096

# The sympy constructors torch's serializer writes (sympy.srepr) and torch.utils._sympy.functions.
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



def _int_literal(node: ast.AST) -> int | None:
    """n for ``n``, ``-n``, ``Integer(n)`` or ``Integer(-n)``; else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" \
            and len(node.args) == 1 and not node.keywords:
        node = node.args[0]
    sign = -1 if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) else 1
    node = node.operand if sign == -1 else node
    return sign * node.value if isinstance(node, ast.Constant) and type(node.value) is int else None


def _expr_bits(node: ast.AST, depth: int = 0) -> int:
    """An upper bound on log2 |value| of a parsed symbolic expression; Refused if it is not one."""
    if depth > MAX_EXPR_DEPTH:
        raise Refused("nested too deeply")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value.bit_length() > _SYMBOL_BITS:
            raise Refused(f"has an integer literal above 2**{_SYMBOL_BITS}")
        return node.value.bit_length()
    if isinstance(node, ast.Name) and node.id in _EXPR_NAMES:
        return 1
    if isinstance(node, ast.Name) and _SYMBOL_NAME.fullmatch(node.id):
        return _SYMBOL_BITS
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _EXPR_CALLS):
        raise Refused(f"uses {ast.unparse(node)[:40]!r}, which is not a sympy constructor torch writes")
    f, args = node.func.id, node.args
    if any(not (isinstance(k.value, ast.Constant) and (type(k.value.value) is bool or
                                                     (k.arg == "precision" and type(k.value.value) is int
                                                      and 0 < k.value.value <= 113)))
           for k in node.keywords):
        raise Refused(f"passes a keyword to {f} that is not a flag")
    if f == "Symbol":
        if len(args) != 1 or not (isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
                                  and _SYMBOL_NAME.fullmatch(args[0].value)):
            raise Refused("names a symbol unlike s0")
        return _SYMBOL_BITS
    if f == "Float":
        text = args[0].value if len(args) == 1 and isinstance(args[0], ast.Constant) else None
        if not (isinstance(text, str) and re.fullmatch(r"-?\d+(\.\d*)?(e[-+]?\d+)?", text)
                and math.isfinite(float(text)) and abs(float(text)) < 2.0**_SYMBOL_BITS):
            raise Refused("has a float literal that is not a plain number below 2**62")
        return _SYMBOL_BITS
    if f in ("Integer", "Rational") and not all(isinstance(a, (ast.Constant, ast.UnaryOp)) for a in args):
        raise Refused(f"builds an {f} from an expression")
    bits = [_expr_bits(a, depth + 1) for a in args]
    if f in _EXPR_POWERS or f == "LShift":
        exponent = _int_literal(args[1]) if len(args) == 2 else None
        if exponent is None or abs(exponent) > (64 if f == "LShift" else 16):
            raise Refused(f"raises to a power that is not a small integer literal ({f})")
        total = bits[0] + exponent if f == "LShift" else bits[0] * max(abs(exponent), 1)
    elif f == "Mul":
        total = sum(bits)
    else:
        total = max(bits, default=1) + len(bits).bit_length()
    if total > MAX_EXPR_BITS:
        raise Refused(f"evaluates to a number above 2**{MAX_EXPR_BITS}")
    return total


def check_expr(text) -> None:
    """Refuse a symbolic shape expression (which torch hands to sympy.sympify, i.e. eval) unless it is
    built of the constructors torch writes, e.g. "Mul(Integer(2), Symbol('s0', positive=True))"."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        raise Refused("has a symbolic shape expression that is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Refused(f"has a symbolic shape expression that does not parse ({text[:60]!r})") from None
    try:
        _expr_bits(tree.body)
    except Refused as e:
        raise Refused(f"has a symbolic shape expression that is not plain arithmetic: it {e} ({text[:60]!r})") \
            from None


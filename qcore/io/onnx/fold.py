"""Constant folding within budgets: what evaluating an untrusted graph's constant nodes at import may cost.

The file is untrusted; a 3 KB graph can ask ConstantOfShape for 6 GiB. Before a node is folded,
``FoldBudget.charge`` finds its output sizes without allocating them (``onnx_ops.output_sizes``) and
stops with one ``QcoreError`` line, before anything is allocated, when one folded tensor would exceed
the upload limit, all folded tensors together twice it, or all folding together ``MAX_FOLD_WORK``
element operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qcore.errors import QcoreError
from qcore.limits import human_size
from qcore.model.onnx_ops import output_sizes

FOLDED_TENSOR_UPLOADS = 1  # one folded constant: at most 1 x the upload limit, in bytes (default 200 MiB)
FOLDED_TOTAL_UPLOADS = 2  # all folded constants together: at most 2 x the upload limit, in bytes
MAX_FOLD_WORK = 2**32  # element operations (values read + written, x the inner size of a contraction or pool)


def _einsum_inner(equation: str, shapes) -> int:
    """Product of the sizes of an einsum's summed-over letters ('ij,jk->ik': the size of j)."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), shapes):
        head, _, tail = term.partition("...")
        for letter, d in [*zip(head, shape), *zip(tail[::-1], shape[::-1])]:
            sizes[letter] = max(sizes.get(letter, 1), d)
    kept = set(rhs) if arrow else {c for c in sizes if lhs.count(c) == 1}
    return math.prod(d for c, d in sizes.items() if c not in kept)


def _work(op: str, xs: list, out_values: int, attrs: dict) -> int:
    """Element operations to evaluate one node with ``out_values`` output values: values read and
    written, each output value times the inner size it sums over in a contraction (MatMul, Gemm,
    Einsum) or a pool (its kernel)."""
    inner = 1
    if op == "MatMul":
        inner = xs[0].shape[-1]
    elif op == "Gemm":
        inner = xs[0].shape[0 if attrs.get("transA", 0) else -1]
    elif op == "Einsum":
        inner = _einsum_inner(attrs["equation"], [x.shape for x in xs])
    elif op in ("MaxPool", "AveragePool"):
        inner = math.prod(attrs["kernel_shape"])
    elif op in ("Conv", "ConvTranspose"):  # each output value sums kernel x input channels per group
        inner = math.prod(xs[1].shape[1:]) if op == "Conv" else math.prod(xs[1].shape[2:]) * xs[1].shape[0]
    return sum(x.numel() for x in xs if x is not None) + out_values * inner


@dataclass
class FoldBudget:
    """What constant folding has used of its limits: bytes of folded tensors (``tensor_limit`` for any
    one, ``total_limit`` for all together) and element operations (see ``_work``)."""

    tensor_limit: int
    total_limit: int
    work_limit: int = MAX_FOLD_WORK
    total: int = 0
    work: int = 0

    @classmethod
    def for_upload(cls, upload_bytes: int) -> FoldBudget:
        return cls(FOLDED_TENSOR_UPLOADS * upload_bytes, FOLDED_TOTAL_UPLOADS * upload_bytes)

    def charge(self, op: str, xs: list, attrs: dict, where: str) -> None:
        """Count what folding this node needs; QcoreError, before anything is allocated, if it does not fit."""
        outs = output_sizes(op, xs, attrs)
        sizes = [math.prod(shape) * per_value for shape, per_value in outs]
        hint = "the file is malformed or built to exhaust memory; export the model again"
        for (shape, _), size in zip(outs, sizes):
            if size > self.tensor_limit:
                raise QcoreError(f"ONNX operator {op!r} ({where}) would create a constant of {human_size(size)} "
                                 f"(shape {shape}) at import, above the limit of {human_size(self.tensor_limit)} "
                                 f"for one folded tensor; {hint}")
        if self.total + sum(sizes) > self.total_limit:
            raise QcoreError(f"ONNX operator {op!r} ({where}) would bring the constants folded at import to "
                             f"{human_size(self.total + sum(sizes))}, above the limit of {human_size(self.total_limit)}; {hint}")
        work = _work(op, xs, sum(math.prod(shape) for shape, _ in outs), attrs)
        if self.work + work > self.work_limit:
            raise QcoreError(f"ONNX operator {op!r} ({where}) would bring the work of folding constants at import to "
                             f"{self.work + work:,} element operations, above the limit of {self.work_limit:,}; {hint}")
        self.total += sum(sizes)
        self.work += work


"""Error feedback across embedding tables that are summed into one input (BERT's word + position + token type
embeddings): GPTQ's idea -- correct the weights not yet quantized for the error just made -- applied to lookup
tables, whose input is an index and so gives GPTQ no Hessian to work with.

Every token's input is one row of each table, added: ``s = A_1[r_1] + ... + A_k[r_k]``. Quantizing table ``i``
makes the error ``e_i[r] = A_i'[r] - A_i[r]`` on its row ``r``, and a token's input error is the sum of its rows'
errors. Objective, per table in turn, over the calibration tokens:

    min over a shift m of the next table's rows   sum_tokens || e_i[r_i] + m ||^2   ->   m = -mean_c(e_i)

with ``mean_c(e_i) = sum_r c_i[r] e_i[r] / sum_r c_i[r]`` and ``c_i[r]`` how many calibration lookups read row r:
the usage-weighted mean error of table ``i`` is subtracted from every row of the next table before that one is
quantized (every token reads exactly one row of it, so the shift cancels table i's mean error in every token's
sum, and the next table rounds its shifted rows onto its own grid). Tables go smallest first: a table with few
rows has a systematic error (BERT's token type table: 2 rows, every token reads row 0, so its whole error is added
to every token), which the larger tables absorb; the largest (the word table) goes last and keeps its own
usage-weighted mean error. Rows never read on the calibration data weigh nothing. Each table is rounded to
nearest on the grid ``spec.range`` chooses for it (``numerics.quantize.quantize``), so sizes and exporters are
those of nearest rounding.

Optionally (``metric``: a (dim, dim) matrix M, e.g. E[J^T J] with J the Jacobian of the model's output with
respect to the summed input, averaged over calibration tokens), each table's rows are rounded by GPTQ with M in
the Hessian's place instead -- the row error ``e`` then costs ``e^T M e``, what the model's output feels to
second order, rather than ``|e|^2`` -- on the same grid choice (the engine computes M with
``qcore.model.embedding_sums.output_metric``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qcore.algorithms.gptq import gptq_quantize
from qcore.numerics.quantize import QuantizedTensor, check_finite, quantize
from qcore.numerics.spec import TensorSpec


def quantize_summed(tables: Sequence[torch.Tensor], specs: Sequence[TensorSpec], counts: Sequence[torch.Tensor],
                    metric: torch.Tensor | None = None, damp: float = 0.1) -> list[QuantizedTensor]:
    """Tables (rows_i, dim) float, all of one ``dim``, each quantized under its spec, in the order given (callers
    pass the smallest first); ``counts[i]`` (rows_i,) how often each row was read on the calibration data;
    ``metric`` (dim, dim) or None: round each table's rows by GPTQ under it (damping ``damp``), else to nearest.
    Returns the ``QuantizedTensor`` of each table, in the order given."""
    shift = torch.zeros(tables[0].shape[1], dtype=torch.float64)
    out = []
    for table, spec, count in zip(tables, specs, counts):
        check_finite(table, "the embedding table")
        shifted = table.detach().double() + shift
        q = quantize(shifted.float(), spec) if metric is None else \
            gptq_quantize(shifted.float(), metric, spec, damp=damp)
        error = q.dequantize().double() - shifted  # its own rounding error: the shift cancelled the earlier ones'
        c = count.double().clamp(min=0)
        total = float(c.sum())
        shift = -(c[:, None] * error).sum(0) / total if total > 0 else torch.zeros_like(shift)
        out.append(q)
    return out

"""Error feedback across summed embedding tables (``qcore.algorithms.embedding_feedback``) and where the engine
uses it (``"gptq": {"embeddings": true}``): the summed tables found by probing a model, their row counts, the
simulation's and the exported file's codes.

Oracles: the token sums recomputed token by token from the lookups (not from the counts); the shifted table
quantized here by ``numerics.quantize`` on the hand-built shift; ONNX Runtime running the exported file."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from qcore.algorithms.embedding_feedback import quantize_summed
from qcore.errors import QcoreError
from qcore.model.embedding_sums import lookup_counts, output_metric, summed_embeddings
from qcore.model.rounding import collect_inputs
from qcore.model.simulate import simulate
from qcore.numerics.quantize import quantize
from qcore.recipe import Recipe, preset

INT4 = preset("int4-weight-only").weights
EMB = {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False, "range": "minmax",
       "rounding": "gptq", "gptq": {"damp": 0.1, "embeddings": True}}


def test_a_one_row_table_read_by_every_token_hands_its_whole_error_to_the_next():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 32, generator=g), torch.randn(5, 32, generator=g)
    qa, qb = quantize_summed([a, b], [INT4, INT4], [torch.tensor([7.0]), torch.tensor([3.0, 0, 1, 2, 1])])
    e_a = quantize(a, INT4).dequantize() - a  # by hand: table a's error, then b shifted by minus it
    assert torch.equal(qa.codes, quantize(a, INT4).codes)
    assert torch.equal(qb.codes, quantize(b - e_a, INT4).codes)
    sums = qa.dequantize()[0] + qb.dequantize() - (a[0] + b)  # every token's error: only b's own rounding
    torch.testing.assert_close(sums, qb.dequantize() - (b - e_a), atol=1e-6, rtol=0)


@given(st.integers(1, 4), st.integers(2, 9), st.integers(1, 60), st.integers(0, 2**31 - 1))
def test_each_table_is_shifted_by_minus_the_mean_error_the_tokens_carry_so_far(rows_a, rows_b, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-3, 3, (1,), generator=g).item()
    a, b, c = (torch.randn(r, 32, generator=g) * scale for r in (rows_a, rows_b, 40))
    ra, rb, rc = (torch.randint(0, t.shape[0], (tokens,), generator=g) for t in (a, b, c))
    counts = [torch.bincount(r, minlength=t.shape[0]).double() for r, t in ((ra, a), (rb, b), (rc, c))]
    qa, qb, qc = quantize_summed([a, b, c], [INT4] * 3, counts)
    err = lambda q, t, r: (q.dequantize().double() - t.double())[r]  # each token's error from this table
    so_far = err(qa, a, ra).mean(0)  # token by token, from the lookups
    assert torch.equal(qb.codes, quantize((b.double() - so_far).float(), INT4).codes)
    so_far = (err(qa, a, ra) + err(qb, b, rb)).mean(0)
    assert torch.equal(qc.codes, quantize((c.double() - so_far).float(), INT4).codes)
    assert all(torch.isfinite(q.dequantize()).all() for q in (qa, qb, qc))


def test_zero_and_constant_tables_and_unread_rows_give_no_nan():
    z, k = torch.zeros(3, 32), torch.full((4, 32), 2.5)
    for q in quantize_summed([z, k], [INT4, INT4], [torch.zeros(3), torch.zeros(4)]):
        assert torch.isfinite(q.dequantize()).all()
    qz, qk = quantize_summed([z, k], [INT4, INT4], [torch.ones(3), torch.ones(4)])
    assert torch.equal(qz.dequantize(), z) and torch.allclose(qk.dequantize(), k)


class Bertish(nn.Module):
    """word + position + token type, summed into a LayerNorm (BERT's embeddings), and a tag table concatenated."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.word, self.position, self.kind = nn.Embedding(50, 32), nn.Embedding(12, 32), nn.Embedding(2, 32)
        self.tag = nn.Embedding(3, 32)
        self.ln, self.head = nn.LayerNorm(32), nn.Linear(64, 4)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        h = self.ln(self.word(ids) + self.position(pos) + self.kind(torch.zeros_like(ids)))
        return self.head(torch.cat([h, self.tag(ids % 3)], -1)).mean(1)


def test_the_probe_finds_the_summed_tables_smallest_first_and_counts_their_lookups():
    model, ids = Bertish().eval(), torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(1))
    assert summed_embeddings(model, ["word", "position", "kind", "tag"], (ids,)) == [("kind", "position", "word")]
    counts = lookup_counts(model, ["kind", "position"], [(ids,), (ids[:2],)])
    assert counts["kind"].tolist() == [56.0, 0.0]
    assert counts["position"].tolist() == [8.0] * 7 + [0.0] * 5


def jacobian_metric(model, ids) -> torch.Tensor:
    """sum over positions of J^T J, J = d(output) / d(word table's output) there: torch's own Jacobian (the oracle)."""
    x0 = model.word(ids).detach()

    def f(x):
        h = model.word.register_forward_hook(lambda m, a, o: x)
        try:
            return model(ids)
        finally:
            h.remove()

    jac = torch.autograd.functional.jacobian(f, x0)  # (B, 4, B, T, 32)
    j = jac.permute(2, 3, 0, 1, 4).reshape(ids.numel(), -1, 32).double()  # per position: (B*4, 32)
    return torch.einsum("pki,pkj->ij", j, j)


@pytest.mark.parametrize("limit", [2**24, 1])  # all 4 output directions in one backward pass, or one per pass
def test_output_metric_is_the_gram_of_the_output_jacobian(monkeypatch, limit):
    import qcore.model.embedding_sums as sums

    monkeypatch.setattr(sums, "MAX_GRAD_ELEMENTS", limit)
    model, ids = Bertish().eval(), torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(1))
    got = output_metric(model, "word", [(ids[:4],), (ids[4:],)])
    torch.testing.assert_close(got, jacobian_metric(model, ids), rtol=1e-5, atol=1e-9)


def test_the_simulation_and_the_onnx_file_hold_the_fed_back_codes(tmp_path):
    model, ids = Bertish().eval(), torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(1))
    recipe = Recipe.from_dict({"name": "e", "weights": EMB, "activations": None})
    sim = simulate(model, recipe, calibration_batches=[(ids,)])
    w = lambda n: getattr(model, n).weight.detach()
    counts = [torch.tensor([42.0, 0.0]), torch.tensor([6.0] * 7 + [0.0] * 5),
              torch.bincount(ids.reshape(-1), minlength=50).double()]  # all 42 tokens read type row 0, 6 per position
    want = quantize_summed([w("kind"), w("position"), w("word")], [recipe.weights] * 3, counts,
                           jacobian_metric(model, ids), damp=0.1)
    for n, q in zip(("kind", "position", "word"), want):
        assert torch.equal(sim.weights[n].codes, q.codes), n
    assert torch.equal(sim.weights["tag"].codes, quantize(w("tag"), INT4).codes)  # in no sum: nearest
    with torch.no_grad():
        simulated = sim.model(ids).numpy()
    from qcore.export.onnx.qdq import export_qdq
    from qcore.model.workload import Data, Workload
    from qcore.model.task import output_task

    wl = Workload("bertish", model, Data((ids,)), Data((ids,)), output_task("regression", (4,), False, "t"), batch_size=6)
    path = str(tmp_path / "e.onnx")
    export_qdq(wl, recipe, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, simulated, rtol=1e-4, atol=1e-4 * np.abs(simulated).max())


class Padded(nn.Module):
    """One Linear over (B, T, 8) token vectors; the second input is the attention mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.fc = nn.Embedding(20, 8), nn.Linear(8, 4)

    def forward(self, ids, mask):
        return (self.fc(self.embed(ids)) * mask[..., None]).sum(1)


def test_padded_positions_are_left_out_of_the_hessian_and_the_lookup_counts():
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    model = Padded().eval()
    x = model.embed(ids).detach()[mask.bool()]  # the 8 real positions, picked by hand
    got = collect_inputs(model, {"fc": "Linear"}, [(ids, mask)], set(), real_rows=1)["fc"]
    assert got.rows == 8
    torch.testing.assert_close(got.hessian, (x.T @ x).double())
    everything = collect_inputs(model, {"fc": "Linear"}, [(ids, mask)], set())["fc"]
    assert everything.rows == 15
    counts = lookup_counts(model, ["embed"], [(ids, mask)], real_rows=1)["embed"]
    assert counts.tolist() == torch.bincount(ids[mask.bool()], minlength=20).double().tolist()


def test_the_option_is_written_only_when_set_and_an_embedding_without_it_is_a_one_line_error():
    assert "embeddings" not in preset("int4-gptq").to_json()
    r = Recipe.from_dict({"name": "e", "weights": EMB, "activations": None})
    assert Recipe.from_json(r.to_json()) == r and '"embeddings": true' in r.to_json()
    with pytest.raises(QcoreError, match=r"gptq\.embeddings=1 must be true or false"):
        Recipe.from_dict({"name": "e", "weights": {**EMB, "gptq": {"embeddings": 1}}, "activations": None})
    model, ids = Bertish().eval(), torch.randint(0, 50, (2, 5))
    asked = preset("int4-gptq").with_layer("tag", {"weights": {"rounding": "gptq"}})
    with pytest.raises(QcoreError, match='use rounding nearest for this layer, or gptq with "embeddings": true') as e:
        simulate(model, asked, calibration_batches=[(ids,)])
    assert "\n" not in str(e.value)


def test_under_a_metric_the_rows_round_by_gptq_identity_is_nearest_and_a_correlated_one_costs_less():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 32, generator=g), torch.randn(64, 32, generator=g)
    counts = [torch.tensor([5.0, 0.0]), torch.ones(64)]
    plain = quantize_summed([a, b], [INT4, INT4], counts)
    same = quantize_summed([a, b], [INT4, INT4], counts, metric=torch.eye(32, dtype=torch.float64))
    assert all(torch.equal(p.codes, s.codes) for p, s in zip(plain, same))  # H = I: no feedback between columns
    x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated "directions"
    m = (x.T @ x).double()
    qa, qb = quantize_summed([a, b], [INT4, INT4], counts, metric=m)
    shifted = b.double() - (qa.dequantize().double() - a.double())[0]
    cost = lambda q: float(torch.einsum("ri,ij,rj->", q.dequantize().double() - shifted, m, q.dequantize().double() - shifted))
    assert cost(qb) < 0.8 * cost(quantize(shifted.float(), INT4))  # e^T M e, by hand, vs nearest on the same shift

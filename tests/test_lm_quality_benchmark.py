"""benchmarks/lm_quality.py keeps working: its quick run (a random model of tiny-lm's architecture) gives rows
whose values agree with independent facts -- the FP32 export reproduces FP32, ONNX Runtime's 4-bit block-32
asymmetric quantizer lands where the same grid simulated by qcore does, fewer bits cost more."""

from __future__ import annotations

import pytest

from benchmarks import lm_quality


@pytest.fixture(scope="module")
def result():
    return lm_quality.measure(["--quick"])


def test_rows_cover_every_recipe_and_peer(result):
    methods = [(r["tool"], r["method"]) for r in result["rows"]]
    assert [m for t, m in methods if t == "qcore"] == [*lm_quality.RECIPES, lm_quality.EMBEDDINGS_FP32]
    assert {t for t, _ in methods} == {"qcore", "onnxruntime", "torch.ao"}
    assert result["tokens"] == 4 * 32


def test_values_agree_with_independent_facts(result):
    rows = {r["method"]: r for r in result["rows"]}
    fp32 = result["fp32"]["perplexity"]
    ref = rows["FP32 export (reference check)"]
    assert ref["perplexity"] == pytest.approx(fp32, rel=1e-4) and ref["kl_divergence"] < 1e-8
    assert ref["top1_agreement"] == 1.0
    # the same grid (4 bits, 32 per block, min-max affine) on the same layers: ORT's quantizer and the simulation agree
    ort4, own4 = rows["MatMulNBitsQuantizer (4 bits, block 32, asymmetric)"], rows[lm_quality.EMBEDDINGS_FP32]
    assert ort4["kl_divergence"] == pytest.approx(own4["kl_divergence"], rel=0.15)
    kl = [rows[m]["kl_divergence"] for m in ("fp16", "int8 weight-only", "int4 g32", "int3 g32")]
    assert kl == sorted(kl) and kl[0] < 1e-6 < kl[-1]
    sizes = [rows[m]["size_bytes"] for m in ("fp16", "int8 weight-only", "int4 g32", "int3 g32")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == pytest.approx(result["fp32"]["size_bytes"] / 2, rel=0.01)


def test_main_prints_a_table_with_every_row(result, monkeypatch):
    monkeypatch.setattr(lm_quality, "measure", lambda argv=None: result)
    text = lm_quality.main(["--quick"])
    assert text.count("\n| ") == len(result["rows"]) + 1 and f"{result['fp32']['perplexity']:.2f}" in text

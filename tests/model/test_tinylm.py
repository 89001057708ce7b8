"""tiny-lm: its architecture, text split, tokenizer, seeded training and the shipped weights' perplexity."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qcore.recipe import preset
from qcore.zoo import tinylm
from qcore.zoo.tinylm import Config, TinyLM
from qcore.zoo.train import train_lm

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = Config(vocab_size=50, context_length=16, dim=16, layers=1, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_attention_exposes_projections_and_is_causal():
    torch.manual_seed(0)
    m = TinyLM(TINY).eval()
    attn = m.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (2, 8)
    assert all(isinstance(getattr(attn, p), torch.nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 50  # changing token 7 may change positions 7.. only
    with torch.no_grad():
        a, b = m(x), m(y)
    assert a.shape == (2, 12, 50)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_training_is_seeded():
    stream = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    first, again = (train_lm(stream, TINY, steps=2, batch=2, seed=0).state_dict() for _ in range(2))
    other = train_lm(stream, TINY, steps=2, batch=2, seed=1).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_the_split_is_by_document_fixed_and_covers_every_topic():
    from pydoc_data.topics import topics

    split = tinylm.documents()
    texts = [t for part in split.values() for t in part]
    assert sorted(texts) == sorted(topics.values())  # each topic in exactly one part
    total = sum(map(len, texts))
    assert all(sum(map(len, split[p])) >= 0.1 * total for p in ("test", "validation"))
    assert tinylm.documents() == split


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=200))
def test_the_tokenizer_round_trips_any_text(text):
    tok = tinylm.tokenizer()
    assert tok.decode(tok.encode(text).ids) == text


def test_the_tokenizer_round_trips_the_test_text_and_compresses_it():
    text = tinylm.documents()["test"][0]
    ids = tinylm.tokenizer().encode(text).ids
    assert tinylm.decode(ids) == text and len(ids) < len(text) / 2.5
    assert tinylm.tokenizer().get_vocab_size() == Config().vocab_size


def test_shipped_weights_reproduce_the_readme_and_perplexity_is_exp_mean_cross_entropy(tiny_lm):
    w = tiny_lm
    (x,), y = w.evaluation.inputs, w.evaluation.labels
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(x)):  # plain loop over windows, summed cross-entropy
            logits = w.model(x[i:i + 1])[0]
            total += float(torch.nn.functional.cross_entropy(logits.double(), y[i], reduction="sum", ignore_index=-100))
            count += int((y[i] != -100).sum())
    ppl = w.fp32_metrics["perplexity"]
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-9)
    printed = re.search(r"FP32 test perplexity[^0-9]*([0-9]+\.[0-9]+)", README.read_text())
    assert printed, "the README states tiny-lm's FP32 test perplexity"
    assert f"{ppl:.{len(printed.group(1).split('.')[1])}f}" == printed.group(1)
    assert w.fp32_metrics["kl_divergence"] == 0.0 and w.fp32_metrics["top1_agreement"] == 1.0


def test_int4_moves_the_distribution_and_costs_perplexity(tiny_lm):
    r = tiny_lm.evaluate(preset("int4-weight-only", tiny_lm.layer_shapes))
    q, f = r.quantized.metrics, r.fp32.metrics
    assert q["kl_divergence"] > 0 and q["perplexity"] > f["perplexity"] and q["top1_flips"] > 0
    assert q["delta_perplexity"] == pytest.approx(q["perplexity"] - f["perplexity"])
    assert r.quantized.size_bytes < r.fp32.size_bytes / 5

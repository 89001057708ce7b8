"""Causal-LM metrics and token windows (qcore.model.lm) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qcore.errors import QcoreError
from qcore.model.lm import IGNORE_INDEX, causal_lm_task, kl_per_position, lm_metrics, token_windows
from qcore.model.task import output_task


def test_metrics_of_two_positions_by_hand():
    # position 0: FP32 p = (1/2, 1/2), quantized q = (1/4, 3/4), label 1; position 1: both certain-ish, label 0
    ref = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    out = torch.tensor([[[math.log(0.25), math.log(0.75)], [2.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    m = lm_metrics(out, ref, labels)
    p1 = math.exp(2) / (math.exp(2) + 1)  # P(token 0) at position 1
    assert m["perplexity"] == pytest.approx(math.exp(-(math.log(0.75) + math.log(p1)) / 2), rel=1e-7)  # float32 logits
    assert m["delta_perplexity"] == pytest.approx(m["perplexity"] - math.exp(-(math.log(0.5) + math.log(p1)) / 2))
    assert m["kl_divergence"] == pytest.approx((0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2, rel=1e-7)
    # argmax of (1/4, 3/4) is 1, of (1/2, 1/2) is 0 (first): one flip in two
    assert (m["top1_agreement"], m["top1_flips"]) == (0.5, 0.5)


def test_ignored_positions_are_not_scored():
    ref = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    out = ref + torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, 4, IGNORE_INDEX]])
    keep = labels != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(out[keep].double(), labels[keep])
    m = lm_metrics(out, ref, labels)
    assert m["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-12)
    assert m["kl_divergence"] == pytest.approx(float(torch.nn.functional.kl_div(
        out[keep].double().log_softmax(-1), ref[keep].double().log_softmax(-1), log_target=True, reduction="batchmean")))


def test_kl_is_zero_for_identical_logits_and_never_negative():
    x = torch.randn(64, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 30
    assert torch.equal(kl_per_position(x, x), torch.zeros(64, dtype=torch.float64))
    assert (kl_per_position(x + 1e-9 * torch.randn_like(x), x) >= 0).all()


def test_the_task_is_lower_is_better_and_checks_its_inputs():
    task = causal_lm_task(5)
    assert (task.kind, task.headline, task.higher_is_better) == ("causal-lm", "perplexity", False)
    assert output_task("causal-lm", (7, 5), True, "set by you").higher_is_better is False
    x = torch.zeros(1, 2, 5)
    with pytest.raises(QcoreError, match="perplexity needs next-token labels"):
        task.metrics(x, x, None)
    with pytest.raises(QcoreError, match="not the vocabulary's 4"):
        causal_lm_task(4).metrics(x, x, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(QcoreError, match="NaN or infinite"):
        task.metrics(torch.full((1, 2, 5), float("nan")), x, torch.zeros(1, 2, dtype=torch.long))
    huge = torch.tensor([[[1e30, -1e30]]])  # certain and wrong: perplexity is infinite, not NaN
    assert lm_metrics(huge, huge, torch.tensor([[1]]))["perplexity"] == math.inf


def test_windows_by_hand():
    d = token_windows(torch.arange(20), 5, 3)
    assert d.inputs[0].tolist() == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [6, 7, 8, 9, 10], [9, 10, 11, 12, 13],
                                    [12, 13, 14, 15, 16]]
    x = IGNORE_INDEX
    assert d.labels.tolist() == [[1, 2, 3, 4, 5], [x, x, 6, 7, 8], [x, x, 9, 10, 11], [x, x, 12, 13, 14],
                                 [x, x, 15, 16, 17]]
    with pytest.raises(QcoreError, match="fewer than one window"):
        token_windows(torch.arange(5), 5)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(2, 200), window=st.integers(1, 40), data=st.data())
def test_every_token_after_the_first_is_scored_once_and_labels_are_the_next_token(length, window, data):
    if length < window + 1:
        return
    stride = data.draw(st.integers(1, window))
    ids = torch.randperm(length)  # distinct ids: a label names its position
    d = token_windows(ids, window, stride)
    (x,), y = d.inputs, d.labels
    assert len(d) == (length - 1 - window) // stride + 1
    scored = y[y != IGNORE_INDEX].tolist()
    assert len(scored) == len(set(scored))  # no token scored twice
    position = {int(t): i for i, t in enumerate(ids)}
    assert sorted(position[t] for t in scored) == list(range(1, position[int(y[-1, -1])] + 1))
    for r in range(len(d)):
        for t in range(window):
            if y[r, t] != IGNORE_INDEX:
                assert position[int(y[r, t])] == position[int(x[r, t])] + 1

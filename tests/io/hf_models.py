"""Tiny randomly initialised Hugging Face causal LMs (GPT-2, Llama, Qwen2) saved as local folders for tests:
2 layers, hidden 32, 4 heads (Llama/Qwen2: 2 KV heads), a 100-token BPE tokenizer trained here, safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = " ".join(["the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun",
                 "quantization maps many real numbers onto a small grid of integers and back again",
                 "a language model predicts the next token from the tokens before it"] * 12)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def config(family: str):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=1,
                          eos_token_id=1)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return cls(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
               vocab_size=100, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0)


def save(family: str, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)  # not part of a checkpoint: the tests' calibration/evaluation text
    return folder

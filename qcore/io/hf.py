"""A local Hugging Face causal-LM checkpoint (a folder, or that folder as a ``.zip``) -> ``Workload``.

Untrusted input, loaded offline: ``transformers`` reads ``config.json``, the ``*.safetensors`` weights and the
tokenizer files with ``local_files_only=True``, ``trust_remote_code=False`` and ``use_safetensors=True``; a
folder whose weights are only pickles (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``) is refused before anything
is read -- unpickling runs code. Architectures (``config.model_type``): ``SUPPORTED``. Bounds: the files
together at most the upload limit (``limits.MAX_UPLOAD_BYTES``), ``config.json`` at most ``MAX_CONFIG_BYTES``,
and the parameters the config describes at most ``MAX_PARAMS_PER_FILE_BYTE`` per byte of weights on disk (a
tiny file whose config asks for a huge model is refused before the model is built). A zip is unpacked by
``qcore.io.hf_zip`` into a private temporary folder, read, and deleted.

The model: ``CausalLM`` wraps the transformers model so ``forward(input_ids (B, T)) -> logits (B, T, V)``
and every layer keeps the checkpoint's own name (``model.layers.0.self_attn.q_proj``, ``lm_head``;
GPT-2's ``transformer.h.0.attn.c_attn``, a ``Conv1D`` quantized as the Linear it is: ``gpt2_conv1d``). A head
tied to the token embedding gets its own copy of the weight so each is quantized as the recipe says (the sizes
then count both, as an export writes both). Attention runs in transformers' plain ("eager") implementation.

Text: a UTF-8 text file (``--data notes.txt``; at most ``MAX_TEXT_BYTES``) or, by default, the held-out
Python help topics tiny-lm is scored on (``qcore.zoo.tinylm``): validation text calibrates, test text
evaluates, in windows of ``min(WINDOW, context)`` tokens; a user text is cut 25 % / 75 %.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from qcore import limits
from qcore.errors import QcoreError
from qcore.io.hf_zip import PICKLE_SUFFIXES
from qcore.limits import first_line, human_size
from qcore.model.lm import TextCodec, causal_lm_task, token_windows
from qcore.model.workload import Data, Workload, content_hash

SUPPORTED = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2"}
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
MAX_CONFIG_BYTES = 2**20
MAX_TEXT_BYTES = 8 * 2**20
MAX_PARAMS_PER_FILE_BYTE = 1  # a float16 checkpoint holds 0.5 parameters per byte, float32 0.25
WINDOW, N_CALIBRATION, N_EVALUATION = 128, 16, 32  # tokens per window; windows (at most)


class CausalLM(nn.Module):
    """``forward(input_ids) -> logits`` of a transformers causal LM, sharing its children, parameters and
    buffers (the same dicts, as ``first_output.FirstOutput`` does), so layer names are the checkpoint's."""

    def __init__(self, inner: nn.Module, context_length: int):
        super().__init__()
        self.__dict__["inner"] = inner  # not a child: its children are ours (below)
        self._modules, self._parameters, self._buffers = inner._modules, inner._parameters, inner._buffers
        self.context_length = context_length

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, use_cache=False).logits

    def train(self, mode: bool = True):
        self.inner.train(mode)
        return super().train(mode)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def check_folder(folder: Path, max_bytes: int | None = None) -> dict:
    """The parsed ``config.json`` of checkpoint ``folder`` after the checks in the module docstring."""
    limit = limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise QcoreError(f"{folder.name} has no config.json; give the folder save_pretrained() wrote (config.json, "
                         "*.safetensors, tokenizer files)")
    files = _files(folder)
    total = sum(p.stat().st_size for p in files)
    if total > limit:
        raise QcoreError(f"{folder.name} holds {human_size(total)} of files, above the limit of {human_size(limit)}; "
                         "use a smaller model or raise the limit (env QCORE_MAX_UPLOAD_MB)")
    weights = [p for p in files if p.suffix == ".safetensors"]
    if not weights:
        pickles = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        raise QcoreError(f"{folder.name} has no *.safetensors weights" + (
            f", only pickled ones ({', '.join(pickles[:3])}), which would run code when loaded and are refused" if pickles
            else "") + "; save it with model.save_pretrained(folder, safe_serialization=True)")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise QcoreError(f"{folder.name}/config.json is above {human_size(MAX_CONFIG_BYTES)}; it is not a model config")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QcoreError(f"{folder.name}/config.json is not JSON ({first_line(e)}); save the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED:
        raise QcoreError(f"{folder.name}: architecture {str(model_type)[:40]!r} (config.json model_type) is not "
                         f"supported; supported: {', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
    if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
        raise QcoreError(f"{folder.name} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model); "
                         "save it beside the model with tokenizer.save_pretrained(folder)")
    params = _config_params(config)
    weight_bytes = sum(p.stat().st_size for p in weights)
    if params > MAX_PARAMS_PER_FILE_BYTE * weight_bytes:
        raise QcoreError(f"{folder.name}: config.json describes about {params:,} parameters but the weights hold "
                         f"{human_size(weight_bytes)}; the config does not match the weights")
    return config


def _config_params(config: dict) -> int:
    """About how many parameters ``config`` asks for (embeddings + per layer 4 attention and 3 MLP matrices)."""
    def number(*keys, default=0):
        for k in keys:
            v = config.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
        return default

    hidden = number("hidden_size", "n_embd")
    layers = number("num_hidden_layers", "n_layer")
    inner = number("intermediate_size", "n_inner", default=4 * hidden)
    return number("vocab_size") * hidden + layers * (4 * hidden * hidden + 3 * hidden * inner)


def load_checkpoint(folder: Path, config: dict) -> tuple[nn.Module, object, int]:
    """(``CausalLM``, tokenizer, context length) read offline from checked ``folder``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars on stderr
    options = dict(local_files_only=True, trust_remote_code=False)
    try:
        inner = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32,
                                                     attn_implementation="eager", **options).eval()
    except Exception as e:  # the user's files failing to load
        raise QcoreError(f"{folder.name}: the model could not be loaded ({first_line(e)}); check that config.json "
                         "and the *.safetensors weights were saved together") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    except Exception as e:
        raise QcoreError(f"{folder.name}: the tokenizer could not be loaded ({first_line(e)}); save it with "
                         "tokenizer.save_pretrained(folder)") from None
    head, embed = inner.get_output_embeddings(), inner.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    inner.requires_grad_(False)
    context = getattr(inner.config, "max_position_embeddings", None) or getattr(inner.config, "n_positions", None) or WINDOW
    return CausalLM(inner, int(context)), tokenizer, int(context)


def _text(path) -> str:
    p = limits.checked_file(path, (".txt", ".md"), "text", MAX_TEXT_BYTES)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QcoreError(f"{p.name} is not UTF-8 text; save it as UTF-8") from None


def _ids(tokenizer, texts: list[str], vocab: int) -> torch.Tensor:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if isinstance(eos, int) else [])
    out = torch.tensor(ids, dtype=torch.long)
    if len(out) and int(out.max()) >= vocab:
        raise QcoreError(f"the tokenizer gives ids up to {int(out.max())} but the model has {vocab} tokens; "
                         "the tokenizer does not belong to this model")
    return out


def _windows(tokenizer, data, vocab: int, window: int) -> tuple[Data, Data, str]:
    """(calibration, evaluation, where the text came from)."""
    if data is None:
        from qcore.zoo.tinylm import documents

        split = documents()
        calibration = token_windows(_ids(tokenizer, split["validation"], vocab), window)
        evaluation = token_windows(_ids(tokenizer, split["test"], vocab), window)
        source = "the held-out Python help topics tiny-lm is scored on (validation text calibrates, test text evaluates)"
    else:
        ids = _ids(tokenizer, [_text(data)], vocab)
        cut = len(ids) // 4
        if cut < window + 1:
            raise QcoreError(f"{Path(data).name} has {len(ids):,} tokens; give at least {4 * (window + 1):,} (a few "
                             "pages of text) so a quarter can calibrate and the rest evaluate")
        calibration, evaluation = token_windows(ids[:cut], window), token_windows(ids[cut:], window)
        source = f"{Path(data).name} (first quarter calibrates, the rest evaluates)"
    return (calibration.subset(slice(0, N_CALIBRATION)), evaluation.subset(slice(0, N_EVALUATION)), source)


def load_hf_workload(path, data=None, max_bytes: int | None = None) -> Workload:
    """A checkpoint folder or a ``.zip`` of one (+ an optional text file) -> ``Workload``; problems are one
    ``QcoreError`` line each."""
    p = Path(path)
    if p.suffix.lower() == ".zip":
        from qcore.io.hf_zip import unpack

        with tempfile.TemporaryDirectory(prefix="qcore-hf-") as tmp:
            return _workload(unpack(p, Path(tmp), max_bytes), data, max_bytes, p.name, p)
    return _workload(p, data, max_bytes, p.name, None)


def _workload(folder: Path, data, max_bytes, name: str, archive: Path | None) -> Workload:
    config = check_folder(folder, max_bytes)
    source_part = ["zip", name, archive] if archive else ["folder", name, [[str(f.relative_to(folder)), f]
                                                                           for f in _files(folder)]]
    model, tokenizer, context = load_checkpoint(folder, config)
    vocab = model.inner.config.vocab_size
    window = min(WINDOW, context)
    calibration, evaluation, source = _windows(tokenizer, data, vocab, window)
    arch = SUPPORTED[config["model_type"]]
    params = sum(t.numel() for t in model.parameters())
    return Workload(
        name=name, model=model, calibration=calibration, evaluation=evaluation,
        task=causal_lm_task(vocab, why="a Hugging Face causal language model"),
        description=(f"{name}, a {arch} causal language model ({params / 1e6:.2f}M parameters, vocabulary {vocab:,}) "
                     f"from Hugging Face files, scored on {source}: perplexity over {len(evaluation) * window:,} "
                     "tokens (lower is better), with KL divergence and top-1 agreement against FP32."),
        source=f"huggingface ({config['model_type']})", batch_size=8,
        tokenizer=TextCodec(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                            lambda ids: tokenizer.decode([int(i) for i in ids], skip_special_tokens=False),
                            eos if isinstance(eos := getattr(tokenizer, "eos_token_id", None), int) else None),
        notes=[f"text: {source}; {len(calibration)} calibration and {len(evaluation)} evaluation windows of "
               f"{window} tokens",
               "a recipe's kv_cache quantizes what each attention caches: "
               + ("the key and value thirds of c_attn's output" if arch == "GPT-2" else
                  "the outputs of k_proj and v_proj, keys before RoPE (this architecture rotates them after k_proj)")],
        content_hash=content_hash("huggingface", source_part, None if data is None else [Path(data).name, Path(data)]))

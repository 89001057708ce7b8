"""The model zoo: built-in models with their data and metrics, all shipped (no downloads).

``ZOO`` maps a name to a loader returning a ``Workload``; ``load(name)`` is the one entry point.
"""

from __future__ import annotations

from pathlib import Path

from qcore.errors import QcoreError
from qcore.model.workload import Workload, content_hash
from qcore.model.task import classification_task


def _digits(name: str, description: str) -> Workload:
    from qcore.zoo import digits

    data = digits.splits()
    return Workload(
        name=name,
        model=digits.load_model(name),
        calibration=data["calibration"],
        evaluation=data["test"],
        task=classification_task(10, True, [str(i) for i in range(10)]),
        description=description,
    )


ZOO = {
    "digits-mlp": lambda: _digits("digits-mlp", (
        "A small multilayer perceptron (64 -> 128 -> 64 -> 10, three Linear layers) trained on scikit-learn's "
        "8x8 handwritten digits. It loads instantly, so every chart updates at once: the best model to learn "
        "what scales, zero-points and clipping do. Metric: top-1 accuracy on 360 held-out test images.")),
    "digits-cnn": lambda: _digits("digits-cnn", (
        "A small convolutional network (three 3x3 Conv+BatchNorm+ReLU blocks, then two Linear layers) trained on "
        "the same 8x8 digits. The BatchNorms are folded into the convolutions before quantization, as inference "
        "runtimes do. Its first convolution has a fan-in of only 9, which limits group-wise formats. "
        "Metric: top-1 accuracy on 360 held-out test images.")),
    "minilm-l6": lambda: __import__("qcore.zoo.minilm", fromlist=["workload"]).workload(),
    "tiny-lm": lambda: __import__("qcore.zoo.tinylm", fromlist=["workload"]).workload(),
}
DEFAULT_MODEL = "digits-mlp"


def weight_files(name: str) -> list[Path]:
    """The shipped files zoo entry ``name`` is loaded from (weights, config, tokenizer)."""
    if name == "minilm-l6":
        from qcore.zoo.minilm import model_dir

        return sorted(p for p in model_dir().rglob("*") if p.is_file())
    if name == "tiny-lm":
        from qcore.zoo.tinylm import TOKENIZER, WEIGHTS

        return [WEIGHTS, TOKENIZER]
    from qcore.zoo.digits import WEIGHTS_DIR

    return [WEIGHTS_DIR / f"{name}.safetensors"]


def load(name: str) -> Workload:
    """The zoo workload ``name`` (a fresh object: cache it, e.g. with st.cache_resource). Its
    ``content_hash`` covers the name, the bytes of its weight files and its data tensors."""
    if name not in ZOO:
        raise QcoreError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}")
    w = ZOO[name]()
    w.content_hash = content_hash("zoo", name, [[p.name, p] for p in weight_files(name)],
                                  [[d.inputs, d.labels] for d in (w.calibration, w.evaluation)])
    return w

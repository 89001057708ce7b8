"""Train the digits zoo models and write their weights: ``python -m qcore.zoo.train``.

Seeded and CPU-only (a few seconds each). The shipped files in ``qcore/zoo/weights/`` were made
by this script; the FP32 test accuracy it prints is the one stated in the README.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from qcore.zoo.digits import ARCHITECTURES, WEIGHTS_DIR, splits

EPOCHS, BATCH, LR, SEED = 60, 64, 3e-3, 0


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="*", default=list(ARCHITECTURES), help="zoo names to train")
    args = ap.parse_args(argv)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model, acc = train(name)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, WEIGHTS_DIR / f"{name}.safetensors", metadata={"test_accuracy": f"{acc:.4f}"})
        print(f"{name}: test accuracy {acc:.4f} -> {WEIGHTS_DIR / (name + '.safetensors')}")


if __name__ == "__main__":
    main()

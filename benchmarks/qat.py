"""PTQ against QAT, and QAT against its peers, on the same model, recipe, data and epochs.

    python -m benchmarks.qat [--quick] [--models digits-mlp,digits-cnn] [--epochs 5] [--threads 1]

For each digits model and recipe (weights per-channel symmetric min-max; "A8" = int8 affine static
activations): FP32, qcore PTQ, qcore QAT (STE; and with LSQ step sizes), torch.ao QAT (FX graph mode,
``prepare_qat_fx`` with per-channel ``FakeQuantize`` of the same bit width on the BatchNorm-folded model,
evaluated in fake-quantized form) and Brevitas QAT (``QuantLinear``/``QuantConv2d`` with per-channel
weights of the same bit width, ``QuantIdentity`` int8 inputs for A8) where it imports. All train on the
digits training split, Adam at the same learning rate and batch size, the same seeded shuffling, for
the same epochs; the qcore runs pick the epoch by the calibration loss, the peers report their last
epoch. Accuracy on the 360 test images; wall time of the whole fine-tuning (seconds).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from dataclasses import replace

import torch
from torch import nn

from qcore import zoo
from qcore.recipe import Recipe
from qcore.training import QATConfig, finetune, training_data

warnings.filterwarnings("ignore")
A8 = {"format": "int8", "symmetric": False, "range": "minmax"}
RECIPES = {  # name -> (weight bits, activations)
    "W8A8": (8, A8), "W4A8": (4, A8), "W4 weight-only": (4, None), "W3 per-channel": (3, None), "W2 per-channel": (2, None),
}


def recipe(name: str) -> Recipe:
    bits, act = RECIPES[name]
    return Recipe.from_dict({"name": name, "weights": {"format": f"int{bits}", "granularity": "per_channel",
                                                       "symmetric": True, "range": "minmax"}, "activations": act})


def _accuracy(model: nn.Module, w) -> float:
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(*b) for b in w.evaluation.batches(w.batch_size)])
    return float((out.argmax(1) == w.evaluation.labels).double().mean())


def _train(model: nn.Module, w, config: QATConfig) -> None:
    """The same loop as qcore's: Adam, constant lr, seeded shuffling, cross-entropy on the training split."""
    train, _ = training_data(w)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=gen).split(config.batch_size):
            loss = nn.functional.cross_entropy(model(train.inputs[0][idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def torch_ao_qat(w, name: str, config: QATConfig) -> tuple[float, float]:
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PlaceholderObserver,
        QConfig,
    )
    from torch.ao.quantization.qconfig_mapping import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    bits, act = RECIPES[name]
    qmax = 2 ** (bits - 1) - 1
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-qmax, quant_max=qmax,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    activation = (FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                         dtype=torch.quint8, qscheme=torch.per_tensor_affine) if act
                  else PlaceholderObserver.with_args(dtype=torch.float))  # weight-only: activations stay float
    start = time.perf_counter()
    model = prepare_qat_fx(copy.deepcopy(w.folded[0]), QConfigMapping().set_global(QConfig(activation=activation, weight=weight)),
                           (w.evaluation.inputs[0][:1],))
    _train(model, w, config)
    return _accuracy(model, w), time.perf_counter() - start


def brevitas_qat(w, name: str, config: QATConfig) -> tuple[float, float]:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    bits, act = RECIPES[name]
    model = copy.deepcopy(w.folded[0])

    def swap(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                if isinstance(child, nn.Linear):
                    q = qnn.QuantLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                        weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits)
                else:
                    q = qnn.QuantConv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                        padding=child.padding, bias=child.bias is not None,
                                        weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits)
                q.load_state_dict(child.state_dict(), strict=False)
                setattr(parent, child_name, nn.Sequential(qnn.QuantIdentity(Int8ActPerTensorFloat), q) if act else q)
            else:
                swap(child)

    start = time.perf_counter()
    swap(model)
    _train(model, w, config)
    return _accuracy(model, w), time.perf_counter() - start


def _peer(fn, *args) -> tuple[float | None, float | None, str]:
    try:
        acc, seconds = fn(*args)
        return acc, seconds, ""
    except ImportError as e:
        return None, None, f"not installed ({e.name})"
    except Exception as e:  # noqa: BLE001 -- a peer that cannot run this recipe says why, in the table
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def rows(models: list[str], recipes: list[str], config: QATConfig, lsq: bool = True) -> list[dict]:
    out = []
    for model in models:
        w = zoo.load(model)
        for name in recipes:
            r = recipe(name)
            qat = finetune(w, r, config)
            row = {"model": model, "recipe": name, "fp32": w.fp32_metrics["accuracy"], "ptq": qat.ptq_metrics["accuracy"],
                   "qat": qat.qat_metrics["accuracy"], "qat_s": qat.seconds, "qat_best_epoch": qat.best_epoch}
            if lsq:
                t = finetune(w, r, replace(config, learn_scales=True))
                row.update(qat_lsq=t.qat_metrics["accuracy"], qat_lsq_s=t.seconds)
            row["torch_ao"], row["torch_ao_s"], row["torch_ao_note"] = _peer(torch_ao_qat, w, name, config)
            row["brevitas"], row["brevitas_s"], row["brevitas_note"] = _peer(brevitas_qat, w, name, config)
            out.append(row)
    return out


def minilm_row(epochs: int, lr: float) -> dict:
    """minilm-l6 at int4 per-channel weights, fine-tuned by distillation (1 - cosine to the FP32 embeddings) on the
    64 calibration sentences, reported on the 300 evaluation sentences. No peer: torch.ao's FX tracing cannot
    trace the Hugging Face BERT (see the quality benchmark), and Brevitas has no drop-in for its layers here."""
    w = zoo.load("minilm-l6")
    r = Recipe.from_dict({"name": "W4 per-channel", "weights": {"format": "int4", "granularity": "per_channel",
                                                                "symmetric": True, "range": "minmax"}})
    q = finetune(w, r, QATConfig(epochs=epochs, lr=lr, batch_size=16))
    return {"loss": q.loss, "seconds": q.seconds, "best_epoch": q.best_epoch,
            **{f"{k}_{which}": m[k] for which, m in (("ptq", q.ptq_metrics), ("qat", q.qat_metrics))
               for k in ("cosine_to_fp32", "retrieval_agreement", "paraphrase_top1")}}


def _cell(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(table: list[dict], config: QATConfig) -> str:
    lines = [(f"Accuracy on the 360 test images after {config.epochs} epochs (Adam, lr {config.lr:g}, batch {config.batch_size}, "
              f"seed {config.seed}, {torch.get_num_threads()} thread(s)); time in seconds for the whole fine-tuning."), "",
             "| model | recipe | FP32 | PTQ | QAT (qcore) | s | QAT+LSQ (qcore) | s | torch.ao QAT | s | Brevitas QAT | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = set()
    for r in table:
        lines.append(f"| {r['model']} | {r['recipe']} | {_cell(r['fp32'])} | {_cell(r['ptq'])} | **{_cell(r['qat'])}** | "
                     f"{_cell(r['qat_s'], 1)} | {_cell(r.get('qat_lsq'))} | {_cell(r.get('qat_lsq_s'), 1)} | "
                     f"{_cell(r['torch_ao'])} | {_cell(r['torch_ao_s'], 1)} | {_cell(r['brevitas'])} | {_cell(r['brevitas_s'], 1)} |")
        notes |= {f"{peer}: {r[peer + '_note']}" for peer in ("torch_ao", "brevitas") if r[peer + "_note"]}
    return "\n".join(lines + [f"\n{n}" for n in sorted(notes)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-mlp, two recipes, one epoch, no LSQ")
    ap.add_argument("--models", default="digits-mlp,digits-cnn")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minilm-epochs", type=int, default=0, help="also fine-tune minilm-l6 (int4, distillation); ~20 s an epoch")
    ap.add_argument("--minilm-lr", type=float, default=3e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QATConfig(epochs=1 if args.quick else args.epochs, lr=args.lr)
    models = ["digits-mlp"] if args.quick else args.models.split(",")
    recipes = ["W8A8", "W2 per-channel"] if args.quick else args.recipes.split(",")
    print("### qat\n")
    print(markdown(rows(models, recipes, config, lsq=not args.quick), config))
    if args.minilm_epochs:
        m = minilm_row(args.minilm_epochs, args.minilm_lr)
        print(f"\nminilm-l6, int4 per-channel weights, {m['loss']} for {args.minilm_epochs} epochs (lr {args.minilm_lr:g}, "
              f"batch 16; best epoch {m['best_epoch']}) in {m['seconds']:.0f} s:\n\n| metric | PTQ | QAT |\n|---|---|---|")
        for k in ("cosine_to_fp32", "retrieval_agreement", "paraphrase_top1"):
            print(f"| {k} | {m[k + '_ptq']:.4f} | **{m[k + '_qat']:.4f}** |")


if __name__ == "__main__":
    main()

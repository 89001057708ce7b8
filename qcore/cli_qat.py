"""``python -m qcore qat``: quantization-aware training (``qcore.training``) on the command line.

Kept beside ``cli`` (which imports ``add_command`` into ``_EXTRA_COMMANDS``) so that module stays readable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qcore.errors import QcoreError


def cmd_qat(args):
    from qcore.cli import _progress, _table, _workload_and_recipe  # qcore.cli imports this module: read at run time
    from qcore.training import QATConfig, finetune, save

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise QcoreError(f"--out {args.out[:200]!r} exists and is not a directory; give a directory for the weights and recipe")
    w, recipe = _workload_and_recipe(args)
    config = QATConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, loss=args.loss, seed=args.seed,
                       patience=args.patience, learn_scales=args.learn_scales)
    progress = _progress(args)
    r = finetune(w, recipe, config, progress=(lambda f, row: progress(f, f"epoch {row.epoch}" if row else "")) if progress else None)
    if progress:
        print(file=sys.stderr)
    result = r.to_dict()
    if args.out:
        result["files"] = save(r.workload, w, recipe, args.out)
    head = r.metric
    rows = [{"": name, head: m[head], **{k: m[k] for k in ("agreement", "sqnr_db") if k in m and k != head}}
            for name, m in (("fp32", r.fp32_metrics), ("ptq", r.ptq_metrics), ("qat", r.qat_metrics))]
    history = [{"epoch": h.epoch, "train_loss": h.train_loss, "calibration_loss": h.calibration_loss, head: h.metric}
               for h in r.history]
    lines = [f"model {w.name}  recipe {recipe.name}  loss {r.loss}  {r.message} in {r.seconds:.1f} s; best epoch {r.best_epoch}",
             lambda: _table(rows), "per epoch (epoch 0 = PTQ):", lambda: _table(history)]
    lines += [f"note: {n}" for n in r.notes]
    if args.out:
        lines.append(f"wrote {result['files']['weights']} and {result['files']['recipe']}; reproduce with: python -m qcore "
                     f"evaluate {args.model} --recipe {result['files']['recipe']} --weights {result['files']['weights']}")
    return result, lambda: "\n".join(line() if callable(line) else line for line in lines)


def add_command(command):
    from qcore.cli import MAX_BATCH_SIZE, _count

    c = command("qat", cmd_qat, "quantization-aware training: fine-tune under a recipe, compare FP32, PTQ and QAT",
                model=True, recipe=True, data=True)
    c.add_argument("--epochs", type=_count(1000), default=5)
    c.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (constant)")
    c.add_argument("--batch-size", type=_count(MAX_BATCH_SIZE), default=64)
    c.add_argument("--loss", default="auto", choices=["auto", "cross_entropy", "distillation"],
                   help="auto: cross-entropy where the data has labels, else distillation to the FP32 outputs")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--patience", type=_count(1000), default=3, help="epochs without a better calibration loss before stopping")
    c.add_argument("--learn-scales", action="store_true", help="LSQ: learn the weights' step sizes too")
    c.add_argument("--out", help="directory for weights.safetensors and recipe.json")

"""Quantization-aware training (QAT): fine-tune a workload under a recipe, quantized in the forward pass.

PTQ quantizes trained weights once; QAT keeps training with the quantization *in the forward pass*, so
the weights move to where the grid serves them best ("the model learns to compensate"). On a private
copy of the BatchNorm-folded model (``Workload.folded``: QAT trains the folded convolutions, so there
are no BatchNorm statistics left to update or freeze):

- each quantized layer's weight is reparametrised as ``ste_fake_quantize(w, plan.weights)``: the forward
  computes exactly the values ``simulate`` would give these weights (same quantizer, same range method
  on the current weights), the backward is the clipped straight-through estimator (``numerics.ste``);
- each quantized layer's input is fake-quantized by a pre-hook with the same STE: dynamic specs take
  the range from each batch; static specs use the range calibrated on the model *as it was at the start
  of the epoch* (frozen within an epoch, re-calibrated after it);
- with ``learn_scales=True`` (LSQ, Esser et al. 2019) the weights' step sizes are learned too: one
  step per block of the recipe's granularity, initialised to min-max (``max|w| / qmax``) and kept in
  ``[0.01, 1] x`` that (LSQ may only tighten the clip, so the top code stays in use and the simulated
  min-max re-quantization of the baked weights gives back the same values). Only symmetric integer
  weights with range ``minmax`` qualify. The result holds the *baked* weights (already on the grid).
  Activation ranges are never learned: they are calibrated, as above.

Everything else (biases, LayerNorms, layers kept in float) trains in float. The model stays in eval
mode (no dropout), Adam with a constant learning rate, batches shuffled by a seeded generator: a run is
deterministic on the CPU for a given thread count.

After every epoch the current weights become a Workload (``result.finetuned_workload``), which is
simulated exactly as ``evaluate`` would (calibrated ranges included): its loss on the calibration split
picks the best epoch (early stopping after ``patience`` epochs without improvement; epoch 0 is PTQ
itself, so QAT never returns something worse than PTQ on that split) and its metric on the evaluation
split draws the curve. The evaluation split is never trained on nor used to choose. The returned
workload is the best epoch's, and its ``evaluate`` reproduces the reported QAT metric exactly.

Training data (``training_data``): a digits zoo model trains on the digits training split (the one its
FP32 weights were trained on; disjoint from calibration and test); any other workload on its
calibration split -- which then is also the early-stopping split (said in the result's notes).

Cancel (``should_stop()`` is checked between steps) and a NaN/Inf loss both stop at once and return the
best epoch finished so far (at worst PTQ), with ``stopped`` and ``message`` saying so.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from qcore.errors import QcoreError
from qcore.model.simulate import input_quantizer, modules_by_name
from qcore.model.workload import Data, Workload
from qcore.numerics.granularity import to_blocks
from qcore.numerics.spec import TensorSpec
from qcore.numerics.ste import lsq_fake_quantize, ste_fake_quantize
from qcore.recipe import Recipe
from qcore.training.losses import choose_loss, loss_function
from qcore.training.result import finetuned_workload


@dataclass(frozen=True)
class QATConfig:
    """epochs (full passes over the training data), lr (Adam, constant), batch_size (samples per step),
    loss ("auto" | "cross_entropy" | "distillation"), seed (shuffling), patience (epochs without a
    better calibration loss before stopping), learn_scales (LSQ weight steps)."""

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    loss: str = "auto"
    seed: int = 0
    patience: int = 3
    learn_scales: bool = False


@dataclass
class EpochRow:
    """One point of the training curve. Epoch 0 is PTQ (no training). Losses are means over the split."""

    epoch: int
    train_loss: float | None
    calibration_loss: float
    metric: float  # the task's headline metric on the evaluation split
    seconds: float  # wall time since the run started


@dataclass
class QATResult:
    workload: Workload  # the best epoch's fine-tuned model, a Workload of its own
    recipe: Recipe
    loss: str  # "cross_entropy" | "distillation": which loss ran
    config: QATConfig
    history: list[EpochRow]
    best_epoch: int
    stopped: str  # "completed" | "early_stopping" | "cancelled" | "diverged"
    message: str
    fp32_metrics: dict
    ptq_metrics: dict
    qat_metrics: dict
    train_samples: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.workload.task.headline

    def to_dict(self) -> dict:
        return {"model": self.workload.name, "recipe": self.recipe.to_dict(), "metric": self.metric,
                "loss": self.loss, "config": asdict(self.config), "best_epoch": self.best_epoch,
                "stopped": self.stopped, "message": self.message, "train_samples": self.train_samples,
                "seconds": self.seconds, "fp32": self.fp32_metrics, "ptq": self.ptq_metrics, "qat": self.qat_metrics,
                "history": [asdict(r) for r in self.history], "notes": list(self.notes)}


def training_data(workload: Workload) -> tuple[Data, str]:
    """The data QAT trains on and its name (see the module docstring); never the evaluation split."""
    from qcore.zoo.digits import ARCHITECTURES, splits

    if workload.source == "zoo" and workload.name in ARCHITECTURES:
        return splits()["train"], "the digits training split"
    return workload.calibration, "the calibration split (also used for early stopping)"


class _WeightSTE(nn.Module):
    """Parametrization: the layer's weight as the simulation quantizes it, trained through the STE."""

    def __init__(self, spec: TensorSpec):
        super().__init__()
        self.spec = spec

    def forward(self, w):
        return ste_fake_quantize(w, self.spec)


class _WeightLSQ(nn.Module):
    """Parametrization: LSQ with one learned step per block (see the module docstring)."""

    def __init__(self, spec: TensorSpec, w: torch.Tensor):
        super().__init__()
        self.spec, self.qmax = spec.for_shape(tuple(w.shape)), spec.fmt.qmax
        self.step = nn.Parameter(self._cap(w).clone())

    def _cap(self, w):  # the min-max step, (n_blocks,)
        s = self.spec
        return (to_blocks(w.detach(), s.granularity, s.axis, s.group_size).abs().amax(1) / self.qmax).clamp(min=1e-12)

    def forward(self, w):
        cap = self._cap(w)
        s = self.spec
        return lsq_fake_quantize(w, torch.clamp(self.step, min=0.01 * cap, max=cap), self.qmax,
                                 s.granularity, s.axis, s.group_size)


class _InputSTE:
    """Forward pre-hook fake-quantizing a layer's first input with the STE (range: fixed lo/hi, or dynamic)."""

    def __init__(self, spec: TensorSpec, lo, hi):
        self.spec, self.lo, self.hi, self.active = spec, lo, hi, True

    def __call__(self, module, args):
        x = args[0]
        if not self.active or not torch.is_floating_point(x):
            return None
        return (ste_fake_quantize(x, self.spec, self.lo, self.hi).to(x.dtype),) + tuple(args[1:])


def check_recipe(workload: Workload, recipe: Recipe, learn_scales: bool) -> None:
    plans = recipe.resolve(workload.layer_shapes)
    quantized = [n for n, p in plans.items() if any(s is not None and s.format != "fp32" for s in (p.weights, p.activations))]
    if not quantized:
        raise QcoreError(f"recipe {recipe.name!r} keeps every layer in float: QAT has nothing to adapt to; "
                         "choose a recipe that quantizes weights or activations (e.g. int8-static)")
    if isinstance(workload.model, torch.jit.ScriptModule):
        raise QcoreError("a TorchScript model cannot be fine-tuned; upload a torch.export (.pt2), ONNX or safetensors model")
    if learn_scales:
        for n, p in plans.items():
            w = p.weights
            if w is not None and w.format != "fp32" and not (w.fmt.step_is_scale and w.symmetric and w.range == "minmax"):
                raise QcoreError(f"learned scales (LSQ) need symmetric integer weights with range minmax; layer {n!r} has "
                                 f"{w.format} {'symmetric' if w.symmetric else 'affine'} {w.range}: turn learned scales off")


class _Trainer:
    """The training copy of the folded model and what snapshots it (see the module docstring)."""

    def __init__(self, workload: Workload, recipe: Recipe, learn_scales: bool):
        self.workload, self.recipe, self.learn_scales = workload, recipe, learn_scales
        self.model = copy.deepcopy(workload.folded[0]).eval()
        self.inputs: dict[str, _InputSTE] = {}
        plans = recipe.resolve(workload.layer_shapes)
        for name, module in modules_by_name(self.model, workload.layers).items():
            spec = plans[name].weights
            if spec is not None and spec.format != "fp32":
                q = _WeightLSQ(spec, module.weight) if learn_scales else _WeightSTE(spec)
                parametrize.register_parametrization(module, "weight", q)
            a = plans[name].activations
            if a is not None and a.format != "fp32" and workload.layers[name].kind != "Embedding":
                self.inputs[name] = hook = _InputSTE(a, None, None)
                module.register_forward_pre_hook(hook)
        for p in self.model.parameters():
            p.requires_grad_(p.is_floating_point())

    def set_ranges(self, calibrated: Workload) -> None:
        """Static input ranges as ``simulate`` takes them from ``calibrated`` (a workload of the current weights);
        a static layer the calibration data never reached is left unquantized, as ``simulate`` leaves it."""
        calib = calibrated.calibration_stats() if any(not h.spec.dynamic for h in self.inputs.values()) else None
        for name, hook in self.inputs.items():
            iq = input_quantizer(name, calibrated.layers[name].kind, hook.spec, calib)
            hook.active = iq is not None
            hook.lo, hook.hi = (iq.lo, iq.hi) if iq is not None else (None, None)

    def snapshot(self) -> Workload:
        """The current weights as a plain folded model (latent float weights; LSQ: the baked values)."""
        plain = copy.deepcopy(self.workload.folded[0])
        trained = dict(self.model.named_modules())
        with torch.no_grad():
            for name, module in plain.named_modules():
                src = trained[name]
                for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                    if pname == "weight" and parametrize.is_parametrized(src, "weight"):
                        t.copy_(src.weight if self.learn_scales else src.parametrizations.weight.original)
                    else:
                        t.copy_(getattr(src, pname))
        return finetuned_workload(self.workload, plain)


def _batch(data: Data, idx) -> tuple[torch.Tensor, ...]:
    return tuple(t[idx] for t in data.inputs)


def _mean_loss(model: nn.Module, data: Data, targets: torch.Tensor, loss_fn, batch_size: int) -> float:
    """Mean of ``loss_fn`` over ``data`` in batches (weighted by batch length), no gradients."""
    total, n = 0.0, len(data)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            labels = None if data.labels is None else data.labels[idx]
            total += float(loss_fn(model(*_batch(data, idx)).float(), targets[idx], labels)) * len(idx)
    return total / n


def finetune(workload: Workload, recipe: Recipe, config: QATConfig = QATConfig(), train: Data | None = None,
             progress: Callable[[float, EpochRow | None], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> QATResult:
    """Fine-tune ``workload`` under ``recipe`` (see the module docstring); ``train`` defaults to
    ``training_data(workload)``. ``progress(fraction, row)`` is called after every step (row None) and
    every epoch (its ``EpochRow``)."""
    start = time.perf_counter()
    check_recipe(workload, recipe, config.learn_scales)
    train_name = "the given training data"
    if train is None:
        train, train_name = training_data(workload)
    has_labels = train.labels is not None and workload.calibration.labels is not None
    loss_name = choose_loss(config.loss, workload.task.kind, has_labels)
    loss_fn = loss_function(loss_name, workload.task.kind)
    notes = [f"trained on {train_name} ({len(train)} samples) with "
             + ("cross-entropy on its labels" if loss_name == "cross_entropy" else
                "distillation towards the FP32 model's outputs" + ("" if has_labels else " (the data has no labels)"))]
    fp32 = workload.folded[0]
    if loss_name == "cross_entropy":
        train_targets, calib_targets = train.labels, workload.calibration.labels
    else:
        train_targets, calib_targets = workload.run(fp32, train), workload.run(fp32, workload.calibration)
    head, bs = workload.task.headline, config.batch_size

    trainer = _Trainer(workload, recipe, config.learn_scales)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[EpochRow] = []

    def evaluate(current: Workload, train_loss):
        """Simulate ``current`` exactly as ``evaluate`` does; one row of the curve, and its metrics."""
        sim = current.simulate(recipe)
        metrics = current.task.metrics(current.run(sim.model, current.evaluation), current.reference_outputs,
                                       current.evaluation.labels)
        cal_loss = _mean_loss(sim.model, current.calibration, calib_targets, loss_fn, bs)
        row = EpochRow(len(history), train_loss, cal_loss, metrics[head], time.perf_counter() - start)
        history.append(row)
        if progress:
            progress(len(history) / (config.epochs + 1), row)
        return row, metrics

    current = trainer.snapshot()
    row, metrics = evaluate(current, None)
    best = (row.calibration_loss, 0, current, metrics)
    stopped, message = "completed", f"trained {config.epochs} epoch(s)"
    steps_per_epoch = math.ceil(len(train) / bs)
    for epoch in range(1, config.epochs + 1):
        trainer.set_ranges(current)  # static ranges: calibrated on the weights this epoch starts from
        losses = []
        for step, idx in enumerate(torch.randperm(len(train), generator=gen).split(bs)):
            if should_stop and should_stop():
                stopped, message = "cancelled", f"cancelled during epoch {epoch}"
                break
            try:  # weights that became NaN/Inf are refused by the quantizer (QcoreError) before the loss sees them
                out = trainer.model(*_batch(train, idx))
                loss = loss_fn(out.float(), train_targets[idx], None if train.labels is None else train.labels[idx])
                bad = None if torch.isfinite(loss) else f"the loss became {float(loss.detach())}"
            except QcoreError:
                bad = "the weights or activations became NaN/Inf"
            if bad:
                stopped, message = "diverged", (f"{bad} at epoch {epoch}, step {step + 1}: training stopped "
                                                f"(try a smaller learning rate than {config.lr:g})")
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()) * len(idx))
            if progress:
                progress((epoch - 1 + (step + 1) / steps_per_epoch) / (config.epochs + 1), None)
        if stopped != "completed":
            break
        current = trainer.snapshot()
        row, metrics = evaluate(current, sum(losses) / len(train))
        if row.calibration_loss < best[0]:
            best = (row.calibration_loss, epoch, current, metrics)
        elif epoch - best[1] >= config.patience:
            stopped, message = "early_stopping", (f"stopped after epoch {epoch}: the calibration loss has not improved "
                                                  f"for {config.patience} epoch(s)")
            break
    _, best_epoch, result, qat_metrics = best
    if stopped in ("cancelled", "diverged"):
        message += f"; kept epoch {best_epoch}" + (" (the PTQ model)" if best_epoch == 0 else "")
    return QATResult(result, recipe, loss_name, config, history, best_epoch, stopped, message,
                     workload.fp32_metrics, workload.evaluate(recipe).quantized.metrics, qat_metrics,
                     len(train), time.perf_counter() - start, notes + [f"best epoch (lowest calibration loss): {best_epoch}"])

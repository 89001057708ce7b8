"""A zoo name or a model file, plus an optional data file -> ``Workload``: the one entry point for uploads.

The workload's ``content_hash`` is computed here from what the result depends on: the model file's
name and bytes (for ONNX also its loaded weights, which may come from a weight file beside it), the
data file's name and bytes (or the ``shape:`` spec), the label column and the loader options.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.model.workload import Data, Workload, content_hash
from qcore.model.task import OUTPUT_KINDS, Task, output_task
from qcore.io.data import (N_SYNTHETIC, SPLIT_SEED, fit, load_data_file, match_names, parse_shape, split,
                           synthetic_data, with_batch_axes)
from qcore.limits import first_line
from qcore.model.first_output import single_output
from qcore.io.models import InputSpec, LoadedModel, load_model_file

def _a(fmt: str) -> str:
    """'a torch.export' / 'an ONNX' / 'a TorchScript': the article and the format's usual spelling."""
    shown = {"onnx": "ONNX", "torchscript": "TorchScript"}.get(fmt, fmt)
    return ("an " if shown[:1].lower() in "aeiou" or shown.startswith("ONNX") else "a ") + shown


FIDELITY_NOTE = "metrics are fidelity-only (agreement with the FP32 model), not accuracy"


def _run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except QcoreError:
        raise
    except Exception as e:  # the user's model failing on the user's data
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise QcoreError(f"the model failed on inputs of shape {shapes} ({first_line(e)}); check that the data "
                         "matches the model's input shape and dtype") from None
    if not isinstance(out, torch.Tensor):
        raise QcoreError(f"the model returns {type(out).__name__}, not one tensor; export a wrapper whose forward "
                         "returns the one output to compare")
    return out.float()


def _batchhuman_size(model: nn.Module, data: Data, example_batch: int) -> int | None:
    """None if the model runs any batch size with the same per-sample results, else the one size it
    accepts (a program exported with a fixed batch dimension)."""
    n = min(3, len(data))
    try:
        one, many = _run(model, data.subset(slice(0, 1)).inputs), _run(model, data.subset(slice(0, n)).inputs)
        tol = 1e-4 * (1 + float(one.abs().max())) if one.numel() else 0.0
        coupled = getattr(model, "batch_coupled", False)  # ranges over the whole batch (a quantized file's): shapes only
        if one.shape[:1] == (1,) and many.shape[:1] == (n,) and (
                coupled or torch.allclose(many[:1], one, rtol=1e-3, atol=tol)):
            return None
        problem = QcoreError("the model's output does not have the batch dimension first; export a model whose "
                             "output is (batch, ...)")
    except QcoreError as e:
        problem = e
    if 1 < example_batch <= len(data):
        try:
            if _run(model, data.subset(slice(0, example_batch)).inputs).shape[:1] == (example_batch,):
                return example_batch
        except QcoreError:
            pass
    raise problem


def _fidelity_task() -> Task:
    return output_task("embedding", (), False, "no data to run the model on")


def infer_output_kind(sample_shape: tuple[int, ...], final_activation: str | None, has_labels: bool,
                      known: str | None = None, unit_rows: bool = False,
                      other_activations: tuple[str | None, ...] = ()) -> tuple[str, str]:
    """(kind, why) for an output with per-sample shape ``sample_shape``, in this order: the model's own task
    (zoo models); probabilities if the graph ends in a Sigmoid or Softmax; an embedding if, without labels,
    every FP32 output row has unit L2 length (``unit_rows``: an L2-normalised embedding, which logits
    practically never are); regression values if, without labels, the output is (N, C) with no activation
    while another output of the model (``other_activations``: how the model's other outputs end) ends in a
    Sigmoid or Softmax; class logits if the output is (N, C) with C >= 2; a regression value if it is
    one number per sample; otherwise an embedding (compared with FP32 by cosine) -- detection maps and
    sequence logits look like embeddings by shape alone, so they are chosen by the user (``--output-kind``,
    the sidebar).

    Why a raw (N, C) head beside a Sigmoid/Softmax head is regression: a model with several heads that turns
    one into probabilities has put its class (or presence) scores there -- a detector's face probability
    beside its box offsets and landmarks (MTCNN), an objectness score beside box coordinates -- so the heads
    it leaves raw are values to regress, not logits whose argmax means anything. A model that returns raw
    logits beside probabilities of the same classes is rare and its user sets ``--output-kind``."""
    if known:
        return known, "the model's own task"
    if final_activation:
        return "probabilities", f"inferred from the final {final_activation.capitalize()}"
    if unit_rows and not has_labels and len(sample_shape) == 1 and sample_shape[0] >= 2:
        return "embedding", f"inferred from output rows of unit length (an L2-normalised embedding, N x {sample_shape[0]})"
    activated = [(i, a) for i, a in enumerate(other_activations, start=2) if a]
    if activated and not has_labels and len(sample_shape) == 1:
        i, a = activated[0]
        return "regression", (f"inferred from the output shape (N, {sample_shape[0]}) without an activation while "
                              f"output {i} of the model ends in a {a.capitalize()}: its probabilities are the class "
                              "scores, so this head holds values to regress (box offsets, say)")
    if len(sample_shape) == 1 and sample_shape[0] >= 2:
        return "classification", (f"inferred from the output shape (N, {sample_shape[0]})"
                                   + (" and the labels in the data" if has_labels else ""))
    if math.prod(sample_shape) == 1:
        return "regression", "inferred from one output value per sample"
    return "embedding", f"inferred from the output shape (N, {', '.join(map(str, sample_shape))})"


def _probability_activation(reference: torch.Tensor, final_activation: str | None) -> str:
    """How the probabilities were made: the graph's final op, else softmax if every row sums to 1."""
    if final_activation:
        return final_activation
    lo, hi = float(reference.min()), float(reference.max())
    if lo < 0 or hi > 1:
        raise QcoreError(f"the model's outputs run from {lo:.4g} to {hi:.4g}, so they are not probabilities; choose "
                         "another output kind (classification for logits, regression for values)")
    rows = reference.reshape(-1, reference.shape[-1]).double().sum(-1)
    return "softmax" if reference.shape[-1] > 1 and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-3)) \
        else "sigmoid"


def _choose_task(output_kind: str | None, loaded: LoadedModel, reference: torch.Tensor, labels: torch.Tensor | None,
                 source: str) -> Task:
    """The task for ``output_kind`` (None: inferred); labels are checked against it here."""
    sample = tuple(reference.shape[1:])
    if output_kind is not None and output_kind not in OUTPUT_KINDS:
        raise QcoreError(f"unknown output kind {output_kind!r}; choose one of {', '.join(OUTPUT_KINDS)}")
    rows = reference.reshape(len(reference), -1).double().norm(dim=1) if reference.ndim == 2 else None
    unit = rows is not None and len(rows) > 0 and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-3))
    kind, why = (output_kind, "set by you") if output_kind else \
        infer_output_kind(sample, loaded.final_activation, labels is not None, loaded.task_kind, unit,
                          loaded.output_activations[1:])
    activation = _probability_activation(reference, loaded.final_activation) if kind == "probabilities" else None
    if labels is not None and (kind == "classification" or activation == "softmax"):
        n_classes = sample[-1]
        if torch.is_floating_point(labels):
            raise QcoreError(f"{source}: labels must be whole class indices 0..{n_classes - 1}, got fractional values")
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise QcoreError(f"{source}: labels run from {int(labels.min())} to {int(labels.max())} but the model has "
                             f"{n_classes} outputs (classes 0..{n_classes - 1}); check the label column")
    if labels is not None and activation == "sigmoid" and math.prod(sample) == 1 and not bool(
            ((labels == 0) | (labels == 1)).all()):
        raise QcoreError(f"{source}: labels of a probability output must be 0 or 1 (got values from "
                         f"{float(labels.min()):g} to {float(labels.max()):g}); check the label column")
    return output_task(kind, sample, labels is not None, why, activation)


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:  # e.g. a name longer than the file system allows: the file checks below say so
        return False


def load_workload(model: str, data: str | None = None, *, allow_pickle: bool = False, label_column: str | None = None,
                  max_bytes: int | None = None, allow_no_data: bool = False,
                  output_kind: str | None = None, batch_axes: dict[str, int] | None = None) -> Workload:
    """A zoo name (``data`` then replaces its calibration/evaluation data), a model file, or a Hugging Face
    causal-LM folder or ``.zip`` (``qcore.io.hf``: ``data`` is then a text file), with an optional data file (or
    ``"shape:1x3x32x32"``) -> ``Workload``. Every problem is one QcoreError line.

    A model that records no input shape (TorchScript, a pickled model) needs data to run. With
    ``allow_no_data`` and no ``data`` it loads anyway, with no samples: its layers and weights only
    (what ``inspect`` lists), and a note saying that evaluation needs data.

    ``output_kind`` (one of ``OUTPUT_KINDS``) says what the model's first output is; None infers it
    (``infer_output_kind``). The headline metric follows it, and a note says which and why.

    ``batch_axes`` (input name -> axis) says which axis of a data file's input counts its samples where that
    is not axis 0 and cannot be inferred (``data.with_batch_axes``); the exported file keeps each input's layout."""
    from qcore.zoo import ZOO, load

    if model not in ZOO and (str(model).lower().endswith(".zip") or _is_dir(model)):  # a Hugging Face checkpoint
        from qcore.io.hf import load_hf_workload

        if batch_axes:  # its text is cut into windows of token ids (samples, tokens): the batch is axis 0
            raise QcoreError("batch axes apply to a data file's arrays; a Hugging Face model's text is cut into "
                             "windows of token ids with the samples on axis 0, so drop --batch-axis")
        return load_hf_workload(model, data, max_bytes)
    shape_spec = data is not None and str(data).startswith("shape:")
    data_part = None if data is None else str(data) if shape_spec else [Path(data).name, Path(data)]
    if batch_axes and (data is None or shape_spec):
        raise QcoreError("batch axes apply to a data file's inputs; give the data file (--data FILE) or drop them")
    # the data first: an ONNX model's scalar inputs take their values from it (see ``load_onnx_file``)
    raw = None if data is None or shape_spec else load_data_file(data, label_column, max_bytes)
    if model in ZOO:
        base = load(model)
        if data is None and output_kind is None:
            return base
        if data is None:
            ref = base.reference_outputs
            task = _choose_task(output_kind, LoadedModel(base.model, "zoo", None), ref, base.evaluation.labels, base.name)
            return dataclasses.replace(base, task=task, notes=[*base.notes, f"output scored as {task.kind} (set by you): "
                                                               f"headline metric {task.headline}"],
                                       evaluation=base.evaluation if task.headline == "accuracy" else
                                       Data(base.evaluation.inputs), content_hash=content_hash(base.content_hash, output_kind),
                                       _lock=threading.RLock())
        first = tuple(t[:1] for t in base.calibration.inputs)
        specs = [InputSpec(tuple(t.shape[1:]), frozenset(range(t.dim() - 1)) if not torch.is_floating_point(t) else frozenset(),
                           t.dtype, (int(t.min()), int(t.max())) if not torch.is_floating_point(t) else (0, 1)) for t in first]
        loaded = LoadedModel(base.model, "zoo", specs, task_kind=base.task.kind)
        name = base.name
        model_part = ["zoo", base.content_hash]
    else:
        try:
            exists = Path(model).is_file()
        except OSError as e:  # e.g. a file name longer than the file system allows
            raise QcoreError(f"model file {model[:80]!r}... cannot be opened ({e.strerror})") from None
        if not exists:
            raise QcoreError(f"{model!r} is neither a zoo model ({', '.join(ZOO)}) nor a file that exists")
        loaded = load_model_file(model, allow_pickle, max_bytes, None if raw is None else raw.constants)
        name = Path(model).name
        weights = sorted(loaded.model.state_dict().items()) if loaded.format == "onnx" else []
        model_part = ["file", name, Path(model), [[k, t] for k, t in weights]]
    notes = list(loaded.notes)
    workload_cls = WeightOnlyWorkload if loaded.weight_only else Workload
    if data is None and loaded.inputs is None and allow_no_data:
        notes.append(f"no data: {_a(loaded.format)} model does not record its input shape, so only its layers and "
                     "weights are read; evaluating it needs a data file (--data FILE) or the shape of one example "
                     "input (--data shape:1x3x32x32)")
        none = Data((torch.zeros(0),))
        return workload_cls(name=name, model=loaded.model, calibration=none, evaluation=none, task=_fidelity_task(),
                            description=f"{name}, {_a(loaded.format)} model, without data (layers and weights only).",
                            source=loaded.format, notes=notes,
                            content_hash=content_hash("load_workload", model_part, None, label_column, allow_pickle))
    if data is None or shape_spec:
        if shape_spec:
            loaded.inputs = parse_shape(str(data)[len("shape:"):])
        if loaded.inputs is None:
            raise QcoreError(f"{_a(loaded.format)} model does not record its input shape: give a data file (--data FILE) "
                             "or the shape of one example input (--data shape:1x3x32x32)")
        dataset, source = synthetic_data(loaded.inputs), "synthetic inputs"
        shape = "x".join(map(str, (1,) + loaded.inputs[0].sample_shape))
        notes.append(f"no data file: {N_SYNTHETIC} synthetic samples (seeded standard normal, shaped like the example "
                     f"input {shape}); {FIDELITY_NOTE}")
    else:
        source = Path(data).name
        dataset, moved = with_batch_axes(match_names(raw, loaded.input_names, source), batch_axes or {},
                                         loaded.input_names, source)
        dataset = fit(dataset, loaded.inputs, source)
        notes += moved
    probe = loaded.example_batch if 1 < loaded.example_batch <= len(dataset) else 1
    loaded.model, several = single_output(loaded.model, dataset.subset(slice(0, probe)).inputs)
    notes += [several] if several else []
    fixed = _batchhuman_size(loaded.model, dataset, loaded.example_batch)
    reference = _run(loaded.model, dataset.subset(slice(0, fixed or min(len(dataset), 8))).inputs)
    labels = dataset.labels
    task = _choose_task(output_kind, loaded, reference, labels, source)
    if task.headline in ("accuracy",) or labels is None:
        if labels is None and data is not None and not shape_spec and task.kind in ("classification", "probabilities"):
            notes.append(f"{source} has no labels: {FIDELITY_NOTE}")
    else:
        notes.append(f"labels in {source} are not used: the model's output {tuple(reference.shape[1:])} per sample "
                     f"is scored as {task.kind}; metrics compare with the FP32 outputs")
        dataset = dataclasses.replace(dataset, labels=None)
    notes.append(f"output scored as {task.kind} ({task.why}): headline metric {task.headline}")
    calibration, evaluation = split(dataset, fixed)
    if not shape_spec and data is not None:
        notes.append(f"data {source}: {len(dataset)} samples split (seed {SPLIT_SEED}) into {len(calibration)} for "
                     f"calibration and {len(evaluation)} for evaluation")
    if fixed:
        notes.append(f"the program only runs batches of {fixed}: data is used in whole batches "
                     f"({len(calibration)} calibration, {len(evaluation)} evaluation samples)")
    return workload_cls(
        name=name, model=loaded.model, calibration=calibration, evaluation=evaluation, task=task,
        description=(f"{name}, {_a(loaded.format)} model, evaluated on {source} ({len(calibration)} calibration / "
                     f"{len(evaluation)} evaluation samples). Headline metric: {task.headline}."),
        source=loaded.format, notes=notes, batch_size=fixed or 128,
        content_hash=content_hash("load_workload", model_part, data_part, label_column, allow_pickle,
                                  *([output_kind] if output_kind else []),
                                  *([sorted(batch_axes.items())] if batch_axes else [])))


@dataclass(eq=False)
class WeightOnlyWorkload(Workload):
    """A workload whose model input hooks cannot reach (TorchScript): only weights can be quantized."""

    def simulate(self, recipe, quantized_weights=None):
        quantized = [n for n in self.layers if (a := recipe.plan(n).activations) is not None and a.format != "fp32"]
        if quantized:
            raise QcoreError(f"recipe {recipe.name!r} quantizes activations (e.g. the input of {quantized[0]!r}), which is "
                             f"unavailable for {self.source} models; use a weight-only recipe (int8-weight-only, "
                             "int4-weight-only, nf4) or export the model with torch.export.save (.pt2) for full support")
        return super().simulate(recipe, quantized_weights)

"""A workload: a model with its calibration data, evaluation data and metric.

Zoo entries and uploads both become a ``Workload``; everything downstream (evaluate, sensitivity,
search, the app) takes one. It caches what every recipe shares -- the BatchNorm-folded FP32 copy,
its quantizable layers, calibration statistics and the FP32 reference outputs -- and never
modifies ``model``. One workload object may serve every session of a server (``st.cache_resource``),
so what it shares is never changed after it is computed: hooks and in-place edits go on copies.

``content_hash`` identifies what the workload was made from (the uploaded bytes, or the zoo entry's
weights and data); caches shared between users key on it, never on the in-memory model.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qcore.model import calibrate as calibrate_mod
from qcore.errors import QcoreError
from qcore.model.task import Task
from qcore.recipe import Recipe
from qcore.model.simulate import LayerInfo, Simulation, find_layers, fold_batchnorm, simulate
from qcore.model.size import model_size
from qcore.model import transforms as transforms_mod


@dataclass
class Data:
    """Model inputs (a tuple of tensors sharing N samples) and optional labels (N,).

    ``names``: the inputs' names when the data file named them (matched to the model's input names);
    ``constants``: scalar (rank-0) inputs by name, one value fed to every batch; ``batch_axes``: per input,
    the axis that counts its N samples (empty: axis 0 of every input) -- an LSTM state (2, N, 128) has 1;
    ``real_rows``: the index of an input that marks each sample's real positions (an attention mask (N, T),
    nonzero = real; None: every position is), so what rounding learns from the data (GPTQ's Hessians, AdaRound's
    rows, the embedding lookup counts) leaves padding out (``qcore.model.rounding``).
    Batches and subsets slice every input along its own axis."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None
    names: tuple[str, ...] | None = None
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_axes: tuple[int, ...] = ()
    real_rows: int | None = None

    def axis(self, i: int) -> int:
        """The batch axis of input ``i``."""
        return self.batch_axes[i] if self.batch_axes else 0

    def __len__(self) -> int:
        return int(self.inputs[0].shape[self.axis(0)])

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
        return [self.subset(slice(i, i + batch_size)).inputs for i in range(0, len(self), batch_size)]

    def subset(self, index) -> "Data":
        """The samples ``index`` (a slice or an index tensor) selects, from every input along its batch axis."""
        return Data(tuple(t[(slice(None),) * self.axis(i) + (index,)] for i, t in enumerate(self.inputs)),
                    None if self.labels is None else self.labels[index], self.names, self.constants, self.batch_axes,
                    self.real_rows)


def content_hash(*parts) -> str:
    """BLAKE2b-256 hex digest (64 characters) of ``parts`` in order. A part is bytes, a str, a ``Path``
    (the file's bytes, read in 1 MiB chunks), a tensor (dtype, shape and raw bytes), a number, None,
    or a list/tuple of parts; each is tagged and length-prefixed, so parts never run together."""
    h = hashlib.blake2b(digest_size=32)

    def add(tag: bytes, payload: bytes = b"") -> None:
        h.update(tag + len(payload).to_bytes(8, "little") + payload)

    def visit(part) -> None:
        if part is None:
            add(b"n")
        elif isinstance(part, bytes):
            add(b"b", part)
        elif isinstance(part, str):
            add(b"s", part.encode())
        elif isinstance(part, (bool, int, float)):
            add(b"v", repr(part).encode())
        elif isinstance(part, Path):
            add(b"f", str(part.stat().st_size).encode())
            with part.open("rb") as f:
                while chunk := f.read(2**20):
                    h.update(chunk)
        elif isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            add(b"t", f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(part, (list, tuple)):
            add(b"l", str(len(part)).encode())
            for p in part:
                visit(p)
        else:
            raise TypeError(f"content_hash cannot hash a {type(part).__name__}")

    for part in parts:
        visit(part)
    return h.hexdigest()


def _unshared_identity() -> str:
    """A workload built without its source bytes gets a random identity: nothing it computes is
    ever served to another workload (or read back from another process's cache)."""
    return secrets.token_hex(32)


@dataclass(eq=False)
class Workload:
    name: str
    model: nn.Module
    calibration: Data
    evaluation: Data
    task: Task
    description: str = ""
    source: str = "zoo"
    notes: list[str] = field(default_factory=list)
    batch_size: int = 128
    content_hash: str = field(default_factory=_unshared_identity)  # hex digest of the source bytes
    tokenizer: object | None = None  # a language model's qcore.model.lm.TextCodec (text <-> token ids)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # ---- what every recipe shares (computed once, under the lock, then never changed) --------
    @property
    def folded(self) -> tuple[nn.Module, list[tuple[str, str]]]:
        """``(model with BatchNorms folded into the convs, [(conv, bn) names])``: a copy of ``model``,
        shared by every caller -- read it or copy it, never register hooks on it or change it."""
        if "_folded" not in self.__dict__:
            with self._lock:
                if "_folded" not in self.__dict__:
                    m = copy.deepcopy(self.model).eval()
                    self.__dict__["_folded"] = (m, fold_batchnorm(m))
        return self.__dict__["_folded"]

    @cached_property
    def layers(self) -> dict[str, LayerInfo]:
        return find_layers(self.folded[0])

    @cached_property
    def kv_cache_slices(self) -> tuple:
        """Language models: each attention's key/value projection (``kv_cache.find_cache_slices``); else ()."""
        from qcore.model.kv_cache import find_cache_slices

        return find_cache_slices(self.folded[0])

    @property
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.weight_shape for n, i in self.layers.items()}

    def calibration_stats(self, progress=None) -> dict[str, calibrate_mod.ActivationStats]:
        """Input statistics of every layer over the calibration data, computed once (``calibrate``
        runs on its own copy of the folded model) and shared: read them, never change them."""
        if "_calib" not in self.__dict__:
            with self._lock:
                if "_calib" not in self.__dict__:
                    m = self.folded[0]
                    self.__dict__["_calib"] = calibrate_mod.calibrate(
                        m, self.layers, self.calibration.batches(self.batch_size), progress)
        return self.__dict__["_calib"]

    @property
    def rounder(self):
        """The ``rounding.Rounder`` of the folded model over the calibration data: GPTQ/AdaRound weights,
        computed once per (layer, spec) and shared (read them, never change them)."""
        if "_rounder" not in self.__dict__:
            with self._lock:
                if "_rounder" not in self.__dict__:
                    from qcore.model.rounding import Rounder

                    self.__dict__["_rounder"] = Rounder(self.folded[0], {n: i.kind for n, i in self.layers.items()},
                                                        lambda: self.calibration.batches(self.batch_size),
                                                        self.calibration.real_rows)
        return self.__dict__["_rounder"]

    def rounded_weights(self, recipe: Recipe, progress: Callable[[float, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> dict:
        """Layer -> ``QuantizedTensor`` for every layer ``recipe`` rounds by GPTQ/AdaRound (cached, see ``rounder``);
        ``should_stop()`` true between layers raises ``rounding.RoundingCancelled``."""
        from qcore.model.rounding import rounding_specs

        rounder = self.rounder
        specs = rounding_specs(recipe, recipe.resolve(self.layer_shapes), rounder.kinds, rounder.modules)
        return rounder.weights(specs, progress, should_stop)
    # ---- the recipe's transforms (SmoothQuant, AWQ, CLE): a transformed float copy per recipe ----------
    @property
    def groups(self) -> list[transforms_mod.Group]:
        """Where a per-channel scale folds (``transforms.find_groups`` on the folded model, tested on the first
        calibration samples), computed once."""
        if "_groups" not in self.__dict__:
            with self._lock:
                if "_groups" not in self.__dict__:
                    probe = self.calibration.subset(slice(0, transforms_mod.PROBE_SAMPLES)).inputs
                    self.__dict__["_groups"] = transforms_mod.find_groups(self.folded[0], self.layers, probe)
        return self.__dict__["_groups"]

    def transformed(self, recipe: Recipe) -> transforms_mod.Transformed | None:
        """The folded float model with ``recipe``'s SmoothQuant/AWQ/CLE transforms applied (None: it has none),
        with its calibration statistics (``.calibration``, computed on it) and input means. Shared like
        ``folded`` (read it or copy it); the last ``TRANSFORMED_CACHE`` are kept."""
        steps = tuple(t for t in recipe.transforms if t.name != "bias_correction")
        if not steps and not recipe.transforms:
            return None
        plans = recipe.resolve(self.layer_shapes)
        planned = any(t.name == "awq" or (t.name == "smoothquant" and t.option("alpha") == "search") for t in steps)
        key = (steps, tuple((p.weights, p.activations) for p in plans.values()) if planned else ())  # AWQ, alpha search: the quantizers
        cache = self.__dict__.setdefault("_transformed", {})
        if key not in cache:
            with self._lock:
                if key not in cache:
                    kinds = {n: i.kind for n, i in self.layers.items()}
                    batches = self.calibration.batches(self.batch_size)
                    if steps:
                        done = transforms_mod.apply_transforms(self.folded[0], kinds, steps, self.groups, batches, plans)
                    else:
                        done = transforms_mod.Transformed(self.folded[0])
                    while len(cache) >= TRANSFORMED_CACHE:
                        cache.pop(next(iter(cache)))
                    cache[key] = done
        return cache[key]

    def calibration_of(self, recipe: Recipe) -> dict[str, calibrate_mod.ActivationStats]:
        """Calibration statistics of the model ``recipe`` quantizes (the transformed one: static ranges are
        calibrated after SmoothQuant has moved them)."""
        done = self.transformed(recipe)
        if done is None or done.model is self.folded[0]:
            return self.calibration_stats()
        if done.calibration is None:
            with self._lock:
                if done.calibration is None:
                    done.calibration = calibrate_mod.calibrate(done.model, self.layers,
                                                               self.calibration.batches(self.batch_size))
        return done.calibration

    def input_means(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Mean of each layer's input per channel (C,) over the calibration data, on ``recipe``'s float model."""
        done = self.transformed(recipe)
        if done.means is None:
            with self._lock:
                if done.means is None:
                    stats = transforms_mod.input_stats(done.model, self.layers, self.calibration.batches(self.batch_size))
                    done.means = {n: s.mean for n, s in stats.items()}
        return done.means

    @cached_property
    def reference_outputs(self) -> torch.Tensor:
        return self.run(self.model, self.evaluation)

    @cached_property
    def fp32_metrics(self) -> dict:
        ref = self.reference_outputs
        return self.task.metrics(ref, ref, self.evaluation.labels)

    # ---- per recipe ------------------------------------------------------------------------
    def run(self, model: nn.Module, data: Data, progress: Callable[[float], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Outputs of ``model`` over ``data``, concatenated along the batch dimension. ``progress(fraction)``
        is called after each batch; ``should_stop()`` true before a batch raises ``EvaluationCancelled``."""
        model.eval()
        batches, outputs = data.batches(self.batch_size), []
        with torch.no_grad():
            for i, b in enumerate(batches):
                if should_stop and should_stop():
                    raise EvaluationCancelled("the evaluation was cancelled; run it again to finish")
                outputs.append(model(*b).float())
                if progress:
                    progress((i + 1) / len(batches))
        return torch.cat(outputs)

    def simulate(self, recipe: Recipe, quantized_weights=None) -> Simulation:
        """``simulate`` of the folded model -- transformed first when the recipe has transforms (then
        ``quantized_weights``, quantized from the untransformed weights, are not reused)."""
        from qcore.model.simulate import needs_calibration

        recipe.check_against(self.layer_shapes)
        done = self.transformed(recipe)
        model = self.folded[0] if done is None else done.model
        calib = self.calibration_of(recipe) if needs_calibration(recipe, self.layers) else None
        means = self.input_means(recipe) if any(t.name == "bias_correction" for t in recipe.transforms) else None
        if model is self.folded[0]:  # GPTQ/AdaRound weights of the folded model are cached by the workload
            given, batches = {**self.rounded_weights(recipe), **(quantized_weights or {})}, None
        else:  # a transformed model: its roundings are its own (computed here from the calibration data)
            given, batches = None, self.calibration.batches(self.batch_size)
        sim = simulate(model, recipe, calib, fold=False, quantized_weights=given,
                       calibration_batches=batches, input_means=means)
        sim.folded = self.folded[1]
        sim.notes = (done.notes if done else []) + sim.notes
        if recipe.kv_cache is not None:
            if not self.kv_cache_slices:
                raise QcoreError(f"recipe {recipe.name!r} quantizes the KV cache, but {self.name} is not a language model "
                                 "whose attention projections are known; remove the recipe's kv_cache key")
            from qcore.model.kv_cache import apply_kv_cache

            apply_kv_cache(sim.model, self.kv_cache_slices, recipe.kv_cache)
        return sim

    def size(self, recipe: Recipe) -> dict:
        return model_size(self.model, self.layers, recipe)

    def evaluate(self, recipe: Recipe, progress: Callable[[float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> "Evaluation":
        """Metrics and sizes of FP32 and of the simulated model under ``recipe``, on the whole
        evaluation set (metrics against the FP32 reference outputs and the labels); ``progress`` and
        ``should_stop`` as in ``run`` (over the quantized model's batches)."""
        self.rounded_weights(recipe, should_stop=should_stop)  # cached: the simulation below reuses them
        sim = self.simulate(recipe)
        outputs = self.run(sim.model, self.evaluation, progress, should_stop)
        size = self.size(recipe)
        return Evaluation(
            model=self.name, recipe=recipe.to_dict(), metric=self.task.headline,
            fp32=Measured(size["fp32_bytes"], self.fp32_metrics),
            quantized=Measured(size["size_bytes"],
                               self.task.metrics(outputs, self.reference_outputs, self.evaluation.labels)),
            folded=[list(p) for p in sim.folded], notes=list(self.notes) + sim.notes)


TRANSFORMED_CACHE = 4  # transformed float copies kept per workload (each one the model's size)


class EvaluationCancelled(QcoreError):
    """``Workload.run`` was stopped by ``should_stop``."""


@dataclass(frozen=True)
class Measured:
    """One model's weight storage in bytes and its metrics (the task's dict: name -> value)."""

    size_bytes: int
    metrics: dict


@dataclass(frozen=True)
class Evaluation:
    """``Workload.evaluate``'s result: ``metric`` names the headline; ``recipe`` is the recipe's dict;
    ``folded`` the (conv, bn) pairs folded before quantizing; ``notes`` the workload's notes."""

    model: str
    recipe: dict
    metric: str
    fp32: Measured
    quantized: Measured
    folded: list[list[str]]
    notes: list[str]

    def to_dict(self) -> dict:
        """``{"model", "recipe", "metric", "fp32": {"size_bytes", "metrics"}, "quantized": {...},
        "folded", "notes"}`` (the ``--json`` output)."""
        return {"model": self.model, "recipe": self.recipe, "metric": self.metric,
                "fp32": {"size_bytes": self.fp32.size_bytes, "metrics": self.fp32.metrics},
                "quantized": {"size_bytes": self.quantized.size_bytes, "metrics": self.quantized.metrics},
                "folded": self.folded, "notes": self.notes}

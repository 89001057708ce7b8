"""What a sensitivity sweep returns (``Sweep``, one ``SweepRow`` per layer and candidate), its JSON
form (``to_dict`` / ``from_dict``: the ``--json`` output and the cache files), and the check a cache
entry must pass before it is served (``valid_entry``).

Numbers are as measured by ``sensitivity.sweep``: metrics in the task's units, SQNRs in dB,
``rmse_over_step`` in grid steps, fractions in 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from qcore.model.workload import Workload


@dataclass(frozen=True)
class SweepRow:
    """One layer under one candidate. ``changed`` false: the candidate quantizes nothing of this layer
    in this mode, and the numbers are the base model's. ``metric_drop`` is oriented so positive is
    worse; ``layer_sqnr_db`` is the layer's own output error on FP32 inputs; the weight and input
    statistics are None when not quantized. ``rank`` 1 = most sensitive (view "only") or recovers most
    when kept in float (view "all_but"), per candidate; ``recovered`` (all_but only, else None) is the
    metric won back by keeping this layer in float."""

    layer: str
    kind: str
    candidate: str
    mode: str
    view: str
    changed: bool
    weight_format: str
    input_format: str
    metric: float
    metric_drop: float
    sqnr_db: float
    layer_sqnr_db: float
    input_rmse_over_step: float | None
    input_clipped_fraction: float | None
    rmse_over_step: float | None
    clipped_fraction: float | None
    rank: int
    recovered: float | None = None

    def to_dict(self) -> dict:
        """The row's fields in this order, ``recovered`` (all_but only) before ``rank``."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rank", "recovered")}
        if self.view == "all_but":
            d["recovered"] = self.recovered
        return {**d, "rank": self.rank}


@dataclass(frozen=True)
class Score:
    """A whole model's headline metric and output SQNR (dB) against the FP32 reference."""

    metric: float
    sqnr_db: float


@dataclass(frozen=True)
class Sweep:
    """Per-layer sensitivity of a workload to each candidate (see ``qcore.analysis.sensitivity``).
    ``base[candidate]``: the model every row perturbs (FP32 for view "only", everything quantized for
    "all_but"); ``samples`` of ``evaluation_samples`` were swept."""

    model: str
    metric: str
    higher_is_better: bool
    fp32_metric: float
    candidates: list[str]
    mode: str
    view: str
    samples: int
    evaluation_samples: int
    base: dict[str, Score]
    notes: list[str]
    rows: list[SweepRow]

    def to_dict(self) -> dict:
        return {"model": self.model, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "fp32_metric": self.fp32_metric, "candidates": list(self.candidates), "mode": self.mode,
                "view": self.view, "samples": self.samples, "evaluation_samples": self.evaluation_samples,
                "base": {c: {"metric": s.metric, "sqnr_db": s.sqnr_db} for c, s in self.base.items()},
                "notes": list(self.notes), "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> "Sweep":
        return cls(**{**d, "base": {c: Score(**s) for c, s in d["base"].items()},
                      "rows": [SweepRow(**r) for r in d["rows"]]})

    def for_candidate(self, candidate: str) -> "Sweep":
        """The part of this sweep that measures ``candidate`` (what one cache entry holds)."""
        return replace(self, candidates=[candidate], base={candidate: self.base[candidate]},
                       rows=[r for r in self.rows if r.candidate == candidate])

    @classmethod
    def merged(cls, parts: list["Sweep"]) -> "Sweep":
        """One sweep over the candidates of ``parts`` (same workload and settings), rows in their order."""
        return replace(parts[0], candidates=[c for p in parts for c in p.candidates],
                       base={c: s for p in parts for c, s in p.base.items()},
                       notes=list(dict.fromkeys(n for p in parts for n in p.notes)),
                       rows=[r for p in parts for r in p.rows])


# ---- what a cache entry must look like -------------------------------------------------------
_NUMBER, _OPTIONAL_NUMBER = "number", "number or None"
_ROW_TYPES = {"layer": str, "kind": str, "candidate": str, "mode": str, "view": str, "changed": bool,
              "weight_format": str, "input_format": str, "metric": _NUMBER, "metric_drop": _NUMBER,
              "sqnr_db": _NUMBER, "layer_sqnr_db": _NUMBER, "rmse_over_step": _OPTIONAL_NUMBER,
              "clipped_fraction": _OPTIONAL_NUMBER, "input_rmse_over_step": _OPTIONAL_NUMBER,
              "input_clipped_fraction": _OPTIONAL_NUMBER, "rank": int}
_SWEEP_FIELDS = {f.name for f in fields(Sweep)}


def _is(value, kind) -> bool:
    if kind is _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is _OPTIONAL_NUMBER:
        return value is None or _is(value, _NUMBER)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def valid_entry(entry, workload: Workload, candidate: str, mode: str, view: str) -> bool:
    """Whether a parsed cache entry is ``Sweep.to_dict()`` of ``candidate`` on ``workload``: exactly the
    fields and types a sweep writes, and one row per layer of this workload, in its order, with its kinds."""
    layers = [(n, info.kind) for n, info in workload.layers.items()]
    row_types = {**_ROW_TYPES, **({"recovered": _NUMBER} if view == "all_but" else {})}
    if not isinstance(entry, dict) or set(entry) != _SWEEP_FIELDS:
        return False
    base, rows, notes = entry["base"], entry["rows"], entry["notes"]
    header_ok = (entry["model"] == workload.name and entry["metric"] == workload.task.headline
                 and entry["higher_is_better"] is workload.task.higher_is_better and _is(entry["fp32_metric"], _NUMBER)
                 and entry["candidates"] == [candidate] and entry["mode"] == mode and entry["view"] == view
                 and _is(entry["samples"], int) and 0 < entry["samples"] <= len(workload.evaluation)
                 and entry["evaluation_samples"] == len(workload.evaluation)
                 and isinstance(notes, list) and all(isinstance(n, str) for n in notes)
                 and isinstance(base, dict) and set(base) == {candidate} and isinstance(base[candidate], dict)
                 and set(base[candidate]) == {"metric", "sqnr_db"}
                 and all(_is(v, _NUMBER) for v in base[candidate].values()))
    if not header_ok or not isinstance(rows, list) or len(rows) != len(layers):
        return False
    return all(isinstance(r, dict) and set(r) == set(row_types) and all(_is(r[k], t) for k, t in row_types.items())
               and (r["layer"], r["kind"]) == layer and (r["candidate"], r["mode"], r["view"]) == (candidate, mode, view)
               for r, layer in zip(rows, layers))

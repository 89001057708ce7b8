"""A roofline ESTIMATE of latency per layer and precision, on a hardware profile.

``roofline(workload, recipe, profile)`` estimates each layer's time as
``max(bytes moved / bandwidth, operations / peak throughput)``: a layer is memory-bound when its
weights and activations take longer to move than to multiply. This is why INT8 can be 4x smaller
but not 4x faster where the chip has no faster int8 units.

Every number ``roofline`` returns is an **estimate** (labelled so); only ``export.bench.bench`` measures.
Units: bytes, ms; profiles (``qcore.hardware``) give GB/s (1e9 bytes/s) and TOPS (1e12 operations/s, a multiply-add = 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qcore.errors import QcoreError
from qcore.hardware import Profile, get_profile
from qcore.model.hooks import run_with_hooks
from qcore.model.size import weight_bytes
from qcore.recipe import Recipe

@dataclass(frozen=True)
class LayerEstimate:
    """One layer's estimate: ``bytes`` moved, ``ops`` (2 x multiply-accumulates), times in ms; it runs
    at ``runs_at`` (the profile's nearest precision to ``compute_precision``) and is ``bound`` by
    "memory" or "compute"."""

    layer: str
    compute_precision: str
    runs_at: str
    bytes: int
    ops: int
    memory_ms: float
    compute_ms: float
    latency_ms: float
    bound: str
    label: str = "estimate"


@dataclass(frozen=True)
class Total:
    """Sums over the quantizable layers: bytes, ops, latency in ms."""

    bytes: int
    ops: int
    latency_ms: float
    label: str = "estimate"


@dataclass(frozen=True)
class Roofline:
    """A roofline ESTIMATE on ``profile`` at ``batch_size``: per layer, the recipe's ``total`` and FP32's
    ``fp32_total``. ``measured_profile``: the profile's figures were measured on this machine."""

    profile: str
    profile_source: str
    measured_profile: bool
    batch_size: int
    layers: list[LayerEstimate]
    total: Total
    fp32_total: Total
    notes: list[str]
    label: str = "estimate"

    def to_dict(self) -> dict:
        """The JSON form: ``{"label", "profile", "profile_source", "measured_profile", "batch_size",
        "layers": [...], "total", "fp32_total", "notes"}``."""
        d = asdict(self)
        return {"label": d.pop("label"), **d}


# A precision the target has no units for runs at the next wider one it has.
_FALLBACK = {"int4": "int8", "int8": "fp16", "fp8": "fp16", "bf16": "fp16", "fp16": "fp32", "tf32": "fp32"}



def _precision(fmt: str) -> str:
    return {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "nf4": "int4"}.get(fmt, fmt)


def compute_precision(kind: str, plan) -> str:
    """The arithmetic a layer needs: integer when weights *and* inputs are integers (the wider of the
    two), fp8 when both are fp8, otherwise the input's float format (weight-only formats are expanded
    to the activation precision before multiplying)."""
    w = _precision(plan.weights.format) if plan.weights else "fp32"
    a = _precision(plan.activations.format) if plan.activations and kind != "Embedding" else "fp32"
    bits = {"int2": 2, "int3": 3, "int4": 4, "int5": 5, "int6": 6, "int7": 7, "int8": 8, "int16": 16}
    if w in bits and a in bits:
        width = max(bits[w], bits[a])
        return "int4" if width <= 4 else "int8" if width <= 8 else "fp32"
    if w == a == "fp8":
        return "fp8"
    return a if a in ("fp16", "bf16", "fp8") else "fp32"


def _peak(profile: Profile, precision: str) -> tuple[str, float]:
    p = precision
    while p not in profile.peak_tops:
        p = _FALLBACK.get(p, "fp32")
        if p == "fp32" and "fp32" not in profile.peak_tops:
            raise QcoreError(f"profile {profile.name!r} has no fp32 throughput")
    return p, profile.peak_tops[p]


def _layer_work(workload) -> dict[str, dict]:
    """Per layer, for one sample: multiply-accumulates, input and output element counts (one forward
    pass of the first calibration sample, recorded with hooks; cached on the workload)."""
    if "_layer_work" in workload.__dict__:
        return workload.__dict__["_layer_work"]
    found = {}

    def recorder(name):
        def hook(m, args, out):
            kind = workload.layers[name].kind
            if kind == "Embedding":
                macs = 0
            elif kind == "Linear":
                macs = out.numel() * m.weight.shape[1]
            else:  # conv: every output element costs C_in/groups * kernel multiply-adds
                macs = out.numel() * m.weight[0].numel()
            found[name] = {"macs": macs, "in": args[0].numel(), "out": out.numel()}
        return hook

    first = tuple(t[:1] for t in workload.calibration.inputs)
    run_with_hooks(workload.folded[0], [first], post={n: recorder(n) for n in workload.layers})
    workload.__dict__["_layer_work"] = found
    return found


def roofline(workload, recipe: Recipe, profile="this-machine", batch_size: int = 1) -> Roofline:
    """Latency ESTIMATE of ``workload``'s quantizable layers under ``recipe`` on ``profile``.

    bytes = weights at the recipe's size (codes + scales) + inputs at their precision + fp32 outputs;
    ops = 2 x multiply-accumulates. Layers not found by the single forward pass are skipped.
    """
    prof = get_profile(profile)
    resolved = {"total": recipe.resolve(workload.layer_shapes),
                "fp32_total": Recipe(name="fp32").resolve(workload.layer_shapes)}
    work = _layer_work(workload)
    rows, totals = [], {}
    for label, plans in resolved.items():
        t_bytes = t_ops = t_ms = 0.0
        for name, w in work.items():
            plan = plans[name]
            kind = workload.layers[name].kind
            prec = compute_precision(kind, plan)
            runs_at, tops = _peak(prof, prec)
            a = plan.activations if kind != "Embedding" else None
            in_bytes = w["in"] * (4 if kind == "Embedding" else (a.fmt.bits / 8 if a and a.format != "fp32" else 4))
            nbytes = weight_bytes(workload.layer_shapes[name], plan.weights)["total"] + batch_size * (in_bytes + 4 * w["out"])
            ops = 2.0 * w["macs"] * batch_size
            memory_ms = nbytes / (prof.memory_bandwidth_gb_s * 1e9) * 1e3
            compute_ms = ops / (tops * 1e12) * 1e3
            ms = max(memory_ms, compute_ms)
            t_bytes, t_ops, t_ms = t_bytes + nbytes, t_ops + ops, t_ms + ms
            if label == "total":
                rows.append(LayerEstimate(name, prec, runs_at, int(nbytes), int(ops), memory_ms, compute_ms, ms,
                                          "memory" if memory_ms >= compute_ms else "compute"))
        totals[label] = Total(int(t_bytes), int(t_ops), t_ms)
    notes = ["estimate: roofline (max of memory time and compute time per layer) over the quantizable layers only; "
             "ignores caches, kernel launch/dispatch overhead, other ops (attention, norms) and achievable-vs-peak gaps"]
    fell_back = sorted({(r.compute_precision, r.runs_at) for r in rows if r.compute_precision != r.runs_at})
    notes += [f"{prof.name} has no {p} units: those layers are estimated at its {q} rate" for p, q in fell_back]
    return Roofline(profile=prof.name, profile_source=prof.source, measured_profile=prof.measured,
                    batch_size=batch_size, layers=rows, total=totals["total"], fp32_total=totals["fp32_total"], notes=notes)

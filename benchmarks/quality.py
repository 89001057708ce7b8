"""Quantization quality: the project's recipes next to the tools users would otherwise pick.

    python -m benchmarks.quality [--quick] [--models digits-mlp,digits-cnn,minilm-l6]

For each model, one table of the headline metric (measured on the evaluation set, against the same
FP32 reference) for:
- the project's int8 presets, int8 variants with other activation range methods, and the
  mixed-precision search held to the int8-static size;
- torch.ao: static PTQ (FX graph mode, default x86 qconfig: histogram observer, per-channel weights)
  and ``quantize_dynamic`` (int8 Linear);
- ONNX Runtime: ``quantize_static`` (QDQ, MinMax / Entropy / Percentile calibrators, per-channel
  weights) and ``quantize_dynamic``;
then the low-bit study: W4/W3/W2 weight-only with min-max vs percentile vs MSE clipping and
per-tensor vs per-channel vs per-group granularity.

A peer that cannot run a model (e.g. FX tracing a Hugging Face BERT) is reported with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings

import torch

from qcore import Recipe, preset, zoo
from qcore.export import export_qdq
from qcore.export.sessions import input_names, run_onnx, session
from qcore.analysis.search import search

warnings.filterwarnings("ignore")
SEARCH_CANDIDATES = ["int8-weight-only", "int8-static", "int4-weight-only"]
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs one warning per 1-D weight


def _metric(w, outputs: torch.Tensor) -> float:
    return w.task.metrics(outputs.float(), w.reference_outputs, w.evaluation.labels)[w.task.headline]


def project_rows(w) -> list[tuple[str, str, float]]:
    rows = []
    for name in ("int8-weight-only", "int8-dynamic", "int8-static"):
        r = w.evaluate(preset(name, w.layer_shapes))
        rows.append(("qcore", name, r.quantized.metrics[w.task.headline]))
    base = preset("int8-static", w.layer_shapes).to_dict()
    for method, extra in (("percentile", {"percentile": 99.99}), ("mse", {}), ("entropy", {}), ("moving_average", {})):
        d = copy.deepcopy(base)
        d["name"] = f"int8-static/{method}"
        d["activations"].update({"range": method, **extra})
        r = w.evaluate(Recipe.from_dict(d))
        rows.append(("qcore", d["name"], r.quantized.metrics[w.task.headline]))
    # the mixed-precision search, held to the int8-static size (equal size to the W8 peers)
    budget = w.size(preset("int8-static", w.layer_shapes))["size_bytes"]
    with tempfile.TemporaryDirectory() as cache:
        found = search(w, SEARCH_CANDIDATES, max_size_bytes=budget, cache_dir=cache)
    rows.append(("qcore", f"search ({' / '.join(SEARCH_CANDIDATES)}, <= int8-static size: "
                          f"{found.measured.size_bytes:,} of {budget:,} B)", found.measured.metric))
    return rows


def torch_ao_rows(w) -> list[tuple[str, str, float | str]]:
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    rows = []
    torch.backends.quantized.engine = "x86"
    try:
        model = copy.deepcopy(w.model).eval()
        example = tuple(t[:1] for t in w.calibration.inputs)
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for batch in w.calibration.batches(w.batch_size):
                prepared(*batch)
        rows.append(("torch.ao", "static PTQ (FX, x86 qconfig)", _metric(w, w.run(convert_fx(prepared), w.evaluation))))
    except Exception as e:  # a peer's failure is a finding, reported in the table
        rows.append(("torch.ao", "static PTQ (FX, x86 qconfig)", f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80]}"))
    dyn = quantize_dynamic(copy.deepcopy(w.model).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    rows.append(("torch.ao", "quantize_dynamic (int8 Linear)", _metric(w, w.run(dyn, w.evaluation))))
    return rows


def _calibration_feeds(w) -> list[dict]:
    """Calibration feeds in equal batches: the largest batch size <= 64 dividing the calibration set
    (ORT's histogram calibrators fail on a smaller last batch)."""
    size = max(d for d in range(1, 65) if len(w.calibration) % d == 0)
    return [dict(zip(input_names(w), (t.numpy() for t in b))) for b in w.calibration.batches(size)]


def _run_onnx(w, path: str) -> torch.Tensor:
    return run_onnx(session(path, os.cpu_count() or 1), w, w.evaluation)


def onnxruntime_rows(w, tmp: str) -> list[tuple[str, str, float | str]]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = os.path.join(tmp, f"{w.name}.onnx")
    export_qdq(w, Recipe(name="fp32"), fp32)  # the FP32 graph (BatchNorm folded, Linear as MatMul, so
    # quantize_dynamic quantizes it too)
    pre = os.path.join(tmp, f"{w.name}.pre.onnx")
    quant_pre_process(fp32, pre, skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(_calibration_feeds(w))

        def get_next(self):
            return next(self.it, None)

    rows = []
    for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile):
        out = os.path.join(tmp, f"{w.name}.{method.name}.onnx")
        try:
            quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
            rows.append(("onnxruntime", f"quantize_static ({method.name}, per-channel)", _metric(w, _run_onnx(w, out))))
        except Exception as e:
            rows.append(("onnxruntime", f"quantize_static ({method.name})", f"n/a: {type(e).__name__}: {str(e)[:80]}"))
    out = os.path.join(tmp, f"{w.name}.dynamic.onnx")
    quantize_dynamic(pre, out, weight_type=QuantType.QInt8)
    rows.append(("onnxruntime", "quantize_dynamic (int8)", _metric(w, _run_onnx(w, out))))
    return rows


def low_bit_rows(w) -> list[dict]:
    """Weight-only W4/W3/W2: range method x granularity (per_group: groups of at most 32, the largest divisor of
    each layer's fan-in, as the engine resolves them)."""
    rows = []
    for bits in (4, 3, 2):
        row = {"weights": f"int{bits}"}
        for gran in ("per_tensor", "per_channel", "per_group"):
            for method in ("minmax", "percentile", "mse"):
                spec = {"format": f"int{bits}", "granularity": gran, "symmetric": True, "range": method,
                        "percentile": 99.9, **({"group_size": 32} if gran == "per_group" else {})}
                r = w.evaluate(Recipe.from_dict({"name": "lowbit", "weights": spec}))
                row[f"{gran}/{method}"] = r.quantized.metrics[w.task.headline]
        rows.append(row)
    return rows


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-mlp only (used by the test suite)")
    ap.add_argument("--models", default="digits-mlp,digits-cnn,minilm-l6")
    return ap.parse_args(argv)


def measure(argv=None) -> list[dict]:
    """Per model: ``{"model", "metric" (headline name), "fp32", "rows": [{"tool", "method", "value"}],
    "low_bit": [{"weights", "<granularity>/<range>": value}]}``; ``value`` is the measured headline metric,
    or a string "n/a: reason" for a peer that could not run the model."""
    args = _args(argv)
    models = ["digits-mlp"] if args.quick else args.models.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            w = zoo.load(name)
            with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's calibrators print progress
                rows = project_rows(w) + torch_ao_rows(w) + onnxruntime_rows(w, tmp)
            results.append({"model": name, "metric": w.task.headline, "fp32": w.fp32_metrics[w.task.headline],
                            "rows": [{"tool": t, "method": m, "value": v} for t, m, v in rows],
                            "low_bit": low_bit_rows(w)})
    return results


def main(argv=None) -> str:
    import pandas as pd

    report = []
    for r in measure(argv):
        name, head, fp32 = r["model"], r["metric"], r["fp32"]
        rows = [(x["tool"], x["method"], round(x["value"], 4) if isinstance(x["value"], float) else x["value"])
                for x in r["rows"]]
        df = pd.DataFrame(rows, columns=["tool", "method (W8A8 unless stated)", head])
        best_peer = max((v for t, _, v in rows if t != "qcore" and isinstance(v, float)), default=float("nan"))
        best_own = max(v for t, _, v in rows if t == "qcore" and isinstance(v, float))
        verdict = "matches or beats" if best_own >= best_peer - 1e-9 else "is BELOW"
        report.append(f"#### {name} (FP32 {head} = {fp32:.4f})\n\n{df.to_markdown(index=False, floatfmt='.4f')}\n\n"
                      f"Best qcore recipe at or below the int8 size {verdict} the best peer ({best_own:.4f} vs {best_peer:.4f}).\n")
        low = pd.DataFrame(r["low_bit"])
        report.append(f"Low-bit weight-only {head} (columns: granularity/range method):\n\n"
                      f"{low.to_markdown(index=False, floatfmt='.4f')}\n")
    text = "\n".join(report)
    print(text)
    return text


if __name__ == "__main__":
    main()

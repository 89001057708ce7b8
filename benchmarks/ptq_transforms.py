"""Round-to-nearest against SmoothQuant, AWQ, CLE and bias correction, and against a peer, in one run.

    python -m benchmarks.ptq_transforms [--quick] [--threads 1]

- minilm-l6 W8A8 (int8 per-channel weights, int8 static activations, min-max): qcore nearest, qcore SmoothQuant
  (alpha 0.5), ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 MatMul weights, uint8 activations, min-max)
  without and with ``extra_options={"SmoothQuant": True}`` on the same 64 calibration sentences. ONNX Runtime's
  SmoothQuant imports Intel Neural Compressor 2.x (``neural_compressor.adaptor.ox_utils``); where it does not import
  the row says so. The qcore rows are the simulation; the ONNX Runtime rows run the quantized file.
  SmoothQuant also with ``"unfoldable": "mul"`` (a per-channel Mul before each Linear no fold reaches), at alpha
  0.5 and with alpha searched per layer (``w8a8-smoothquant-mul``).
- minilm-l6 int4 per-group 32 weight-only: nearest vs AWQ (grid 20).
- digits-cnn int4 / int3 per-tensor weight-only: nearest, CLE, CLE + bias correction.

Metric: cosine to FP32 (minilm, mean over 300 sentences) or test accuracy (digits, 360 images). Time: seconds to
quantize (qcore: transforms, calibration and weight quantization from cold caches; ONNX Runtime: ``quantize_static``).
``--quick``: digits-cnn at int3 only; ``--w8a8``: the minilm-l6 W8A8 qcore rows only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings

import torch

from qcore import zoo
from qcore.hardware import cpu_features, cpu_name
from qcore.model.input_scale import input_scales
from qcore.recipe import Recipe, preset

warnings.filterwarnings("ignore")


def _cold(w) -> None:
    """Forget what a workload computed for recipes (transforms, calibration), so a timing starts cold."""
    for key in ("_transformed", "_groups", "_calib"):
        w.__dict__.pop(key, None)


def qcore_row(w, recipe: Recipe, label: str) -> dict:
    _cold(w)
    start = time.perf_counter()
    sim = w.simulate(recipe)
    seconds = time.perf_counter() - start
    out = w.run(sim.model, w.evaluation)
    metric = w.task.metrics(out, w.reference_outputs, w.evaluation.labels)[w.task.headline]
    done = w.transformed(recipe)
    if done is not None and input_scales(done.model):  # SmoothQuant's explicit Mul ops, counted
        label += f" ({len(input_scales(done.model))} Mul ops added)"
    return {"model": w.name, "recipe": recipe.name, "method": label, "metric": metric, "seconds": seconds,
            "what": "qcore simulation"}


def ort_static_rows(w, smoothquant: bool) -> dict:
    """ONNX Runtime ``quantize_static`` of minilm-l6's float ONNX graph on the calibration sentences."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from qcore.export import export_qdq
    from qcore.export.sessions import run_onnx, session

    label = "ONNX Runtime quantize_static" + (" + SmoothQuant" if smoothquant else "")
    row = {"model": w.name, "recipe": "W8A8", "method": label, "metric": float("nan"), "seconds": float("nan"),
           "what": "ONNX Runtime, the quantized file"}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, q = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "q.onnx")
        export_qdq(w, preset("fp32"), fp32)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(w.calibration.batches(16))

            def get_next(self):
                b = next(self.batches, None)
                return None if b is None else {f"input_{i}": t.numpy() for i, t in enumerate(b)}

        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                quantize_static(fp32, q, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["MatMul"],
                                extra_options={"SmoothQuant": smoothquant, "SmoothQuantAlpha": 0.5})
        except Exception as e:  # noqa: BLE001 -- the peer's own failure (e.g. Neural Compressor missing): reported, not raised
            row["what"] = f"did not run: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            return row
        row["seconds"] = time.perf_counter() - start
        out = run_onnx(session(q, torch.get_num_threads()), w, w.evaluation)
    row["metric"] = w.task.metrics(out, w.reference_outputs, w.evaluation.labels)[w.task.headline]
    return row


def w8a8_steps(w) -> list:
    """minilm-l6 W8A8: nearest, SmoothQuant fold-only, and with the Mul before the layers no fold reaches (alpha
    0.5, alpha searched per layer)."""
    static = preset("int8-static", w.layer_shapes)
    mul = Recipe.from_dict({**static.to_dict(), "name": "int8-static + smoothquant mul",
                            "transforms": [{"smoothquant": {"alpha": 0.5, "unfoldable": "mul"}}]})
    return [lambda: qcore_row(w, static, "nearest"),
            lambda: qcore_row(w, preset("w8a8-smoothquant", w.layer_shapes), "SmoothQuant (alpha 0.5), folds only"),
            lambda: qcore_row(w, mul, "SmoothQuant (alpha 0.5), folds + Mul"),
            lambda: qcore_row(w, preset("w8a8-smoothquant-mul", w.layer_shapes),
                              "SmoothQuant (alpha searched per layer), folds + Mul")]


def minilm_rows(w8a8_only: bool = False) -> list[dict]:
    w = zoo.load("minilm-l6")
    steps = w8a8_steps(w) if w8a8_only else w8a8_steps(w) + [
        lambda: ort_static_rows(w, False), lambda: ort_static_rows(w, True),
        lambda: qcore_row(w, preset("int4-weight-only", w.layer_shapes), "nearest"),
        lambda: qcore_row(w, preset("int4-awq", w.layer_shapes), "AWQ (grid 20)")]
    rows = []
    for step in steps:
        rows.append(step())
        print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)  # progress: a long run shows its rows
    return rows


def digits_rows(bits: list[int]) -> list[dict]:
    w = zoo.load("digits-cnn")
    rows = []
    for b in bits:
        base = {"name": f"int{b} per-tensor", "weights": {"format": f"int{b}", "granularity": "per_tensor",
                                                           "symmetric": True, "range": "minmax"}, "activations": None}
        for label, transforms in [("nearest", []), ("CLE", [{"cle": {}}]),
                                  ("CLE + bias correction", [{"cle": {}}, {"bias_correction": {}}])]:
            rows.append(qcore_row(w, Recipe.from_dict({**base, "transforms": transforms}), label))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | recipe | method | metric | time to quantize (s) | measured in |", "|---|---|---|---|---|---|"]
    for r in rows:
        metric = "n/a" if r["metric"] != r["metric"] else f"{r['metric']:.4f}"
        seconds = "n/a" if r["seconds"] != r["seconds"] else f"{r['seconds']:.1f}"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['method']} | {metric} | {seconds} | {r['what']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-cnn at int3 only")
    ap.add_argument("--w8a8", action="store_true", help="the minilm-l6 W8A8 qcore rows only")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("### ptq_transforms\n")
    print(f"CPU: {cpu_name()} ({', '.join(cpu_features())}); torch threads {args.threads}\n")
    if args.w8a8:
        rows = minilm_rows(w8a8_only=True)
    else:
        rows = digits_rows([3]) if args.quick else digits_rows([4, 3]) + minilm_rows()
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""PTQ weight rounding: nearest vs GPTQ vs AdaRound vs ONNX Runtime's own, side by side in one run.

    python -m benchmarks.ptq_rounding [--quick]

1. minilm-l6, int4 affine weights per group of 32, weight-only: qcore nearest (``int4-weight-only``), qcore GPTQ
   (``int4-gptq``; with the embedding tables' error feedback, ``int4-gptq-embeddings``; after AWQ's scales (the
   transformed model rounds its own weights, embeddings at nearest); damping 0.01 as the preset had it before; the
   Linears only, embeddings float, as ONNX Runtime's MatMulNBits leaves its Gather), ONNX Runtime ``MatMulNBitsQuantizer`` in RTN and GPTQ modes
   (``onnxruntime.quantization.matmul_nbits_quantizer``) on the FP32 ONNX graph of the same model, calibrated on
   the same calibration sentences, and NNCF ``compress_weights`` (data-free; AWQ + scale estimation) on that
   graph. Metric: mean cosine to the FP32 embeddings on the evaluation sentences (qcore: the simulation, which its
   exported file matches; ONNX Runtime and NNCF: the quantized file run in ONNX Runtime). Time to quantize:
   wall seconds from the float model to the quantized weights (collecting the calibration inputs included in the
   first GPTQ row only: the later qcore rows reuse the workload's cached layer inputs, the embeddings-float row
   also its cached roundings).
2. digits-cnn, int3 symmetric per-channel weights: FP32 vs nearest vs AdaRound, top-1 accuracy (simulation).

``--quick`` (the test suite): digits-mlp instead of minilm-l6 for part 1, and 10 AdaRound iterations.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from dataclasses import replace

from qcore import Recipe, preset, zoo
from qcore.export import export_qdq
from qcore.export.sessions import input_names, run_onnx, session
from qcore.hardware import cpu_features, cpu_name

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)


def _metric(w, outputs) -> float:
    return float(w.task.metrics(outputs.float(), w.reference_outputs, w.evaluation.labels)[w.task.headline])


def _qcore_row(w, label: str, recipe: Recipe) -> dict:
    """Each recipe rounds on its own (nothing of it cached yet): the time includes collecting the calibration inputs."""
    start = time.perf_counter()
    w.simulate(recipe)
    seconds = time.perf_counter() - start
    return {"method": label, "metric": w.evaluate(recipe).quantized.metrics[w.task.headline], "seconds": seconds}


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the workload's calibration batches (its GPTQ iterates it)."""

    def __init__(self, w):
        self.items = [{n: t.numpy() for n, t in zip(input_names(w), b)} for b in w.calibration.batches(w.batch_size)]
        self.next = 0

    def get_next(self):
        self.next += 1
        return self.items[self.next - 1] if self.next <= len(self.items) else None

    def __iter__(self):
        return iter(self.items)


def ort_rows(w, tmp: str, threads: int) -> list[dict]:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    fp32 = os.path.join(tmp, f"{w.name}-fp32.onnx")
    export_qdq(w, preset("fp32"), fp32)
    rows = []
    for label, config in (("ONNX Runtime MatMulNBits RTN", lambda: mnq.RTNWeightOnlyQuantConfig()),
                          ("ONNX Runtime MatMulNBits GPTQ", lambda: mnq.GPTQWeightOnlyQuantConfig(
                              calibration_data_reader=_Reader(w), percdamp=0.01, block_size=128, actorder=False))):
        try:
            start = time.perf_counter()
            q = mnq.MatMulNBitsQuantizer(onnx.load(fp32), bits=4, block_size=32, is_symmetric=False,
                                         algo_config=config())
            q.process()
            seconds = time.perf_counter() - start
            path = os.path.join(tmp, f"{label.split()[-1]}.onnx")
            q.model.save_model_to_file(path, use_external_data_format=False)
            outputs = run_onnx(session(path, threads), w, w.evaluation)
            rows.append({"method": label, "metric": _metric(w, outputs), "seconds": seconds})
        except Exception as e:  # a peer that cannot run here is reported with its reason
            rows.append({"method": label, "metric": None, "seconds": None, "error": f"{type(e).__name__}: {e}"[:160]})
    return rows


def nncf_rows(w, tmp: str, threads: int) -> list[dict]:
    """NNCF ``compress_weights`` on the same FP32 ONNX graph: int4 asymmetric, groups of 32, every MatMul at int4
    (``ratio=1``, ``all_layers=True``) and the embeddings (Gather) left float -- compare with qcore's
    embeddings-float row (ONNX Runtime 1.32 fails on NNCF's int4 DequantizeLinear of minilm's position
    embedding) -- data-free and with AWQ + scale estimation on the calibration sentences (its ONNX backend has
    no GPTQ)."""
    import onnx

    fp32 = os.path.join(tmp, f"{w.name}-fp32.onnx")
    if not os.path.exists(fp32):
        export_qdq(w, preset("fp32"), fp32)
    rows = []
    for label, data_aware in (("NNCF compress_weights (data-free), embeddings float", False),
                              ("NNCF compress_weights AWQ + scale estimation, embeddings float", True)):
        try:
            import nncf

            start = time.perf_counter()
            extra = {}
            if data_aware:  # one calibration sentence per sample, all of them
                items = [{n: t.numpy() for n, t in zip(input_names(w), b)} for b in w.calibration.batches(1)]
                extra = {"dataset": nncf.Dataset(items), "awq": True, "scale_estimation": True,
                         "subset_size": len(items)}
            q = nncf.compress_weights(onnx.load(fp32), mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=32,
                                      ratio=1.0, all_layers=True,
                                      ignored_scope=nncf.IgnoredScope(types=["Gather"], validate=False), **extra)
            seconds = time.perf_counter() - start
            path = os.path.join(tmp, f"nncf-{data_aware}.onnx")
            onnx.save(q, path)
            outputs = run_onnx(session(path, threads), w, w.evaluation)
            rows.append({"method": label, "metric": _metric(w, outputs), "seconds": seconds})
        except Exception as e:  # a peer that cannot run here is reported with its reason
            rows.append({"method": label, "metric": None, "seconds": None, "error": f"{type(e).__name__}: {e}"[:160]})
    return rows


def int4_rows(model: str, tmp: str, threads: int) -> list[dict]:
    w = zoo.load(model)
    gptq = preset("int4-gptq", w.layer_shapes)
    old = Recipe.from_dict({**gptq.to_dict(), "name": "gptq-damp0.01", "weights": {**gptq.weights.to_dict(),
                                                                                   "gptq": {"damp": 0.01}}})
    embeddings_float = {n: {"weights": None} for n, info in w.layers.items() if info.kind == "Embedding"}
    rows = [{"method": "FP32", "metric": float(w.fp32_metrics[w.task.headline]), "seconds": 0.0},
            _qcore_row(w, "qcore nearest (int4-weight-only)", preset("int4-weight-only", w.layer_shapes)),
            _qcore_row(w, "qcore GPTQ (int4-gptq)", gptq),  # first: its time includes collecting the inputs
            _qcore_row(w, "qcore GPTQ + embedding feedback (int4-gptq-embeddings)",
                       preset("int4-gptq-embeddings", w.layer_shapes)),
            _qcore_row(w, "qcore AWQ then GPTQ (int4-gptq + awq transform)", Recipe.from_dict(
                {**gptq.to_dict(), "name": "awq-gptq", "transforms": [{"awq": {}}]})),
            _qcore_row(w, "qcore GPTQ damp 0.01 (int4-gptq before)", old),
            _qcore_row(w, "qcore GPTQ (int4-gptq), embeddings float", Recipe.from_dict(
                {**gptq.to_dict(), "name": "gptq-linears", "layers": {**gptq.to_dict().get("layers", {}),
                                                                      **embeddings_float}}))]
    return rows + ort_rows(w, tmp, threads) + nncf_rows(w, tmp, threads)


def int3_rows(iters: int | None) -> list[dict]:
    w = zoo.load("digits-cnn")
    nearest = Recipe.from_dict({"name": "int3-nearest", "weights": {"format": "int3", "granularity": "per_channel"}})
    ada = preset("int3-adaround", w.layer_shapes)
    if iters is not None:
        ada = replace(ada, weights=replace(ada.weights, adaround=replace(ada.weights.adaround, iters=iters)))
    return [{"method": "FP32", "metric": float(w.fp32_metrics[w.task.headline]), "seconds": 0.0},
            _qcore_row(w, "qcore nearest (int3 per-channel)", nearest),
            _qcore_row(w, "qcore AdaRound (int3-adaround)", ada)]


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-mlp for the int4 table, 10 AdaRound iterations")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return ap.parse_args(argv)


def measure(argv=None) -> dict:
    """``{"cpu", "flags", "int4": {"model", "metric", "rows"}, "int3": {...}}``; each row ``{"method", "metric",
    "seconds"}`` (metric None and an ``error`` for a peer that could not run)."""
    args = _args(argv)
    model = "digits-mlp" if args.quick else "minilm-l6"
    with tempfile.TemporaryDirectory() as tmp:
        int4 = int4_rows(model, tmp, args.threads)
    return {"cpu": cpu_name(), "flags": cpu_features(), "threads": args.threads,
            "int4": {"model": model, "metric": "cosine_to_fp32" if model == "minilm-l6" else "accuracy", "rows": int4},
            "int3": {"model": "digits-cnn", "metric": "accuracy", "rows": int3_rows(10 if args.quick else None)}}


def table(part: dict) -> str:
    lines = [f"| {part['model']}: method | {part['metric']} | time to quantize (s) |", "|---|---|---|"]
    for r in part["rows"]:
        metric = "-" if r["metric"] is None else f"{r['metric']:.4f}"
        seconds = r.get("error", "-") if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['method']} | {metric} | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    result = measure(argv)
    text = (f"CPU: {result['cpu']} (flags: {', '.join(result['flags']) or 'unknown'}), {result['threads']} thread(s); "
            "metrics measured on the evaluation data against FP32.\n\n" + table(result["int4"]) + "\n\n"
            + table(result["int3"]))
    print(text)
    return text


if __name__ == "__main__":
    main()

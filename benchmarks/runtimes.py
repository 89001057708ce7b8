"""ONNX Runtime and OpenVINO side by side: the project's exported files on both runtimes next to each
runtime's own quantizers, in one run on this CPU.

    nice python -m benchmarks.runtimes [--quick] [--model minilm-l6] [--threads 1] [--batch-size 8]

Contestants (all on the same evaluation inputs, every call timed in the same interleaved rounds, so a busy
moment of a shared machine hits every row alike):
- ONNX Runtime: FP32; its own ``quantize_dynamic(per_channel=True)``; the project's exports;
- OpenVINO: FP32 with ``INFERENCE_PRECISION_HINT=f32`` (true FP32) and with the plugin's default (bf16 on
  AMX / AVX-512 BF16); NNCF ``quantize`` (INT8, calibrated on the calibration inputs) and NNCF weight
  compression (INT8 asymmetric, INT4 symmetric per group of 32); the project's exports, default hint;
- torch.ao ``quantize_dynamic`` (int8 Linear).
- the project's ``w8a8-smoothquant-mul`` (int8-static + SmoothQuant, a per-channel Mul where no fold exists);
- the project's int8-static with the inputs of BERT's FFN output layers (``*.output.dense`` after the GELU,
  whose inputs have 98-171x outliers) kept float: the mixed recipe that reaches NNCF INT8's cosine;
Columns: best / median ms and the p10-p90 at batch 1 and at the batch size (measured), file size and its ratio
to FP32, the headline metric on the evaluation set, the precision the runtime reported, and a roofline
ESTIMATE (``qcore.analysis.roofline`` on the "this-machine" profile) for the project's recipes. The notes say,
per OpenVINO int8 row, how many of its FullyConnected (Linear) nodes and fused Subgraphs OpenVINO compiled
into int8 kernels (``qcore.export.profile.openvino_kernels``) and name the kernels. NNCF missing:
its rows are skipped and the table says so. Quick mode: digits-mlp, short timing (the test suite runs it).
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

import numpy as np
import torch

from qcore import preset, zoo
from qcore.analysis.roofline import roofline
from qcore.export import export, export_qdq
from qcore.export.bench import interleaved_times_ms, spread
from qcore.export.openvino import openvino_session
from qcore.export.profile import openvino_kernels
from qcore.export.sessions import feed, run_onnx, session
from qcore.hardware import cpu_features, cpu_name
from qcore.recipe import Recipe

warnings.filterwarnings("ignore")
logging.getLogger("nncf").setLevel(logging.ERROR)
RECIPES = ("int8-static", "int8-dynamic", "int4-weight-only")


def _quiet(fn, *args, **kwargs):
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantizers' advice goes to the root logger
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return fn(*args, **kwargs)
    finally:
        root.setLevel(level)


def _nncf_rows(w, fp32_path: str, tmp: str, threads: int) -> tuple[list[tuple], str]:
    """(label, IR path) of NNCF's INT8 / weight-compressed models, and a note ("" or why they are missing)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return [], "NNCF is not installed (pip install nncf): its rows are missing"
    out = []
    calib = [feed(w, w.calibration.subset(slice(i, i + 1))) for i in range(len(w.calibration))]
    kinds = {"model_type": nncf.ModelType.TRANSFORMER} if any(k == "Embedding" for k in
                                                               (i.kind for i in w.layers.values())) else {}
    model = ov.convert_model(fp32_path)
    q = _quiet(nncf.quantize, model, nncf.Dataset(calib), subset_size=len(calib), **kinds)
    out.append(("NNCF quantize (INT8, calibrated)", q))
    for label, mode, extra in (("NNCF compress_weights INT8", nncf.CompressWeightsMode.INT8_ASYM, {}),
                               ("NNCF compress_weights INT4 (g32)", nncf.CompressWeightsMode.INT4_SYM,
                                {"group_size": 32, "ratio": 1.0})):
        try:
            out.append((label, _quiet(nncf.compress_weights, ov.convert_model(fp32_path), mode=mode, **extra)))
        except Exception as e:  # noqa: BLE001 - a peer failing on a model is a row's note, not a crash
            out.append((label, f"failed: {type(e).__name__}: {str(e)[:120]}"))
    paths = []
    for i, (label, m) in enumerate(out):
        if isinstance(m, str):
            paths.append((label, m))
            continue
        xml = os.path.join(tmp, f"nncf{i}.xml")
        ov.save_model(m, xml, compress_to_fp16=False)
        paths.append((label, xml))
    return paths, ""


def model_rows(w, tmp: str, batch_size: int, threads: int, budget_s: float,
               quick: bool = False) -> tuple[list[dict], list[str]]:
    """One row per (runtime, way of running ``w``), every call timed in the same interleaved rounds at batch 1
    and at ``batch_size``; the notes say what is missing. ``quick``: one project recipe, no NNCF."""
    torch.set_num_threads(threads)
    head = w.task.headline
    rows, calls, notes = [], [], []

    def add(runtime, method, path, sess, size=None, estimate=None):
        rows.append({"runtime": runtime, "method": method, "precision": getattr(sess, "precision", "f32"),
                     "size": size if size is not None else _size(path), head: _metric(w, run_onnx(sess, w, w.evaluation)),
                     "roofline estimate B ms": estimate})
        calls.append(lambda data, s=sess: s.run(None, feed(w, data)))

    fp32_path = os.path.join(tmp, "fp32.onnx")
    export_qdq(w, Recipe(name="fp32"), fp32_path)
    fp32_est = roofline(w, Recipe(name="fp32"), "this-machine", batch_size).total.latency_ms
    add("onnxruntime", "FP32", fp32_path, session(fp32_path, threads), estimate=fp32_est)
    add("openvino", "FP32, INFERENCE_PRECISION_HINT=f32", fp32_path, openvino_session(fp32_path, threads, "f32"),
        estimate=fp32_est)
    add("openvino", "FP32, default hint", fp32_path, openvino_session(fp32_path, threads))
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ort_dyn = os.path.join(tmp, "ort-dynamic.onnx")
    _quiet(quantize_dynamic, fp32_path, ort_dyn, weight_type=QuantType.QInt8, per_channel=True)
    add("onnxruntime", "quantize_dynamic (per_channel)", ort_dyn, session(ort_dyn, threads))
    int8_files = {}
    for name, recipe in _project_recipes(w, quick):
        path = os.path.join(tmp, f"{name.replace(' ', '_').replace(',', '')}.onnx")
        export(w, recipe, "onnx", path)
        est = roofline(w, recipe, "this-machine", batch_size).total.latency_ms
        add("onnxruntime", f"qcore {name}", path, session(path, threads), estimate=est)
        add("openvino", f"qcore {name}, default hint", path, openvino_session(path, threads), estimate=est)
        if recipe.activations is not None:
            int8_files[f"qcore {name}"] = path
    nncf_paths, missing = ([], "quick mode: no NNCF rows") if quick else _nncf_rows(w, fp32_path, tmp, threads)
    if missing:
        notes.append(missing)
    for label, path in nncf_paths:
        if path.startswith("failed"):
            notes.append(f"{label}: {path}")
            continue
        add("openvino", label, path, openvino_session(path, threads))
        if "INT8, calibrated" in label:
            int8_files[label] = path
    x = feed(w, w.evaluation.subset(slice(0, batch_size)))
    notes += [f"OpenVINO kernels of {label}: {_kernel_summary(openvino_kernels(path, x, threads))}"
              for label, path in int8_files.items()]
    model = copy.deepcopy(w.model).eval()
    dyn = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    pt = os.path.join(tmp, "torch.pt")
    torch.save(dyn.state_dict(), pt)
    rows.append({"runtime": "torch", "method": "torch.ao quantize_dynamic (int8 Linear)", "precision": "int8 Linear",
                 "size": os.path.getsize(pt), head: _metric(w, w.run(dyn, w.evaluation)), "roofline estimate B ms": None})
    calls.append(lambda data, m=dyn: m(*data.inputs))
    with torch.no_grad():
        for label, k in (("batch 1", 1), ("batch B", batch_size)):
            data = w.evaluation.subset(slice(0, k))
            times = interleaved_times_ms({i: (lambda c=c, d=data: c(d)) for i, c in enumerate(calls)}, budget_s=budget_s)
            for i, row in enumerate(rows):
                s = spread(times[i])
                row[f"{label} best ms"], row[f"{label} median ms"] = s["best"], s["median"]
                row[f"{label} p10-p90 ms"] = f"{s['p10']:.3g}-{s['p90']:.3g}"
    base = rows[0]["size"]
    for r in rows:
        r["size MiB"], r["size / FP32"] = r["size"] / 2**20, r.pop("size") / base
    return rows, notes


def _project_recipes(w, quick: bool) -> list[tuple[str, Recipe]]:
    """(label, recipe) of the project's exports: the RECIPES presets, and on a BERT-like model
    ``w8a8-smoothquant-mul`` (SmoothQuant with a Mul where no fold exists, alpha searched per layer) and int8-static
    with the FFN output layers' inputs (``encoder.layer.N.output.dense``) kept float (quick mode: int8-static only)."""
    out = [(name, preset(name, w.layer_shapes)) for name in (RECIPES[:1] if quick else RECIPES)]
    ffn_out = [n for n in w.layers if n.endswith(".output.dense") and ".attention." not in n]
    if ffn_out and not quick:
        mixed = preset("int8-static", w.layer_shapes)
        for n in ffn_out:
            mixed = mixed.with_layer(n, {"activations": None})
        out.insert(1, ("int8-static, FFN-out inputs fp32", mixed))
        out.insert(1, ("w8a8-smoothquant-mul", preset("w8a8-smoothquant-mul", w.layer_shapes)))
    return out


def _kernel_summary(rows: list[dict]) -> str:
    """'FullyConnected (Linear): 30 of 36 in int8, 6 of 36 in bf16; fused Subgraphs ...: 6 of 6 in bf16
    (kernels: ...)'."""
    parts = []
    for op, what in (("FullyConnected", "FullyConnected (Linear)"),
                     ("Subgraph", "fused Subgraphs (attention, eltwise chains)")):
        mine = [r for r in rows if r["op"] == op]
        if mine:
            by = {p: sum(r["precision"] == p for r in mine) for p in dict.fromkeys(r["precision"] for r in mine)}
            parts.append(f"{what}: " + ", ".join(f"{n} of {len(mine)} in {p}" for p, n in by.items()))
    kernels = sorted({r["kernel"] for r in rows if r["op"] in ("FullyConnected", "Subgraph")})
    return "; ".join(parts) + f" (kernels: {', '.join(kernels)})"


def _size(path: str) -> int:
    """Bytes on disk of an .onnx file, or of an OpenVINO IR (.xml + .bin)."""
    return os.path.getsize(path) + (os.path.getsize(path[:-4] + ".bin") if path.endswith(".xml") else 0)


def _metric(w, outputs) -> float:
    return w.task.metrics(outputs.float(), w.reference_outputs, w.evaluation.labels)[w.task.headline]


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-mlp, short timing (used by the test suite)")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    return ap.parse_args(argv)


def measure(argv=None) -> dict:
    """``{"model", "metric", "threads", "batch_size", "cpu", "features", "rows", "notes"}`` (numbers: ms, MiB, ratios)."""
    args = _args(argv)
    name = "digits-mlp" if args.quick else args.model
    w = zoo.load(name)
    with tempfile.TemporaryDirectory() as tmp:
        rows, notes = model_rows(w, tmp, args.batch_size, args.threads, 0.05 if args.quick else 2.0, args.quick)
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
             if f in cpu_features()]
    missing = [f for f in ("avx512_vnni", "amx_int8", "avx512_bf16") if f not in cpu_features()]
    if missing:
        notes.append(f"this CPU lacks {', '.join(missing)}: the int8 kernels named above are not AMX/VNNI ones "
                     "(without avx512_vnni/avx_vnni, u8 x s8 products go through AVX2 vpmaddubsw with 16-bit "
                     "intermediate sums, in ONNX Runtime's MatMulIntegerToFloat and OpenVINO's FullyConnected "
                     "alike), and OpenVINO's default hint stays f32 where bf16 is missing")
    return {"model": name, "metric": w.task.headline, "threads": args.threads, "batch_size": args.batch_size,
            "cpu": cpu_name(), "features": flags, "rows": rows, "notes": notes}


def main(argv=None) -> str:
    import pandas as pd

    r = measure(argv)
    cols = ["runtime", "method", "precision", "batch 1 best ms", "batch 1 median ms", "batch B best ms",
            "batch B median ms", "batch B p10-p90 ms", "size MiB", "size / FP32", r["metric"], "roofline estimate B ms"]
    df = pd.DataFrame(r["rows"])[cols]
    df["roofline estimate B ms"] = [("" if v is None or v != v else f"{v:.4g}") for v in df["roofline estimate B ms"]]
    df = df.rename(columns=lambda c: c.replace(" B ", f" {r['batch_size']} "))
    text = "\n".join([f"{r['model']} on {r['cpu']} ({', '.join(r['features'])}), {r['threads']} thread(s); latency "
                      "measured (every row in the same interleaved rounds; best, median, p10-p90); roofline column an "
                      "ESTIMATE; metric on the evaluation set.", "", df.to_markdown(index=False, floatfmt=".4g"), "",
                      *[f"- {n}" for n in r["notes"]]])
    print(text)
    return text


if __name__ == "__main__":
    main()

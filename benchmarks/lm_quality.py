"""Language-model quantization quality on tiny-lm: the project's recipes next to the peers users would pick.

    python -m benchmarks.lm_quality [--quick]

One table, every row measured on the same held-out windows against the same FP32 logits: perplexity (lower
is better), mean KL(FP32 || quantized) per token in nats, top-1 next-token agreement with FP32, and a size
that says what it is -- "simulated" (the recipe's codes + scales + every other tensor, ``Workload.size``),
"ONNX file" (bytes on disk) or "torch.save" (the quantized module's state dict on disk).

- qcore (the simulation): fp16, int8 weight-only, W8A8 dynamic (int8-dynamic), int4 g32 (int4-weight-only),
  NF4 (blocks of 64), int3 g32 (affine, min-max); and int4 g32 with the embeddings in FP32, the layers ONNX
  Runtime's 4-bit quantizer touches (its MatMuls, not the embedding Gathers);
- ONNX Runtime on the FP32 ONNX export: ``quantize_dynamic`` (int8) and ``MatMulNBitsQuantizer`` (4 bits,
  blocks of 32, asymmetric: the same grid as int4 g32);
- torch.ao ``quantize_dynamic`` (int8 Linear; embeddings stay FP32).

``--quick`` runs a small random model of the same architecture on 4 windows (the test suite's check).
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import os
import tempfile
import warnings

import torch

from qcore import Recipe, preset
from qcore.export import export_qdq
from qcore.export.sessions import run_onnx, session

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)
INT3_G32 = {"name": "int3-g32", "weights": {"format": "int3", "granularity": "per_group", "group_size": 32,
                                            "symmetric": False, "range": "minmax"}, "activations": None}
EMBEDDINGS_FP32 = "int4 g32, embeddings FP32 (the layers MatMulNBitsQuantizer quantizes)"
RECIPES = {"fp16": "fp16", "int8 weight-only": "int8-weight-only", "W8A8 dynamic": "int8-dynamic",
           "int4 g32": "int4-weight-only", "NF4 (block 64)": "nf4", "int3 g32": INT3_G32}


def quick_workload():
    """A random 1-block model of tiny-lm's architecture (vocab 2048, context 32) on 4 windows of 32 tokens of the
    real test text (calibration: 2 of the validation text): the same code paths in seconds."""
    from qcore.model.lm import causal_lm_task, token_windows
    from qcore.model.workload import Workload
    from qcore.zoo import tinylm

    torch.manual_seed(0)
    model = tinylm.TinyLM(tinylm.Config(context_length=32, dim=32, layers=1, num_heads=2)).eval()
    split = tinylm.documents()
    cal = token_windows(tinylm.encode(split["validation"][:1]), 32).subset(slice(0, 2))
    ev = token_windows(tinylm.encode(split["test"][:1]), 32).subset(slice(0, 4))
    return Workload("tiny-lm (quick: random weights)", model, cal, ev, causal_lm_task(2048), batch_size=4)


def _row(w, tool: str, method: str, outputs: torch.Tensor, size: int, size_kind: str) -> dict:
    m = w.task.metrics(outputs.float(), w.reference_outputs, w.evaluation.labels)
    return {"tool": tool, "method": method, "perplexity": m["perplexity"], "kl_divergence": m["kl_divergence"],
            "top1_agreement": m["top1_agreement"], "size_bytes": size, "size": size_kind}


def qcore_rows(w) -> list[dict]:
    rows = []
    for label, p in RECIPES.items():
        recipe = Recipe.from_dict(p) if isinstance(p, dict) else preset(p, w.layer_shapes)
        outputs = w.run(w.simulate(recipe).model, w.evaluation)
        rows.append(_row(w, "qcore", label, outputs, w.size(recipe)["size_bytes"], "simulated"))
    # what MatMulNBitsQuantizer quantizes: the MatMuls (every Linear, lm_head too), not the embedding tables' Gathers
    d = preset("int4-weight-only", w.layer_shapes).to_dict()
    d["layers"] = {**(d.get("layers") or {}), **{n: None for n, i in w.layers.items() if i.kind == "Embedding"}}
    recipe = Recipe.from_dict(d)
    rows.append(_row(w, "qcore", EMBEDDINGS_FP32, w.run(w.simulate(recipe).model, w.evaluation),
                     w.size(recipe)["size_bytes"], "simulated"))
    return rows


def onnxruntime_rows(w, tmp: str) -> list[dict]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32 = os.path.join(tmp, "fp32.onnx")
    export_qdq(w, Recipe(name="fp32"), fp32)
    rows = [_row(w, "onnxruntime", "FP32 export (reference check)", run_onnx(session(fp32, 1), w, w.evaluation),
                 os.path.getsize(fp32), "ONNX file")]
    out = os.path.join(tmp, "dynamic.onnx")
    quantize_dynamic(fp32, out, weight_type=QuantType.QInt8)
    rows.append(_row(w, "onnxruntime", "quantize_dynamic (int8)", run_onnx(session(out, 1), w, w.evaluation),
                     os.path.getsize(out), "ONNX file"))
    q = MatMulNBitsQuantizer(onnx.load(fp32), bits=4, block_size=32, is_symmetric=False)
    q.process()
    out = os.path.join(tmp, "nbits.onnx")
    onnx.save(q.model.model, out)
    rows.append(_row(w, "onnxruntime", "MatMulNBitsQuantizer (4 bits, block 32, asymmetric)",
                     run_onnx(session(out, 1), w, w.evaluation), os.path.getsize(out), "ONNX file"))
    return rows


def torch_ao_rows(w) -> list[dict]:
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "x86"
    dyn = quantize_dynamic(copy.deepcopy(w.model).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(dyn.state_dict(), buf)
    return [_row(w, "torch.ao", "quantize_dynamic (int8 Linear)", w.run(dyn, w.evaluation), buf.tell(), "torch.save")]


def measure(argv=None) -> dict:
    """``{"model", "fp32": {"perplexity", "size_bytes"}, "tokens" (scored), "rows": [{"tool", "method", "perplexity",
    "kl_divergence", "top1_agreement", "size_bytes", "size"}]}``, every number measured."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small random model on 4 windows (the test suite's run)")
    args = ap.parse_args(argv)
    if args.quick:
        w = quick_workload()
    else:
        from qcore import zoo

        w = zoo.load("tiny-lm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same arithmetic for every row, and no spinning on a shared CPU
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = qcore_rows(w) + onnxruntime_rows(w, tmp) + torch_ao_rows(w)
    finally:
        torch.set_num_threads(threads)
    return {"model": w.name, "fp32": {"perplexity": w.fp32_metrics["perplexity"], "size_bytes": w.size(Recipe(name="fp32"))["fp32_bytes"]},
            "tokens": int((w.evaluation.labels != -100).sum()), "rows": rows}


def main(argv=None) -> str:
    r = measure(argv)
    lines = [f"#### {r['model']}: FP32 perplexity {r['fp32']['perplexity']:.2f} on {r['tokens']:,} held-out tokens, "
             f"{r['fp32']['size_bytes']:,} B\n",
             "| tool | method | perplexity | KL (nats/token) | top-1 agreement | size (bytes) | size is |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['tool']} | {x['method']} | {x['perplexity']:.2f} | {x['kl_divergence']:.4f} | "
              f"{x['top1_agreement']:.4f} | {x['size_bytes']:,} | {x['size']} |" for x in r["rows"]]
    text = "\n".join(lines) + "\n"
    print(text)
    return text


if __name__ == "__main__":
    main()

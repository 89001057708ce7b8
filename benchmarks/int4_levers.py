"""minilm-l6 int4 g32, every weight (embeddings too): two levers the engine does not have yet, measured side by side.

    python -m benchmarks.int4_levers

Rows (cosine to FP32 on the 300 evaluation sentences, the simulation; seconds = wall time of that row's own work):

1. ``int4-gptq-embeddings`` as the engine does it (GPTQ on the 36 Linears from the calibration inputs, the summed
   embedding tables by ``embedding_feedback`` with nearest rounding);
2. the Linears' GPTQ from Hessians of the *real* tokens only: the 64 calibration sentences are padded to 18 tokens,
   and 265 of the 1,152 rows each Linear sees are padding, which the attention mask and the mean pooling drop;
3. the tables rounded by GPTQ under M = E[J^T J] (``quantize_summed(metric=M)``), J the Jacobian of the sentence
   embedding with respect to the summed embedding (the LayerNorm's input), on the real calibration tokens,
   estimated with 32 random output directions per batch (E[v v^T] = I), the lookup counts of real tokens;
4. both.

Nothing here is tuned on the evaluation sentences: damping 0.1 as ``int4-gptq``, 32 directions chosen once.
"""

from __future__ import annotations

import copy
import time

import torch

from qcore import preset, zoo
from qcore.algorithms.embedding_feedback import quantize_summed
from qcore.algorithms.gptq import gptq_quantize
from qcore.hardware import cpu_features, cpu_name
from qcore.model.hooks import temporary_hooks

DIRECTIONS = 32
TABLES = [f"bert.embeddings.{k}_embeddings" for k in ("token_type", "position", "word")]  # fewest rows first


def real_token_hessians(w, names) -> dict:
    """Layer -> sum of x x^T over the calibration rows whose attention mask is 1 (float64)."""
    model = copy.deepcopy(w.folded[0]).eval()
    modules = dict(model.named_modules())
    hessians, mask = {}, {}

    def hook(n):
        def record(module, args):
            x = args[0].detach().float()[mask["now"]]
            gram = (x.T @ x).double()
            hessians[n] = gram if n not in hessians else hessians[n].add_(gram)
        return record

    with temporary_hooks(pre=[(modules[n], hook(n)) for n in names]), torch.no_grad():
        for batch in w.calibration.batches(w.batch_size):
            mask["now"] = batch[1].bool()
            model(*batch)
    return hessians


def output_metric(w) -> torch.Tensor:
    """M = sum over real calibration tokens of J^T J (dim, dim), J: d(sentence embedding) / d(summed embedding)."""
    model = copy.deepcopy(w.folded[0]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ln = dict(model.named_modules())["bert.embeddings.LayerNorm"]
    seen, dim = {}, ln.weight.shape[0]
    metric = torch.zeros(dim, dim, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)

    def leaf(module, args):
        seen["x"] = args[0].detach().requires_grad_(True)
        return (seen["x"],)

    with temporary_hooks(pre=[(ln, leaf)]):
        for batch in w.calibration.batches(w.batch_size):
            out = model(*batch)
            v = torch.randn(DIRECTIONS, *out.shape, generator=generator)
            grads, = torch.autograd.grad(out, seen["x"], grad_outputs=v, is_grads_batched=True)
            g = grads[:, batch[1].bool()].reshape(-1, dim).double()
            metric += g.T @ g / DIRECTIONS
    return metric


def measure() -> dict:
    w = zoo.load("minilm-l6")
    recipe = preset("int4-gptq-embeddings", w.layer_shapes)
    plans = recipe.resolve(w.layer_shapes)
    modules = dict(w.folded[0].named_modules())
    linears = [n for n, i in w.layers.items() if i.kind == "Linear"]
    ids, mask = w.calibration.inputs[:2]
    counts = [torch.tensor([float(mask.sum()), 0.0]),
              torch.cat([mask.double().sum(0), torch.zeros(modules[TABLES[1]].weight.shape[0] - ids.shape[1])]),
              torch.bincount(ids[mask.bool()], minlength=modules[TABLES[2]].weight.shape[0]).double()]

    def cosine(given) -> float:
        out = w.run(w.simulate(recipe, quantized_weights=given).model, w.evaluation)
        return float(w.task.metrics(out, w.reference_outputs, w.evaluation.labels)[w.task.headline])

    def load() -> float:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])

    rows = []
    start = time.perf_counter()
    engine = w.rounded_weights(recipe)
    rows.append({"method": "int4-gptq-embeddings (engine)", "seconds": time.perf_counter() - start})
    start = time.perf_counter()
    hessians = real_token_hessians(w, linears)
    real = {n: gptq_quantize(modules[n].weight.detach(), hessians[n], plans[n].weights, damp=0.1) for n in linears}
    real_s = time.perf_counter() - start
    start = time.perf_counter()
    metric = output_metric(w)
    tables = dict(zip(TABLES, quantize_summed([modules[n].weight.detach() for n in TABLES],
                                              [plans[n].weights for n in TABLES], counts, metric=metric)))
    tables_s = time.perf_counter() - start
    rows[0].update(metric=cosine({}), load=load())
    rows.append({"method": "Linears: GPTQ on real-token Hessians; tables as the engine", "seconds": real_s,
                 "metric": cosine({**engine, **real}), "load": load()})
    rows.append({"method": "tables: GPTQ under the output metric M; Linears as the engine", "seconds": tables_s,
                 "metric": cosine({**engine, **tables}), "load": load()})
    rows.append({"method": "both", "seconds": real_s + tables_s, "metric": cosine({**real, **tables}), "load": load()})
    return {"cpu": cpu_name(), "flags": cpu_features(), "rows": rows}


def main() -> str:
    result = measure()
    lines = [f"CPU: {result['cpu']} (flags: {', '.join(result['flags'])})", "",
             "| minilm-l6, every weight int4 g32 | cosine_to_fp32 | time (s) | load average (1 min) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['metric']:.5f} | {r['seconds']:.1f} | {r['load']:.1f} |" for r in result["rows"]]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()

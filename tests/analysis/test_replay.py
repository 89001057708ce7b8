"""Prefix reuse in the sensitivity sweep: a run perturbing a layer recomputes only that layer and what
comes after it, also when the model keeps its blocks in a container that is never called itself
(``nn.ModuleList``, the dotted containers of an uploaded ONNX graph). The forward passes are counted
with a wrapper around the block's class and compared with the count the design predicts from the
layers' positions; the sweep's numbers equal a naive loop (a fresh simulated copy run on the same samples)."""

import math

import pytest
import torch
from torch import nn

from qcore.analysis import sensitivity
from qcore.analysis.sensitivity import evenly_spaced, recipe_for, sweep
from qcore.io.workload import load_workload
from qcore.model.simulate import modules_by_name
from qcore.numerics.metrics import sqnr_db


def count_forwards(monkeypatch, cls, marked: bool = False) -> list[int]:
    """Count the calls of ``cls.forward`` that compute (a replayed module's forward is replaced on the
    instance); ``marked``: only of modules with a ``counted_layer`` attribute (the sweep's deep copy keeps it)."""
    calls, real = [0], cls.forward

    def counted(self, *args, **kwargs):
        calls[0] += not marked or hasattr(self, "counted_layer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return calls


def naive(w, result, layer, candidate, mode):
    """(metric, output SQNR dB) of ``layer`` quantized alone: a fresh simulated copy run on the sweep's samples."""
    index = evenly_spaced(result.evaluation_samples, result.samples)
    data, reference = w.evaluation.subset(index), w.reference_outputs[index]
    out = w.run(w.simulate(recipe_for(w, layer, candidate, mode)).model, data)
    return float(w.task.metrics(out, reference, data.labels)[w.task.headline]), sqnr_db(out, reference)


@pytest.mark.slow
def test_minilm_sweep_recomputes_the_encoder_only_from_the_perturbed_block(minilm, tmp_path, monkeypatch):
    """bert.encoder.layer is an nn.ModuleList its parent loops over. A layer in block k (embeddings: k = 0)
    replays blocks 0..k-1 and computes the 6 - k others; the layer-error run computes all 6 and the one check
    of the replay (the last layer: block 5) computes 1; recording the call order 6. Before descending into the list: 6 per run."""
    from transformers.models.bert.modeling_bert import BertLayer

    minilm.reference_outputs  # computed once per workload, not by the sweep
    monkeypatch.setattr(sensitivity, "SWEEP_FLOPS", 1.0)  # sweep the fewest samples (2, one per half): fast
    monkeypatch.setattr(sensitivity, "MIN_SWEEP_SAMPLES", 2)
    calls = count_forwards(monkeypatch, BertLayer)
    r = sweep(minilm, ["int3"], mode="weights", cache_dir=tmp_path)
    blocks = len(minilm.model.bert.encoder.layer)
    assert blocks == 6 and r.samples == 2 and all(row.changed for row in r.rows) and len(r.rows) == 39
    block = [int(n.split(".")[3]) if n.startswith("bert.encoder.layer.") else 0 for n in minilm.layers]
    per_batch = blocks + 1 + sum(blocks - k for k in block)
    assert per_batch == 6 + 1 + 3 * 6 + 6 * (6 + 5 + 4 + 3 + 2 + 1)  # 151, against 41 runs x 6 = 246 before
    # + one pass over two samples recording the call order
    assert calls[0] == per_batch * math.ceil(r.samples / minilm.batch_size) + blocks
    by = {row.layer: row for row in r.rows}
    for layer in ("bert.embeddings.word_embeddings", "bert.encoder.layer.2.attention.self.key",
                  "bert.encoder.layer.5.output.dense"):
        metric, sqnr = naive(minilm, r, layer, "int3", "weights")
        assert by[layer].metric == pytest.approx(metric, abs=1e-6)
        assert by[layer].sqnr_db == pytest.approx(sqnr, abs=1e-3)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stacked(nn.Module):
    """stem -> 3 residual blocks kept in an nn.ModuleList (never called itself) -> head: 8 Linear layers in a chain."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.blocks, self.head = nn.Linear(8, 16), nn.ModuleList(Block() for _ in range(3)), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _chain_workload(kind, tmp_path, digits_cnn):
    if kind == "digits-cnn":
        return digits_cnn, (nn.Conv2d, nn.Linear), False
    model, x = Stacked().eval(), torch.randn(4, 8)
    path = tmp_path / f"stacked.{kind}"
    if kind == "pt2":
        torch.export.save(torch.export.export(model, (x,)), str(path))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, verbose=False)
    w = load_workload(str(path))
    layers = modules_by_name(w.folded[0], w.layers).values()
    for m in layers:  # a .pt2's layers are unflattened InterpreterModules, an ONNX graph's nn.Linear
        m.counted_layer = True
    return w, tuple({type(m) for m in layers}), True


@pytest.mark.parametrize("kind", ["digits-cnn", "onnx", "pt2"])
def test_chain_models_recompute_only_the_perturbed_layer_and_after(kind, tmp_path, monkeypatch, digits_cnn):
    """In a chain of L layers, a run perturbing layer i computes layers i..L-1 (L - i forwards); the
    layer-error run computes each layer twice (FP32 and quantized on the same input) and the replay
    check computes the last layer once; one pass over two samples records the call order. Numbers equal the naive loop's."""
    w, classes, marked = _chain_workload(kind, tmp_path, digits_cnn)
    w.reference_outputs
    counters = [count_forwards(monkeypatch, cls, marked) for cls in classes]
    r = sweep(w, ["int3"], mode="weights", cache_dir=tmp_path)
    n = len(w.layers)
    assert n == (5 if kind == "digits-cnn" else 8) and all(row.changed for row in r.rows)
    per_batch = 2 * n + 1 + sum(n - i for i in range(n))
    assert sum(c[0] for c in counters) == per_batch * math.ceil(r.samples / w.batch_size) + n  # + the call order
    for row in r.rows:
        metric, sqnr = naive(w, r, row.layer, "int3", "weights")
        assert row.metric == pytest.approx(metric, abs=1e-6) and row.sqnr_db == pytest.approx(sqnr, abs=1e-3)

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
from qcore.analysis.sensitivity import evenly_spaced, recipe_for, sweep, sweep_reference
from qcore.analysis.sweep_cache import clear_memory_cache
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
    data, reference = w.evaluation.subset(index), sweep_reference(w, index)
    out = w.run(w.simulate(recipe_for(w, layer, candidate, mode)).model, data)
    return float(w.task.metrics(out, reference, data.labels)[w.task.headline]), sqnr_db(out, reference)


@pytest.mark.slow
def test_minilm_sweep_recomputes_the_encoder_only_from_the_perturbed_block(minilm, tmp_path, monkeypatch):
    """bert.encoder.layer is an nn.ModuleList its parent loops over. A layer in block k (embeddings: k = 0)
    replays blocks 0..k-1 and computes the 6 - k others; the FP32 run computes all 6 and the check of the
    replay (the last layer: block 5) computes 1, once on the batch and once on two stacked copies of it;
    recording the call order 6, and the FP32 reference outputs on the swept samples 6. Before descending into
    the list: 6 per run. Both candidates of a layer run in one pass (a copy of the batch each), except
    position_embeddings: its input, the (1, L) position ids, is shared by the batch, so its candidates run one at
    a time (6 more blocks). Inside block k the children that finish before the perturbed layer starts are
    replayed too: a run perturbing ``intermediate.dense`` or ``output.dense`` computes no self-attention in block
    k, one perturbing ``output.dense`` no intermediate either."""
    from transformers.models.bert.modeling_bert import BertIntermediate, BertLayer, BertSelfAttention

    monkeypatch.setattr(sensitivity, "SWEEP_FLOPS", 1.0)  # sweep few samples (4, two per half): fast; with 2, two
    monkeypatch.setattr(sensitivity, "MIN_SWEEP_SAMPLES", 4)  # stacked copies round differently: no stacking
    calls = count_forwards(monkeypatch, BertLayer)
    attention_calls = count_forwards(monkeypatch, BertSelfAttention)
    intermediate_calls = count_forwards(monkeypatch, BertIntermediate)
    clear_memory_cache()
    r = sweep(minilm, ["int3", "int4-weight-only"], mode="weights", cache_dir=tmp_path)
    blocks = len(minilm.model.bert.encoder.layer)
    assert blocks == 6 and r.samples == 4 and all(row.changed for row in r.rows) and len(r.rows) == 2 * 39
    block = [int(n.split(".")[3]) if n.startswith("bert.encoder.layer.") else 0 for n in minilm.layers]
    per_batch = blocks + 2 + sum(blocks - k for k in block) + blocks
    assert per_batch == 6 + 2 + 3 * 6 + 6 * (6 + 5 + 4 + 3 + 2 + 1) + 6  # 158, against 2 x 41 runs x 6 = 492 before
    # + one pass over two samples recording the call order
    # + the FP32 reference on the 4 swept samples (not on all 300: the whole set's is not computed for a subset)
    assert calls[0] == per_batch * math.ceil(r.samples / minilm.batch_size) + blocks + blocks
    # per batch, a child of block b is computed by a run perturbing a layer of block k if b > k, or b == k and the
    # child does not end before the layer starts (an embedding layer: k = -1); the FP32 run computes all 6, the
    # replay checks (block 5's output.dense) none; position_embeddings runs twice
    position = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"]
    runs = [(-1, 0)] * 4 + [(int(n.split(".")[3]), position.index(n.split(".", 4)[4])) for n in minilm.layers
                            if n.startswith("bert.encoder.layer.")]
    for counted, last in ((attention_calls, 2), (intermediate_calls, 4)):  # the child ends after position `last`
        per_batch = blocks + sum(sum(b > k or (b == k and j <= last) for b in range(blocks)) for k, j in runs)
        assert counted[0] == per_batch * math.ceil(r.samples / minilm.batch_size) + blocks + blocks
    assert attention_calls[0] == 6 + 4 * 6 + 6 * 15 + 6 * 3 + 12  # 150 (block reuse alone: 168)
    assert intermediate_calls[0] == 6 + 4 * 6 + 6 * 15 + 6 * 5 + 12  # 162
    by = {(row.layer, row.candidate): row for row in r.rows}
    for layer, candidate in (("bert.embeddings.word_embeddings", "int3"), ("bert.embeddings.position_embeddings", "int3"),
                             ("bert.encoder.layer.2.attention.self.key", "int4-weight-only"),
                             ("bert.encoder.layer.5.output.dense", "int3")):
        metric, sqnr = naive(minilm, r, layer, candidate, "weights")
        assert by[layer, candidate].metric == pytest.approx(metric, abs=1e-6)
        assert by[layer, candidate].sqnr_db == pytest.approx(sqnr, abs=1e-3)


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
    """In a chain of L layers, the FP32 run computes every layer once, the replay check the last layer once on
    the batch and once on two stacked copies of it, and the run perturbing layer i computes layers i+1..L-1 once
    (all k candidates of layer i in one run, a copy of the batch each) and layer i 1 + k times (FP32 and each
    candidate's quantized version on the same FP32 input); one pass over two samples records the call order.
    Numbers equal the naive loop's, int8 compute's quantized inputs included."""
    w, classes, marked = _chain_workload(kind, tmp_path, digits_cnn)
    w.reference_outputs
    clear_memory_cache()  # another test's sweep of one of these candidates would be served from memory
    counters = [count_forwards(monkeypatch, cls, marked) for cls in classes]
    candidates = ["int3", "int4-int8compute"]
    r = sweep(w, candidates, mode="weights", cache_dir=tmp_path)
    n, k = len(w.layers), len(candidates)
    assert n == (5 if kind == "digits-cnn" else 8) and all(row.changed for row in r.rows)
    per_batch = n + 2 + sum(n - i - 1 + 1 + k for i in range(n))
    assert sum(c[0] for c in counters) == per_batch * math.ceil(r.samples / w.batch_size) + n  # + the call order
    for row in r.rows:
        metric, sqnr = naive(w, r, row.layer, row.candidate, "weights")
        assert row.metric == pytest.approx(metric, abs=1e-6) and row.sqnr_db == pytest.approx(sqnr, abs=1e-3)


def test_candidates_that_compute_a_layer_the_same_way_run_it_once(tmp_path, monkeypatch, digits_cnn):
    """int8-dynamic and int8-static quantize weights alike (int8 per channel, min-max): in mode "weights" every
    layer computes the same under both, so the sweep runs each layer once, as for one candidate: per batch the
    FP32 run (n layers), the replay check (the last layer once; no stacked check), and for layer i one run
    computing layers i+1..n-1 and layer i twice (FP32 and quantized); the call order n more. Both candidates'
    rows equal the naive loop's."""
    w, classes, marked = _chain_workload("digits-cnn", tmp_path, digits_cnn)
    w.reference_outputs
    clear_memory_cache()
    counters = [count_forwards(monkeypatch, cls, marked) for cls in classes]
    r = sweep(w, ["int8-dynamic", "int8-static"], mode="weights", cache_dir=tmp_path)
    n = len(w.layers)
    per_batch = n + 1 + sum(n - i - 1 + 2 for i in range(n))
    assert sum(c[0] for c in counters) == per_batch * math.ceil(r.samples / w.batch_size) + n
    for row in r.rows:
        metric, sqnr = naive(w, r, row.layer, row.candidate, "weights")
        assert row.metric == pytest.approx(metric, abs=1e-6) and row.sqnr_db == pytest.approx(sqnr, abs=1e-3)


class Twice(nn.Module):
    """stem -> fc -> fc again (the second call's input is the first call's output) -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(torch.relu(self.stem(x))))))


def test_a_layer_called_twice_gets_each_candidates_own_input_on_its_second_call(tmp_path):
    """Both candidates of ``fc`` run in one pass (a copy of the batch each); on its second call each copy's input is
    that copy's first quantized output, not the first copy's: every row equals the naive loop's."""
    from qcore.model.task import output_task
    from qcore.model.workload import Data, Workload

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    w = Workload("twice", Twice().eval(), Data((x,)), Data((x,)), output_task("embedding", (4,), False, "test"))
    clear_memory_cache()
    r = sweep(w, ["int3", "int4-weight-only"], mode="weights", cache_dir=tmp_path)
    for row in r.rows:
        metric, sqnr = naive(w, r, row.layer, row.candidate, "weights")
        assert row.metric == pytest.approx(metric, abs=1e-6) and row.sqnr_db == pytest.approx(sqnr, abs=1e-3)

"""The ONNX importer against ONNX's own node conformance cases (``onnx.backend.test.case.node``, shipped
with the onnx package: each case is a one-node model -- or a function expanded into several nodes -- with
inputs and the outputs ONNX's reference implementation computed).

Every case whose operators (subgraphs included) are all in the importer's table is converted and run,
and each of its outputs is compared with the expected one. Cases the importer knowingly cannot take are
skipped for a reason a rule below states (an element type torch cannot feed, an opset older than the
importer's minimum, ...) or are listed by name in ``KNOWN`` with the reason; any other failure fails.

Weights: a real model holds a Conv/ConvTranspose/LSTM/GRU weight as an initializer, and that is what the
importer turns into a layer; the node cases feed weights as graph inputs, so ``_as_exported`` makes those
inputs initializers (the data input stays a run-time input), which runs the layer path.

Tolerance: float32 rtol 1e-4, atol 1e-5 -- torch and numpy's reference order float sums differently (a
few ulp per step; LSTM/GRU recurrences and 4-tap cubic resizes accumulate most, measured max ~1e-6 abs);
float16 and float64 cases compare at 1e-3 / 1e-7 relative to their own precision (rtol 1e-2 for float16,
which carries ~3 decimal digits); integer and bool outputs must be equal.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qcore.io.onnx.convert import MIN_OPSET, SUPPORTED, convert

WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3)}
FEEDABLE = {np.dtype(t) for t in ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")}
TOLERANCE = {np.dtype("float32"): (1e-4, 1e-5), np.dtype("float16"): (1e-2, 1e-3), np.dtype("float64"): (1e-7, 1e-9)}

# Cases whose operators are all in the table but which the importer knowingly does not handle.
KNOWN = {
    **{f"test_training_dropout{s}": "Dropout in training mode (random masks): the importer runs inference only"
       for s in ("", "_default", "_default_mask", "_mask")},
    "test_batchnorm_epsilon_training_mode": "BatchNormalization in training mode (batch statistics): inference only",
    "test_batchnorm_example_training_mode": "BatchNormalization in training mode (batch statistics): inference only",
    **{f"test_maxpool_with_argmax_2d_precomputed_{s}": "MaxPool's indices output is refused (export without return_indices)"
       for s in ("pads", "strides")},
    **{n: "pools over 3 spatial dims are refused (1-D and 2-D are supported)" for n in (
        "test_maxpool_3d_default", "test_maxpool_3d_dilations", "test_maxpool_3d_dilations_use_ref_impl",
        "test_maxpool_3d_dilations_use_ref_impl_large", "test_averagepool_3d_default",
        "test_averagepool_3d_dilations_small",
        *(f"test_averagepool_3d_dilations_large_count_include_pad_is_{i}_ceil_mode_is_{c}"
          for i in (0, 1) for c in ("False", "True")))},
    **{n: "pools with auto_pad SAME are refused (export with explicit pads)" for n in (
        "test_maxpool_2d_precomputed_same_upper", "test_maxpool_2d_same_lower", "test_maxpool_2d_same_upper",
        "test_averagepool_2d_precomputed_same_upper", "test_averagepool_2d_same_lower",
        "test_averagepool_2d_same_upper")},
    **{n: "pools with pads above half the kernel: torch's pools refuse them" for n in (
        "test_maxpool_2d_pads", "test_averagepool_2d_pads", "test_averagepool_2d_pads_count_include_pad")},
    "test_averagepool_2d_dilations": "AveragePool's dilations are ignored (torch's avg_pool has none)",
    "test_averagepool_2d_ceil_last_window_starts_on_pad": "AveragePool ceil_mode: torch drops a last window that starts in the padding",
    **{f"test_resize_downsample_{s}_antialias": "Resize with antialias=1 is refused"
       for s in ("scales_cubic", "scales_linear", "sizes_cubic", "sizes_linear")},
    **{f"test_resize_tf_crop_and_resize{s}": "Resize's tf_crop_and_resize (roi) mode is refused"
       for s in ("", "_axes_2_3", "_axes_3_2", "_extrapolation_value")},
    **{f"test_resize_downsample_scales_{m}_align_corners": (
        "align_corners with a non-integer output length (scale 0.6): ONNX's reference divides by scale * n - 1, "
        "onnxruntime and torch by the integer size - 1, which the importer follows") for m in ("linear", "cubic")},
    **{n: "ReduceMax/Min over an empty axis (ONNX: -inf/+inf; torch refuses)" for n in (
        "test_reduce_max_empty_set", "test_reduce_max_empty_set_bool", "test_reduce_min_empty_set")},
}


def _ops(graph):
    for node in graph.node:
        yield node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _ops(g)


def _cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators cast out-of-range values on purpose
        cases = collect_testcases(None)
    return [c for c in cases if set(_ops(c.model.graph)) <= set(SUPPORTED) and not c.model.functions]


CASES = {c.name: c for c in _cases()}


def _data_sets(case):
    """(inputs, outputs) lists of numpy arrays (some cases store TensorProtos to keep their element type,
    scalars as numpy scalars: rank-0 inputs)."""
    array = lambda v: (numpy_helper.to_array(v) if isinstance(v, TensorProto) else
                       np.asarray(v) if isinstance(v, np.generic) else v)
    return [([array(v) for v in inputs], [array(v) for v in outputs]) for inputs, outputs in case.data_sets]


def _skip_reason(case) -> str | None:
    """Why a selected case cannot run, by rule: its values or its opset, not its operator."""
    opset = next((o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        return f"opset {opset} < {MIN_OPSET}: the importer refuses older opsets"
    for inputs, outputs in _data_sets(case):
        for v in [*inputs, *outputs]:
            if not isinstance(v, np.ndarray):
                return "sequence or optional values: the importer runs tensors only"
            if v.dtype not in FEEDABLE:
                return f"element type {v.dtype}: not a torch dtype the importer runs"
    return KNOWN.get(case.name)


def _as_exported(case):
    """The case's model with the weights of its layer operators as initializers, and the remaining inputs."""
    model = type(case.model)()
    model.CopyFrom(case.model)
    inputs, _ = _data_sets(case)[0]
    values = dict(zip([i.name for i in model.graph.input], inputs))
    weights = {n.input[i] for n in model.graph.node for i in WEIGHT_INPUTS.get(n.op_type, ())
               if i < len(n.input) and n.input[i] in values and values[n.input[i]].dtype == np.float32}
    for name in weights:
        model.graph.initializer.append(numpy_helper.from_array(values[name], name))
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model, [n for n in values if n not in weights]


def _check(case):
    model, feeds = _as_exported(case)
    module = convert(model)
    for inputs, expected in _data_sets(case):
        values = dict(zip([i.name for i in case.model.graph.input], inputs))
        with torch.no_grad():
            got = module.run(*(torch.from_numpy(np.array(values[n])) for n in feeds))
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            g = g.numpy()
            assert g.shape == e.shape, (g.shape, e.shape)
            if e.dtype in TOLERANCE:
                rtol, atol = TOLERANCE[e.dtype]
                assert g.dtype == e.dtype
                np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
            else:
                np.testing.assert_array_equal(g.astype(e.dtype), e)


@pytest.mark.parametrize("name", sorted(CASES))
def test_node_case(name):
    case = CASES[name]
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    _check(case)


def test_known_failures_are_real_and_the_count_is_stated():
    """Every case in ``KNOWN`` is selected (its operators are in the table) and really fails; the
    counts (run / skipped by reason) are printed with ``pytest -s``."""
    for name in KNOWN:
        assert name in CASES, f"{name} is not a selected case: remove it from KNOWN"
        with pytest.raises(Exception):  # noqa: B017 -- each fails its own way (refused, wrong values, missing output)
            _check(CASES[name])
    reasons = collections.Counter(_skip_reason(c) or "run" for c in CASES.values())
    print(f"\nONNX node cases: {len(CASES)} selected, {reasons.pop('run')} run")
    for reason, n in reasons.most_common():
        print(f"  skipped {n:4d}: {reason}")

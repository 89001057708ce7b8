"""``ui.charts``: a figure is reused only for the very same function and inputs, and is the figure a fresh call
builds (compared as plotly JSON, against ``make(*args)`` called directly, outside the cache)."""

from __future__ import annotations

import numpy as np
import plotly.io as pio
import streamlit as st
import torch

from qcore.figures import viz
from ui import charts


def _json(fig) -> str:
    return pio.to_json(fig, validate=False)


def test_same_inputs_give_the_cached_figure_and_it_is_the_fresh_one():
    st.cache_resource.clear()
    counts, edges = np.array([1.0, 4.0, 2.0]), np.array([-1.0, -0.2, 0.3, 1.0])
    first = charts.figure(viz.error_histogram, counts, edges, step=0.5)
    again = charts.figure(viz.error_histogram, counts.copy(), edges.copy(), step=0.5)  # equal values, new objects
    assert again is first
    assert _json(first) == _json(viz.error_histogram(counts, edges, step=0.5))


def test_changed_inputs_or_function_give_a_changed_figure_equal_to_a_fresh_one():
    st.cache_resource.clear()
    counts, edges = torch.tensor([1.0, 4.0, 2.0]), torch.tensor([-1.0, -0.2, 0.3, 1.0])
    before = charts.figure(viz.error_histogram, counts, edges, step=0.5)
    for args, kwargs in [((torch.tensor([1.0, 5.0, 2.0]), edges), {"step": 0.5}),  # one count differs
                         ((counts.double(), edges.double()), {"step": 0.5}),  # same values, another dtype
                         ((counts, edges), {"step": 0.25}),  # a keyword argument differs
                         ((counts, edges), {})]:
        got = charts.figure(viz.error_histogram, *args, **kwargs)
        assert got is not before
        assert _json(got) == _json(viz.error_histogram(*args, **kwargs))
    other = charts.figure(viz.distribution, counts, edges)  # another function on the same arguments
    assert _json(other) == _json(viz.distribution(counts, edges)) != _json(before)


def test_a_large_array_changed_in_one_value_is_not_served_from_the_cache():
    """Streamlit's own hash samples 100,000 values of an array with 500,000 or more; ours reads every byte."""
    st.cache_resource.clear()
    mins = np.linspace(-1.0, 0.0, 600_000)
    result = {"min": mins, "max": mins + 1.0, "channel": np.arange(600_000), "tensor_min": -1.0, "tensor_max": 1.0}
    before = charts.figure(viz.channel_ranges, result)
    changed = {**result, "max": result["max"].copy()}
    changed["max"][123_457] += 0.5
    after = charts.figure(viz.channel_ranges, changed)
    assert after is not before
    band = next(t for t in after.data if t.name == "channel range")  # two points per channel: its max twice
    assert float(band.y[2 * 123_457]) == float(band.y[2 * 123_457 + 1]) == float(changed["max"][123_457])

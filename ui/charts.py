"""Plotly charts drawn from cached figures: ``plot(viz.error_histogram, counts, edges, step=s)``.

Building a Plotly figure is slow: plotly validates every property as it is set, so one figure with a few traces
and shapes takes 20-300 ms of CPU, more than the cached numbers it shows (the Weights page spent ~1 s of its
1.25 s warm rerun building its four figures). The same figure function on the same inputs gives the same figure,
so a rerun draws the figure it built before.

Figures are kept with ``st.cache_resource`` (shared by every session, never copied: ``st.plotly_chart`` only reads
the figure) under Streamlit's hash of the figure function (its module and name) and all its arguments. Arrays and tensors are hashed by
their full content (dtype, shape and bytes; Streamlit's own hash samples arrays of 500,000+ values), so a figure
is reused only for the very same numbers. Figure functions (``qcore.figures``) are pure: data in, figure out.
"""

from __future__ import annotations

import hashlib
import types

import numpy as np
import streamlit as st
import torch


def _content(a) -> bytes:
    """Dtype, shape and a digest of every byte of the array or tensor ``a``."""
    x = np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a)
    return f"{x.dtype.str}{x.shape}".encode() + hashlib.blake2b(x.view(np.uint8).reshape(-1)).digest()


def _name(f) -> str:
    return f"{f.__module__}.{f.__qualname__}"


@st.cache_resource(show_spinner=False, max_entries=256,
                   hash_funcs={np.ndarray: _content, torch.Tensor: _content, types.FunctionType: _name})
def figure(make, *args, **kwargs):
    """``make(*args, **kwargs)``, built once per distinct function and arguments (the object is shared: do not
    change it)."""
    return make(*args, **kwargs)


def plot(make, *args, key: str | None = None, **kwargs) -> None:
    """Draw ``make(*args, **kwargs)`` full width (``key``: the chart's element key, if it needs one)."""
    st.plotly_chart(figure(make, *args, **kwargs), key=key, width="stretch")

"""What the pages share: session-state keys, the active workload, and cached loaders / tables.

Not a page (``app.py`` lists the pages). Workloads are cached with ``st.cache_resource`` -- one
object per zoo model for every session, never modified (recipes are applied to copies by
``Workload.simulate``). Derived tables use ``st.cache_data`` keyed by the workload's ``key``
(zoo name, or a digest of the uploaded bytes) with the workload itself passed unhashed.
"""

from __future__ import annotations

import streamlit as st

from qcore import explain, summary, zoo
from qcore.recipe import TensorSpec

# ---- session-state keys (the only place they are spelled) ----------------------------------------
SOURCE = "model_source"  # "zoo" | "upload"
ZOO_NAME = "model"  # the zoo model chosen in the sidebar; also its URL query parameter (?model=...)
LABEL_COLUMN = "label_column"  # CSV label column typed in the sidebar
UPLOAD = "uploaded"  # {"key", "workload", "label"} of the last upload that loaded
UPLOAD_ERROR = "upload_error"  # one-line message of the last upload that failed
ZOO, UPLOAD_SOURCE = "zoo", "upload"


@st.cache_resource(show_spinner="Loading the model (minilm-l6 takes a few seconds)…", max_entries=4)
def zoo_workload(name: str):
    return zoo.load(name)


def active() -> tuple[str, object]:
    """``(key, workload)`` of the model every page shows: the loaded upload when the sidebar is on
    "upload" and one loaded, else the chosen zoo model."""
    uploaded = st.session_state.get(UPLOAD)
    if st.session_state.get(SOURCE) == UPLOAD_SOURCE and uploaded:
        return uploaded["key"], uploaded["workload"]
    name = st.session_state.get(ZOO_NAME, zoo.DEFAULT_MODEL)
    return f"zoo:{name}", zoo_workload(name)


def spec_from(d: dict, activation: bool = False) -> TensorSpec:
    return TensorSpec.from_dict(d, "spec", activation)


# ---- cached derived tables (key identifies the workload; _w is not hashed) -----------------------
@st.cache_data(show_spinner=False, max_entries=32)
def layer_table(key: str, _w) -> list[dict]:
    return summary.layer_table(_w)


@st.cache_data(show_spinner=False, max_entries=32)
def preset_sizes(key: str, _w) -> list[dict]:
    return summary.preset_sizes(_w)


def layer_weight(w, layer: str):
    return dict(w.folded[0].named_modules())[layer].weight.detach()


@st.cache_data(show_spinner="Quantizing the layer with every range method…", max_entries=64)
def weight_report(key: str, _w, layer: str, spec: dict) -> dict:
    return explain.weight_report(layer_weight(_w, layer), spec_from(spec))


@st.cache_data(show_spinner=False, max_entries=1024)
def _layer_sqnr_row(key: str, _w, layer: str, spec: dict) -> dict:
    return explain.layer_sqnr({layer: layer_weight(_w, layer)}, spec_from(spec))[0]


def layer_sqnr(key: str, w, spec: dict) -> list[dict]:
    """``explain.layer_sqnr`` for every layer of ``w``, each row cached on its own, with a progress
    bar while rows are computed (a cached function may not draw, so the loop lives here)."""
    bar = st.progress(0.0)
    rows = []
    for i, name in enumerate(w.layers):
        bar.progress(i / len(w.layers), text=f"Quantizing {name} ({i + 1}/{len(w.layers)})…")
        rows.append(_layer_sqnr_row(key, w, name, spec))
    bar.empty()
    return rows


@st.cache_data(show_spinner="Running the calibration data in small batches…", max_entries=32)
def batch_ranges(key: str, _w, batch_size: int) -> dict:
    return explain.batch_ranges(_w, batch_size)


def progress_bar(text: str):
    """An ``st.progress`` bar and a callback ``fraction -> None`` that moves it; call ``.empty()`` after."""
    bar = st.progress(0.0, text=text)
    return bar, lambda fraction, *_: bar.progress(min(max(float(fraction), 0.0), 1.0), text=text)


@st.cache_data(show_spinner="Quantizing at every bit width…", max_entries=64)
def bitwidth_sweep(key: str, what: str, symmetric: bool, _x) -> list[dict]:
    """``what`` names the values ``_x`` (distribution or layer) for the cache."""
    return explain.bitwidth_sweep(_x, symmetric=symmetric)


@st.cache_data(show_spinner="Sweeping the clip threshold…", max_entries=64)
def clipping_tradeoff(key: str, what: str, spec: dict, _x) -> dict:
    return explain.clipping_tradeoff(_x, spec_from(spec))

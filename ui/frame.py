"""The frame around every page: the navigation, the sidebar that picks the model, and the error box for bugs.

``app.py`` (the entry point of ``streamlit run app.py``) calls ``run``. Each page in ``pages/`` reads widgets,
calls ``qcore`` and shows the result; what pages share lives in ``ui.state`` and the session-state keys in
``ui.keys``.
The chosen zoo model is bound to the URL (``?model=digits-cnn``), so a link reopens the same model; a
name the zoo does not have is an error box, never a silent fallback. An uploaded model cannot travel in
a link: the URL carries its content hash (``?upload=<16 hex>``), and the receiver is asked to upload the
same files, which are checked against it.
Uploads are loaded once in a throw-away process first (``qcore.io.sandbox.vet_upload``), so a file that
would exhaust memory or time kills that process, not the server. Every user-derived string shown in
Markdown goes through ``ui.text.plain``. A bug shows one box with an error id; the traceback goes to the
server log, never to the visitor.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import tempfile
import time
from pathlib import Path

import streamlit as st

from qcore.errors import QcoreError
from qcore.model.task import OUTPUT_KINDS
from qcore.zoo import DEFAULT_MODEL, ZOO
from ui import keys, kv_cache, state
from ui.text import plain

log = logging.getLogger("quantization_explorer")

MODEL_TYPES = ["pt2", "onnx", "pt", "ts", "safetensors", "zip"]
DATA_TYPES = ["npz", "pt", "csv", "txt"]

HOME = "pages/model.py"


def pages() -> list:
    """The navigation, made anew for every run (``st.Page`` objects carry per-run state)."""
    return [
        st.Page("pages/lessons.py", title="Lessons", icon=":material/school:", url_path="lessons"),
        st.Page(HOME, title="Model", icon=":material/account_tree:", default=True, url_path="home"),
        st.Page("pages/formats.py", title="Formats", icon=":material/straighten:"),
        st.Page("pages/weights.py", title="Weights", icon=":material/bar_chart:"),
        st.Page("pages/activations.py", title="Activations", icon=":material/bolt:"),
        st.Page("pages/sensitivity.py", title="Sensitivity", icon=":material/troubleshoot:"),
        st.Page("pages/mixed_precision.py", title="Mixed precision", icon=":material/tune:"),
        st.Page("pages/tradeoffs.py", title="Trade-offs", icon=":material/scatter_plot:"),
        st.Page("pages/qat.py", title="QAT", icon=":material/model_training:"),
        st.Page("pages/export.py", title="Export", icon=":material/download:"),
        *([st.Page("pages/generate.py", title="Generation", icon=":material/edit_note:")] if _language_model_shown() else []),
        st.Page("pages/glossary.py", title="Glossary", icon=":material/menu_book:", url_path="glossary"),
        # The home page's address is "/" (its url_path only has to differ from "model"); its file is model.py, so
        # a link to /model goes home instead of to "page not found".
        st.Page(lambda: state.switch_page(HOME), title="Model", url_path="model", visibility="hidden"),
    ]


def _language_model_shown() -> bool:
    """Whether the model the sidebar will show is a language model (the Generation page is listed for those only)."""
    uploaded = st.session_state.get(keys.UPLOAD)
    if st.session_state.get(keys.SOURCE) == keys.UPLOAD_SOURCE:
        return bool(uploaded) and uploaded["workload"].task.kind == "causal-lm"
    name = st.session_state.get(keys.ZOO_NAME) or st.query_params.get(keys.ZOO_NAME, DEFAULT_MODEL)
    return name in ZOO and state.zoo_workload(name).task.kind == "causal-lm"


_framed = contextvars.ContextVar("framed", default=False)  # this script run is inside run() (per session thread)


def load_upload(model_file, data_file, label_column: str, output_kind: str | None = None, batch_axes: str = "") -> None:
    """Load the uploaded files into session state; a user error is kept as a message and whatever
    was loaded before stays loaded."""
    from qcore.io.data import parse_batch_axes
    from qcore.io.hf_zip import unpack
    from qcore.io.sandbox import memory_limit_bytes, vet_upload
    from qcore.io.workload import load_workload  # imported here so the app starts even without it

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for role, f in (("model", model_file), ("data", data_file)):
            if f is None:
                paths.append(None)
                continue
            path = Path(tmp) / role / Path(f.name).name  # one folder each (same names never collide); keeps the suffix
            path.parent.mkdir()
            path.write_bytes(f.getvalue())
            paths.append(str(path))
        try:
            with st.spinner(f"Loading {plain(model_file.name)}…"):
                memory = memory_limit_bytes(paths[0], paths[1])
                if paths[0].lower().endswith(".zip"):  # a Hugging Face folder: unpacked here (checked, bounded), then
                    paths[0] = str(unpack(Path(paths[0]), Path(tmp) / Path(paths[0]).stem))  # vetted as a folder
                axes = parse_batch_axes(batch_axes)
                vet_upload(paths[0], paths[1], label_column or None, memory_bytes=memory, batch_axes=axes)  # in a child
                workload = load_workload(paths[0], paths[1], label_column=label_column or None, output_kind=output_kind,
                                         batch_axes=axes)
                _ = workload.layers  # find the layers while the files exist
        except QcoreError as e:
            st.session_state[keys.UPLOAD_ERROR] = str(e)
            return
    st.session_state[keys.UPLOAD] = {"key": f"upload:{workload.content_hash}", "workload": workload,
                                      "label": model_file.name, "loaded_at": time.time()}  # ui.jobs.evict_old_upload
    st.session_state[keys.UPLOAD_ERROR] = None  # state.active() checks it against a link's ?upload= hash


def sidebar() -> None:
    """The model source, the upload form, what is shown and the recipe the link carries."""
    state.read_link()
    with st.sidebar:
        st.radio("Model source", [keys.ZOO, keys.UPLOAD_SOURCE], key=keys.SOURCE, horizontal=True,
                 format_func={keys.ZOO: "Built-in", keys.UPLOAD_SOURCE: "Upload"}.get, persist_state="session")
        if st.session_state[keys.SOURCE] == keys.ZOO:
            st.selectbox("Built-in model", list(ZOO), index=list(ZOO).index(DEFAULT_MODEL), key=keys.ZOO_NAME,
                         bind="query-params", persist_state="session",
                         on_change=lambda: st.session_state.pop(keys.MODEL_ERROR, None),
                         help="digits-mlp loads instantly; minilm-l6 (a 22.7M-parameter BERT) takes a few seconds "
                              "and every computation on it is slower.")
        else:
            model_file = st.file_uploader("Model file", type=MODEL_TYPES,
                                          help="torch.export (.pt2), ONNX, TorchScript (.pt/.ts), a safetensors state dict, or a "
                                               "Hugging Face causal-LM folder as a .zip (config.json, *.safetensors, "
                                               "tokenizer files)")
            data_file = st.file_uploader("Data file (optional)", type=DATA_TYPES,
                                         help=".npz with x (and y), .pt tensors, or .csv; for a language model a UTF-8 .txt "
                                              "text; used for calibration and evaluation")
            label_column = st.text_input("CSV label column (optional)", key=keys.LABEL_COLUMN)
            output_kind = st.selectbox("The model's output is", [None, *OUTPUT_KINDS], key="output_kind",
                                       format_func=lambda k: "inferred from the model and data" if k is None else k,
                                       help="sets the headline metric: " + "; ".join(f"{k}: {v}" for k, v in OUTPUT_KINDS.items()))
            batch_axes = st.text_input("Batch axes (optional)", key="batch_axes", placeholder="state=1",
                                       help="which axis of a data input counts its samples, where it is not axis 0 "
                                            "and cannot be inferred: input=axis, comma-separated (an LSTM state "
                                            "(2, batch, 128): state=1); the exported file keeps that layout")
            if st.button("Load uploaded model", disabled=model_file is None, type="primary"):
                load_upload(model_file, data_file, label_column, output_kind, batch_axes)
            state.active()  # checks a new upload against a link's ?upload= hash before its error is shown
            if st.session_state.get(keys.UPLOAD_ERROR):
                st.error(plain(st.session_state[keys.UPLOAD_ERROR]), icon=":material/error:")
            if st.session_state.get(keys.LINK_UPLOAD):
                st.warning(plain(f"This link was made with an uploaded model (content hash {st.session_state[keys.LINK_UPLOAD]}…). "
                                 "A link cannot carry the file: upload the same model and data files (and label column) "
                                 "here; their hash is checked and then the link's recipe is applied. Until then "
                                 "a built-in model is shown."), icon=":material/upload_file:")
        if st.session_state.get(keys.MODEL_ERROR):
            st.error(plain(st.session_state[keys.MODEL_ERROR]), icon=":material/error:")
        key, workload = state.active()
        st.caption(f"Showing **{plain(workload.name)}**: {len(workload.layers)} quantizable layers, "
                   f"{sum(p.numel() for p in workload.model.parameters()):,} parameters.")
        state.sync_url(key, workload)  # the recipe <-> ?preset=&layers= (the link reproduces the view)
        kv_cache.select(key, workload)  # language models: the recipe's KV-cache format (&kv= in the link)
        preset_name, overrides, _ = state.current(key, workload)
        reach = ("the model, the recipe and the page" if key.startswith("zoo:") else
                 f"the recipe and the page, not the model: whoever opens it must upload the same files (the address "
                 f"holds their content hash, {state.upload_tag(workload)}…, and checks it)")
        st.caption(f"Recipe: **{plain(preset_name)}**" + (f" with {len(overrides)} layer override(s)" if overrides else "")
                   + f". The page's address reproduces {plain(reach)}.")
        if st.session_state.get(keys.URL_ERROR):
            st.error(plain(st.session_state[keys.URL_ERROR]), icon=":material/link_off:")


def run() -> None:
    """Declare the pages, draw the sidebar, run the chosen page. A bug shows one box with an error id."""
    st.set_page_config(page_title="Quantization Explorer", page_icon=":material/grid_on:", layout="wide")
    page = st.navigation(pages())
    token = _framed.set(True)
    try:
        sidebar()
        page.run()
    except Exception:  # a bug, not the user's doing (Streamlit's stop/rerun are BaseExceptions and pass through)
        error_id = secrets.token_hex(4)
        log.exception("internal error %s on page %s", error_id, page.title)
        st.error(f"Something went wrong (error id {error_id}); the server log has the details.", icon=":material/bug_report:")
    finally:
        _framed.reset(token)


def ensure() -> None:
    """Make sure ``run`` frames this page. With a ``pages/`` folder next to ``app.py`` a fresh server is in
    Streamlit's legacy "pages directory" mode until some session calls ``st.navigation``: the first visitor's
    link to ``/mixed_precision`` runs that page file alone, without the sidebar, the model or the link's
    recipe. Then run the app around it here -- its ``st.navigation`` ends that mode for the whole server and
    resolves the same page, which runs inside the frame -- and stop the frameless run. Otherwise a no-op."""
    if not _framed.get():
        run()
        st.stop()

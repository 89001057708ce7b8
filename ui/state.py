"""What the pages share: the active workload, cached loaders / tables, the recipe in session and URL, the sweep
with a progress bar, latencies. The session-state keys are spelled in ``ui.keys``.

Not a page (``ui.frame`` lists the pages). Workloads are cached with ``st.cache_resource`` -- one
object per zoo model for every session, never modified (recipes are applied to copies by
``Workload.simulate``). Derived tables use ``st.cache_data`` keyed by the workload's ``key``
(zoo name, or a digest of the uploaded bytes) with the workload itself passed unhashed.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import streamlit as st

from qcore.analysis import explain, summary
from qcore import zoo
from qcore.errors import QcoreError
from qcore.recipe import PRESETS, Recipe, preset
from qcore.numerics.spec import TensorSpec
from ui.keys import (EDITOR_VERSION, LAYERS_PARAM, LINK_READ, LINK_UPLOAD, MEASURED, MODEL_ERROR, PRESET_PARAM,
                     RECIPE_UPLOAD_DIGEST, RECIPES, SOURCE, UPLOAD, UPLOAD_ERROR, UPLOAD_PARAM, UPLOAD_SOURCE, URL_ERROR,
                     URL_RESTORED, USER_RECIPES, ZOO_NAME)
from ui import presenter
from ui.text import plain
from qcore.recipe.links import (KV_PARAM, TRANSFORMS_PARAM, build_recipe, compact, decode_kv_cache, decode_layers,
                                decode_transforms, encode_kv_cache, encode_layers, encode_transforms, recipe_hash,
                                recipe_id)


@st.cache_resource(show_spinner="Loading the model (minilm-l6 takes a few seconds)…", max_entries=4)
def zoo_workload(name: str):
    return zoo.load(name)


def active() -> tuple[str, object]:
    """``(key, workload)`` of the model every page shows: the loaded upload when the sidebar is on
    "upload" and one loaded, else the chosen zoo model. A page calls it first: run without ``app.py`` (the
    legacy ``pages/`` mode of a fresh server, see ``ui.frame.ensure``), it runs the app around the page instead."""
    from ui import frame

    frame.ensure()
    from ui.jobs import evict_old_upload

    uploaded = evict_old_upload()
    if st.session_state.get(SOURCE) == UPLOAD_SOURCE and uploaded:
        check_upload(uploaded["workload"])
        return uploaded["key"], uploaded["workload"]
    if st.session_state.get(SOURCE) != UPLOAD_SOURCE and st.session_state.pop(LINK_UPLOAD, None):
        st.session_state[URL_RESTORED] = True  # back to the zoo: the link's recipe was for its upload
    name = st.session_state.get(ZOO_NAME, zoo.DEFAULT_MODEL)
    return f"zoo:{name}", zoo_workload(name)


def upload_tag(w) -> str:
    """What ``?upload=`` holds for workload ``w``: the first 16 hex digits of its ``content_hash``
    (model bytes, data bytes and label column), enough to tell whether a file is the same."""
    return w.content_hash[:16]


def read_link() -> None:
    """Once per session, before the sidebar's widgets: a ``?model=`` the zoo does not have becomes an
    error (the bound select box would otherwise drop it without a word), ``?upload=`` switches the
    source to Upload and waits for a file with that hash (``check_upload``), and a presenter link's
    ``?view=`` sets the widget state it carries (``ui.presenter``)."""
    if st.session_state.get(LINK_READ):
        return
    st.session_state[LINK_READ] = True
    params = st.query_params
    name = params.get(ZOO_NAME)
    if name is not None and name not in zoo.ZOO:
        st.session_state[MODEL_ERROR] = (f"The link asks for the model {name!r}, which is not in the zoo "
                                         f"({', '.join(zoo.ZOO)}); {zoo.DEFAULT_MODEL} is shown instead. Pick a model "
                                         "in the sidebar or ask for a new link.")
    if params.get(UPLOAD_PARAM):
        st.session_state[LINK_UPLOAD] = params[UPLOAD_PARAM]
        st.session_state[SOURCE] = UPLOAD_SOURCE
    if params.get(presenter.VIEW_PARAM):  # a presenter link: the teacher's widget state, before any widget exists
        try:
            st.session_state.update(presenter.decode(params[presenter.VIEW_PARAM]))
        except QcoreError as e:
            st.session_state[URL_ERROR] = f"The presenter link's selections were not applied: {e}"


def check_upload(w) -> None:
    """When a link waits for an upload and ``w`` (the loaded one) is shown: the same hash lets the link's
    recipe be applied (by ``sync_url``); another hash keeps the file loaded, with an error saying it is
    not the link's model, and the link's recipe is dropped. Either way the link no longer waits."""
    wanted = st.session_state.pop(LINK_UPLOAD, None)
    if wanted is not None and upload_tag(w) != wanted:
        st.session_state[URL_RESTORED] = True  # the link's recipe names another model's layers
        st.session_state[UPLOAD_ERROR] = (f"This file is not the model the link was made with: its content hash starts "
                                          f"{upload_tag(w)}, the link's {wanted}. It is loaded; the link's recipe was not "
                                          "applied.")


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
        bar.progress(i / len(w.layers), text=f"Quantizing {plain(name)} ({i + 1}/{len(w.layers)})…")
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


# ---- the recipe the decide pages share (Sensitivity, Mixed precision, Trade-offs, Export) --------
# One recipe per workload, kept as a preset name plus per-layer overrides (recipe.Recipe layer
# entries, only for layers that differ from the preset). The same pair is the URL:
# ?preset=int8-static&layers=<url-safe base64 of the overrides as compact JSON>.
DEFAULT_PRESET = "int8-static"
DEFAULT_CANDIDATES = ["int8-static", "int4-weight-only", "int2"]
def current(key: str, w) -> tuple[str, dict, Recipe]:
    """``(preset, overrides, Recipe)`` of the recipe the user is building for workload ``key`` (with the KV-cache
    choice of a language model, ``entry["kv"]``: ``links.encode_kv_cache``'s text, kept apart from preset and table)."""
    entry = st.session_state.setdefault(RECIPES, {}).get(key) or {"preset": DEFAULT_PRESET, "layers": {}}
    return entry["preset"], entry["layers"], build_recipe(w, entry["preset"], entry["layers"], entry.get("transforms"),
                                                          decode_kv_cache(entry.get("kv")))


def set_current(key: str, w, preset_name: str, layers: dict, reset_editor: bool = True,
                transforms: list | None = None) -> None:
    """Store the recipe (validated first: QcoreError leaves the old one); reset the table's edits. ``transforms``
    (recipe JSON entries) replace the preset's; when not given, ones set before on this same preset are kept (an edit
    of the layer table, "Keep layer in float" edit the recipe the user has, transforms and all) and a different
    preset brings its own. A recipe measured elsewhere (a search result, an upload, a lesson, a remedy) goes through
    ``set_recipe``, which passes exactly the transforms it was measured with. The KV-cache choice stays
    (``set_kv_cache`` changes it)."""
    old = st.session_state.setdefault(RECIPES, {}).get(key) or {}
    if transforms is None and old.get("preset") == preset_name:
        transforms = old.get("transforms")
    build_recipe(w, preset_name, layers, transforms)
    kv = old.get("kv")
    st.session_state[RECIPES][key] = {"preset": preset_name, "layers": dict(layers),
                                      **({"transforms": transforms} if transforms is not None else {}),
                                      **({"kv": kv} if kv else {})}
    if reset_editor:
        st.session_state[EDITOR_VERSION] = st.session_state.get(EDITOR_VERSION, 0) + 1


def set_recipe(key: str, w, recipe: Recipe, presets=tuple(PRESETS), reset_editor: bool = True) -> None:
    """Make ``recipe`` (as measured: its layers and its transforms, none if it has none) the recipe of workload
    ``key``, spelled as the shortest preset of ``presets`` plus overrides (``links.compact``)."""
    set_current(key, w, *compact(w, recipe, presets), reset_editor=reset_editor,
                transforms=[t.to_json() for t in recipe.transforms])


def set_kv_cache(key: str, w, kv: str | None) -> None:
    """Make ``kv`` ("int8.per_token", ...; None: float) the KV-cache choice of workload ``key`` (validated first)."""
    if decode_kv_cache(kv) is not None and not w.kv_cache_slices:
        raise QcoreError(f"{w.name} is not a language model with attention layers, so it has no KV cache to quantize")
    preset_name, layers, _ = current(key, w)
    entry = {k: v for k, v in (st.session_state[RECIPES].get(key) or {}).items() if k != "kv"}
    st.session_state[RECIPES][key] = {**entry, "preset": preset_name, "layers": dict(layers), **({"kv": kv} if kv else {})}


def sync_url(key: str, w) -> None:
    """Once per session read ``?preset=&layers=&kv=&transforms=`` into the recipe; afterwards write the recipe to them
    (``transforms=`` only when they differ from the preset's)."""
    params = st.query_params
    if st.session_state.get(LINK_UPLOAD) and not key.startswith("upload:"):
        return  # the link's model is an upload not loaded yet: keep its recipe in the address for when it is
    if not st.session_state.get(URL_RESTORED):
        st.session_state[URL_RESTORED] = True
        if any(p in params for p in (PRESET_PARAM, LAYERS_PARAM, KV_PARAM, TRANSFORMS_PARAM)):
            try:
                name = params.get(PRESET_PARAM, DEFAULT_PRESET)
                if name not in PRESETS:
                    raise QcoreError(f"the link's preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
                set_current(key, w, name, decode_layers(params[LAYERS_PARAM]) if params.get(LAYERS_PARAM) else {},
                            transforms=decode_transforms(params[TRANSFORMS_PARAM]) if params.get(TRANSFORMS_PARAM) else None)
                set_kv_cache(key, w, params.get(KV_PARAM) or None)
            except QcoreError as e:
                st.session_state[URL_ERROR] = f"The link's recipe was not loaded: {e}"
    name, layers, recipe = current(key, w)
    wanted = {PRESET_PARAM: name if (name != DEFAULT_PRESET or layers) else None,
              LAYERS_PARAM: encode_layers(layers) if layers else None, KV_PARAM: encode_kv_cache(recipe.kv_cache),
              TRANSFORMS_PARAM: None if recipe.transforms == preset(name, w.layer_shapes).transforms else
              encode_transforms([t.to_json() for t in recipe.transforms]),
              UPLOAD_PARAM: upload_tag(w) if key.startswith("upload:") else None}
    for param, value in wanted.items():
        if value is None and param in params:
            del params[param]
        elif value is not None and params.get(param) != value:
            params[param] = value


MAX_RECIPE_BYTES = 2**20  # a recipe JSON larger than 1 MiB is refused unread


def load_recipe_file(key: str, w, upload) -> str | None:
    """Make the uploaded recipe JSON (a Streamlit ``UploadedFile``) the recipe of workload ``key``, keep it
    among the user's recipes and rerun; the same file is read once. Returns the one-line reason when
    it cannot be used (the recipe stays as it was), else ``None``."""
    digest = hashlib.sha256(upload.getvalue()).hexdigest()
    if st.session_state.get(RECIPE_UPLOAD_DIGEST) == digest:
        return None
    try:
        if upload.size > MAX_RECIPE_BYTES:
            raise QcoreError(f"{upload.name} is larger than 1 MiB; a recipe is a small JSON file")
        loaded = Recipe.from_json(upload.getvalue())
        loaded.check_against(w.layer_shapes)
        set_recipe(key, w, loaded)
        set_kv_cache(key, w, encode_kv_cache(loaded.kv_cache))
        remember(key, w, loaded, f"uploaded: {upload.name}")
    except QcoreError as e:
        return str(e)
    st.session_state[RECIPE_UPLOAD_DIGEST] = digest
    st.rerun()


def switch_page(page: str) -> None:
    """``st.switch_page`` keeping the recipe's query parameters. The model's (``?model=``) is bound to
    the sidebar's select box, which carries it over itself and may not be set by hand."""
    st.switch_page(page, query_params={k: v for k, v in st.query_params.to_dict().items() if k != ZOO_NAME})


# ---- the per-layer table of the Mixed precision page ---------------------------------------------
# ---- sensitivity: the sweep with a progress bar, and the estimate it gives a recipe --------------
SMALL_MODEL_WEIGHTS = 2_000_000  # above this, sweeps / evaluations of many recipes start on a click


def small(w) -> bool:
    """Whether ``w`` is small enough to sweep and evaluate without asking (the digits models are)."""
    return sum(i.params for i in w.layers.values()) <= SMALL_MODEL_WEIGHTS


def sweep(w, candidates: list[str], mode: str = "both", view: str = "only"):
    """``sensitivity.sweep`` (memory + disk cache shared by every session) with a progress bar and a Stop button."""
    from qcore.analysis import sensitivity

    with stoppable("sweep", "Sensitivity sweep…") as advance:
        return sensitivity.sweep(w, candidates, mode, view, progress=lambda f, msg="": advance(f, f"Sweep: {plain(msg)}"))


@contextmanager
def stoppable(what: str, text: str):
    """A progress bar and a Stop button for the long computation run inside; yields ``advance(fraction, text)``.

    Streamlit's own stop: a click reruns the page, and Streamlit ends the running script at its next call
    (``runner.fastReruns``, on by default) -- here the next ``advance`` -- so the computation stops at its next
    progress step, and nothing partial is cached (the engine caches only finished sweeps and evaluations). On
    that rerun the button reads true: the page says so and stops, so the computation does not start again.
    Bar and button are removed when the computation ends."""
    stop, bar = st.empty(), st.empty()
    if stop.button(f"Stop the {what}", key=f"stop:{what}", icon=":material/stop_circle:",
                   help="stops at the next progress step; nothing partial is kept"):
        stop.info(f"The {what} was stopped. Start it again to finish it.", icon=":material/stop_circle:")
        st.stop()
    bar.progress(0.0, text=text)
    try:
        yield lambda fraction, shown=text: bar.progress(min(max(float(fraction), 0.0), 1.0), text=shown)
    finally:
        stop.empty()
        bar.empty()


def on_samples(samples: int, total: int) -> str:
    """``" (computed on N of M samples)"`` for a number computed on a subset of the evaluation data, else ``""``."""
    return f" (computed on {samples:,} of {total:,} samples)" if samples < total else ""


@st.cache_data(show_spinner="Evaluating the recipe on the evaluation data…", max_entries=256)
def evaluate(key: str, _w, recipe_json: str) -> dict:
    """``Workload.evaluate`` (measured), cached per workload and recipe, with a progress bar over its batches
    (made and removed in here, so a cached result replays nothing visible). Each bar update is a point where a
    Stop click (``stoppable`` around the call) ends the run; the bar moves at most 50 times."""
    text = f"Evaluating on {len(_w.evaluation):,} samples…"
    bar, shown = st.progress(0.0, text=text), [0.0]

    def advance(fraction: float) -> None:
        if fraction - shown[0] >= 0.02 or fraction >= 1.0:
            shown[0] = fraction
            bar.progress(min(fraction, 1.0), text=text)
    result = _w.evaluate(Recipe.from_json(recipe_json), progress=advance).to_dict()
    bar.empty()
    return result


def remember(key: str, w, recipe: Recipe, what: str) -> str:
    """Keep ``recipe`` among the user's recipes of workload ``key`` (shown on Trade-offs) under its own
    label ``"<what> [<hash>]"`` and return the label. A recipe kept before keeps its first label; no
    recipe ever replaces another (their hashes differ)."""
    mine = st.session_state.setdefault(USER_RECIPES, {}).setdefault(key, {})
    for label, d in mine.items():
        if recipe_id(w, Recipe.from_dict(d)) == recipe_id(w, recipe):
            return label
    label = f"{what} [{recipe_hash(w, recipe)}]"
    mine[label] = recipe.to_dict()
    return label


# ---- latency: measured by the runtime where it ran, a hardware-profile estimate elsewhere ---------
LATENCY_HELP = ("Latency of one sample (batch 1) in milliseconds. \"measured\": the recipe exported and timed with "
                "ONNX Runtime on this machine (layers ONNX Runtime has no low-precision kernel for run in float on their "
                "dequantized values; the source says how many). "
                "\"estimate\": a roofline prediction (max of memory and compute time per layer) from a hardware "
                "profile, not a measurement.")


@st.cache_data(show_spinner=False, max_entries=512)
def _roofline(key: str, _w, recipe_json: str, profile: str) -> dict:
    from qcore.analysis.roofline import roofline

    return roofline(_w, Recipe.from_json(recipe_json), profile).to_dict()


def latencies(key: str, w, recipes: dict, profile: str = "this-machine") -> dict:
    """``{label: {"latency_ms", "source"}}`` for each recipe: measured when ``measure_latencies`` ran
    it (this machine only), else the roofline estimate on ``profile`` (source ``"estimate: <profile>"``)."""
    measured = st.session_state.get(MEASURED, {}).get(key, {}) if profile == "this-machine" else {}
    out = {}
    for label, recipe in recipes.items():
        if recipe_id(w, recipe) in measured:
            out[label] = measured[recipe_id(w, recipe)]
        else:
            est = _roofline(key, w, recipe.to_json(), profile)
            out[label] = {"latency_ms": est["total"]["latency_ms"], "source": f"estimate: {est['profile']}"}
    return out


# The runtimes the app measures with: label -> (bench's runtime, OpenVINO's precision hint)
RUNTIMES = {"ONNX Runtime": ("onnxruntime", "default"), "OpenVINO, true FP32": ("openvino", "f32"),
            "OpenVINO, its default precision (bf16 on AMX)": ("openvino", "default")}


def measure_latencies(key: str, w, recipes: dict, runtime: str = "ONNX Runtime") -> bool:
    """Time every recipe with ``qcore.export.bench.bench`` (``RUNTIMES[runtime]``) as background jobs (kind
    ``bench``, ``ui.jobs``: one per recipe, so the same timing asked by several sessions runs once, and timings
    queue instead of running side by side) and keep the results; the source names the runtime, the precision it
    executed in and the threads it had. True once every recipe is timed; False while a job still runs (its
    progress is drawn) or was refused (its error box is drawn)."""
    from ui import jobs

    measured = st.session_state.setdefault(MEASURED, {}).setdefault(key, {})
    name, precision = RUNTIMES[runtime]
    for i, (label, recipe) in enumerate(recipes.items()):
        if measured.get(recipe_id(w, recipe), {}).get("runtime") == runtime:
            continue
        inputs = {"recipe": recipe.to_dict(), "runtime": name, "precision": precision, "batch_size": 1}
        result = jobs.result("bench", key, w, inputs, f"timing of {plain(label)} with {runtime} ({i + 1} of "
                             f"{len(recipes)})", small(w), stop=False)
        if result is None:
            return False
        in_float = sum(r["executes"] == "float (dequantized)" for r in result["layers"])
        where = "" if runtime == "ONNX Runtime" else f" in {result['runtime']['label']}"
        measured[recipe_id(w, recipe)] = {
            "latency_ms": result["quantized"]["latency_ms"]["median"], "runtime": runtime,
            "source": f"measured{where}, {result['threads']} thread(s)"
                      + (f" ({in_float} layer(s) ran in float in ONNX Runtime)" if in_float else "")}
    return True

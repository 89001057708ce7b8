"""AppTest: every number on Trade-offs, Mixed precision and Sensitivity is the number of the thing it names.

One regression test per defect of the issue (named after it), each comparing what the page shows with
what qcore computes on its own: ``Workload.evaluate`` of the recipe a row names, ``sensitivity.sweep``'s
rows, ``search.search``'s result, a SHA-256 taken here of the recipe's canonical JSON.
"""

import hashlib
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from qcore.recipe.links import build_recipe, decode_layers, encode_layers
from qcore.recipe.table import FLOAT_LAYER
from ui import keys, state
from qcore.analysis import search, sensitivity
from qcore import zoo
from qcore.recipe import Recipe
from test_hostile_app import visible
from ui import jobs as ui_jobs

APP = str(Path(__file__).resolve().parents[2] / "app.py")
HAND_MADE = {"fc2": {"weights": {"format": "int4"}}}  # on int8-static: fc2 int4 per-channel, inputs int8 static


@pytest.fixture(autouse=True, scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QCORE_CACHE_DIR", str(tmp_path_factory.mktemp("qcore-cache")))
        yield


def start(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(query)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def edit(at: AppTest, rows: dict) -> None:
    editor = at.data_editor[0]
    at.session_state[editor.key] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def click(at: AppTest, label: str) -> None:
    next(b for b in at.button if b.label == label).click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def table_recipe(at: AppTest, w) -> Recipe:
    """The recipe in the editor, read back from the address (?preset=&layers=) the way a link is."""
    layers = at.query_params.get("layers")
    return build_recipe(w, at.query_params.get("preset", state.DEFAULT_PRESET),
                              decode_layers(layers) if layers else {})


def same(a: Recipe, b: Recipe, w) -> bool:
    return all(a.plan(n) == b.plan(n) for n in w.layers)


def sha8(recipe: Recipe, layers=("fc1", "fc2", "fc3")) -> str:
    """First 8 hex of the SHA-256 of the canonical JSON: each digits-mlp layer's weight and input spec."""
    plans = {n: {"weights": None if recipe.plan(n).weights is None else recipe.plan(n).weights.to_dict(),
                 "activations": None if recipe.plan(n).activations is None else recipe.plan(n).activations.to_dict()}
             for n in layers}
    return hashlib.sha256(json.dumps(plans, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]


def rows_holding(table, recipe: Recipe):
    """The Trade-offs rows whose label names ``recipe`` (labels end in the recipe's content hash)."""
    return table[table.index.str.endswith(f"[{sha8(recipe)}]")]


# ---- Trade-offs: recipes keep their identity --------------------------------------------------------
def test_tradeoffs_a_search_after_a_hand_made_recipe_keeps_both_with_their_own_numbers(digits_mlp):
    """Regression: the search's numbers showed under the hand-made recipe's name, which vanished (same
    automatic name), and the search overwrote the editor. Now both are rows, each with its own measured numbers."""
    at = visit(start(layers=encode_layers(HAND_MADE)), "mixed_precision")
    hand = build_recipe(digits_mlp, "int8-static", HAND_MADE)
    click(at, "Evaluate this recipe (simulated)")
    at.slider(key="mp_budget").set_value(0.15).run()
    click(at, "Search")
    assert same(table_recipe(at, digits_mlp), hand, digits_mlp), "the search overwrote the table's recipe"
    assert at.data_editor[0].value.set_index("layer").loc["fc2", "weights"] == "int4"

    found = search.search(digits_mlp, state.DEFAULT_CANDIDATES, max_size_fraction=0.15).to_dict()
    searched = Recipe.from_dict(found["recipe"])
    assert not same(searched, hand, digits_mlp)  # two different recipes, or the test proves nothing
    assert not found["recipe"]["name"].startswith("uniform")  # at 15 % a mix, not a preset (a preset shows as its row)
    table = visit(at, "tradeoffs").dataframe[0].value.set_index("recipe")
    assert table.index.is_unique
    for recipe in (hand, searched):
        held = rows_holding(table, recipe)
        assert len(held) == 1, f"the recipe with hash {sha8(recipe)} is not exactly one row: {list(table.index)}"
        row = held.iloc[0]
        measured = digits_mlp.evaluate(recipe).to_dict()["quantized"]
        assert row["accuracy"] == measured["metrics"]["accuracy"]
        assert row["size (bytes)"] == measured["size_bytes"]
    evaluated = [label for label in table.index if label.startswith("evaluated:")]
    searched_rows = [label for label in table.index if label.startswith("search: size ≤ 15% of FP32 [")]
    assert len(evaluated) == 1 and evaluated[0].endswith(f"[{sha8(hand)}]")
    assert len(searched_rows) == 1 and searched_rows[0].endswith(f"[{sha8(searched)}]")
    # every recipe once: no two rows hold the same recipe
    kept = at.session_state[keys.USER_RECIPES]["zoo:digits-mlp"].values()
    assert sorted(sha8(Recipe.from_dict(d)) for d in kept) == sorted([sha8(hand), sha8(searched)])


def test_the_search_result_replaces_the_table_only_on_use_this_recipe(digits_mlp):
    at = visit(start(layers=encode_layers(HAND_MADE)), "mixed_precision")
    at.slider(key="mp_budget").set_value(0.2).run()
    click(at, "Search")
    hand = build_recipe(digits_mlp, "int8-static", HAND_MADE)
    assert same(table_recipe(at, digits_mlp), hand, digits_mlp)
    click(at, "Use this recipe")
    searched = Recipe.from_dict(search.search(digits_mlp, state.DEFAULT_CANDIDATES, max_size_fraction=0.2).recipe)
    assert same(table_recipe(at, digits_mlp), searched, digits_mlp)
    assert int(metric(at, "Size (bytes)").replace(",", "")) == digits_mlp.size(searched)["size_bytes"]
    assert next(b for b in at.button if b.label == "In the table").disabled
    (label,) = at.session_state[keys.USER_RECIPES]["zoo:digits-mlp"].keys() - {at.session_state[keys.SEARCH]["zoo:digits-mlp"]["label"]}
    assert label == f"replaced: digits-mlp-int8-static-mixed [{sha8(hand)}]"  # the hand-made recipe was kept
    table = visit(at, "tradeoffs").dataframe[0].value.set_index("recipe")
    assert table.loc[label, "accuracy"] == digits_mlp.evaluate(hand).quantized.metrics["accuracy"]


def test_remembered_labels_carry_the_sha256_of_the_canonical_recipe(digits_mlp):
    at = visit(start(layers=encode_layers(HAND_MADE)), "mixed_precision")
    click(at, "Evaluate this recipe (simulated)")
    (label,) = at.session_state[keys.USER_RECIPES]["zoo:digits-mlp"]
    assert label == f"evaluated: digits-mlp-int8-static-mixed [{sha8(build_recipe(digits_mlp, 'int8-static', HAND_MADE))}]"


# ---- Mixed precision: estimates say what they cover -------------------------------------------------
def test_mixed_precision_estimate_with_an_unswept_layer_says_incomplete_not_fp32(digits_mlp):
    """Regression: with fc1 at int4 (no sweep row has that spec) the estimate showed FP32's 0.9750 and the
    drop column a raw None."""
    at = visit(start(), "mixed_precision")
    sweep = sensitivity.sweep(digits_mlp, state.DEFAULT_CANDIDATES, "both", "only").to_dict()
    int8 = {r["layer"]: r["metric_drop"] for r in sweep["rows"] if r["candidate"] == "int8-static"}
    shown = metric(at, "accuracy (estimate)")  # complete before the edit: FP32 minus the int8-static drops
    assert shown == f"{sweep['fp32_metric'] - sum(int8.values()):.4f}"

    edit(at, {list(digits_mlp.layers).index("fc1"): {"weights": "int4"}})
    assert metric(at, "accuracy (estimate)") == "incomplete"
    (box,) = [visible(w.value) for w in at.warning]
    assert box.startswith("Estimate incomplete: 1 layer(s) not swept (fc1)")
    drops = at.data_editor[0].value.set_index("layer")["drop (estimate)"].to_dict()
    assert drops == {"fc1": "not swept", "fc2": f"{int8['fc2']:+.4f}", "fc3": f"{int8['fc3']:+.4f}"}
    assert "None" not in drops.values()


# ---- honest links ----------------------------------------------------------------------------------
def test_link_unknown_model_is_an_error_naming_the_zoo_not_a_silent_digits_mlp():
    """Regression: ?model=nope silently showed digits-mlp."""
    at = start(model="nope")
    (box,) = [visible(e.value) for e in at.error]
    assert "'nope'" in box and all(name in box for name in zoo.ZOO) and "digits-mlp is shown instead" in box


def test_link_with_an_old_model_preset_and_layers_still_opens_without_an_error(digits_cnn):
    overrides = {"features.0": None}
    at = visit(start(model="digits-cnn", preset="nf4", layers=encode_layers(overrides)), "mixed_precision")
    assert not at.error and "upload" not in at.query_params
    assert same(table_recipe(at, digits_cnn), build_recipe(digits_cnn, "nf4", overrides), digits_cnn)


def as_upload(w) -> dict:
    return {"key": f"upload:{w.content_hash}", "workload": w, "label": "mine.safetensors"}


def test_link_of_an_uploaded_model_carries_its_hash_and_says_the_file_must_be_uploaded(digits_mlp):
    """Regression: an uploaded model vanished on reload while the sidebar said the address reproduced the model."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state[keys.SOURCE] = keys.UPLOAD_SOURCE
    at.session_state[keys.UPLOAD] = as_upload(digits_mlp)
    at.run()
    assert at.query_params["upload"] == digits_mlp.content_hash[:16]
    caption = next(visible(c.value) for c in at.sidebar.caption if "address reproduces" in c.value)
    assert "not the model" in caption and "must upload the same files" in caption and digits_mlp.content_hash[:16] in caption

    receiver = start(upload=digits_mlp.content_hash[:16], preset="int4-weight-only")
    (box,) = [visible(w.value) for w in receiver.sidebar.warning]
    assert digits_mlp.content_hash[:16] in box and "upload the same model and data files" in box
    assert receiver.query_params["preset"] == "int4-weight-only"  # the link waits for the file, untouched


@pytest.mark.parametrize("matches", [True, False])
def test_link_upload_hash_is_checked_when_the_file_arrives(digits_mlp, matches):
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(upload=digits_mlp.content_hash[:16] if matches else "0123456789abcdef", preset="int4-weight-only")
    at.session_state[keys.UPLOAD] = as_upload(digits_mlp)  # the receiver's file, loaded
    at.run()
    assert not at.exception
    entry = (at.session_state[keys.RECIPES] if keys.RECIPES in at.session_state else {}).get(f"upload:{digits_mlp.content_hash}")
    errors = [visible(e.value) for e in at.error]
    if matches:
        assert not errors and entry == {"preset": "int4-weight-only", "layers": {}}
    else:
        (box,) = errors
        assert "not the model the link was made with" in box and "0123456789abcdef" in box
        assert entry is None and "preset" not in at.query_params  # the link's recipe was not applied
    assert at.query_params["upload"] == digits_mlp.content_hash[:16]


# ---- Sensitivity: defaults that teach --------------------------------------------------------------
def spreads(rows) -> dict:
    out = {}
    for r in rows:
        lo, hi = out.get(r["candidate"], (r["metric_drop"], r["metric_drop"]))
        out[r["candidate"]] = (min(lo, r["metric_drop"]), max(hi, r["metric_drop"]))
    return {c: hi - lo for c, (lo, hi) in out.items()}


def test_sensitivity_ranks_and_sums_up_under_the_widest_spread_not_an_all_zero_int8(digits_mlp):
    """Regression: the summary showed int2's result while the ranked chart defaulted to int8-static, whose drops
    are all +0.0000."""
    at = visit(start(), "sensitivity")
    rows = sensitivity.sweep(digits_mlp, state.DEFAULT_CANDIDATES, "both", "only").to_dict()["rows"]
    spread = spreads(rows)
    widest = max(spread, key=spread.get)
    assert spread[widest] > 0 and spread[widest] > min(spread.values())
    assert at.selectbox(key="sens_rank_candidate:both:only").value == widest
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    bars = next(c["data"][0] for c in charts if c["data"][0]["type"] == "bar")
    under = sorted((r for r in rows if r["candidate"] == widest), key=lambda r: r["rank"])
    assert bars["x"] == [r["metric_drop"] for r in under] and any(bars["x"])
    assert metric(at, "Most sensitive layer") == under[0]["layer"]
    assert metric(at, "Its accuracy drop") == f"{under[0]['metric_drop']:+.4f}"


def test_sensitivity_heatmap_cells_show_their_values_on_a_per_candidate_scale(digits_mlp):
    """Regression: one candidate's colour scale dominated the heatmap and its cells showed no values."""
    at = visit(start(), "sensitivity")
    rows = sensitivity.sweep(digits_mlp, state.DEFAULT_CANDIDATES, "both", "only").to_dict()["rows"]
    heat = next(d for c in at.get("plotly_chart") for d in json.loads(c.proto.spec)["data"] if d["type"] == "heatmap")
    assert heat["texttemplate"] == "%{text}"
    cell = {(r["layer"], r["candidate"]): r for r in rows}
    for i, layer in enumerate(heat["y"]):
        for j, cand in enumerate(heat["x"]):
            r = cell[(layer, cand)]
            shown = f"{r['metric_drop']:+.4f}"  # a sign always, but a drop that rounds to zero reads 0.0000
            shown = shown[1:] if float(shown) == 0 else shown.replace("-", "\u2212")
            assert heat["text"][i][j] == (shown if r["changed"] else "")
    for j, cand in enumerate(heat["x"]):  # each column on its own scale: its largest |drop| is ±1
        largest = max(abs(cell[(l, cand)]["metric_drop"]) for l in heat["y"] if cell[(l, cand)]["changed"])
        column = [heat["z"][i][j] for i in range(len(heat["y"])) if heat["z"][i][j] is not None]
        if largest:
            assert max(map(abs, column)) == pytest.approx(1.0)
            assert column == pytest.approx([cell[(l, cand)]["metric_drop"] / largest for l in heat["y"]
                                            if cell[(l, cand)]["changed"]])


# ---- one word, one meaning: "float" = weights and inputs ---------------------------------------------
def test_float_means_weights_and_inputs_and_fp32_weights_keep_the_inputs_quantized(digits_mlp):
    """Regression: "fp32" in the weights column kept the inputs quantized while "Keep in FP32" made the layer
    fully float."""
    at = visit(start(), "mixed_precision")
    fc2 = list(digits_mlp.layers).index("fc2")
    edit(at, {fc2: {"weights": "fp32"}})
    plan = table_recipe(at, digits_mlp).plan("fc2")
    assert plan.weights is None and plan.activations is not None and not plan.is_float
    row = at.data_editor[0].value.set_index("layer").loc["fc2"]
    assert (row["weights"], row["inputs"], bool(row[FLOAT_LAYER])) == ("fp32", "int8 static", False)
    config = json.loads(at.data_editor[0].proto.columns)
    assert "fp32 (float weights only)" in json.dumps(config["weights"])

    visit(at, "sensitivity")
    at.selectbox(key="sens_act_layer:zoo:digits-mlp").select("fc2").run()
    button = at.button(key="sens_f:fc2")
    assert button.label == "Keep layer in float"
    button.click().run()
    assert table_recipe(at, digits_mlp).plan("fc2").is_float
    assert at.button(key="sens_f:fc2").label == "Layer in float"
    row = visit(at, "mixed_precision").data_editor[0].value.set_index("layer").loc["fc2"]
    assert (row["weights"], row["inputs"], bool(row[FLOAT_LAYER])) == ("fp32", "float", True)


def test_ticking_keep_in_float_makes_the_whole_layer_float(digits_mlp):
    at = visit(start(), "mixed_precision")
    edit(at, {list(digits_mlp.layers).index("fc1"): {FLOAT_LAYER: True}})
    assert table_recipe(at, digits_mlp).plan("fc1").is_float
    assert decode_layers(at.query_params["layers"]) == {"fc1": None}


def test_link_waiting_for_an_upload_is_dropped_when_the_receiver_goes_back_to_the_zoo(digits_mlp):
    at = start(upload=digits_mlp.content_hash[:16], preset="int4-weight-only")
    at.session_state[keys.SOURCE] = keys.ZOO
    visit(at, "mixed_precision")  # a page that writes the address (AppTest runs later pages without app.py)
    assert keys.LINK_UPLOAD not in at.session_state
    assert "upload" not in at.query_params and "preset" not in at.query_params  # the zoo model's own (default) recipe


# ---- issue 14: sweeps on a subset say so beside their numbers; the Model page names the output kind ----
def test_a_sweep_on_a_subset_says_on_how_many_samples(tmp_path, monkeypatch):
    from qcore.analysis import sweep_cache

    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sensitivity, "SWEEP_FLOPS", 1.0)  # every sweep drops to MIN_SWEEP_SAMPLES
    sweep_cache.clear_memory_cache()
    ui_jobs._backends.clear()  # the in-process job store keeps finished sweeps too
    try:
        at = visit(start(), "sensitivity")
        n = len(zoo.load("digits-mlp").evaluation)
        expected = f"computed on {sensitivity.MIN_SWEEP_SAMPLES} of {n:,} samples"
        assert any(expected in c.value for c in at.caption), [c.value for c in at.caption]
    finally:
        sweep_cache.clear_memory_cache()  # the subset sweep must not serve other tests
        ui_jobs._backends.clear()


def test_model_page_says_which_output_kind_and_why(tmp_path):
    import numpy as np
    import torch
    from qcore.io.workload import load_workload
    from test_output_kinds import Vad

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(Vad(x).eval(), (x[:2],), dynamic_shapes=({0: batch},)), tmp_path / "vad.pt2")
    np.savez(tmp_path / "vad.npz", x=x.numpy())
    workload = load_workload(str(tmp_path / "vad.pt2"), str(tmp_path / "vad.npz"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state[keys.SOURCE] = keys.UPLOAD_SOURCE
    at.session_state[keys.UPLOAD] = {"key": "upload:vad", "workload": workload, "label": "vad.pt2"}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    text = " ".join(visible(m.value) for m in at.markdown)
    assert "The headline metric is **decision_agreement**" in text
    assert "scored as **probabilities** (inferred from the final Sigmoid)" in text
    assert "The model's output is" in [s.label for s in at.sidebar.selectbox]
    assert "Batch axes (optional)" in [t.label for t in at.sidebar.text_input]  # e.g. state=1 (tests/io/test_batch_axes.py)

"""The workshop lessons (``ui.lessons``, ``pages/lessons.py``, ``ui.presenter``).

Checkers called directly: each accepts its reference answer and rejects a wrong one, and the numbers they judge by
match hand computations, a plain numpy re-implementation or (lesson 10, on tiny-lm) perplexity computed with
``torch.nn.functional.cross_entropy`` (never the engine's own constants). Then AppTest walks
every lesson through the real widgets, a presenter link reproduces the widget state in a fresh session, "reset this
lesson" works, and thirty-students-style sessions opening lesson 7 run one sweep between them.

Speed: the lessons' facts are computed once for the module (``facts``) and handed to the page in the walk tests;
the sweep-count test computes lesson 7's for real.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import streamlit as st
from hypothesis import given, settings
from hypothesis import strategies as st_h
from streamlit.testing.v1 import AppTest
from urllib.parse import parse_qsl, urlsplit

from qcore import zoo
from qcore.errors import QcoreError
from qcore.analysis import sensitivity, sweep_cache
from ui import lesson_view, presenter
from ui.lessons import lessons, teaching_weight
from ui.text import signed

APP = str(Path(__file__).resolve().parents[2] / "app.py")
TIMEOUT = 120

LESSONS = lessons()


@pytest.fixture(scope="module")
def facts(digits_cnn, tiny_lm):
    workloads = {"digits-cnn": digits_cnn, "tiny-lm": tiny_lm}
    return {n: lesson.facts(workloads[lesson_view.model_of(lesson)]) for n, lesson in LESSONS.items()}


def test_the_ten_lessons_come_in_the_issues_order():
    assert list(LESSONS) == list(range(1, 11))
    assert [LESSONS[n].TITLE.split(":")[0] for n in (1, 4, 5, 8, 10)] == ["Why quantize", "Clipping and outliers",
                                                                          "Granularity", "PTQ or QAT", "Language models"]


def test_lesson1_gigabytes_by_hand(facts):
    l, f = LESSONS[1], facts[1]
    assert l.reference(f) == pytest.approx(70e9 * 4 / 8 / 1e9)  # 35 GB
    assert f["gb_1b"]["fp32"] == pytest.approx(4.0) and f["gb_1b"]["fp16"] == pytest.approx(2.0)
    assert f["gb_1b"]["int8"] == pytest.approx(1.0) and f["gb_1b"]["int4"] == pytest.approx(0.5)
    assert l.check(35.0, f).passed and l.check(35.3, f).passed
    wrong = l.check(140.0, f)
    assert not wrong.passed and "FP16" in wrong.sentence
    assert f["seconds_per_token_70b"]["fp32"] == pytest.approx(280 / 100)  # 280 GB over the M3's 100 GB/s


def test_lesson2_bf16_range_and_int8_levels_by_hand(facts):
    l, f = LESSONS[2], facts[2]
    bf16_max = (2 - 2 ** -7) * 2.0 ** 127  # 8 exponent bits, 7 mantissa bits
    assert f["formats"]["bf16"]["max"] == pytest.approx(bf16_max, rel=1e-6)
    assert f["formats"]["fp16"]["max"] == 65504.0
    assert l.reference(f) == {"wider": "bf16", "levels": 256}
    assert l.check({"wider": "bf16", "levels": 256}, f).passed
    assert not l.check({"wider": "fp16", "levels": 256}, f).passed
    assert not l.check({"wider": "bf16", "levels": 255}, f).passed


def test_lesson3_affine_code_by_hand(facts):
    l, f = LESSONS[3], facts[3]
    s = (1.5 - -0.6) / 15
    z = round(-8 - (-0.6) / s)  # -4
    q = round(0.37 / s) + z  # round(2.64) - 4 = -1
    assert (z, q) == (-4, -1)
    assert f["affine"]["scale"] == pytest.approx(s) and f["affine"]["zero_point"] == z
    assert f["affine"]["x_hat"] == pytest.approx((q - z) * s)
    assert f["symmetric"]["q"] == round(0.37 / (1.5 / 7))  # 2
    assert l.reference(f) == q and l.check(q, f).passed
    assert not l.check(q - z, f).passed  # forgot the zero-point
    assert not l.check(2, f).passed  # the symmetric code


def _sqnr_clipped_int4(x: np.ndarray, t: float) -> float:
    s = t / 7  # symmetric int4: codes -8..7, max |code| 7 maps to t
    xq = np.clip(np.round(x / s), -8, 7) * s
    return 10 * math.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((xq - x).astype(np.float64) ** 2))


def test_lesson4_clip_threshold_against_numpy(facts, digits_cnn):
    l, f = LESSONS[4], facts[4]
    x = teaching_weight(digits_cnn, l.LAYER).reshape(-1).numpy()
    amax = float(np.abs(x).max())
    ours = {p: _sqnr_clipped_int4(x, amax * p / 100) for p in range(2, 101, 2)}
    assert l.PERCENTS == list(ours)
    best = max(ours, key=ours.get)
    assert l.reference(f) == best
    assert f["best_sqnr_db"] == pytest.approx(ours[best], abs=0.01)
    assert f["sqnr_by_percent"][50] == pytest.approx(ours[50], abs=0.01)
    assert l.check(best, f).passed
    assert ours[best] - ours[100] > l.TOLERANCE_DB  # min-max is clearly worse here...
    assert not l.check(100, f).passed  # ...and is rejected
    assert not l.check(10, f).passed  # far too tight


def test_lesson5_granularity_against_numpy(facts, digits_cnn):
    l, f = LESSONS[5], facts[5]
    x = teaching_weight(digits_cnn, l.LAYER).numpy().reshape(32, -1)

    def sqnr(blocks):
        s = np.abs(blocks).max(1, keepdims=True) / 7
        xq = np.clip(np.round(blocks / s), -8, 7) * s
        return 10 * math.log10(np.sum(blocks.astype(np.float64) ** 2) / np.sum((xq - blocks).astype(np.float64) ** 2))

    assert f["rows"]["per_tensor"]["sqnr_db"] == pytest.approx(sqnr(x.reshape(1, -1)), abs=0.01)
    assert f["rows"]["per_channel"]["sqnr_db"] == pytest.approx(sqnr(x), abs=0.01)
    assert f["rows"]["per_tensor"]["scale_bytes"] == 4 and f["rows"]["per_channel"]["scale_bytes"] == 4 * 32
    assert l.reference(f) == "per_channel" and l.check("per_channel", f).passed
    assert not l.check("per_tensor", f).passed and not l.check("per_group", f).passed


def test_lesson6_dim_calibration_clips_static_ranges(facts, digits_cnn):
    from qcore.zoo.teaching import dim_calibration

    l, f = LESSONS[6], facts[6]
    dim = dim_calibration(digits_cnn, 0.5)
    assert float(dim.calibration.inputs[0].max()) == pytest.approx(0.5 * float(digits_cnn.calibration.inputs[0].max()))
    assert dim.content_hash != digits_cnn.content_hash and dim.evaluation is digits_cnn.evaluation
    real_max = max(hi for _, hi in f["real_batches"])
    assert f["static_range"][1] < 0.75 * real_max  # the static range misses a quarter of the real inputs' range
    assert l.reference(f) == "int8-dynamic" and l.check("int8-dynamic", f).passed
    assert not l.check("int8-static", f).passed


def test_lesson7_mixed_precision_goal(facts, digits_cnn):
    l, f = LESSONS[7], facts[7]
    ref = l.reference(f)
    assert sorted(b for b in ref.values()) == [3, 3, 3, 4, 4]
    assert l.check(ref, f, digits_cnn).passed
    assert not l.check({k: 3 for k in ref}, f, digits_cnn).passed  # all int3: loses too much
    too_big = l.check({k: 8 for k in ref}, f, digits_cnn)
    assert not too_big.passed and "size" in too_big.sentence


def test_lesson8_and_9_choices(facts):
    assert LESSONS[8].reference(facts[8]) == "int3" and LESSONS[8].check("int3", facts[8]).passed
    assert not LESSONS[8].check("int8", facts[8]).passed
    est = facts[9]["estimates"]
    best = LESSONS[9].reference(facts[9])
    assert all(est[best]["speedup"] >= e["speedup"] for e in est.values())
    assert LESSONS[9].check(best, facts[9]).passed
    assert not LESSONS[9].check("h100-sxm", facts[9]).passed


def _perplexity(model, data) -> float:
    """exp(mean cross-entropy) of ``model`` on token windows ``data``, by torch's own cross_entropy (the oracle)."""
    with torch.no_grad():
        logits = model(data.inputs[0]).double()
    return math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.labels.reshape(-1),
                                                      ignore_index=-100))


def test_lesson10_smallest_formats_within_5_percent_against_cross_entropy(facts, tiny_lm):
    l, f = LESSONS[10], facts[10]
    data = tiny_lm.evaluation.subset(slice(0, l.WINDOWS))
    fp32 = _perplexity(tiny_lm.model, data)
    assert f["fp32"] == pytest.approx(fp32, rel=1e-6) and f["tokens"] == 2 * 128
    ref, wrong, bigger = l.reference(f), {"weights": "int2 g32", "kv": "int4"}, {"weights": "int4 g32", "kv": "int8"}
    assert ref == {"weights": "int3 g32", "kv": "int4"}
    row = {(r["weights"], r["kv"]): r for r in f["rows"]}
    # the lesson hooks its KV cache on a copy of each weights-only simulation; the oracle runs Workload.simulate
    # of the whole recipe and scores it with cross_entropy
    good, bad = (_perplexity(tiny_lm.simulate(l.full_recipe(f, a)).model, data) for a in (ref, wrong))
    assert good <= 1.05 * fp32 < bad
    assert row["int3 g32", "int4"]["perplexity"] == pytest.approx(good, rel=1e-6)
    assert row["int2 g32", "int4"]["perplexity"] == pytest.approx(bad, rel=1e-6)
    # KV cache by hand: 4 layers x 2 (K, V) x 6 heads x 32 values x 128 tokens at 4 bits, + a float32 scale per
    # token, head and K/V; FP16 when not quantized
    assert row["int3 g32", "int4"]["kv_bytes"] == 2 * 4 * 6 * 32 * 128 // 2 + 2 * 4 * 6 * 128 * 4
    assert row["int3 g32", "fp16"]["kv_bytes"] == 2 * 4 * 6 * 32 * 128 * 2
    assert l.check(ref, f).passed
    too_far = l.check(wrong, f)
    assert not too_far.passed and "Too far" in too_far.sentence
    not_smallest = l.check(bigger, f)
    assert not not_smallest.passed and "not the smallest" in not_smallest.sentence
    assert not l.check({"weights": "nf4", "kv": None}, f).passed  # an incomplete answer


@pytest.mark.parametrize("value, text", [(0.0, "0.0000"), (-0.00001, "0.0000"), (-0.0, "0.0000"),
                                         (0.25, "+0.2500"), (-1.5, "\u22121.5000")])
def test_signed_never_shows_minus_zero(value, text):
    assert signed(value) == text


# ---- the page, driven by AppTest ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(digits_mlp, digits_cnn, tiny_lm):
    """The app's zoo loader returns the session fixtures; Streamlit's caches start empty."""
    mp = pytest.MonkeyPatch()
    mp.setattr(zoo, "load", {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn, "tiny-lm": tiny_lm}.__getitem__)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    mp.undo()
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def shared_facts(app, facts, monkeypatch):
    """The page shows the module's facts (computed once above) instead of computing them again."""
    monkeypatch.setattr(lesson_view, "facts", lambda number, content_hash, lesson, w: facts[number])


def open_lessons(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(query or {})
    at.run()
    at.switch_page("pages/lessons.py").run()
    return at


def widget(at: AppTest, key: str):
    found = [w for kind in ("number_input", "radio", "select_slider", "selectbox", "slider")
             for w in getattr(at, kind) if w.key == key]
    assert found, key
    return found[0]


def assert_clean(at: AppTest) -> None:
    assert not at.exception and not at.error, [e.value for e in at.error]


def answers(n: int, f: dict) -> tuple[dict, dict]:
    """(reference, wrong) answers of lesson ``n`` as {widget key: value}."""
    l = LESSONS[n]
    ref = l.reference(f)
    if n == 2:
        return ({"lesson2_wider": ref["wider"], "lesson2_levels": ref["levels"]},
                {"lesson2_wider": "fp16", "lesson2_levels": ref["levels"]})
    if n == 7:
        return {f"lesson7_bits:{k}": b for k, b in ref.items()}, {f"lesson7_bits:{k}": 3 for k in ref}
    if n == 10:
        return ({"lesson10_weights": ref["weights"], "lesson10_kv": ref["kv"]},
                {"lesson10_weights": "int2 g32", "lesson10_kv": ref["kv"]})
    name = next(iter(l.WIDGETS)).replace("\\", "")
    wrong = {1: 140.0, 3: 3, 4: 100, 5: "per_tensor", 6: "int8-static", 8: "int8", 9: "h100-sxm"}[n]
    return {name: ref}, {name: wrong}


def test_walk_every_lesson_and_its_exercise(shared_facts, facts):
    at = open_lessons()
    assert_clean(at)
    for n in LESSONS:
        widget(at, "lesson").set_value(str(n))
        widget(at, "step").set_value("idea")
        at.run()
        assert_clean(at)
        assert at.header[0].value.startswith(f"{n}. ")
        assert at.get("plotly_chart"), f"lesson {n} shows no figure"
        widget(at, "step").set_value("exercise").run()
        ref, wrong = answers(n, facts[n])
        for answer, passed, shown in ((wrong, False, at.warning), (ref, True, at.success)):
            for k, v in answer.items():
                widget(at, k).set_value(v)
            at.button(key=f"lesson{n}_check").click().run()
            assert_clean(at)
            boxes = at.success if passed else at.warning
            assert len(boxes) == 1, (n, passed)
        assert not at.warning  # the right answer replaced the wrong one's verdict


def test_presenter_link_reproduces_the_widget_state(shared_facts):
    at = open_lessons()
    at.switch_page("pages/formats.py").run()
    widget(at, "formats_family").set_value("bf16").run()
    at.switch_page("pages/weights.py").run()
    widget(at, "weights_granularity").set_value("per_group").run()
    at.switch_page("pages/lessons.py").run()
    widget(at, "lesson").set_value("5").run()
    widget(at, "step").set_value("exercise").run()
    widget(at, "lesson5_granularity").set_value("per_tensor").run()
    url = at.code[0].value
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["lesson"] == "5" and query["step"] == "exercise"
    assert presenter.decode(query["view"]) == {"formats_family": "bf16", "lesson5_granularity": "per_tensor",
                                               **{k: v for k, v in presenter.decode(query["view"]).items()
                                                  if k not in ("formats_family", "lesson5_granularity")}}

    fresh = open_lessons(query)
    assert_clean(fresh)
    assert widget(fresh, "lesson").value == "5" and widget(fresh, "step").value == "exercise"
    assert widget(fresh, "lesson5_granularity").value == "per_tensor"
    fresh.switch_page("pages/formats.py").run()
    assert widget(fresh, "formats_family").value == "bf16"
    fresh.switch_page("pages/weights.py").run()
    assert widget(fresh, "weights_granularity").value == "per_group"


def test_a_changed_presenter_link_sets_nothing_else(shared_facts):
    view = presenter.encode({"formats_family": 7, "model_source": "upload", "lesson3_q": True, "weights_format": "int8"})
    assert presenter.decode(view) == {"weights_format": "int8"}  # wrong types and foreign keys are dropped
    at = open_lessons({"view": "not-base64!"})
    assert any("presenter link" in e.value for e in at.error)  # one line in the sidebar, nothing applied


@settings(max_examples=40)
@given(st_h.dictionaries(st_h.text(max_size=30) | st_h.sampled_from(["formats_bits", "lesson4_clip", "act_log",
                                                                     "weights_layer:zoo:digits-cnn"]),
                         st_h.none() | st_h.booleans() | st_h.integers() | st_h.floats(allow_nan=False) | st_h.text(max_size=8),
                         max_size=6))
def test_presenter_decode_keeps_only_declared_keys_of_declared_types(view):
    kept = presenter.decode(presenter.encode(view))
    patterns = presenter.schema()
    for k, v in kept.items():
        kind = next(t for p, t in patterns.items() if re.fullmatch(p, k))
        assert type(v) is kind, (k, v)
        assert v == view[k]


@given(st_h.text(max_size=60))
@settings(max_examples=40)
def test_presenter_decode_of_any_text_is_a_dict_or_one_line_error(text):
    try:
        assert isinstance(presenter.decode(text), dict)
    except QcoreError as e:
        assert "\n" not in str(e)


def test_reset_this_lesson(shared_facts):
    at = open_lessons({"lesson": "3", "step": "exercise"})
    widget(at, "lesson3_q").set_value(-1)
    at.button(key="lesson3_check").click().run()
    assert len(at.success) == 1
    at.button(key="reset_lesson:3").click().run()
    assert widget(at, "lesson3_q").value == 0 and not at.success
    assert_clean(at)


def test_thirty_students_opening_lesson_7_run_one_sweep(app, monkeypatch, tmp_path):
    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path))
    sweep_cache.clear_memory_cache()
    st.cache_data.clear()
    calls = []
    real = sensitivity._compute
    monkeypatch.setattr(sensitivity, "_compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):  # each AppTest is a new session (a new student) on the same server process
        at = open_lessons({"lesson": "7"})
        assert_clean(at)
        assert at.get("plotly_chart")
    assert len(calls) == 1


def test_open_in_the_full_page_carries_the_lessons_state(shared_facts):
    at = open_lessons({"lesson": "5", "step": "exercise"})
    widget(at, "lesson5_granularity").set_value("per_group").run()
    at.button(key="lesson5_open").click().run()
    assert_clean(at)
    assert at.title[0].value.startswith("Weights")
    assert widget(at, "model").value == "digits-cnn"
    assert widget(at, "weights_layer:zoo:digits-cnn").value == "features.3"
    assert widget(at, "weights_granularity").value == "per_group"


def test_lesson10_presenter_link_and_full_page(shared_facts):
    at = open_lessons({"lesson": "10", "step": "exercise"})
    assert_clean(at)
    widget(at, "lesson10_weights").set_value("nf4").run()
    widget(at, "lesson10_kv").set_value("int8").run()
    query = dict(parse_qsl(urlsplit(at.code[0].value).query))
    assert query["lesson"] == "10"
    assert {k: v for k, v in presenter.decode(query["view"]).items() if k.startswith("lesson10_")} == \
        {"lesson10_weights": "nf4", "lesson10_kv": "int8"}
    fresh = open_lessons(query)
    assert_clean(fresh)
    assert widget(fresh, "lesson10_weights").value == "nf4" and widget(fresh, "lesson10_kv").value == "int8"
    fresh.button(key="lesson10_open").click().run()  # the Generation page, on tiny-lm, with the answer's recipe
    assert_clean(fresh)
    assert fresh.title[0].value.startswith("Generation")
    assert widget(fresh, "model").value == "tiny-lm"
    assert [s.value for s in fresh.selectbox if s.key.startswith("kv_cache:")] == ["int8.per_token"]
    assert any("nf4" in c.value for c in fresh.caption)


def test_lesson_8_and_9_runs_are_jobs_shared_by_the_class(shared_facts, monkeypatch):
    """One student's click runs lesson 8's QAT and lesson 9's measurement as jobs; the next student (a new session)
    sees both results without clicking, and nothing ran twice."""
    from qcore.training import QATConfig
    from ui import jobs as ui_jobs
    from ui.lessons import l08_qat

    monkeypatch.setattr(l08_qat, "QAT_CONFIG", QATConfig(epochs=1))  # a short run: what is tested is the sharing
    ui_jobs._backends.clear()
    first = open_lessons({"lesson": "8"})
    first.button(key="lesson8_run").click().run()
    assert_clean(first)
    caption = next(c.value for c in first.caption if "after QAT" in c.value)
    first = open_lessons({"lesson": "9"})
    first.button(key="lesson9_measure").click().run()
    assert_clean(first)
    assert any("Measured" in m.value for m in first.markdown)
    backend = ui_jobs._backends()[0]
    assert backend.runs == 2

    second = open_lessons({"lesson": "8"})
    assert_clean(second)
    assert not [b for b in second.button if b.key == "lesson8_run"]
    assert next(c.value for c in second.caption if "after QAT" in c.value) == caption
    second = open_lessons({"lesson": "9"})
    assert any("Measured" in m.value for m in second.markdown) and backend.runs == 2

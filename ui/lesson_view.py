"""What the Lessons page draws around any lesson: its facts (computed once per server), the exercise with its
check, hint and reveal, "open this in the full page", "reset this lesson" and the presenter link.

The lesson modules (``ui.lessons``) hold the content; this module only arranges it. Facts are cached with
``st.cache_data`` keyed on the lesson and its workload's content hash (the teaching model's; lesson 10's tiny-lm), so every session of one server
shares them: thirty students opening lesson 7 run one sensitivity sweep.
"""

from __future__ import annotations

import streamlit as st

from qcore.recipe.links import encode_kv_cache
from qcore.zoo.teaching import TEACHING_MODEL
from ui import keys, presenter, state
from ui.lessons import Verdict, key, owns

PAGE = "pages/lessons.py"
LESSON_PARAM, STEP_PARAM = "lesson", "step"  # query parameters (and widget keys) of the Lessons page
STEPS = {"idea": "1. The idea", "exercise": "2. Exercise"}


@st.cache_data(show_spinner="Preparing the lesson (once for the whole class)…", max_entries=64)
def facts(number: int, content_hash: str, _lesson, _w) -> dict:
    """``_lesson.facts(_w)``, computed once per server for each lesson and teaching workload."""
    return _lesson.facts(_w)


def url_bound(key: str, options: list[str]) -> None:
    """Before widget ``key`` is drawn: the first time a session shows it (or after another page dropped it), its
    value comes from the query parameter ``key`` when that is one of ``options``. ``bind="query-params"`` would
    write the option's displayed label into the address; this keeps ``?lesson=4&step=exercise``."""
    if key not in st.session_state and st.query_params.get(key) in options:
        st.session_state[key] = st.query_params[key]


def write_url(**values: str) -> None:
    """After the widgets: the address shows the lesson and step (what a reload or a copied link reopens)."""
    for k, v in values.items():
        if st.query_params.get(k) != v:
            st.query_params[k] = v


def model_of(lesson) -> str:
    """The zoo model lesson ``lesson`` uses: its ``MODEL`` (lesson 10: tiny-lm), else the teaching model."""
    return getattr(lesson, "MODEL", TEACHING_MODEL)


def workload(lesson):
    return state.zoo_workload(model_of(lesson))


def exercise(lesson, f: dict, w) -> None:
    """The goal, the answer widgets, the check (the engine's verdict stays until the answer is checked again),
    the hint, the reveal and the link to the full page."""
    n = lesson.NUMBER
    st.markdown(f"**Goal.** {lesson.GOAL}")
    answer = lesson.ask(f)
    if st.button("Check my answer", key=key(n, "check"), type="primary", icon=":material/check:"):
        v = lesson.check(answer, f, w)
        st.session_state[key(n, "verdict")] = (v.passed, v.sentence)
    if (verdict := st.session_state.get(key(n, "verdict"))) is not None:
        v = Verdict(*verdict)
        (st.success if v.passed else st.warning)(v.sentence, icon=":material/check_circle:" if v.passed else ":material/replay:")
    with st.expander("Hint"):
        st.write(lesson.HINT)
    with st.expander("Reveal the answer"):
        st.markdown(lesson.reveal(f))
    page, _ = lesson.full_page(f, answer)
    st.button("Open this in the full page", key=key(n, "open"), icon=":material/open_in_new:",
              on_click=_open_full_page, args=(lesson, f, answer, w))
    if st.session_state.pop(key(n, "go"), None):
        state.switch_page(page)


def _open_full_page(lesson, f: dict, answer, w) -> None:
    """Button callback (runs before the next script run, so the sidebar's model may still be set): the full page's
    widget state and, for lessons that build one, the recipe (with its KV cache); the model becomes the lesson's."""
    page, values = lesson.full_page(f, answer)
    st.session_state[keys.SOURCE] = keys.ZOO
    st.session_state[keys.ZOO_NAME] = model_of(lesson)
    st.session_state.update(values)
    if hasattr(lesson, "full_recipe"):
        recipe = lesson.full_recipe(f, answer)
        state.set_recipe(f"zoo:{model_of(lesson)}", w, recipe)
        state.set_kv_cache(f"zoo:{model_of(lesson)}", w, encode_kv_cache(recipe.kv_cache))
    st.session_state[key(lesson.NUMBER, "go")] = True


def reset(number: int) -> None:
    """Button callback: forget every widget value and verdict of lesson ``number`` (widgets return to defaults)."""
    for k in [k for k in st.session_state if owns(number, k)]:
        del st.session_state[k]


def teacher_tools(number: int) -> None:
    """"Reset this lesson" and the presenter link."""
    c1, c2 = st.columns([1, 3])
    c1.button("Reset this lesson", key=f"reset_lesson:{number}", icon=":material/restart_alt:", on_click=reset,
              args=(number,), help="every answer and choice of this lesson back to its start")
    with c2.expander("Presenter link: every student on this lesson, step, model and selections"):
        base = (st.context.url or "").split("?")[0] or "/lessons"
        st.code(presenter.link(base, st.query_params.to_dict(), dict(st.session_state)), language=None, wrap_lines=True)
        st.caption("Share it (chat, QR code, projector). It carries this lesson and step, the model, the recipe and "
                   "what is selected here and on the Formats, Weights and Activations pages.")

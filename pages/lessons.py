"""Lessons page: the workshop's guided path, one lesson at a time (``?lesson=4&step=exercise``)."""

import streamlit as st

from ui import glossary, lesson_view, state
from ui.lessons import lessons

state.active()
LESSONS = lessons()
st.title("Lessons: quantization step by step")
c1, c2 = st.columns([3, 2])
lesson_view.url_bound(lesson_view.LESSON_PARAM, [str(n) for n in LESSONS])
lesson_view.url_bound(lesson_view.STEP_PARAM, list(lesson_view.STEPS))
number = c1.selectbox("Lesson", [str(n) for n in LESSONS], key=lesson_view.LESSON_PARAM, persist_state="session",
                      format_func=lambda n: f"{n}. {LESSONS[int(n)].TITLE}")
step = c2.radio("Step", list(lesson_view.STEPS), key=lesson_view.STEP_PARAM, persist_state="session", horizontal=True,
                format_func=lesson_view.STEPS.get)
lesson_view.write_url(**{lesson_view.LESSON_PARAM: number, lesson_view.STEP_PARAM: step})
lesson = LESSONS[int(number)]
w = lesson_view.workload(lesson)
st.caption(f"This lesson uses **{w.name}** (whatever the sidebar shows) and computes its numbers with the "
           "engine, once for the whole class.")
glossary.link(*getattr(lesson, "GLOSSARY", ("sqnr", "agreement", "drop")))
f = lesson_view.facts(lesson.NUMBER, w.content_hash, lesson, w)

st.header(f"{lesson.NUMBER}. {lesson.TITLE}")
if step == "idea":
    st.markdown(lesson.IDEA)
    lesson.show(f, w)
else:
    lesson_view.exercise(lesson, f, w)
st.divider()
lesson_view.teacher_tools(lesson.NUMBER)

"""The workshop's lessons, in teaching order: one module each (``l01_why`` ... ``l10_language_models``).

Every lesson module has the same parts, so ``pages/lessons.py`` draws any of them and the tests walk them all:

- ``NUMBER``, ``TITLE``, ``IDEA`` (Markdown), ``GOAL`` (the exercise, one sentence), ``HINT``;
- ``WIDGETS``: ``{key pattern (regex): type}`` of the lesson's own widgets (the presenter link carries them);
- ``MODEL`` (optional): the zoo model the lesson uses instead of the teaching model (lesson 10: tiny-lm);
  ``GLOSSARY`` (optional): the glossary terms the page links to;
- ``facts(w) -> dict``: every number the lesson shows, computed by the engine on the lesson's workload ``w``
  (plain data: the page caches it once per server);
- ``show(facts, w)``: the figure and the numbers under the idea (Streamlit);
- ``ask(facts) -> answer``: the exercise's widgets; ``reference(facts) -> answer``: the answer that meets the goal;
- ``check(answer, facts, w) -> Verdict``: a pure function, the engine judging the answer in one sentence;
- ``reveal(facts) -> str``: the reference answer explained (Markdown);
- ``full_page(facts, answer) -> (page, {session-state key: value})``: the full page and its widget state.

Lesson 10 (language models) uses the zoo's language model, tiny-lm, instead of the teaching model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import import_module

MODULES = ["l01_why", "l02_formats", "l03_scale", "l04_clipping", "l05_granularity", "l06_calibration",
           "l07_sensitivity", "l08_qat", "l09_hardware", "l10_language_models"]


@dataclass(frozen=True)
class Verdict:
    """The checker's judgement: ``passed`` and one sentence saying why, with the engine's numbers."""

    passed: bool
    sentence: str


def lessons() -> dict[int, object]:
    """``{number: lesson module}`` in teaching order."""
    mods = [import_module(f"ui.lessons.{m}") for m in MODULES]
    return {m.NUMBER: m for m in mods}


def key(number: int, name: str) -> str:
    """The session-state key of lesson ``number``'s widget ``name`` (``"lesson4_clip"``): every key of a lesson
    starts with ``lesson<N>_``, which is what "reset this lesson" removes."""
    return f"lesson{number}_{name}"


def owns(number: int, session_key: str) -> bool:
    """Whether ``session_key`` belongs to lesson ``number`` (its widgets, its checked answer)."""
    return re.fullmatch(rf"lesson{number}_.+", str(session_key)) is not None


def teaching_weight(w, layer: str):
    """Layer ``layer``'s weight of the BatchNorm-folded teaching model (what every page quantizes)."""
    return dict(w.folded[0].named_modules())[layer].weight.detach()

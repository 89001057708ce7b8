"""The presenter link: one address that puts every student on the teacher's lesson, step, model and widget state.

The address is the lessons page's own (``/lessons?lesson=7&step=exercise&model=digits-cnn``, the recipe's
``?preset=&layers=`` if any) plus ``?view=<url-safe base64 of compact JSON>``: ``{session-state key: value}`` of the
widgets students see -- every lesson's and the Formats, Weights and Activations pages' selections. Only keys
matching ``SHARED`` (or a lesson's ``WIDGETS``) with a value of the declared type are carried and applied, so a
changed link can set nothing else; a select box given a value it does not offer falls back to its default (Streamlit).
Links without ``?view=`` decode exactly as before.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import urlencode

from qcore.errors import QcoreError
from ui.lessons import lessons

VIEW_PARAM = "view"
MAX_VIEW_CHARS = 20_000
_SUFFIX = r"(:[\w.:\-]+)?"  # a per-model key: "weights_layer:zoo:digits-cnn"
SHARED: dict[str, type] = {  # the explore pages' widget keys -> value type
    rf"formats_(source|family|range){_SUFFIX}|formats_layer:[\w.:\-]+": str,
    r"formats_bits": int, r"formats_percentile": float, rf"formats_symmetric|formats_scaled{_SUFFIX}": bool,
    r"weights_(layer:[\w.:\-]+|format|range|granularity)": str, r"weights_group": int, r"weights_percentile": float,
    rf"weights_(symmetric|scaled)|weights_all{_SUFFIX}": bool,
    r"act_(layer:[\w.:\-]+|format|grid)": str, r"act_batch": int, r"act_percentile": float,
    r"act_(symmetric|scaled|log)": bool,
}


def schema() -> dict[str, type]:
    """Every shareable key pattern and its type: ``SHARED`` and each lesson's ``WIDGETS``."""
    out = dict(SHARED)
    for lesson in lessons().values():
        out.update(lesson.WIDGETS)
    return out


def _typed(value, kind: type):
    """``value`` as ``kind`` when it is one (an int is a float; a bool is never a number), else ``None``."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, kind) else None


def shareable(session: dict) -> dict:
    """The entries of ``session`` (session state as a dict) a presenter link carries, sorted by key."""
    patterns = schema()
    out = {}
    for k in sorted(str(k) for k in session):
        for pattern, kind in patterns.items():
            if re.fullmatch(pattern, k) and (v := _typed(session[k], kind)) is not None:
                out[k] = v
                break
    return out


def encode(view: dict) -> str:
    """``{key: value}`` -> url-safe base64 (no padding) of its compact, sorted JSON."""
    text = json.dumps(view, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode(text: str) -> dict:
    """Inverse of ``encode``, keeping only the shareable entries; QcoreError when ``text`` is not an encoding."""
    if len(text) > MAX_VIEW_CHARS:
        raise QcoreError(f"the link's {VIEW_PARAM}= parameter is longer than {MAX_VIEW_CHARS:,} characters; ask the "
                         "teacher for the link again")
    try:
        view = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        view = None
    if not isinstance(view, dict):
        raise QcoreError(f"the link's {VIEW_PARAM}= parameter was cut or changed; ask the teacher for the link again")
    return shareable(view)


def link(base_url: str, params: dict, session: dict) -> str:
    """The presenter link: ``base_url`` (the lessons page's address, no query) with ``params`` (the current query
    parameters) and ``?view=`` holding the shareable widget state of ``session``."""
    query = {k: v for k, v in params.items() if k != VIEW_PARAM}
    view = shareable(session)
    if view:
        query[VIEW_PARAM] = encode(view)
    return base_url + ("?" + urlencode(query) if query else "")

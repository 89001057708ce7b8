"""The Mixed precision table as the page shows it: ``qcore.recipe.table``'s rows with the group size blank on rows
whose granularity is not per_group (a per-channel or per-tensor spec still carries a group size, unused), and
back: a blank cell takes the recipe's own value again, so the recipe the table writes is unchanged.

The column is text (``""`` when blank, else the digits): the data editor draws a missing number as a grey "None"."""

from __future__ import annotations

import pandas as pd

from qcore.errors import QcoreError

GROUP = "group size"
DIGITS = r"^[0-9]*$"  # what the column accepts: digits, or nothing


def shown(rows: list[dict]) -> pd.DataFrame:
    """``rows`` (``table_rows``) as the editor's frame: ``group size`` as text, ``""`` where ``granularity`` is not
    ``"per_group"``."""
    table = pd.DataFrame(rows)
    table[GROUP] = [str(g) if gran == "per_group" else "" for g, gran in zip(table[GROUP], table["granularity"])]
    return table


def filled(edited: pd.DataFrame, rows: list[dict]) -> list[dict]:
    """The edited frame's records for ``apply_rows``: a blank group size is the layer's value in ``rows`` (the
    recipe before the edit: a row switched to per_group starts from its spec's group size), else the number typed."""
    before = {row["layer"]: row[GROUP] for row in rows}
    out = []
    for r in edited.to_dict("records"):
        text = "" if r[GROUP] is None or pd.isna(r[GROUP]) else str(r[GROUP]).strip()
        if text and not text.isdigit():
            raise QcoreError(f"layer {r['layer']}: group size {text!r} is not a whole number")
        out.append({**r, GROUP: int(text) if text else before[r["layer"]]})
    return out

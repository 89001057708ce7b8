"""The Mixed precision table as the page shows it: ``qcore.recipe.table``'s rows with the group size blank on rows
whose granularity is not per_group (a per-channel or per-tensor spec still carries a group size, unused), and
back: a blank cell takes the recipe's own value again, so the recipe the table writes is unchanged."""

from __future__ import annotations

import pandas as pd

GROUP = "group size"


def shown(rows: list[dict]) -> pd.DataFrame:
    """``rows`` (``table_rows``) as the editor's frame: ``group size`` a nullable integer column, blank (``<NA>``)
    where ``granularity`` is not ``"per_group"``."""
    table = pd.DataFrame(rows)
    table[GROUP] = table[GROUP].where(table["granularity"] == "per_group").astype("Int64")
    return table


def filled(edited: pd.DataFrame, rows: list[dict]) -> list[dict]:
    """The edited frame's records for ``apply_rows``: a blank group size is the layer's value in ``rows`` (the
    recipe before the edit), e.g. when a row is switched to per_group it starts from the spec's group size."""
    before = {row["layer"]: row[GROUP] for row in rows}
    return [{**r, GROUP: before[r["layer"]]} if pd.isna(r[GROUP]) else r for r in edited.to_dict("records")]

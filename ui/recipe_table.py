"""The Mixed precision table as the page shows it: ``qcore.recipe.table``'s rows with the group size blank on rows
whose granularity is not per_group (a per-channel or per-tensor spec still carries a group size, unused), the
editor's column menus and help (``columns``, ``READ_ONLY``), and back: a blank cell takes the recipe's own value again, so the recipe the table writes is unchanged.

The column is text (``""`` when blank, else the digits): the data editor draws a missing number as a grey "None"."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from qcore.errors import QcoreError
from qcore.recipe.table import FLOAT_LAYER, WEIGHT_CHOICES, WEIGHTS_HELP, weight_choice_label

GROUP = "group size"
DIGITS = r"^[0-9]*$"  # what the column accepts: digits, or nothing
READ_ONLY = ["layer", "type", "weight shape", "size (bytes)", "drop (estimate)"]  # columns the user cannot edit


def columns(inputs: list[str]) -> dict:
    """The data editor's ``column_config``: menus of the choices a cell may take (``inputs``: the input
    quantization choices, those of the recipe included) and what each column means."""
    return {
        FLOAT_LAYER: st.column_config.CheckboxColumn(help="weights and inputs stay float: the layer is not quantized"),
        "weights": st.column_config.SelectboxColumn("weights", options=WEIGHT_CHOICES, required=True,
                                                    format_func=weight_choice_label, help=WEIGHTS_HELP),
        "granularity": st.column_config.SelectboxColumn(options=["per_tensor", "per_channel", "per_group"], required=True),
        GROUP: st.column_config.TextColumn(validate=DIGITS, alignment="right",
                                           help="per_group only (blank otherwise); must divide the input size"),
        "symmetric": st.column_config.CheckboxColumn(help="integer formats: zero-point fixed at 0"),
        "range": st.column_config.SelectboxColumn(options=["minmax", "percentile", "mse", "entropy"], required=True),
        "inputs": st.column_config.SelectboxColumn("inputs", options=inputs, required=True,
                                                   help="how the layer's input is quantized (static = calibrated range)"),
        "drop (estimate)": st.column_config.TextColumn(help="the sweep's simulated drop with only this layer quantized; "
                                                       "\"not swept\": no sweep row has this layer's spec"),
    }


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

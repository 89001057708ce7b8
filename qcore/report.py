"""A self-contained HTML report of one analysis: model, recipe, metrics, sizes, latency, charts, environment.

``html_report`` takes plain data (what ``Workload.evaluate`` and friends return) and Plotly figures and
returns one HTML string that opens offline: plotly.js is inlined once, in front of the first chart,
and every later chart reuses it. Every value is HTML-escaped. Latency rows say where each number
comes from ("measured" on this machine or a hardware-profile "estimate").
"""

from __future__ import annotations

import datetime
import html
import json
import os
import platform
import sys

import plotly.graph_objects as go

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #111827; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #d1d5db; padding: 4px 10px; }
th { background: #f3f4f6; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f9fafb; padding: 1em; overflow-x: auto; } .note { color: #6b7280; }
"""


def environment() -> dict:
    """Versions and machine the numbers were produced with (strings)."""
    import numpy
    import plotly
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "plotly": plotly.__version__, "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
           "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for module in ("onnxruntime", "onnx", "streamlit"):
        if module in sys.modules:
            env[module] = getattr(sys.modules[module], "__version__", "?")
    return env


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.6g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value:,}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def table(rows: list[dict]) -> str:
    """An HTML table of ``rows`` (the first row's keys are the columns)."""
    if not rows:
        return '<p class="note">(none)</p>'
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(model: dict, recipe: dict, evaluation: dict, *, sizes: dict | None = None,
                latency: list[dict] | None = None, figures: list[tuple[str, go.Figure]] = (),
                env: dict | None = None, notes: list[str] = ()) -> str:
    """The report as one HTML document.

    model      : {"name", "description", ...} (every key is listed)
    recipe     : a recipe dict (``Recipe.to_dict``), shown as JSON
    evaluation : ``Workload.evaluate(...).to_dict()`` (plain data, as the page caches it)
    sizes      : extra size figures, e.g. {"bits_per_weight": 5.1}
    latency    : rows {"recipe", "latency_ms", "source" ("measured" | "estimate"), ...}
    figures    : (title, Plotly figure) pairs, drawn in order
    """
    name = str(model.get("name", "model"))
    fp32, quant = evaluation["fp32"], evaluation["quantized"]
    scalar = [k for k, v in quant["metrics"].items() if isinstance(v, (int, float))]
    metric_rows = [{"metric": k, "FP32": float(fp32["metrics"][k]), "quantized": float(quant["metrics"][k]),
                    "change": float(quant["metrics"][k]) - float(fp32["metrics"][k])} for k in scalar if k in fp32["metrics"]]
    size_rows = [{"": "FP32", "bytes": int(fp32["size_bytes"])},
                 {"": "quantized", "bytes": int(quant["size_bytes"])},
                 {"": "quantized / FP32", "bytes": quant["size_bytes"] / fp32["size_bytes"]}]
    size_rows += [{"": k, "bytes": v} for k, v in (sizes or {}).items()]
    parts = [f"<h1>Quantization report: {html.escape(name)}</h1>",
             f'<p class="note">Headline metric: <b>{html.escape(str(evaluation["metric"]))}</b>. Every metric below is '
             "measured on the evaluation data; sizes are theoretical storage (codes + scales + zero-points).</p>",
             "<h2>Model</h2>", table([{"": k, "value": v} for k, v in model.items()]),
             "<h2>Metrics</h2>", table(metric_rows),
             "<h2>Size</h2>", table(size_rows)]
    if latency:
        parts += ["<h2>Latency</h2>", '<p class="note">"measured": timed on this machine; "estimate": predicted from a '
                  "hardware profile, not measured.</p>", table(latency)]
    for i, (title, fig) in enumerate(figures):
        parts += [f"<h2>{html.escape(title)}</h2>",
                  fig.to_html(full_html=False, include_plotlyjs=i == 0, default_height=420)]
    parts += ["<h2>Recipe</h2>", f"<pre>{html.escape(json.dumps(recipe, indent=2))}</pre>"]
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    parts += ["<h2>Environment</h2>", table([{"": k, "value": v} for k, v in (env or environment()).items()])]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)}: quantization report'
            f"</title><style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>")

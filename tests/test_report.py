"""The HTML report: the measured numbers, the model, escaped text, plotly.js inlined exactly once."""

import re

import plotly.graph_objects as go

from qcore import report
from qcore.recipe import preset


def test_report_holds_model_metrics_sizes_latency_and_figures(digits_mlp):
    recipe = preset("int4-weight-only", digits_mlp.layer_shapes)
    result = digits_mlp.evaluate(recipe).to_dict()
    figures = [("one", go.Figure(go.Bar(x=[1, 2], y=[3, 4]))), ("two", go.Figure(go.Scatter(x=[1], y=[2])))]
    html = report.html_report({"name": digits_mlp.name, "description": "a <b>small</b> MLP"}, recipe.to_dict(), result,
                              latency=[{"recipe": "int4", "latency_ms": 0.125, "source": "estimate (this machine)"}],
                              figures=figures, notes=["swept on 16 samples"])
    q, f = result["quantized"], result["fp32"]
    assert "<title>digits-mlp: quantization report</title>" in html
    for value in (q["metrics"]["accuracy"], f["metrics"]["accuracy"], q["metrics"]["sqnr_db"], q["metrics"]["kl_div"]):
        assert f'<td class="num">{value:.6g}</td>' in html
    assert f'<td class="num">{q["size_bytes"]:,}</td>' in html and f'<td class="num">{f["size_bytes"]:,}</td>' in html
    assert "0.125" in html and "estimate (this machine)" in html and "swept on 16 samples" in html
    assert "a &lt;b&gt;small&lt;/b&gt; MLP" in html and "<b>small</b>" not in html
    assert html.count("Plotly.newPlot") == 2
    assert len(re.findall(r"plotly\.js v\d", html)) == 1  # the library inlined once, before the first chart
    assert "<script src=" not in html and "<script charset=\"utf-8\" src=" not in html  # nothing loaded from the network
    assert "&quot;group_size&quot;: 32" in html  # the recipe JSON, escaped
    assert "python" in html and "torch" in html  # environment


def test_environment_names_versions():
    env = report.environment()
    assert env["python"].count(".") == 2 and env["torch"][0].isdigit() and int(env["cpu_count"]) >= 1

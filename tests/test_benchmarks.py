"""The benchmarks keep working: each ``--quick`` run prints tables of real measured numbers.

Speed targets are not asserted here (they are what the benchmarks report); these tests check that
every number is measured (positive, finite, consistent with the verdict printed next to it).
"""

import math
import re
from pathlib import Path

import pytest

import benchmarks.__main__ as runner
from benchmarks import interactivity, memory, quality, runtime, sensitivity

APP = Path(__file__).resolve().parent.parent / "app.py"


def markdown_tables(text: str) -> list[list[dict]]:
    """Every pipe table in ``text`` as a list of {header: cell} rows (cells stripped strings)."""
    tables, lines = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            lines.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif lines:
            header, _, *rows = lines
            tables.append([dict(zip(header, row)) for row in rows])
            lines = []
    return tables


def number(cell: str) -> float:
    """A table cell as a finite float ("~" marks an extrapolation, "x" a ratio)."""
    value = float(cell.removeprefix("~").removesuffix("x"))
    assert math.isfinite(value), cell
    return value


def navigation_titles() -> list[str]:
    """Page titles as app.py declares them (st.Page(..., title="...")), in menu order."""
    return re.findall(r'st\.Page\([^)]*title="([^"]+)"', APP.read_text())


def test_quality_quick_scores_every_tool_on_digits_mlp():
    text = quality.main(["--quick"])
    fp32 = float(re.search(r"## digits-mlp \(FP32 accuracy = ([0-9.]+)\)", text).group(1))
    main_table, low_bit = markdown_tables(text)
    tools = {row["tool"] for row in main_table}
    assert tools == {"qcore", "torch.ao", "onnxruntime"}
    scores = {row["method (W8A8 unless stated)"]: row["accuracy"] for row in main_table}
    assert len(scores) == len(main_table) >= 10
    assert fp32 > 0.9  # the digits MLP is trained, not random
    assert abs(number(scores["int8-static"]) - fp32) < 0.05  # int8 barely moves a small MLP
    for method, cell in scores.items():
        if not cell.startswith("n/a"):
            assert 0.0 <= number(cell) <= 1.0, method
    assert [row["weights"] for row in low_bit] == ["int4", "int3", "int2"]
    for row in low_bit:
        cells = [number(v) for k, v in row.items() if k != "weights"]
        assert len(cells) == 9 and all(0.0 <= v <= 1.0 for v in cells)
    best_own, best_peer = map(float, re.search(r"\(([0-9.]+) vs ([0-9.]+)\)", text).groups())
    assert best_own == max(number(row["accuracy"]) for row in main_table if row["tool"] == "qcore")
    assert best_peer == max(number(row["accuracy"]) for row in main_table
                            if row["tool"] != "qcore" and not row["accuracy"].startswith("n/a"))


def test_sensitivity_quick_times_the_sweep_and_the_naive_loop_on_both_digits_models():
    (rows,) = markdown_tables(sensitivity.main(["--quick"]))
    assert [row["model"] for row in rows] == ["digits-mlp", "digits-cnn"]
    for row in rows:
        cold, naive, naive_same = (number(row[k]) for k in (
            "cold sweep (s)", "naive, all samples (s)", "naive, sweep's samples (s)"))
        assert cold > 0 and naive > 0 and naive_same > 0
        assert all(number(row[k]) > 0 for k in ("shared (s)", "from memory (ms)", "from disk (ms)"))
        # the printed ratios are the printed times divided (to the table's rounding)
        for ratio, naive_s in (("ratio", naive), ("ratio (same samples)", naive_same)):
            assert number(row[ratio]) == pytest.approx(naive_s / cold, abs=0.05 + 0.1 * naive_s / cold)


def test_runtime_quick_measures_latency_and_file_size_of_every_export():
    text = runtime.main(["--quick"])
    measured, estimates = markdown_tables(text)
    by_method = {(row["tool"], row["method"]): row for row in measured}
    fp32 = by_method[("onnxruntime", "FP32")]
    assert number(fp32["size / FP32"]) == 1.0 and number(fp32["speed-up"]) == 1.0
    for row in measured:
        assert number(row["batch 1 ms"]) > 0 and number(row["batch B ms"]) > 0 and number(row["size MiB"]) > 0
        assert 0.0 <= number(row["accuracy"]) <= 1.0
    int8 = by_method[("qcore -> onnxruntime", "int8-static")]
    assert number(int8["size / FP32"]) < 0.5  # a real int8 file: about a quarter of FP32 plus scales and graph
    assert number(int8["size / FP32"]) >= number(int8["physical limit"]) - 0.01
    assert "ESTIMATES" in text and len(estimates) >= 1
    for row in estimates:
        assert all(number(v) > 0 for k, v in row.items() if k.endswith("µs"))


def test_runner_writes_interactivity_into_the_readme_section(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{runner.START}\nold results\n{runner.END}\n\n## After\n")
    monkeypatch.setattr(runner, "README", readme)

    assert runner.main(["--quick", "--only", "interactivity", "--write-readme"]) == 0

    text = readme.read_text()
    assert text.startswith(f"# Title\n\nintro\n\n{runner.START}\n") and text.endswith(f"{runner.END}\n\n## After\n")
    assert "old results" not in text and "(quick mode)" in text and "### interactivity" in text
    section = text.split(runner.START)[1].split(runner.END)[0]
    (rows,) = markdown_tables(section)
    assert [row["page"] for row in rows] == navigation_titles()
    assert {row["model"] for row in rows} == {"digits-mlp"}
    for row in rows:
        cold, first, warm = (number(row[k]) for k in ("cold (s)", "first change (s)", "warm, median of 3 (s)"))
        assert 0 < cold < 600 and 0 < first < 600 and 0 < warm < 600
        verdict = row[f"warm < {interactivity.TARGET_S} s"]
        assert verdict.startswith("pass" if warm < interactivity.TARGET_S else "FAIL")
        assert f"{warm:.3f} s" in verdict  # the verdict states the measured value


def test_runner_refuses_a_readme_without_markers_before_running(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# No benchmark section\n")
    monkeypatch.setattr(runner, "README", readme)
    assert runner.main(["--quick", "--only", "memory", "--write-readme"]) == 2
    assert readme.read_text() == "# No benchmark section\n"
    assert runner.START in capsys.readouterr().err


@pytest.mark.browser
def test_memory_quick_reads_the_servers_resident_memory():
    (rows,) = markdown_tables(memory.main(["--quick"]))
    (row,) = rows
    assert row["model"] == "digits-mlp"
    idle, one, three, peak, extra = (number(row[k]) for k in (
        "RSS idle (MiB)", "RSS, 1 session (MiB)", "RSS, 3 sessions (MiB)", "peak RSS (MiB)", "extra per session (MiB)"))
    assert 20 < idle < one  # a session imports torch and loads the model into the server
    assert one - idle > 50
    assert peak >= three > 0
    assert extra == pytest.approx((three - one) / 2, abs=0.11)  # the table rounds to 0.1 MiB
    assert number(row["first session rendered in (s)"]) > 0 and number(row["other 2 rendered in (s)"]) > 0


def test_readme_keeps_the_results_of_benchmarks_not_run_again(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{runner.START}\npreamble\n### runtime\n\nold runtime\n\n### quality\n\nq 0.97\n"
                      f"{runner.END}\nafter\n")
    monkeypatch.setattr(runner, "README", readme)
    runner.write_readme({"runtime": "### runtime\n\nnew runtime\n", "memory": "### memory\n\n12 MiB\n"})
    section = readme.read_text().split(runner.START)[1].split(runner.END)[0]
    assert section == "\n### quality\n\nq 0.97\n\n### runtime\n\nnew runtime\n\n### memory\n\n12 MiB\n\n"
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith(f"{runner.END}\nafter\n")

"""Mutation probe: do the tests notice when one line of the engine is wrong?

    python -m benchmarks.mutation_probe [--tests tests/test_a.py tests/test_b.py] [--focused] [--only 3,7] [--list]

Each mutant changes one line: in a file, an exact substring that must occur there exactly once is replaced.
Mutants are located by text, not line numbers: when the substring is not in the named file (code moved),
every ``qcore/**/*.py`` is searched and the one file holding it exactly once is used; a mutant found in no
file, or in several, is reported "not found" / "ambiguous" and not run.

The repository is copied once to a temporary directory (without .git); each mutant is applied to the copy,
the chosen pytest selection runs there (default: the whole suite with ``-x -q -p no:cacheprovider -m "not
browser"``; ``--tests`` narrows it, ``--focused`` runs each mutant's own oracle tests), and the file is
restored and checked to be byte-identical before the next mutant. A mutant is *killed* when pytest fails
(exit code 1: a test went red), *survived* when it passes; any other exit code (collection error, timeout)
is reported as such. The working tree is never modified.

``probe(...)`` returns the rows (one dict per mutant: id, target, description, file, status, seconds) that
``main`` prints as a Markdown table with a summary line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not browser"]
NUMERICS, CALIBRATION, ANALYSIS = ("tests/numerics/test_oracles_numerics.py",), ("tests/model/test_oracles_calibration.py",), \
    ("tests/analysis/test_oracles_analysis.py",)
TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutant:
    target: str  # the idea it breaks, e.g. "sensitivity"
    path: str  # where the line lives today (relative to the repo root)
    find: str  # exact substring, unique in its file
    replace: str
    description: str
    tests: tuple[str, ...] = ()  # the oracle tests meant to kill it (--focused)


MUTANTS = [
    Mutant("sensitivity", "qcore/analysis/sensitivity.py", "10.0 * math.log10(signal / noise)",
           "10.0 * math.log10(signal / noise) + 3.0", "layer SQNR 3 dB too high", ANALYSIS),
    Mutant("sensitivity", "qcore/analysis/sensitivity.py",
           "drop = fp32_metric - metric if task.higher_is_better else metric - fp32_metric",
           "drop = metric - fp32_metric if task.higher_is_better else fp32_metric - metric", "metric drop sign flipped",
           ANALYSIS),
    Mutant("sensitivity", "qcore/analysis/sensitivity.py",
           'group.sort(key=lambda r: (-sign * r["metric_drop"], sign * r["sqnr_db"]))',
           'group.sort(key=lambda r: (sign * r["metric_drop"], sign * r["sqnr_db"]))', "rank 1 = least sensitive",
           ANALYSIS),
    Mutant("calibration", "qcore/model/calibrate.py", "EMA_CONSTANT = 0.01", "EMA_CONSTANT = 0.1",
           "moving-average constant 0.1 instead of torch.ao's 0.01", CALIBRATION),
    Mutant("calibration", "qcore/model/calibrate.py", "s.min, s.max = min(s.min, lo), max(s.max, hi)",
           "s.min, s.max = max(s.min, lo), max(s.max, hi)", "running min takes the max", CALIBRATION),
    Mutant("calibration", "qcore/model/calibrate.py",
           "s.channel_absmax = ch if s.channel_absmax is None else torch.maximum(s.channel_absmax, ch)",
           "s.channel_absmax = ch if s.channel_absmax is None else torch.minimum(s.channel_absmax, ch)",
           "per-channel absmax keeps the minimum over batches", CALIBRATION),
    Mutant("calibration", "qcore/model/calibrate.py", "/ (hi - lo) * HIST_BINS).long()",
           "/ (hi - lo) * (HIST_BINS - 1)).long()",
           "histogram bins stretched by one bin", CALIBRATION),
    Mutant("search", "qcore/analysis/search.py", "steps.sort(key=lambda s: s[:3])",
           "steps.sort(key=lambda s: s[:3], reverse=True)", "greedy order reversed (costliest per byte first)",
           ANALYSIS),
    Mutant("search", "qcore/analysis/search.py", 'result.fp32_metric - sign * sum(drops.values())',
           'result.fp32_metric - sign * max(drops.values())', "estimate uses the max drop instead of the sum",
           ANALYSIS),
    Mutant("search", "qcore/analysis/search.py", 'return max(row.metric_drop, 0.0) + NOISE_WEIGHT * noise',
           'return row.metric_drop + NOISE_WEIGHT * noise', "negative drops not clamped in the greedy cost",
           ANALYSIS),
    Mutant("search", "qcore/analysis/search.py",
           'best = max(ok, key=lambda e: (sign * e.metric, -e.size_bytes)) if ok',
           'best = min(ok, key=lambda e: (sign * e.metric, -e.size_bytes)) if ok',
           "budget goal picks the worst recipe that fits", ANALYSIS),
    Mutant("roofline", "qcore/analysis/roofline.py", "memory_ms = nbytes / (prof.memory_bandwidth_gb_s * 1e9) * 1e3",
           "memory_ms = nbytes / (prof.memory_bandwidth_gb_s * 1e9) * 2e3", "memory time doubled", ANALYSIS),
    Mutant("roofline", "qcore/analysis/roofline.py", '"int8": "fp16", "fp8"', '"int8": "fp32", "fp8"',
           "int8 falls back to fp32 instead of fp16", ANALYSIS),
    Mutant("roofline", "qcore/analysis/roofline.py", 'ops = 2.0 * w["macs"] * batch_size',
           'ops = 1.0 * w["macs"] * batch_size', "a multiply-add counted as one operation", ANALYSIS),
    Mutant("metrics", "qcore/numerics/metrics.py", "10.0 * math.log10(signal / noise)",
           "20.0 * math.log10(signal / noise)", "SQNR as an amplitude ratio (20 log10)", NUMERICS),
    Mutant("metrics", "qcore/numerics/metrics.py", "cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)",
           "cos = (a * b).sum(1)", "cosine without normalising", NUMERICS),
    Mutant("metrics", "qcore/numerics/metrics.py", "(log_p.exp() * (log_p - log_q))", "(log_q.exp() * (log_q - log_p))",
           "KL direction reversed", NUMERICS),
    Mutant("sizes", "qcore/model/size.py", "SCALE_BYTES = 4", "SCALE_BYTES = 2", "scales counted as 2 bytes", ANALYSIS),
    Mutant("sizes", "qcore/model/size.py", "codes = math.ceil(numel * fmt.bits / 8)",
           "codes = numel * math.ceil(fmt.bits / 8)", "sub-byte codes not packed", ANALYSIS),
    Mutant("sizes", "qcore/numerics/formats.py", 'return ("scale",) if symmetric else ("scale", "zero_point")',
           'return ("scale", "zero_point")', "symmetric formats charged zero-points", ANALYSIS),
    Mutant("formats", "qcore/numerics/formats.py", "q = torch.round(x.float() / scale.float()[:, None])",
           "q = torch.floor(x.float() / scale.float()[:, None])", "int rounding floors", NUMERICS),
    Mutant("formats", "qcore/numerics/formats.py", "return 2 ** (self.bits - 1) - 1", "return 2 ** (self.bits - 1)",
           "qmax one too large", NUMERICS),
    Mutant("formats", "qcore/numerics/formats.py", "scale = _safe_scale(amax / self.qmax)",
           "scale = _safe_scale(amax / (self.qmax + 0.5))", "symmetric scale amax/127.5 (torch's convention)",
           NUMERICS),
    Mutant("formats", "qcore/numerics/formats.py",
           "zero_point = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)",
           "zero_point = torch.clamp(torch.round(self.qmax - lo / scale), self.qmin, self.qmax)",
           "affine zero-point from qmax", NUMERICS),
    Mutant("formats", "qcore/numerics/formats.py", "midpoints = (cb[1:] + cb[:-1]) / 2", "midpoints = cb[1:]",
           "nf4 rounds down to the codebook instead of to the nearest", NUMERICS),
    Mutant("formats", "qcore/numerics/formats.py", "return torch.clamp(x, -m, m).to(self.dtype).to(torch.float32)",
           "return x.to(self.dtype).to(torch.float32)", "float casts do not saturate", NUMERICS),
    Mutant("formats", "qcore/numerics/formats.py", '("formats", 105)), "BF16 (bfloat16)", "", torch.bfloat16, 8, 7)',
           '("formats", 105)), "BF16 (bfloat16)", "", torch.float16, 8, 7)', "bf16 cast as fp16", NUMERICS),
    Mutant("latency", "qcore/export/bench.py", 'return {"median": float(med),',
           'return {"median": float(np.mean(values)),', "spread's median is the mean", ANALYSIS),
    Mutant("latency", "qcore/export/bench.py", '"median_ratio": float(np.median(base_ms) / np.median(other_ms))',
           '"median_ratio": float(np.mean(base_ms) / np.mean(other_ms))', "speed-up as a ratio of means", ANALYSIS),
    Mutant("pareto", "qcore/analysis/search.py", 'if best is None or metric > best[1] or (size, metric) == best:', 'if best is None or metric >= best[1] or (size, metric) == best:',
           "Pareto front keeps ties (non-strict dominance)", ANALYSIS),
    Mutant("ranges", "qcore/numerics/ranges.py", "k = min(max(math.ceil(round(q * n, 9)), 1), n)",
           "k = min(max(math.floor(round(q * n, 9)), 1), n)", "percentile one rank low", NUMERICS),
    Mutant("ranges", "qcore/numerics/ranges.py", "amax = _quantile(x.abs(), p, w)", "amax = _quantile(x, p, w)",
           "symmetric percentile of x instead of abs(x)", NUMERICS),
    Mutant("ranges", "qcore/numerics/ranges.py", "for k in range(MSE_GRID, 0, -1):",
           "for k in range(MSE_GRID, MSE_GRID // 2, -1):", "MSE searches only half the clip grid", NUMERICS),
    Mutant("ranges", "qcore/numerics/ranges.py", "p[:, -1] += hist[:, i:].sum(1)", "p[:, -1] += 0",
           "entropy reference drops the clipped outliers", CALIBRATION),
    Mutant("granularity", "qcore/numerics/granularity.py", "return x.movedim(axis, 0).reshape(x.shape[axis], -1)",
           "return x.reshape(x.shape[axis], -1)", "per_channel ignores the axis", NUMERICS),
    # the recipe, training and file-level analyses (their own test files are the oracles named)
    Mutant("recipe", "qcore/numerics/spec.py", "g = group_size_for(fan_in(tuple(shape)), self.group_size)",
           "g = self.group_size", "group size not fitted to the layer's fan-in", ("tests/recipe/test_recipe_links.py", "tests/recipe/test_recipe.py")),
    Mutant("recipe", "qcore/recipe/core.py", "specs.append(default if written is KEEP else None)",
           "specs.append(default)", "a layer entry's null part inherits the default instead of staying float",
           ("tests/recipe/test_recipe_links.py", "tests/recipe/test_recipe.py")),
    Mutant("qat", "qcore/numerics/ste.py", "return (grad if inside is None else grad * inside), None, None, None",
           "return grad, None, None, None", "the STE passes gradients of clipped values", ("tests/training/test_qat.py",)),
    Mutant("sweep cache", "qcore/analysis/sweep_cache.py", "task.kind, task.headline, task.higher_is_better,",
           "task.kind, task.higher_is_better,", "the cache key ignores the headline metric", ("tests/analysis/test_sensitivity.py", "tests/analysis/test_integrity.py")),
    Mutant("summary", "qcore/analysis/summary.py", '"share": info.params / total,', '"share": info.params / (total + 1),',
           "a layer's share of the weights off by one parameter", ("tests/test_cli.py", "tests/frontend/test_app.py")),
    Mutant("export policy", "qcore/export/policy.py", "    if kind == \"Embedding\":\n        return \"the table is dequantized",
           "    if kind == \"Embeddin\":\n        return \"the table is dequantized", "embeddings explained as a missing int8 kernel",
           ("tests/export/test_runtime.py",)),
]


def locate(root: Path, m: Mutant) -> tuple[str, Path | None]:
    """("ok", file) when ``m.find`` occurs exactly once in ``m.path`` or, failing that, in exactly one
    ``qcore/**/*.py``; else ("not found" | "ambiguous", None)."""
    named = root / m.path
    if named.is_file():
        count = named.read_text().count(m.find)
        if count == 1:
            return "ok", named
        if count > 1:
            return "ambiguous", None
    holders = [p for p in sorted((root / "qcore").rglob("*.py")) if m.find in p.read_text()]
    if len(holders) == 1 and holders[0].read_text().count(m.find) == 1:
        return "ok", holders[0]
    return ("ambiguous" if holders else "not found"), None


def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".hypothesis", ".pytest_cache", "*.pyc")
    shutil.copytree(ROOT, dest / "repo", ignore=ignore)
    return dest / "repo"


def run_mutant(repo: Path, m: Mutant, tests: list[str], env: dict) -> tuple[str, str, float]:
    """Apply ``m`` in ``repo``, run pytest, restore. Returns (status, file relative to repo, seconds)."""
    status, path = locate(repo, m)
    if path is None:
        return status, "", 0.0
    original = path.read_bytes()
    start = time.perf_counter()
    try:
        path.write_text(original.decode().replace(m.find, m.replace, 1))
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=repo, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=TIMEOUT_S)
            status = {0: "SURVIVED", 1: "killed"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
        except subprocess.TimeoutExpired:
            status = f"timeout ({TIMEOUT_S} s)"
    finally:
        path.write_bytes(original)
    assert path.read_bytes() == original, f"{path} was not restored"
    return status, str(path.relative_to(repo)), time.perf_counter() - start


def probe(mutants=MUTANTS, tests: list[str] | None = None, focused: bool = False, progress=None) -> list[dict]:
    """Run every mutant (see the module docstring); one row per mutant."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-probe-") as tmp:
        repo = _copy_repo(Path(tmp))
        env = {**os.environ, "QCORE_CACHE_DIR": str(Path(tmp) / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
        for i, m in enumerate(mutants, 1):
            selection = list(m.tests) if focused and m.tests else list(tests or [])
            status, where, seconds = run_mutant(repo, m, selection, env)
            rows.append({"id": MUTANTS.index(m) + 1 if m in MUTANTS else i, "target": m.target, "description": m.description, "file": where or m.path,
                         "status": status, "seconds": round(seconds, 1)})
            if progress:
                progress(rows[-1])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| # | target | mutant | file | result | s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['target']} | {r['description']} | {r['file']} | {r['status']} | {r['seconds']} |"
              for r in rows]
    killed = sum(r["status"] == "killed" for r in rows)
    survived = [r["id"] for r in rows if r["status"] == "SURVIVED"]
    other = [r["id"] for r in rows if r["status"] not in ("killed", "SURVIVED")]
    lines.append(f"\n{killed} of {len(rows)} mutants killed; survived: {survived or 'none'}; "
                 f"not run or errored: {other or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", nargs="*", help="pytest selection (default: the whole suite)")
    ap.add_argument("--focused", action="store_true", help="run each mutant's own oracle test file")
    ap.add_argument("--only", help="comma-separated mutant numbers (1-based)")
    ap.add_argument("--list", action="store_true", help="list the mutants and whether each is found; run nothing")
    args = ap.parse_args(argv)
    chosen = MUTANTS if not args.only else [MUTANTS[int(i) - 1] for i in args.only.split(",")]
    if args.list:
        text = "\n".join(f"{i:2d}. [{m.target}] {m.description}: {locate(ROOT, m)[0]}" for i, m in enumerate(chosen, 1))
    else:
        text = table(probe(chosen, args.tests, args.focused,
                           progress=lambda r: print(f"{r['id']:2d} {r['status']:<10} {r['description']}",
                                                    file=sys.stderr, flush=True)))
    print(text)
    return text


if __name__ == "__main__":
    main()

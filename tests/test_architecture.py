"""The package dependency rules of ``qcore/__init__``'s docstring, checked on every module's imports.

Imports are read with ``ast`` (module level and inside functions alike), so a lazy import counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QCORE = ROOT / "qcore"
MAX_LINES = 400

# package -> the qcore packages / top-level modules it may import (besides itself)
ALLOWED = {
    "numerics": {"errors"},
    "algorithms": {"numerics", "errors"},
    "recipe": {"numerics", "errors"},
    "model": {"numerics", "recipe", "errors", "algorithms"},
    "io": {"model", "recipe", "numerics", "errors", "limits", "hardware", "zoo", "algorithms"},
    "analysis": {"model", "recipe", "numerics", "errors", "limits", "hardware", "zoo", "algorithms"},
    "export": {"model", "recipe", "numerics", "errors", "limits", "hardware", "zoo", "algorithms"},
    "figures": set(),
    "training": {"model", "recipe", "numerics", "errors", "zoo", "algorithms"},
    "zoo": {"model", "numerics", "errors"},
}
EXCEPTIONS = {  # module -> extra allowed imports, each with its reason
    "qcore.recipe.table": {"model"},  # the Mixed precision table's size column is model.size.weight_bytes
}


def modules():
    for path in sorted(QCORE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imported(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "qcore":  # from qcore import limits: the module named
                names |= {f"qcore.{a.name}" for a in node.names}
            else:
                names.add(mod)
    return names


ALL = list(modules())


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_imports_follow_the_package_rules(module, path):
    parts = module.split(".")
    names = imported(path, module)
    assert not any(n == "streamlit" or n.startswith("streamlit.") for n in names), f"{module} imports Streamlit"
    if len(parts) < 2 or parts[1] not in ALLOWED:
        return  # top-level modules (cli, report, hardware, limits, errors) may use any package
    own = parts[1]
    allowed = ALLOWED[own] | EXCEPTIONS.get(module, set()) | {own}
    for n in names:
        if n.startswith("qcore."):
            target = n.split(".")[1]
            assert target in allowed, f"{module} imports {n}: {own} may import only {sorted(allowed - {own})}"


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_modules_are_short_or_say_why(module, path):
    text = path.read_text()
    lines = text.count("\n")
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_LINES or "longer than" in doc.lower(), \
        f"{module} has {lines} lines (> {MAX_LINES}) and its docstring does not say why it is 'longer than' that"


def test_pages_folder_holds_only_pages():
    """Every file in ``pages/`` is a page of the navigation (``ui/frame.py``, which ``app.py`` runs)."""
    nav = (ROOT / "ui" / "frame.py").read_text()
    pages = sorted((ROOT / "pages").glob("*.py"))
    assert pages
    for page in pages:
        assert f"pages/{page.name}" in nav, f"pages/{page.name} is not a page listed in ui/frame.py's navigation"


def test_qcore_never_imports_the_app():
    for module, path in ALL:
        bad = {n for n in imported(path, module) if n.split(".")[0] in ("ui", "pages", "app")}
        assert not bad, f"{module} imports {sorted(bad)}: the engine may not import the app"

"""The house rules, checked on the source: imports run one way, no first-party import hides in a function, sizes stay small."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.env import ROOT

PACKAGES = ("appliance", "filters", "sync", "image")

# layer -> the layers it may import (itself always allowed). Order matters in layer_of: most specific first.
LAYERS = ["appliance.core", "appliance.ha", "appliance.lab", "appliance.cli", "appliance.speaker",
          "appliance.report", "appliance.admin", "appliance.migrate", "appliance.lists",
          "filters.proxy", "filters", "sync", "image", "appliance"]
ALLOWED = {
    "appliance.core": set(),
    "filters": {"appliance.core"},
    "filters.proxy": {"appliance.core", "filters"},
    "sync": {"appliance.core", "filters"},
    "image": {"appliance.core", "sync"},
    "appliance.ha": {"appliance.core"},
    "appliance.lab": {"appliance.core", "appliance.ha", "filters", "filters.proxy", "sync"},
    "appliance.cli": set(LAYERS) - {"appliance.cli"},
    "appliance.speaker": {"appliance.ha"},  # the stable `python -m appliance.speaker` entry point
    "appliance.report": {"appliance.core"},  # access-log reports: read logs, figures, render
    "appliance.admin": {"appliance.core", "appliance.report"},  # the status page server
    "appliance.migrate": {"appliance.core"},  # SquidGuard configuration -> the filter section
    "appliance.lists": {"appliance.core", "filters", "sync"},  # category list updates: fetch, check, compile, swap
    "appliance": set(),
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# functions allowed to be longer, each with the reason
LONG_FUNCTIONS = {
    "filters/engine.py:RuleEngine.decide": "the engine's hot path: one flat function, no calls per decision (benchmarked)",
}


def layer_of(module: str) -> str | None:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def product_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST, module: str, is_pkg: bool):
    """(imported module, line, inside a function) for every import statement."""
    def visit(node: ast.AST, in_func: bool):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, child.lineno, f
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    # `from pkg import mod` imports pkg.mod when that is a module
                    yield (f"{base}.{a.name}" if layer_of(f"{base}.{a.name}") else base), child.lineno, f
            yield from visit(child, f)
    yield from visit(tree, False)


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for path in product_files(root):
        mod = module_name(path, root)
        src = path.read_text()
        lines = src.splitlines()
        me = layer_of(mod)
        for name, line, in_func in imports(ast.parse(src), mod, path.name == "__init__.py"):
            target = layer_of(name)
            if target is None or target == me:
                continue
            where = f"{path.relative_to(root)}:{line}"
            if target not in ALLOWED[me]:
                out.append(f"{where}: {me} imports {name} ({target}), against the direction")
            text = " ".join(lines[max(0, line - 2): line])
            if in_func and "deferred:" not in text:
                out.append(f"{where}: first-party import of {name} inside a function (say '# deferred: why' if on purpose)")
    return out


def test_imports_run_one_way() -> None:
    assert violations() == []


def test_the_direction_test_fails_on_a_wrong_import(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text('"""x"""\n')
    (tmp_path / "filters" / "bad.py").write_text("from appliance.cli import main\n")
    (tmp_path / "sync" / "lazy.py").write_text("def f():\n    from filters import ruleset\n")
    found = violations(tmp_path)
    assert any("filters/bad.py:1" in v and "against the direction" in v for v in found), found
    assert any("sync/lazy.py:2" in v and "inside a function" in v for v in found), found


def test_nothing_imports_the_cli() -> None:
    for path in product_files():
        mod = module_name(path)
        if layer_of(mod) == "appliance.cli":
            continue
        for name, line, _ in imports(ast.parse(path.read_text()), mod, path.name == "__init__.py"):
            assert layer_of(name) != "appliance.cli", f"{path}:{line} imports {name}"


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_sizes(path: Path) -> None:
    src = path.read_text()
    rel = str(path.relative_to(ROOT))
    assert len(src.splitlines()) <= MAX_MODULE_LINES, f"{rel}: {len(src.splitlines())} lines"
    assert src.lstrip().startswith(('"""', "'''")), f"{rel}: no module docstring"
    long = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                n = child.end_lineno - child.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}:{name}" not in LONG_FUNCTIONS:
                    long.append(f"{name} ({n} lines)")
                walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
    walk(ast.parse(src), "")
    assert not long, f"{rel}: functions over {MAX_FUNCTION_LINES} lines: {long}"

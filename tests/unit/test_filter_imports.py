"""filters/ outside filters/proxy stays pure: no mitmproxy, no event loop, no first-party import but appliance.core."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("mitmproxy", "asyncio", "selectors", "filters.proxy")  # the proxy lives in filters/proxy only
FIRST_PARTY = ("appliance", "filters", "sync", "image")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_rule_engine_modules_import_no_proxy_and_only_core():
    bad = []
    for path in sorted((ROOT / "filters").glob("*.py")):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
            elif top in FIRST_PARTY and top != "filters" and not name.startswith("appliance.core"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} (only appliance.core)")
    assert not bad, "\n".join(bad)

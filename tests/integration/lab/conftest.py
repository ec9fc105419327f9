"""The namespace lab tests: when one fails, each node's ha.log and carp.log tail (the transitions each script applied,
the engines' own messages) go to the terminal, since the lab and its files are gone once the module ends."""
from __future__ import annotations

import sys

import pytest

LAB_FIXTURES = ("lab", "lab3")


@pytest.fixture(autouse=True)
def _lab_logs_on_failure(request: pytest.FixtureRequest):
    failed = request.session.testsfailed
    yield
    names = [f for f in LAB_FIXTURES if f in request.fixturenames]
    if request.session.testsfailed == failed or not names:
        return
    lab = request.getfixturevalue(names[0])
    for node, n in getattr(lab, "nodes", {}).items():
        for log in (n.state / "ha.log", n.dir / "carp.log"):
            tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else ["(none)"]
            print(f"\n--- {node} {log.name} (tail) ---\n" + "\n".join(tail), file=sys.__stderr__)

"""appliance-sync.service's ExecStart (packaging/debian/libexec/appliance-sync-due): `appliance sync` runs only when
sync.schedule is due in this minute and this node is the MASTER; a backup's tick starts nothing."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tests.support import due_script


@pytest.fixture
def due_mod(tmp_path: Path, monkeypatch):
    return due_script.load("appliance-sync-due", "sync:\n  schedule: '* * * * *'\n", tmp_path, monkeypatch)


def _role(d: Path, role: str | None, raw: str | None = None) -> None:
    (d / "role.json").write_text(raw if raw is not None else json.dumps({"role": role, "vhid": 1}))


def test_master_syncs_when_due(due_mod, tmp_path: Path) -> None:
    _role(tmp_path, "MASTER")
    assert due_mod.main() == 0 and due_mod.execs == [[due_mod.APPLIANCE, "-c", due_mod.CONFIG, "sync", "--json"]]


@pytest.mark.parametrize("role,raw", [("BACKUP", None), ("INIT", None), (None, "{not json"), (None, "[1]")])
def test_a_node_that_is_not_master_starts_nothing(due_mod, tmp_path: Path, role, raw) -> None:
    _role(tmp_path, role, raw)
    assert due_mod.main() == 0 and due_mod.execs == []


def test_no_role_file_starts_nothing(due_mod) -> None:
    assert due_mod.main() == 0 and due_mod.execs == []


def test_not_due_starts_nothing_even_on_the_master(due_mod, tmp_path: Path) -> None:
    _role(tmp_path, "MASTER")
    Path(due_mod.CONFIG).write_text("sync:\n  schedule: '0 0 1 1 *'\n")
    now = dt.datetime(2026, 6, 1, 12, 30)
    assert not due_mod.due("0 0 1 1 *", now) and due_mod.due("*/5 * * * *", now)
    if not due_mod.due("0 0 1 1 *", dt.datetime.now()):
        assert due_mod.main() == 0 and due_mod.execs == []


def test_a_bad_schedule_is_named_and_exits_2(due_mod, tmp_path: Path, capsys) -> None:
    _role(tmp_path, "MASTER")
    Path(due_mod.CONFIG).write_text("sync:\n  schedule: 'every day'\n")
    assert due_mod.main() == 2 and due_mod.execs == []
    assert "sync.schedule 'every day'" in capsys.readouterr().err

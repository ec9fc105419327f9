"""The sync key's `logs` verb without ssh: its arguments, what its stream holds, and the client reading a fake ssh."""
from __future__ import annotations

import gzip
import io
import os
import stat
from pathlib import Path

import pytest
import yaml

from appliance.core.paths import Paths
from sync import logs
from sync.errors import SyncError
from sync.peer import Peer
from tests.support.env import config_tree
from tests.unit.test_report_parse import T0, line


@pytest.mark.parametrize("argv,since", [(["logs"], None), (["logs", "--since", "1704276000"], 1704276000.0)])
def test_arguments(argv, since):
    assert logs.parse_args(argv) == since


@pytest.mark.parametrize("argv", [["logs", "/etc/shadow"], ["logs", "--since", "-1"], ["logs", "--since"],
                                  ["logs", "--since", "1", "/etc/shadow"], ["logs", "--path=/etc/shadow"]])
def test_no_path_and_nothing_else_is_taken(argv):
    with pytest.raises(SyncError, match="takes no path") as e:
        logs.parse_args(argv)
    assert e.value.exit_code == 2


def _node(tmp_path: Path, access_log: str) -> Paths:
    """A state dir whose live release (releases/1 + current) names `access_log`."""
    rel = config_tree(tmp_path / "state" / "releases" / "1")
    data = yaml.safe_load((rel / "appliance.yaml").read_text())
    data["proxy"]["access_log"] = access_log
    (rel / "appliance.yaml").write_text(yaml.safe_dump(data))
    os.symlink("releases/1", tmp_path / "state" / "current")
    return Paths(tmp_path / "state")


def test_the_stream_holds_only_records_oldest_file_first(tmp_path):
    log = tmp_path / "log" / "access.log"
    log.parent.mkdir()
    with gzip.open(log.with_name("access.log.2.gz"), "wt") as f:
        f.write(line(ts=T0 - 7200) + "secret: hunter2\n")
    log.with_name("access.log.1").write_text(line(ts=T0 - 3600, tag="block:adult", code="TCP_DENIED", status=403))
    log.write_text(line(ts=T0) + line(ts=T0 + 1)[:-1])  # the last record without its newline (being written)
    out = io.BytesIO()
    r = logs.serve(["logs"], _node(tmp_path, str(log)), out)
    text = gzip.decompress(out.getvalue()).decode()
    assert r == {"ok": True, "sent": 4, "dropped": 1} and "hunter2" not in text
    assert text == (logs.MAGIC + "#file access.log.2.gz\n" + line(ts=T0 - 7200) + "#file access.log.1\n"
                    + line(ts=T0 - 3600, tag="block:adult", code="TCP_DENIED", status=403) + "#file access.log\n"
                    + line(ts=T0) + line(ts=T0 + 1) + "#end 4 1\n")
    out = io.BytesIO()
    os.utime(log.with_name("access.log.2.gz"), (T0 - 7000, T0 - 7000))
    logs.serve(["logs", "--since", str(int(T0))], _node(tmp_path / "b", str(log)), out)
    assert gzip.decompress(out.getvalue()).decode().count("#file") == 2  # .2.gz last written before --since


def test_no_log_file_is_an_error(tmp_path):
    with pytest.raises(SyncError, match="proxy.access_log is '-'"):
        logs.serve(["logs"], _node(tmp_path, "-"), io.BytesIO())
    with pytest.raises(SyncError, match="no live config"):
        logs.serve(["logs"], Paths(tmp_path / "empty"), io.BytesIO())


class _FakePeer(Peer):
    """A peer whose ssh is a script printing a payload (a fake: the real sshd path is tests/integration/report)."""

    def ssh_argv(self) -> list[str]:
        return [str(self.key.with_name("ssh"))]


def _fake_ssh(d: Path, payload: bytes, code: int = 0) -> Peer:
    d.mkdir()
    (d / "payload").write_bytes(payload)
    ssh = d / "ssh"
    ssh.write_text(f"#!/bin/sh\ncat {d / 'payload'}\nexit {code}\n")
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR)
    (d / "key").write_text("k")
    return _FakePeer("fw2", "127.0.0.2", 22, "root", d / "key", d / "known_hosts", None, 5)


def test_client_reads_records_and_refuses_a_cut_stream_or_too_much(tmp_path):
    body = (logs.MAGIC + "#file access.log\n" + line(ts=T0) + "#end 1 0\n").encode()
    peer = _fake_ssh(tmp_path / "ok", gzip.compress(body))
    assert list(logs.remote_lines(peer)) == [("access.log", line(ts=T0))]
    cut = _fake_ssh(tmp_path / "cut", gzip.compress(body[:-9]))
    with pytest.raises(SyncError, match="cut short"):
        list(logs.remote_lines(cut))
    with pytest.raises(SyncError, match="over 10 bytes"):
        list(logs.remote_lines(peer, max_bytes=10))
    refused = _fake_ssh(tmp_path / "no", b'{"ok": false, "code": 2, "error": "logs: it takes no path"}\n', 2)
    with pytest.raises(SyncError, match="takes no path"):
        list(logs.remote_lines(refused))

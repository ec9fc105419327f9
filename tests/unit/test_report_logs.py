"""The sync key's `logs` verb without ssh: its arguments, what its stream holds, and the client reading a fake ssh."""
from __future__ import annotations

import gzip
import io
import os
import stat
import tracemalloc
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


@pytest.fixture
def logdir(tmp_path, monkeypatch) -> Path:
    """This node's log directory (APPLIANCE_LOG_DIR): the only one the verb reads."""
    d = tmp_path / "log"
    d.mkdir()
    monkeypatch.setenv("APPLIANCE_LOG_DIR", str(d))
    return d


def _text(out: io.BytesIO) -> str:
    return gzip.decompress(out.getvalue()).decode()


def test_the_stream_holds_only_records_oldest_file_first(tmp_path, logdir):
    log = logdir / "access.log"
    with gzip.open(log.with_name("access.log.2.gz"), "wt") as f:
        f.write(line(ts=T0 - 7200) + "secret: hunter2\n")
    log.with_name("access.log.1").write_text(line(ts=T0 - 3600, tag="block:adult", code="TCP_DENIED", status=403))
    log.write_text(line(ts=T0) + line(ts=T0 + 1)[:-1])  # the last record without its newline (being written)
    out = io.BytesIO()
    r = logs.serve(["logs"], _node(tmp_path, str(log)), out)
    text = _text(out)
    assert r == {"ok": True, "sent": 4, "truncated": False} and "hunter2" not in text
    assert text == (logs.MAGIC.decode() + "#file access.log.2.gz\n" + line(ts=T0 - 7200) + "#file access.log.1\n"
                    + line(ts=T0 - 3600, tag="block:adult", code="TCP_DENIED", status=403) + "#file access.log\n"
                    + line(ts=T0) + line(ts=T0 + 1) + "#end 4\n")  # no count of the dropped lines (review F4)
    out = io.BytesIO()
    os.utime(log.with_name("access.log.2.gz"), (T0 - 7000, T0 - 7000))
    logs.serve(["logs", "--since", str(int(T0))], _node(tmp_path / "b", str(log)), out)
    assert _text(out).count("#file") == 2  # .2.gz last written before --since


def test_no_log_file_is_an_error(tmp_path, logdir):
    with pytest.raises(SyncError, match="proxy.access_log is '-'"):
        logs.serve(["logs"], _node(tmp_path, "-"), io.BytesIO())
    with pytest.raises(SyncError, match="no live config"):
        logs.serve(["logs"], Paths(tmp_path / "empty"), io.BytesIO())


@pytest.mark.parametrize("where", ["/etc/shadow", "/proc/kcore", "/etc/passwd-missing", "{d}/../secret.txt",
                                   "{d}/sub/access.log", "{d}", "{d}/", "relative.log"])
def test_a_pushed_access_log_outside_the_log_dir_is_refused_unread(tmp_path, logdir, where):
    """Review F1/F4: whatever a pushed config names, only files directly in the node's log dir are read; the
    refusal is one message whether or not the file exists (nothing about it leaks)."""
    out = io.BytesIO()
    with pytest.raises(SyncError) as e:
        logs.serve(["logs"], _node(tmp_path, where.format(d=logdir)), out)
    assert str(e.value) == logs.REFUSED_PATH and e.value.exit_code == 1 and out.getvalue() == b""


def test_links_fifos_and_devices_in_the_log_dir_are_not_read(tmp_path, logdir):
    secret = tmp_path / "secret.log"
    secret.write_text(line(ts=T0, client="10.6.6.6"))
    log = logdir / "access.log"
    os.symlink(secret, log)  # the live file a link out: not followed (O_NOFOLLOW)
    os.symlink(secret, logdir / "access.log.1")  # a symlinked rotation: not followed
    os.mkfifo(logdir / "access.log.2")  # a FIFO: never opened for a blocking read
    os.symlink("/dev/zero", logdir / "access.log.3")
    (logdir / "access.log.4").write_text(line(ts=T0 - 10))
    out = io.BytesIO()
    r = logs.serve(["logs"], _node(tmp_path, str(log)), out)
    assert r["sent"] == 1 and _text(out) == logs.MAGIC.decode() + "#file access.log.4\n" + line(ts=T0 - 10) + "#end 1\n"


def test_a_bomb_is_read_in_bounded_memory_and_stops_at_the_budget(tmp_path, logdir):
    """Review F1: a long line without a newline is dropped in bounded reads, never held; the bytes read (sent or
    dropped) and the time have a cap, after which the stream says #truncated and ends cleanly."""
    log = logdir / "access.log"
    with gzip.open(log.with_name("access.log.1.gz"), "wb", compresslevel=1) as f:
        for _ in range(32):  # 32 MiB of zeros, no newline
            f.write(bytes(1 << 20))
        f.write(b"\n" + line(ts=T0).encode())
    log.write_text(line(ts=T0 + 1))
    paths = _node(tmp_path, str(log))
    tracemalloc.start()
    try:
        out = io.BytesIO()
        r = logs.serve(["logs"], paths, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r == {"ok": True, "sent": 2, "truncated": False} and peak < 8 << 20, peak
    out = io.BytesIO()
    r = logs.serve(["logs"], paths, out, max_read=8 << 20)
    assert r == {"ok": True, "sent": 0, "truncated": True} and _text(out).endswith("#truncated\n#end 0\n")
    out = io.BytesIO()
    assert logs.serve(["logs"], paths, out, seconds=0)["truncated"]


def test_records_are_printable_ascii_with_bounded_fields(tmp_path, logdir):
    """Review F2/F3: a record-shaped line carrying ESC, other controls or non-ASCII bytes, or an over-long field,
    never leaves the node."""
    esc = (b"1764460000.000      1 \x1b[2J\x1b]0;PWNED\x1b\\ TCP_MISS/200 10 GET http://evil.example\x1b]52;c;"
           b"cm0gLXJmIH4K\x1b\\/ - HIER_DIRECT/1.2.3.4 text/html [block:\x1b[5;31madult]\n")  # the review's line
    log = logdir / "access.log"
    good = line(ts=T0).encode()
    raw = good.replace(b"http://a.test/x", b"http://\xc3\xa9.test/")  # the proxy's log escapes these: a crafted file
    log.write_bytes(esc + good + raw + good[:-1] + b" [block:a\x07b]\n" + good.replace(b"10.0.0.5", b"c" * 300)
                    + good.replace(b"http://a.test/x", b"http://a.test/" + b"x" * 9000) + good.replace(b" GET ", b" G\tET "))
    out = io.BytesIO()
    assert logs.serve(["logs"], _node(tmp_path, str(log)), out)["sent"] == 1
    assert _text(out) == logs.MAGIC.decode() + "#file access.log\n" + good.decode() + "#end 1\n"


def test_run_sends_one_generic_line_never_a_traceback(tmp_path, logdir, monkeypatch, capsys):
    """Review F4: a failure while streaming (here a rotation that is no gzip: its message would quote its first
    bytes) is one generic line on stderr; the file's bytes and path stay on the node, the next file still counts."""
    monkeypatch.setattr(logs, "_bound_process", lambda: None)  # rlimits are for the forced command's own process
    log = logdir / "access.log"
    log.with_name("access.log.1.gz").write_text("root:$6$secret:19000:0:99999:7:::\n")
    log.write_text(line(ts=T0))
    out = io.BytesIO()
    paths = _node(tmp_path, str(log))
    assert logs.run(["logs"], paths, out) == 0
    assert _text(out) == (logs.MAGIC.decode() + "#file access.log.1.gz\n#unreadable\n#file access.log\n"
                          + line(ts=T0) + "#end 1\n")

    class Boom(io.BytesIO):
        def write(self, b):
            raise ValueError("root:$6$secret")

    assert logs.run(["logs"], paths, Boom()) == 1
    err = capsys.readouterr().err
    assert err == logs.FAILED + "\n" and "secret" not in err and "Traceback" not in err
    assert "stopped by ValueError" in (paths.state / "sync" / "sync.log").read_text()


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
    body = logs.MAGIC + b"#file access.log\n" + line(ts=T0).encode() + b"#end 1\n"
    peer = _fake_ssh(tmp_path / "ok", gzip.compress(body))
    assert list(logs.remote_lines(peer)) == [("access.log", line(ts=T0))]
    cut = _fake_ssh(tmp_path / "cut", gzip.compress(body[:-7]))
    with pytest.raises(SyncError, match="cut short"):
        list(logs.remote_lines(cut))
    with pytest.raises(SyncError, match="over 10 bytes"):
        list(logs.remote_lines(peer, max_bytes=10))
    refused = _fake_ssh(tmp_path / "no", b'{"ok": false, "code": 2, "error": "logs: it takes no path\\u001b[2J"}\n', 2)
    with pytest.raises(SyncError, match="takes no path") as e:
        list(logs.remote_lines(refused))
    assert "\x1b" not in str(e.value)


def test_client_caps_what_a_hostile_peer_sends_unpacked(tmp_path):
    """Review F3: one long line (or too much in all) is refused after a bounded read; escapes in a file name are
    replaced; a line that is no record comes through as text for the report to count (and escape) as bad."""
    head = logs.MAGIC + b"#file acc\x1b]0;PWNED\x07ess.log\n"
    long_line = _fake_ssh(tmp_path / "long", gzip.compress(head + b"0" * (16 << 20) + b"\n#end 0\n", 1))
    tracemalloc.start()
    try:
        with pytest.raises(SyncError, match="a line over 8192 bytes"):
            list(logs.remote_lines(long_line))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    many = _fake_ssh(tmp_path / "many", gzip.compress(head + line(ts=T0).encode() * 1000 + b"#end 1000\n"))
    with pytest.raises(SyncError, match="over 4096 bytes unpacked"):
        list(logs.remote_lines(many, max_unpacked=4096))
    esc = _fake_ssh(tmp_path / "esc", gzip.compress(head + b"\x1b[2J not a record\n#end 0\n"))
    assert list(logs.remote_lines(esc)) == [("acc_]0;PWNED_ess.log", "\x1b[2J not a record\n")]

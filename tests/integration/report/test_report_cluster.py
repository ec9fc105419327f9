"""`appliance report --cluster` over the real sync link (the sync lab's sshd and forced command): the peer's log
records are merged in, read-only; the `logs` verb takes no path and sends nothing that is not a log record."""
from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from appliance.core.loader import load
from sync import peer as syncpeer
from sync.errors import SyncError
from sync.logs import REFUSED_PATH, remote_lines
from tests.unit.test_report_parse import T0, line

ESC = (b"1764460000.000      1 \x1b[2J\x1b]0;PWNED\x1b\\ TCP_MISS/200 10 GET http://evil.example\x1b]52;c;"
       b"cm0gLXJmIH4K\x1b\\/ - HIER_DIRECT/1.2.3.4 text/html [block:\x1b[5;31madult]\n")  # the review's line

pytestmark = pytest.mark.timeout(240)


def _peer_log(lab, path: Path) -> None:
    """Point the backup's live config (only its copy) at its own access log: on real nodes each has its own disk."""
    cfg = lab.backup.config.resolve()
    data = yaml.safe_load(cfg.read_text())
    data["proxy"]["access_log"] = str(path)
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))


def _fw2_peer(lab) -> syncpeer.Peer:
    m = lab.master
    [p] = syncpeer.make_peers(load(m.config), "fw1", m.config.parent, m.key)
    return p


def test_cluster_report_merges_the_peers_log(sync_lab):
    lab = sync_lab
    (lab.root / "access.log").write_text("".join(line(ts=T0 + i, client="10.0.0.1") for i in range(5)))
    fw2 = lab.backup.log_dir / "access.log"  # the peer serves only its own log dir (APPLIANCE_LOG_DIR in the lab)
    fw2.parent.mkdir()
    with gzip.open(fw2.with_name("access.log.2.gz"), "wt") as f:
        f.write("".join(line(ts=T0 - 7200 + i, client="10.0.0.2") for i in range(3)))
    fw2.with_name("access.log.1").write_text(line(ts=T0 - 3600, client="10.0.0.2", code="TCP_DENIED", status=403,
                                                  peer="-", tag="block:adult"))
    fw2.write_text(line(ts=T0 + 100, client="10.0.0.3") + "root:secret-not-a-record\n")
    _peer_log(lab, fw2)
    r = lab.master.appliance("report", "--cluster", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["requests"], s["blocked"], s["bad_lines"]) == (5 + 3 + 1 + 1, 1, 0)  # the junk line never left fw2
    assert s["categories"] == [{"category": "adult", "blocks": 1}]
    assert [(x["node"], x["file"], x["lines"]) for x in s["sources"]] == [
        ("fw1", str(lab.root / "access.log"), 5), ("fw2", "fw2:access.log.2.gz", 3), ("fw2", "fw2:access.log.1", 1),
        ("fw2", "fw2:access.log", 1)]
    assert "secret" not in r.stdout
    since = lab.master.appliance("report", "--cluster", "--json", "--since", "@", timeout=60)
    assert since.returncode == 2 and "--since '@'" in since.stderr


def test_the_logs_verb_reads_nothing_but_log_records(sync_lab):
    lab = sync_lab
    secret = lab.root / "secret.txt"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot for the sync key\n" + line(ts=T0))
    peer = _fw2_peer(lab)
    for where in (secret, Path("/etc/shadow"), Path("/proc/kcore"), lab.root / "missing.log",
                  lab.backup.log_dir / ".." / "secret.txt"):
        _peer_log(lab, where)  # a stolen push could name any file: nothing outside the log dir is read
        with pytest.raises(SyncError) as e:
            list(remote_lines(peer))
        assert str(e.value) == REFUSED_PATH, where  # the same words whether the file exists or not (review F4)
    log = lab.backup.log_dir / "access.log"
    log.parent.mkdir()
    os.symlink(secret, log)  # in the log dir, a link out is not followed either
    _peer_log(lab, log)
    assert list(remote_lines(peer)) == []
    log.unlink()
    log.write_text(line(ts=T0) + "root:secret-not-a-record\n")
    assert list(remote_lines(peer)) == [("access.log", line(ts=T0))]
    for cmd in ("logs /etc/passwd", "logs --since /etc/passwd", "logs --file /etc/shadow", "logs --since 1 2"):
        code, out, _ = peer.run(cmd)
        reply = json.loads(out)
        assert code == 2 and reply["ok"] is False and "takes no path" in reply["error"], (cmd, out)
    with pytest.raises(SyncError, match="no live config|proxy.access_log"):
        _peer_log(lab, Path("-"))
        list(remote_lines(peer))


def test_a_stolen_keys_bomb_fifo_and_escapes_are_bounded_and_never_reach_the_terminal(sync_lab):
    """Review F1-F4 over the real sshd and forced command: a gzip bomb line, a FIFO, a link to /etc/shadow and a
    rotation that is no gzip in the peer's log dir; terminal escapes in a peer's records and in the master's own
    log. The verb ends promptly, sends records only, no traceback or file bytes, and the text view escapes them."""
    lab = sync_lab
    d = lab.backup.log_dir
    d.mkdir()
    with gzip.open(d / "access.log.4.gz", "wb", compresslevel=1) as f:
        for _ in range(32):  # 32 MiB of zeros without a newline: once 3.85 GB RSS for 2 GB
            f.write(bytes(1 << 20))
    (d / "access.log.3.gz").write_text("root:$6$hash-not-for-the-master:19000:0:99999:7:::\n")
    os.symlink("/etc/shadow", d / "access.log.2")
    os.mkfifo(d / "access.log.1")
    (d / "access.log").write_bytes(ESC + line(ts=T0 + 5, client="10.0.0.9").encode())
    _peer_log(lab, d / "access.log")
    (lab.root / "access.log").write_bytes(ESC + line(ts=T0, client="10.0.0.1").encode())
    t0 = time.monotonic()
    r = lab.master.appliance("report", "--cluster", timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 60
    assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout and "hash-not-for" not in r.stdout + r.stderr
    assert "\\x1b[5;31madult" in r.stdout  # the master's own log's category: shown, escaped
    s = json.loads(lab.master.appliance("report", "--cluster", "--json", timeout=120).stdout)
    assert s["requests"] == 3 and [x["file"] for x in s["sources"]][1:] == ["fw2:access.log"]  # the peer's ESC record never left it (2 + 1)
    assert "stopped by" not in (lab.backup.state / "sync" / "sync.log").read_text()
    assert "'access.log.3.gz' unreadable" in (lab.backup.state / "sync" / "sync.log").read_text()

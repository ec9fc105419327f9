"""`appliance report --cluster` over the real sync link (the sync lab's sshd and forced command): the peer's log
records are merged in, read-only; the `logs` verb takes no path and sends nothing that is not a log record."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from appliance.core.loader import load
from sync import peer as syncpeer
from sync.errors import SyncError
from sync.logs import remote_lines
from tests.unit.test_report_parse import T0, line

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
    fw2 = lab.root / "fw2-log" / "access.log"
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
    _peer_log(lab, secret)  # a stolen push could name any file: only record-shaped lines leave the node
    got = list(remote_lines(_fw2_peer(lab)))
    assert got == [("secret.txt", line(ts=T0))]
    peer = _fw2_peer(lab)
    for cmd in ("logs /etc/passwd", "logs --since /etc/passwd", "logs --file /etc/shadow", "logs --since 1 2"):
        code, out, _ = peer.run(cmd)
        reply = json.loads(out)
        assert code == 2 and reply["ok"] is False and "takes no path" in reply["error"], (cmd, out)
    with pytest.raises(SyncError, match="no live config|proxy.access_log"):
        _peer_log(lab, Path("-"))
        list(remote_lines(peer))

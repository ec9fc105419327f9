"""Sync in the lab (root): `lab exec fw1 -- appliance sync` over each node's private sshd on the sync link, the
backup's running proxy enforcing the change (same PID), CARP settings applied by the supervisor's SIGHUP, the
backup's quiet no-op, and the stale-generation guard across a real failover."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from appliance.core.paths import Paths
from appliance.core.pids import alive
from appliance.core.state import read_role
from appliance.ha import ip as netns
from appliance.ha import supervisor as carp
from appliance.lab import daemons, lifecycle, topology
from appliance.lab.measure import client_get
from appliance.lab.model import Lab, LabError, load
from sync import keys as keymod
from tests.support.env import APPLIANCE, EXAMPLES, need_tool
from tests.support.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    need_tool("ip", "arping", "ucarp", "sshd", "ssh", "ssh-keygen", "rsync")
    try:
        with lifecycle.running(EXAMPLES / "appliance.yaml", tmp_path_factory.mktemp("labs"), "cs") as data:
            yield data
    except LabError as e:
        pytest.fail(f"lab: {e}")


def lab_exec(lab: Lab, node: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([APPLIANCE, "lab", "exec", "--name", lab.name, node, "--", *argv], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy(), stdin=subprocess.DEVNULL)


def sync_json(lab: Lab, node: str, *args: str) -> tuple[int, dict]:
    r = lab_exec(lab, node, "appliance", "sync", "--json", *args)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"sync on {node} printed no JSON (exit {r.returncode}): {r.stdout!r} {r.stderr!r}")


def state(lab: Lab, node: str) -> Path:
    return lab.nodes[node].state


def live(lab: Lab, node: str) -> int:
    return int(Path(os.readlink(state(lab, node) / "current")).name)


def role(lab: Lab, node: str) -> str | None:
    return (read_role(Paths(state(lab, node))) or {}).get("role")


def add_domain(lab: Lab, node: str, domain: str) -> None:
    with open(state(lab, node) / "current" / "lists" / "malware" / "domains", "a") as f:
        f.write(domain + "\n")


def lan_ip(lab: Lab, node: str) -> str:
    return lab.nodes[node].lan_ip


def engine_info(lab: Lab, node: str) -> dict:
    return (daemons.carp_status(lab, node).get("engines") or {}).get("1") or {}


def test_lab_nodes_run_sshd_with_lab_keys(lab) -> None:
    for node, n in lifecycle.describe(lab)["nodes"].items():
        assert alive(n["sshd_pid"]), node
        tree = state(lab, node) / "current"
        sd = lab.nodes[node].sshd_dir
        own = Paths(state(lab, node)).sync_key  # the node's own sync key: node-local, never in its tree
        for secret in (sd / "ssh_host_ed25519_key", own, sd / "authorized_keys"):
            assert (secret.stat().st_mode & 0o777) == 0o600, secret
        assert (own.parent.stat().st_mode & 0o777) == 0o700 and not keymod.sync_key(tree).exists()
        # its sshd lets in exactly every OTHER node's own key, each from that node's sync address only
        authorized = (sd / "authorized_keys").read_text().splitlines()
        others = [m for m in lab.nodes if m != node]
        assert [l.split()[-1] for l in authorized] == [f"{keymod.KEY_COMMENT}@{m}" for m in others]
        for m, l in zip(others, authorized):
            pub = Paths(state(lab, m)).sync_key.with_name(keymod.SYNC_KEY + ".pub").read_text().split()
            assert f'from="{lab.nodes[m].sync_ip}",restrict {pub[0]} {pub[1]} ' in l, l
        kh = keymod.known_hosts(tree).read_text()
        assert all(f"{m.sync_ip} " in kh for m in lab.nodes.values())  # every node pinned
        conf = (sd / "sshd_config").read_text()
        assert "PermitRootLogin forced-commands-only" in conf and "UsePAM no" in conf
        assert f"ListenAddress {lab.nodes[node].sync_ip}\n" in conf
        assert yaml.safe_load((tree / "appliance.yaml").read_text())["sync"]["user"] == "root"
        assert os.readlink(state(lab, node) / "current") == "releases/1"


def test_sync_from_the_master_is_enforced_by_the_backup_proxy(lab) -> None:
    domain = f"lab-sync-{secrets.token_hex(3)}.example"
    url = f"http://{domain}/"
    assert client_get(lab, lan_ip(lab, "fw2"), url) != "403"
    proxy_pid = lab.nodes["fw2"].proxy_pid
    engine_before = engine_info(lab, "fw2")
    assert engine_before.get("advskew") == 100
    # the admin edits the master's live tree: a blocked domain, and fw2's advskew (a CARP setting)
    add_domain(lab, "fw1", domain)
    cfg = state(lab, "fw1") / "current" / "appliance.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["nodes"]["fw2"]["advskew"] = 110
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))

    code, r = sync_json(lab, "fw1")
    assert code == 0 and r["ok"], json.dumps(r)
    assert r["generation"] == 2 and [(p["peer"], p["ok"], p["action"]) for p in r["peers"]] == [("fw2", True, "pushed")], r
    assert live(lab, "fw1") == 2 and live(lab, "fw2") == 2
    # fw2's own proxy (its LAN address, not the VIP) blocks the domain now, without a restart
    wait_until(lambda: client_get(lab, lan_ip(lab, "fw2"), url) == "403", 10, f"fw2's proxy blocks {domain}", step=0.2)
    assert alive(proxy_pid) and load(lab.name).nodes["fw2"].proxy_pid == proxy_pid
    assert client_get(lab, lan_ip(lab, "fw2"), lab.origin) == "200"
    # the SIGHUP to fw2's carp supervisor restarted its engine with the new advskew; fw1 keeps the VIP
    after = wait_until(lambda: engine_info(lab, "fw2").get("advskew") == 110 and engine_info(lab, "fw2"), 10,
                       "fw2's engine runs with advskew 110")
    assert after["pid"] != engine_before["pid"], engine_info(lab, "fw2")
    assert topology.holders(lab) == ["fw1"]
    s = json.loads(lab_exec(lab, "fw2", "appliance", "status", "--json").stdout)
    assert s["advskew"] == 110 and s["sync_generation"] == 2
    assert s["peers"]["fw1"]["seen"] and "sshd answers" in s["peers"]["fw1"]["probe"]


def test_carp_supervisor_keeps_its_engine_on_a_broken_config(lab) -> None:
    cfg = state(lab, "fw2") / "current" / "appliance.yaml"
    good = cfg.read_text()
    before = engine_info(lab, "fw2")
    try:
        cfg.write_text(good.replace("advbase: 1", "advbase: 0"))
        os.kill(carp.supervisor_pid(Paths(state(lab, "fw2"))), signal.SIGHUP)
        log = state(lab, "fw2") / "ha.log"
        wait_until(lambda: "config reload refused" in log.read_text(), 5, "ha.log says the reload was refused")
    finally:
        cfg.write_text(good)
    assert "cluster.advbase" in log.read_text()
    assert engine_info(lab, "fw2")["pid"] == before["pid"] and alive(before["pid"])


def test_sync_on_the_backup_is_a_quiet_noop(lab) -> None:
    r = lab_exec(lab, "fw2", "appliance", "sync")
    assert r.returncode == 0, r.stderr
    assert "not MASTER: nothing to sync" in r.stdout + r.stderr
    assert live(lab, "fw1") == 2 and live(lab, "fw2") == 2


def test_old_master_back_after_failover_does_not_overwrite(lab) -> None:
    """fw1 drops off both links (its engine stops, fw2 takes the VIP); the admin changes fw2 and syncs (fw1 is
    unreachable, fw2 cuts generation 3); fw1 comes back and preempts; its sync is refused (exit 4)."""
    ns = lab.nodes["fw1"].netns
    domain = f"lab-stale-{secrets.token_hex(3)}.example"
    url = f"http://{domain}/"
    try:
        for link in ("em0", "em1"):
            netns.ip("link", "set", link, "down", netns=ns)
        wait_until(lambda: role(lab, "fw2") == "MASTER" and topology.holders(lab) == ["fw2"], 15,
                   "fw2 MASTER and the only VIP holder")
        add_domain(lab, "fw2", domain)
        code, r = sync_json(lab, "fw2")
        assert code == 1 and r["failed"] == ["fw1"] and r["cut"] and r["generation"] == 3, r
        assert "fw1" in r["peers"][0]["error"]
        assert live(lab, "fw2") == 3 and live(lab, "fw1") == 2
        wait_until(lambda: client_get(lab, lan_ip(lab, "fw2"), url) == "403", 10, f"fw2's proxy blocks {domain}",
                   step=0.2)
    finally:
        for link in ("em0", "em1"):
            netns.ip("link", "set", link, "up", netns=ns)
    # fw1 is back and takes the VIP again (preempt)
    wait_until(lambda: role(lab, "fw1") == "MASTER" and role(lab, "fw2") == "BACKUP" and topology.holders(lab) == ["fw1"],
               20, "fw1 MASTER again, fw2 BACKUP, VIP on fw1 only")
    code, r = sync_json(lab, "fw1")
    assert code == 4 and not r["ok"], r
    assert "fw2 has generation 3, newer than ours (2)" in r["error"], r
    # nothing changed on either side: fw2 still serves what was changed while it was master
    assert live(lab, "fw2") == 3 and live(lab, "fw1") == 2
    assert client_get(lab, lan_ip(lab, "fw2"), url) == "403"


def test_the_carp_pass_is_only_in_0600_files_and_never_logged(lab) -> None:
    """After the lab ran carp, proxies, sshd and syncs: every file under the lab dir holding the pass (the
    rendered cluster files of every release and the staging copy, carp.pass) is 0600; no log or status has it."""
    pw = yaml.safe_load((EXAMPLES / "appliance.yaml").read_text())["cluster"]["password"].encode()
    holders, logs = [], 0
    for dirpath, _dirs, names in os.walk(lab.dir):
        for n in names:
            p = Path(dirpath) / n
            if p.is_symlink() or not p.is_file():
                continue
            logs += n.endswith(".log")
            if pw in p.read_bytes():
                holders.append(p)
    names = {p.name for p in holders}
    assert names <= {"appliance.yaml", "carp.pass"} and "carp.pass" in names, holders
    assert sum(p.name == "appliance.yaml" for p in holders) >= len(lab.nodes), holders  # every release, staging
    assert logs >= len(lab.nodes), "no log files to look at"
    wide = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in holders if p.stat().st_mode & 0o077]
    assert wide == [], wide

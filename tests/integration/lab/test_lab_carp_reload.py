"""`appliance carp` on SIGHUP: the CARP parameter diff, reload_config (applied / unchanged / refused), and the
status probe of the peer (loopback only; never sent when this node's sync address is not configured)."""
from __future__ import annotations

import socket
from pathlib import Path

import yaml

from appliance.cli import ha as cmd_ha
from appliance.core.loader import load
from appliance.core.paths import Paths
from appliance.ha import supervisor as carp
from tests.support.env import free_port


def _edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_carp_changes_lists_what_differs_without_the_pass(example_tree: Path) -> None:
    cfg = load(example_tree)
    old = carp.carp_params(cfg, "fw2")
    assert carp.carp_changes(old, carp.carp_params(cfg, "fw2")) == []

    def change(d: dict) -> None:
        d["cluster"]["advbase"] = 2
        d["cluster"]["password"] = "new-secret-pass"
        d["cluster"]["vip"] = "192.168.1.60/24"
        d["nodes"]["fw2"]["advskew"] = 120
        d["cluster"]["extra_vhids"] = [{"vhid": 2, "vip": "192.168.1.51/24", "advskew": {"fw2": 0}}]

    _edit(example_tree, change)
    new = carp.carp_params(load(example_tree), "fw2")
    changes = carp.carp_changes(old, new)
    assert "advbase 1 -> 2" in changes and "password changed" in changes
    assert "vhid 1 vip 192.168.1.50/24 -> 192.168.1.60/24" in changes
    assert "vhid 1 advskew 100 -> 120" in changes
    assert "vhid 2 added (vip 192.168.1.51/24 advskew 0)" in changes
    assert not any("new-secret-pass" in c or "change-me" in c for c in changes)
    assert carp.carp_changes(new, old)[-1] == "vhid 2 removed"
    # another node's advskew is not this node's own advskew: only its peer list (the speaker's --peer) changes
    _edit(example_tree, lambda d: d["nodes"]["fw1"].update(advskew=7))
    got = carp.carp_changes(new, carp.carp_params(load(example_tree), "fw2"))
    assert not [c for c in got if c.startswith("vhid") and "advskew" in c], got
    assert [c for c in got if c.startswith("peers") and "advskew=7" in c], got


def test_reload_config_applies_changes_and_keeps_engines_on_a_bad_file(example_tree: Path, tmp_path: Path) -> None:
    base = tmp_path / "state"
    sup = carp.CarpSupervisor(load(example_tree), "fw2", example_tree, Paths(base), use_watchdog=False)
    sup.passfile = carp.write_pass(sup.cfg, sup.paths)
    sup.engines = [carp.CarpProcess(g) for g in carp.role.groups(sup.cfg, "fw2")]
    assert sup.reload_config() == []  # nothing changed: engines untouched
    before = sup.engines
    _edit(example_tree, lambda d: d["nodes"]["fw2"].update(advskew=130))
    assert sup.reload_config() == ["vhid 1 advskew 100 -> 130"]
    assert sup.engines is not before and [e.group.advskew for e in sup.engines] == [130]
    assert sup.cfg.nodes["fw2"].advskew == 130
    # a password change (as the rotation's swap step, the old pass still accepted) rewrites the 0600 pass file;
    # a direct one is refused (tests/integration/ha/test_ha_carp.py::test_a_pass_change_applies_only_as_a_rotation)
    old = sup.cfg.cluster.password.get_secret_value()
    _edit(example_tree, lambda d: d["cluster"].update(password_next="other-pass"))
    assert sup.reload_config() == ["next password set"]
    _edit(example_tree, lambda d: d["cluster"].update(password="other-pass", password_next=old))
    assert sup.reload_config() == ["password changed", "next password changed"]
    assert sup.passfile.read_text() == "other-pass" and (sup.passfile.stat().st_mode & 0o777) == 0o600
    # a file that does not validate: refused, the running config and engines stay, the reason is logged
    good = example_tree.read_text()
    example_tree.write_text(good.replace("advbase: 1", "advbase: 0"))
    engines = sup.engines
    assert sup.reload_config() is None
    assert sup.engines is engines and sup.cfg.cluster.advbase == 1
    log = (base / "ha.log").read_text()
    assert "config reload refused" in log and "advbase" in log and "other-pass" not in log
    # this node removed from the cluster: refused as well
    example_tree.write_text(good)
    _edit(example_tree, lambda d: (d["nodes"].pop("fw2"), d["nodes"].update(fw3={"lan": "192.168.1.4/24",
                                                                                "sync": "192.168.200.2/30", "advskew": 50})))
    assert sup.reload_config() is None and "not in it any more" in (base / "ha.log").read_text()


def test_status_probe_on_loopback_and_never_without_our_sync_address(example_tree: Path) -> None:
    port = free_port()
    ok, what = cmd_ha.probe_peer("127.0.0.1", "127.0.0.1", port, timeout=1.0)
    assert ok and "nothing listens" in what  # a refusal still proves the peer is up
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        ok, what = cmd_ha.probe_peer("127.0.0.1", "127.0.0.1", srv.getsockname()[1], timeout=1.0)
    assert ok and "sshd answers" in what
    # in the host namespace this node's sync address (192.168.200.1 on em1) does not exist: nothing is sent
    got = cmd_ha.probe_peers(load(example_tree), "fw1", {"fw2": load(example_tree).nodes["fw2"]})
    assert got["fw2"][0] is None and "not probed" in got["fw2"][1]

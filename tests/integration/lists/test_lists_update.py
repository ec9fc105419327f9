"""`appliance lists update` with the real parts: a running proxy reloaded onto the new lists (blocked without a
restart), and on a sync lab's MASTER a generation cut and pushed to the backup by the normal sync; a refused update
moves neither."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sync.releases import Releases
from tests.support.dns import StubDNS
from tests.support.env import APPLIANCE
from tests.support.proxy import Proxy, fetch, make_tree
from tests.support.sync_lab import SyncLab
from tests.support.wait import wait_until
from tests.unit.test_lists import domains, tarball, ut1


def test_the_running_proxy_is_reloaded_onto_the_new_lists(tmp_path: Path) -> None:
    cfg = make_tree(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    src = tarball(tmp_path / "ut1.tgz", {"blacklists/blocked/domains": domains(40, "fresh")})
    dns = StubDNS({}).start()  # NXDOMAIN for everything: no name the test asks about leaves this machine
    proxy = Proxy(cfg, state, env={"APPLIANCE_PROXY_RESOLVER": f"127.0.0.1:{dns.address[1]}"}).wait_ready()
    try:
        status, _, _ = fetch(proxy.port, "http://site9.fresh.test/")
        assert status != 403 and "site9.fresh.test" in dns.queries  # not listed yet: the proxy looked it up
        env = {**proxy.env, "APPLIANCE_NODE": "fw1"}
        r = subprocess.run([APPLIANCE, "-c", str(cfg), "lists", "update", str(src), "--force", "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
        report = json.loads(r.stdout)
        assert r.returncode == 0 and report["proxy"].startswith("reloaded proxy pid"), (r.stdout, r.stderr)
        wait_until(lambda: fetch(proxy.port, "http://site9.fresh.test/")[0] == 403, 30, "the reloaded lists block")
        body = fetch(proxy.port, "http://site9.fresh.test/", accept="text/html")[1]
        assert b"blocked" in body.lower()
        assert proxy.proc.poll() is None  # reloaded, not restarted
    finally:
        proxy.stop()
        dns.close()


def _update(node, *args: str) -> tuple[int, dict]:
    r = node.appliance("lists", "update", "--json", *args, timeout=300)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON (exit {r.returncode}): {r.stdout!r} {r.stderr!r}") from None


def _explain(node, url: str) -> dict:
    r = node.appliance("explain", url, "--client", "192.168.1.10", "--json", check=True)
    return json.loads(r.stdout)


def test_on_the_master_a_generation_is_cut_and_pushed(lab: SyncLab, tmp_path: Path) -> None:
    src = str(ut1(tmp_path / "ut1.tgz"))
    bad = str(ut1(tmp_path / "small.tgz", adult=0))
    # refused (the adult category would shrink to one entry): nothing is cut, nothing reaches the backup
    code, r = _update(lab.master, bad)
    assert code == 2 and "below lists.min_ratio" in r["error"], r
    assert lab.master.live() == 1 and lab.backup.live() == 1
    code, r = _update(lab.backup, src)
    assert code == 2 and "not MASTER" in r["error"], r
    code, r = _update(lab.master, src)
    assert code == 0 and r["sync"]["ok"] and r["sync"]["cut"] and r["sync"]["generation"] == 2, r
    assert lab.master.live() == 2 and lab.backup.live() == 2
    assert Releases(lab.master.state).meta(2)["hash"] == Releases(lab.backup.state).meta(2)["hash"]
    for node in (lab.master, lab.backup):
        d = _explain(node, "http://site17.adult.test/")
        assert d["verdict"] == "block" and d["source"] == "lists/adult/domains:18", d
    # the timer's next sync finds nothing to do: the update's sync was the normal one
    code, s = lab.master.sync()
    assert code == 0 and not s["cut"] and s["peers"][0]["action"] == "up-to-date", s

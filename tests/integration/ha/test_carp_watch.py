"""Issue 12: the kernel-CARP watcher (`appliance carp-watch`) on a real LAN in namespaces the test made.

fw1's namespace runs the watcher on eth0; a third namespace on the bridge (no node's address) injects adverts
built with the speaker's encoder and the cluster pass: a forged "better master" from its own address, and one
that claims fw2's address with an advskew below fw2's; fw2's namespace sends a genuine-looking advert and a
bad-digest one. The watcher counts two forged, `appliance status` shows them, the metric file has them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.carp_lan import PY, ROOT, Lan
from tests.support.env import APPLIANCE, EXAMPLES, need_tool
from tests.support.wait import poll

pytestmark = [pytest.mark.root, pytest.mark.timing]

PASS = "watch-pass"
SEND = """
import socket, struct, sys
from appliance.ha import protocol as cp
iface, vip, pw = sys.argv[1], sys.argv[2], sys.argv[3].encode()
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
tx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("4s4si", socket.inet_aton(cp.CARP_MCAST),
              socket.inet_aton("0.0.0.0"), socket.if_nametoindex(iface)))
for i, spec in enumerate(sys.argv[4:]):
    src, advbase, advskew, key = spec.split(",")
    tx.sendto(cp.build_packet(key.encode() or pw, 1, vip, src, int(advbase), int(advskew), 1000 + i, ident=i),
              (cp.CARP_MCAST, 0))
"""


@pytest.fixture
def lan(tmp_path: Path):
    need_tool("ip")
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    lan = Lan(3, tmp_path)
    try:
        yield lan.up()
    finally:
        lan.close()


def _config(lan: Lan, d: Path) -> Path:
    for sub in ("lists",):
        subprocess.run(["cp", "-r", str(EXAMPLES / sub), str(d / sub)], check=True)
    data = yaml.safe_load((EXAMPLES / "appliance.yaml").read_text())
    data["cluster"].update(vip=f"{lan.vip()}/24", password=PASS)  # interface: the namespace's eth0 via --iface
    data["nodes"]["fw1"]["lan"] = f"{lan.nodes[0].ip}/24"
    data["nodes"]["fw2"]["lan"] = f"{lan.nodes[1].ip}/24"
    data["ha"]["lan_witness"] = []                      # the example's gateway is not on this LAN
    p = d / "appliance.yaml"
    p.write_text(yaml.safe_dump(data))
    p.chmod(0o600)
    return p


def _send(lan: Lan, node: int, *specs: str) -> None:
    subprocess.run(["ip", "netns", "exec", lan.nodes[node].netns, PY, "-c", SEND, "eth0", lan.vip(), PASS, *specs],
                   check=True, cwd=ROOT, timeout=30, capture_output=True)


def test_the_watcher_flags_forged_adverts_and_status_shows_them(lan: Lan, tmp_path: Path) -> None:
    cfg = _config(lan, tmp_path)
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_STATE_DIR=str(state))
    argv = ["ip", "netns", "exec", lan.nodes[0].netns, APPLIANCE, "-c", str(cfg), "--node", "fw1", "carp-watch",
            "--iface", "eth0", "--no-peers", "--seconds", "60"]
    err = open(tmp_path / "watch.err", "wb")
    w = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    err.close()
    lan.procs.append(w)
    assert poll(lambda: (state / "ha.log").exists() and "carp-watch: listening" in (state / "ha.log").read_text(), 20), \
        (tmp_path / "watch.err").read_text()
    attacker, fw2 = lan.nodes[2].ip, lan.nodes[1].ip
    _send(lan, 1, f"{fw2},1,100,", f"{fw2},1,0,wrong-pass")                 # genuine-looking; bad digest
    _send(lan, 2, f"{attacker},1,0,", f"{fw2},1,0,")                         # not a node; fw2 below its advskew
    run = state / "run" / "carp-watch.json"
    got = poll(lambda: (d := json.loads(run.read_text()) if run.exists() else None) and d["forged"] >= 2 and d, 15)
    assert got, run.read_text() if run.exists() else (tmp_path / "watch.err").read_text()
    assert got["forged"] == 2 and got["ok"] == 1 and got["bad"] == 1, got
    assert got["last_forged"]["src"] == fw2 and "below fw2's configured 100" in got["last_forged"]["why"]
    assert got["sources"] == {attacker: 1, fw2: 1}
    log = (state / "ha.log").read_text()
    assert f"forged advert vhid 1 from {attacker} (advbase 1 advskew 0): {attacker} is not a node's LAN address" in log
    # the .prom file is written just after the JSON one (watch.Tally.flush): wait for it, do not race it
    prom_file, want = state / "run" / "carp-watch.prom", 'appliance_carp_adverts_total{verdict="forged"} 2'
    poll(lambda: prom_file.exists() and want in prom_file.read_text(), 5)
    prom = prom_file.read_text()
    assert want in prom, prom
    st = subprocess.run([APPLIANCE, "-c", str(cfg), "--node", "fw1", "status", "--no-probe"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    assert f"carp-watch: forged adverts: 2, last from {fw2} at " in st.stdout, st.stdout
    js = json.loads(subprocess.run([APPLIANCE, "-c", str(cfg), "--node", "fw1", "status", "--no-probe", "--json"],
                                   env=env, capture_output=True, text=True, timeout=60).stdout)
    assert js["carp_watch"]["forged"] == 2
    w.send_signal(signal.SIGTERM)
    assert w.wait(10) == 0

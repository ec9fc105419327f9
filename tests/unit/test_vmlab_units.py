"""The VM lab's code that runs without qemu or root: its state file found and refused like the namespace lab's (one
LabKind serves both), the failover measurement shared with the namespace lab (same keys, same lines), the qemu
command line (nothing written outside the lab dir, no kernel chosen by the environment), and `vmlab` bad input."""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.lab import measure, vm, vmfail
from appliance.lab.model import LAB, LabError
from appliance.lab.vmmodel import VMLAB, VMLAB_ROOT_ENV, VmLab, VmNode, load
from tests.support.vmlab_cli import cli

VM = {"lan": "192.168.1.2/24", "sync": "192.168.200.1/30", "advskew": 0, "image": "/dist/fw1.qcow2",
      "overlay": "/l/fw1.qcow2", "console": "/l/fw1.console", "qemu_log": "/l/fw1.qemu.log",
      "taps": ["t0lan", "t0sync"], "macs": ["52:54:00:aa:bb:cc", "52:54:00:dd:ee:ff"], "qemu_pid": 42, "boots": 1,
      "console_from": 0}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(VMLAB_ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("APPLIANCE_VMLAB", raising=False)
    return tmp_path


def _write(root: Path, name: str, data: dict) -> None:
    (root / name).mkdir()
    (root / name / "vmlab.json").write_text(json.dumps(data))


def test_vmlab_state_round_trips_and_lookup_errors(root: Path) -> None:
    with pytest.raises(LabError, match=r"^no VM lab is up \(nothing in .*\); run `appliance vmlab up`$"):
        load()
    _write(root, "vm1", {"name": "vm1", "dir": "/elsewhere", "vip": "192.168.1.50", "vms": {"fw1": VM}})
    lab = load()
    assert isinstance(lab, VmLab) and lab.vm("fw1").lan_ip == "192.168.1.2" and lab.vm("fw1").sync_ip == "192.168.200.1"
    assert lab.to_json()["vms"]["fw1"] == VM and lab.node_by_ip() == {"192.168.1.2": "fw1"}
    _write(root, "vm2", {"name": "other", "dir": "/x"})
    with pytest.raises(LabError, match=r"^several VM labs are up \(vm1, vm2\); pass --name$"):
        load()
    with pytest.raises(LabError, match=r"vmlab.json: names lab 'other', not 'vm2'$"):  # no suffix, unlike `lab`
        load("vm2")
    with pytest.raises(LabError, match=r"^no VM lab named 'nope' \(no .*nope/vmlab.json\)$"):
        load("nope")
    with pytest.raises(LabError, match="not a path"):
        load("../x")
    assert VMLAB.names() == ["vm1", "vm2"] and LAB.names() == []


def test_down_takes_the_dir_from_the_name_and_removes_only_lab_dirs(root: Path, tmp_path_factory) -> None:
    _write(root, "vm1", {"name": "vm1", "dir": "/etc"})
    assert VMLAB.recorded("vm1").dir == root / "vm1"  # never what the state file says
    assert VMLAB.recorded("gone").dir == root / "gone" and VMLAB.recorded("gone").vms == {}
    assert VMLAB.recorded(None).name == "vm1"  # the only one
    plain = tmp_path_factory.mktemp("plain")
    with pytest.raises(LabError, match=r"plain\d*: not a VM lab directory under .* \(no vmlab.json\); not removed$"):
        VMLAB.remove_dir(plain)
    (root / "nolab").mkdir()
    with pytest.raises(LabError, match="not a VM lab directory"):
        VMLAB.remove_dir(root / "nolab")
    VMLAB.remove_dir(root / "vm1")
    assert not (root / "vm1").exists() and plain.is_dir() and (root / "nolab").is_dir()


def _namespace_result() -> dict:
    return {"kind": "link-down", "node": "fw1", "took_over": "fw2", "returned": True, "failover_outage": 1.6,
            "failover_outages": [1.6, 0.2], "return_outage": 0.2, "return_outages": [0.2], "served": ["fw2", "fw1"],
            "holders_after_failure": ["fw2"], "holders_after": ["fw1"], "seconds": 9.1}


def test_result_lines_of_both_labs() -> None:
    assert measure.fmt_result(_namespace_result()) == (
        "link-down    fw1 -> fw2: outage 1.60 s (2 gaps); back to fw1: outage 0.20 s; served by fw2 -> fw1; vip on fw1")
    r = {**_namespace_result(), "took_over": None, "returned": False, "failover_outage": float("inf"),
         "served": ["fw1", None], "holders_after": [], "kind": "power-loss", "back_after": None, "max_holders": 2}
    assert vmfail.fmt(r) == ("power-loss  fw1 -> nobody: outage never; back to NOT fw1 after None s: outage 0.20 s; "
                             "served by fw1 -> ?; most holders at once 2; vip on nobody")


class _Probe:
    """A probe whose clients saw: a failed request, fw2 serving, fw1 serving again."""

    timeout = 0.0

    def __init__(self) -> None:
        self.waits: list[float] = []

    def window(self, t_from: float, t_to: float = float("inf")) -> list[dict]:
        return [{"t0": t_from + 0.01, "ok": False, "node": None}, {"t0": t_from + 0.02, "ok": True, "node": "fw2"},
                {"t0": t_from + 0.03, "ok": True, "node": "fw1"}]

    def served_by(self, nodes: set[str], since: float, stable: int = 6) -> str | None:
        return "fw2"

    def wait_served(self, nodes: set[str], since: float, timeout: float, stable: int = 6) -> str | None:
        self.waits.append(timeout)
        return "fw1"

    def outages(self, t_from: float, t_to: float) -> list[float]:
        return [1.5, 0.25]

    def longest_gap(self, t_from: float, t_to: float) -> float:
        return 2.75

    def served(self, t_from: float, t_to: float) -> list[str]:
        return ["fw1", "fw2", "fw1"]


class _Watch:
    def most(self, t_from: float) -> int:
        return 1

    def doubles(self, t_from: float) -> list:
        return []


COMMON = ["kind", "node", "took_over", "returned", "failover_outage", "failover_outages", "return_outage",
          "return_outages", "served"]


def test_vm_failure_measured_by_the_shared_code(monkeypatch: pytest.MonkeyPatch) -> None:
    done: list[tuple] = []
    monkeypatch.setattr(vmfail, "inject", lambda lab, kind, node: done.append(("inject", kind, node)))
    monkeypatch.setattr(vmfail, "recover", lambda lab, kind, node: done.append(("recover", kind, node)))
    monkeypatch.setattr(vmfail.vmnode, "holders_arp", lambda lab: ["fw1"])
    lab = VmLab(name="vm1", dir=Path("/nonexistent"), master="fw1", vms={"fw1": VmNode(**VM)})
    probe = _Probe()
    r = vmfail.measure(lab, probe, _Watch(), "power-loss")  # type: ignore[arg-type]
    assert list(r) == COMMON + ["max_holders", "two_holders", "back_after", "no_answer", "no_answer_return",
                                "holders_after", "seconds"]
    assert done == [("inject", "power-loss", "fw1"), ("recover", "power-loss", "fw1")]
    assert r["took_over"] == "fw2" and r["returned"] and r["failover_outage"] == 1.5 and r["return_outages"] == [0.25, 1.5, 0.25]
    assert r["max_holders"] == 1 and r["two_holders"] == [] and r["back_after"] is not None
    assert r["no_answer"] == 2.75 and "no answer for 2.75 s / 2.75 s" in vmfail.fmt(r)
    assert probe.waits == [vmfail.FAILOVER_WAIT, vmfail.RETURN_WAIT + 180]  # a power loss waits for the boot too


def test_namespace_failure_measured_by_the_shared_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "inject_fault", lambda lab, kind, node: None)
    monkeypatch.setattr(measure, "recover", lambda lab, kind, node: None)
    monkeypatch.setattr(measure, "holders", lambda lab, ip=None: ["fw2"])
    monkeypatch.setattr(measure, "preferred", lambda lab: "fw1")
    probe = _Probe()
    r = measure.measure(SimpleNamespace(nodes={"fw1": None, "fw2": None}), probe, "demote", timeout=5.0)  # type: ignore[arg-type]
    assert list(r) == COMMON + ["holders_after_failure", "holders_after", "seconds"]
    assert r["holders_after_failure"] == ["fw2"] and probe.waits == [5.0, 15.0]


def test_qemu_writes_nothing_outside_the_lab_dir_and_boots_only_the_image(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No pidfile, no daemonizing (the PID is the Popen's), no kernel chosen by the environment: what boots is the
    node's overlay of its image, and the files qemu writes are the lab's console (qemu's log is the lab's too)."""
    monkeypatch.setenv("APPLIANCE_VMLAB_KERNEL", "/boot/vmlinuz:/boot/initrd.img")  # the removed dev hook: ignored
    v = VmNode(**{**VM, "overlay": str(tmp_path / "fw1.qcow2"), "console": str(tmp_path / "fw1.console"),
                  "qemu_log": str(tmp_path / "fw1.qemu.log")})
    argv = vm.qemu_argv("vm1-fw1", v, "tcg")
    assert not {"-pidfile", "-daemonize", "-kernel", "-initrd", "-append", "-nic"} & set(argv), argv
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single" and argv[argv.index("-smp") + 1] == "2"
    monkeypatch.setenv(vm.TCG_THREAD_ENV, "multi")
    assert vm.qemu_argv("vm1-fw1", v, "tcg")[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert vm.qemu_argv("vm1-fw1", v, "kvm")[argv.index("-accel") + 1] == "kvm"
    paths = [p for a in argv for p in a.replace(",", "=").split("=") if p.startswith("/") and p != "/dev/urandom"]
    assert paths and all(Path(p).parent == tmp_path for p in paths), paths


def test_vmlab_bad_input(tmp_path: Path) -> None:
    name = f"nv{uuid.uuid4().hex[:8]}"
    env = {VMLAB_ROOT_ENV: str(tmp_path)}
    r = cli("vmlab", "down", "--name", name, timeout=60, env=env)
    assert r.returncode == 2 and f"--name '{name}': no such VM lab (no {tmp_path / name}, no namespaces {name}-*); " \
        "nothing removed" in r.stderr, r.stderr
    r = cli("vmlab", "status", "--name", name, timeout=60, env=env)
    assert r.returncode == 2 and f"no VM lab named '{name}'" in r.stderr, r.stderr
    r = cli("vmlab", "failover", timeout=60, env=env)
    assert r.returncode == 2 and "no VM lab is up" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_probe_keeps_at_most_inflight_requests_open() -> None:
    """The VM lab's probe on a proxy that never answers: no more requests than `inflight` slots allow, and the ones
    it did send still fail (a slow proxy is sampled, not buried, and its outage is still seen)."""
    import socket
    import threading

    from appliance.lab import helpers
    srv = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept() -> None:
        srv.settimeout(3)
        for _ in range(200):  # bounded; ends with the server's timeout
            try:
                c, _ = srv.accept()
            except OSError:
                return
            held.append(c)   # never answered, kept open: the probe gives up on its timeout

    threading.Thread(target=accept, daemon=True).start()
    port = srv.getsockname()[1]
    out = subprocess.run(helpers.argv("probe", "127.0.0.1", str(port), "http://origin.test/", "0.02", "0.4", "1.2",
                                      "--inflight=2"), capture_output=True, text=True, timeout=30)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    for c in [srv, *held]:
        c.close()
    assert out.returncode == 0, out.stderr
    # 60 ticks; two slots, each held 0.4 s per request: at most 2 x (1.2 / 0.4 + 1) = 8 requests in all
    assert 2 <= len(events) <= 8 and not any(e["ok"] for e in events), events


def test_outage_opens_at_the_failure_for_requests_open_then() -> None:
    """With the probe's cap on open requests, the requests a power loss meets started before it: their failure opens
    the outage at the failure's time; answered or earlier-failed requests before it do not."""
    import threading
    p = object.__new__(measure.Probe)
    p.timeout, p._lock = 5.0, threading.Lock()
    ev = lambda t0, t1, ok: {"t0": t0, "t1": t1, "ok": ok, "node": "fw2" if ok else None}  # noqa: E731
    p.events = [ev(90.0, 91.0, False), ev(99.8, 100.1, True), ev(99.9, 104.9, False), ev(99.95, 104.95, False),
                ev(105.0, 105.3, True), ev(105.2, 105.4, True)]
    assert p.outages(100.0, 105.5) == [5.0]
    p.events = [ev(99.8, 100.1, True), ev(100.2, 100.3, True)]
    assert p.outages(100.0, 101.0) == []


def test_longest_gap_without_an_answer_and_sustained_holders() -> None:
    """The power-loss outage as a client saw it when no request failed (answered late through the new holder), and
    two VIP holders counted only when two ARP samples in a row saw them."""
    import threading
    p = object.__new__(measure.Probe)
    p.timeout, p._lock = 5.0, threading.Lock()
    ev = lambda t0, t1, ok: {"t0": t0, "t1": t1, "ok": ok, "node": "fw2"}  # noqa: E731
    p.events = [ev(99.7, 99.8, True), ev(99.9, 103.1, True), ev(100.1, 103.2, True), ev(103.3, 103.4, True)]
    assert p.longest_gap(100.0, 110.0) == 3.3          # 99.8 -> 103.1: nothing answered for 3.3 s
    assert p.longest_gap(104.0, 110.0) == float("inf")  # no answer after the failure at all
    w = object.__new__(vmfail.HolderWatch)
    w.samples = [(1.0, ["fw1"]), (2.0, ["fw2", "fw1"]), (3.0, ["fw1"]), (4.0, ["fw1"])]
    assert w.most(0) == 2 and w.most_held(0) == 1
    w.samples += [(5.0, ["fw1", "fw2"]), (6.0, ["fw2", "fw1"])]
    assert w.most_held(0) == 2

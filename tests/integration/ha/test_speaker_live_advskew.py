"""Two speakers in network namespaces: a new advskew in --advskew-file plus SIGUSR1 hands the VIP over and back, no restart, no gap."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.carp_lan import Lan
from tests.support.env import need_tool
from tests.support.wait import poll

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(60), pytest.mark.timing]

ADVBASE = 1
SKEW_N1 = 100
DEMOTED = 240
# what a handover must beat: the backup's dead interval (a restart of the master would cost at least this)
DEAD_N1 = 3 * ADVBASE + SKEW_N1 / 256


@pytest.fixture
def lan(tmp_path: Path):
    need_tool("ip")
    lan = Lan(2, tmp_path)
    try:
        yield lan.up()
    finally:
        lan.close()                                # kills the speakers and the observer, deletes the namespaces


def write_atomic(path: Path, text: str) -> None:
    """As the supervisor does: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def diag(lan: Lan) -> str:
    return "\n".join(f"--- {n.name} events {n.events()}\n{n.stderr.read_text()[-1500:] if n.stderr.exists() else ''}"
                     for n in lan.nodes)


def sample(lan: Lan, files: dict) -> tuple[float, dict, list]:
    return time.monotonic(), {n: read_state(f).get("state") for n, f in files.items()}, lan.holders()


def handover(lan: Lan, files: dict, master: str, backup: str, timeout: float, hold: float) -> tuple[float | None, list]:
    """Sample the state files and VIP holders (bounded in count and time) until `master` is MASTER and sole holder
    and `backup` is BACKUP, then for `hold` seconds more; returns (when it first held or None, every sample)."""
    samples: list = []
    held = None
    end = time.monotonic() + timeout + hold
    for _ in range(int((timeout + hold) / 0.02) + 1):
        t, st, holders = sample(lan, files)
        samples.append((t, st, holders))
        if held is None and st[master] == "MASTER" and st[backup] == "BACKUP" and holders == [master]:
            held = t
        if (held is not None and t - held >= hold) or t > end or (held is None and t > end - hold):
            break
        time.sleep(0.02)
    return held, samples


def overlap(samples: list) -> float:
    """The longest time two masters (state files or VIP holders) were seen in samples in a row. A preempting
    handover has two for as long as one advert takes to reach the old master and its down script to run (a few ms,
    up to ~0.1 s on a loaded box), which samples may catch; an old master that does not step down stays."""
    longest, first = 0.0, None
    for t, st, holders in samples:
        if list(st.values()).count("MASTER") > 1 or len(holders) > 1:
            first = t if first is None else first
            longest = max(longest, t - first)
        else:
            first = None
    return longest


OVERLAP = 0.3


def test_new_advskew_hands_over_live_and_back(lan):
    n0, n1 = lan.nodes
    obs = lan.observe()
    f = lan.workdir / "n0.advskew"
    write_atomic(f, "0\n")
    files = {"n0": lan.workdir / "n0.json", "n1": lan.workdir / "n1.json"}
    # n0 claims MASTER after 0.5 s instead of a full dead interval (keeps the test short); n1 listens for 3.4 s
    lan.start("speaker", n0, advbase=ADVBASE, advskew=5, preempt=True,
              extra=[f"--advskew-file={f}", f"--state-file={files['n0']}", "--initial-wait=0.5"])
    lan.start("speaker", n1, advbase=ADVBASE, advskew=SKEW_N1, preempt=True, extra=[f"--state-file={files['n1']}"])
    held, _ = handover(lan, files, "n0", "n1", 8, hold=0)
    assert held, (read_state(files["n0"]), read_state(files["n1"]), lan.holders(), diag(lan))
    st0 = read_state(files["n0"])
    pid0 = st0["pid"]
    assert st0["advskew"] == 0, st0                         # the file (0) overrode --advskew 5 at start
    assert obs.wait_for(lambda a: a["src"] == n0.ip and a["advskew"] == 0, time.monotonic(), 3), diag(lan)

    # -- demote: n0 announces 240 at once, n1 (preempt, 100) takes over on that advert
    t_sig = time.monotonic()
    write_atomic(f, f"{DEMOTED}\n")
    n0.proc.send_signal(signal.SIGUSR1)
    held, samples = handover(lan, files, "n1", "n0", 3 * ADVBASE, hold=2 * ADVBASE)
    assert held, (samples[-3:], diag(lan))
    # once over, it stays over for the hold time (past n1's next advert and the time n0's next one was due):
    # no bounce back
    assert all(st == {"n0": "BACKUP", "n1": "MASTER"} and h == ["n1"] for t, st, h in samples if t >= held), samples
    assert overlap(samples) < OVERLAP, samples
    announce = obs.wait_for(lambda a: a["src"] == n0.ip and a["advskew"] == DEMOTED, t_sig, 2)
    first_n1 = obs.wait_for(lambda a: a["src"] == n1.ip, t_sig, 2)
    assert announce and first_n1, diag(lan)
    assert announce["t"] - t_sig < 0.5, announce["t"] - t_sig       # sent at once, not at the next advert time
    took = first_n1["t"] - t_sig
    assert took < ADVBASE + 0.5 and took < DEAD_N1 / 2, took        # about one advbase at most: no dead interval
    # from n1's first advert on, n0 is silent: one master on the wire
    assert not [a for a in obs.since(first_n1["t"]) if a["src"] == n0.ip], obs.since(first_n1["t"])
    s0, s1 = read_state(files["n0"]), read_state(files["n1"])
    assert s0["pid"] == pid0 and n0.proc.poll() is None, (s0, diag(lan))   # the same speaker: not restarted
    assert s0["advskew"] == DEMOTED and s0["state"] == "BACKUP" and s1["state"] == "MASTER", (s0, s1)
    # no gap and no lasting overlap: n1 became MASTER at most an advert's flight before n0 stepped down
    assert -0.05 <= s0["since"] - s1["since"] < OVERLAP, (s0["since"], s1["since"])

    # -- promote: n0 (BACKUP, now 0) preempts on n1's next advert, at most n1's interval away
    t_sig = time.monotonic()
    write_atomic(f, "0\n")
    n0.proc.send_signal(signal.SIGUSR1)
    held, samples = handover(lan, files, "n0", "n1", 3 * ADVBASE, hold=1.5 * ADVBASE)
    assert held, (samples[-3:], diag(lan))
    assert all(st == {"n0": "MASTER", "n1": "BACKUP"} and h == ["n0"] for t, st, h in samples if t >= held), samples
    assert overlap(samples) < OVERLAP, samples
    back = obs.wait_for(lambda a: a["src"] == n0.ip, t_sig, 2)
    assert back and back["advskew"] == 0, (back, diag(lan))
    took = back["t"] - t_sig
    assert took < ADVBASE + SKEW_N1 / 256 + 0.5 and took < DEAD_N1 * 2 / 3, took
    assert not [a for a in obs.since(back["t"]) if a["src"] == n1.ip], obs.since(back["t"])
    s0, s1 = read_state(files["n0"]), read_state(files["n1"])
    assert s0["pid"] == pid0 and n0.proc.poll() is None, (s0, diag(lan))
    assert s0["advskew"] == 0 and s0["state"] == "MASTER" and s1["state"] == "BACKUP", (s0, s1)
    assert -0.05 <= s1["since"] - s0["since"] < OVERLAP, (s0["since"], s1["since"])
    # the down/up scripts ran once each way on n0: BACKUP at start, then down (demoted), up (promoted)
    # (the script logs its line after its `ip addr` call: wait for it)
    assert poll(lambda: [e.split()[0] for e in n0.events()] == ["down", "up", "down", "up"], 2), n0.events()

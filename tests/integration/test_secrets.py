"""The CARP pass and private keys: never in any command's output or log, and every file holding them is 0600."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.env import APPLIANCE, config_tree, need_tool
from tests.support.proxy import Proxy

PW = "pw-Zq8"
pytestmark = pytest.mark.timeout(240)


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    etc = config_tree(tmp_path / "etc")  # one cluster file + lists (not debian.yaml, nor a build's keys/ or compiled/)
    cfg = etc / "appliance.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["cluster"]["password"] = PW
    data["proxy"]["access_log"] = str(tmp_path / "state" / "access.log")
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "state").mkdir()
    return cfg, tmp_path / "state"


def _run(cfg: Path, state: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(state), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    return subprocess.run([APPLIANCE, "-c", str(cfg), "--node", "fw1", "-vv", *args], capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)


def _files(root: Path):
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                yield p


def _holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in _files(root) if needle in p.read_bytes()]


def test_pass_never_in_output_or_logs_and_its_files_are_0600(tmp_path: Path):
    cfg, state = _tree(tmp_path)
    runs = {}
    for args in (["check"], ["check", "--json"], ["render"], ["render", "--json"], ["status"], ["status", "--json"],
                 ["releases"], ["explain", "http://www.example.com/"], ["reload"], ["watchdog", "--help"],
                 ["role", "backup", "--no-vip", "--no-garp"], ["sync", "--json"], ["sync-receive"], ["cron"],
                 ["demote"], ["promote"]):
        r = _run(cfg, state, *args)
        runs[" ".join(args)] = r
        assert PW not in r.stdout + r.stderr, f"`appliance {' '.join(args)}` (exit {r.returncode}) shows the pass"
    assert runs["check"].returncode == 0, runs["check"].stderr
    assert runs["render --json"].returncode == 0 and "**********" in runs["render --json"].stdout
    # the one place meant to show it (proves the needle is right)
    shown = _run(cfg, state, "render", "--show-secrets")
    assert shown.returncode == 0 and PW in shown.stdout
    # a bad config's error message names the field, not the value next to it
    bad = cfg.with_name("bad.yaml")
    data = yaml.safe_load(cfg.read_text())
    data["cluster"]["password"] = PW + "x" * 40  # too long for CARP
    bad.write_text(yaml.safe_dump(data))
    r = _run(bad, state, "check")
    assert r.returncode == 2 and "password" in r.stderr and PW not in r.stdout + r.stderr
    # the proxy (intercept: it makes the CA) with its logs
    data = yaml.safe_load(cfg.read_text())
    data["proxy"]["tls"] = "intercept"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    p = Proxy(cfg, state).wait_ready()
    try:
        p.signal(1)  # SIGHUP: a reload logs too
    finally:
        p.stop()
    assert PW not in p.stderr()
    # nothing the commands wrote under the state dir (logs, status, role, pidfiles) shows the pass...
    leaked = _holding(state, PW.encode())
    assert leaked == [], f"the pass is in {leaked}"
    # ...and the CA key is 0600 in a 0700 dir, never in a log
    ca = cfg.parent / "ca"
    key = ca / "mitmproxy-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(ca.stat().st_mode) == 0o700
    pem = key.read_bytes()
    body = pem.split(b"PRIVATE KEY-----")[1].split(b"-----END")[0].split()[0]
    assert body not in b"".join(p.read_bytes() for p in _files(state))


def test_image_outputs_and_overlay_holding_secrets_are_0600(tmp_path: Path):
    need_tool("makefs", "ssh-keygen")
    cfg, state = _tree(tmp_path)
    out = tmp_path / "dist"
    r = _run(cfg, state, "image", "--out", str(out), "--only", "fw1", "--json")
    assert r.returncode == 0, r.stderr
    assert PW not in r.stdout + r.stderr
    # per-node keys (keys/hosts/<node>/sync_ed25519): the 4th base64 line holds the private scalar (the first lines
    # are a header every ed25519 key shares)
    own, other = ((cfg.parent / "keys" / "hosts" / n / "sync_ed25519").read_bytes() for n in ("fw1", "fw2"))
    assert not (cfg.parent / "keys" / "sync_ed25519").exists()  # no shared key made
    secret = own.split(b"\n")[4]
    assert b"PRIVATE KEY" in own and secret.decode() not in r.stdout + r.stderr
    holders = _holding(out, PW.encode())
    names = {p.relative_to(out).as_posix() for p in holders}
    assert {"fw1.tar", "fw1.ufs", "fw1/overlay/etc/rc.conf.d/netif",
            "fw1/overlay/var/db/appliance/releases/1/appliance.yaml"} <= names, names
    wide = {n: oct(stat.S_IMODE((out / n).stat().st_mode)) for n in names if stat.S_IMODE((out / n).stat().st_mode) & 0o077}
    assert wide == {}, f"files holding the pass readable by others: {wide}"
    keyfiles = {p.relative_to(out).as_posix() for p in _holding(out, secret)}
    assert "fw1/overlay/var/db/appliance/keys/sync_ed25519" in keyfiles and "fw1.ufs" in keyfiles, keyfiles
    for n in keyfiles:  # fw1's own private sync key: only in files readable by root alone
        assert stat.S_IMODE((out / n).stat().st_mode) & 0o077 == 0, n
    assert stat.S_IMODE((out / "fw1/overlay/var/db/appliance/keys").stat().st_mode) == 0o700
    assert _holding(out, other.split(b"\n")[4]) == []  # fw2's private key is in no output of fw1's build


def test_carp_pass_file_narrowed_before_write(tmp_path: Path):
    """An existing world-readable carp.pass is made 0600 before the new pass goes in (no readable window)."""
    from appliance.ha import supervisor as carp
    from appliance.core.loader import load
    from appliance.core.paths import Paths

    cfg, state = _tree(tmp_path)
    pf = Paths(state).carp_pass
    pf.parent.mkdir(parents=True)
    pf.write_text("old")
    pf.chmod(0o644)
    seen = []
    real_fdopen = os.fdopen

    def spy(fd, *a, **kw):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fdopen(fd, *a, **kw)

    os.fdopen = spy
    try:
        carp.write_pass(load(cfg), Paths(state))
    finally:
        os.fdopen = real_fdopen
    assert seen == [0o600] and pf.read_text() == PW and stat.S_IMODE(pf.stat().st_mode) == 0o600


def test_sync_cuts_and_pushes_the_cluster_file_only_as_0600(sync_lab) -> None:
    """A master whose cluster file is 0644 (e.g. copied in by hand): the cut narrows it first, so no release or
    staging copy on either node is readable by others (the tree hash carries modes, so peers keep 0600 too)."""
    from appliance.core.loader import load

    lab = sync_lab
    cfg = lab.master.tree / "appliance.yaml"
    os.chmod(cfg, 0o644)
    pw = load(cfg).cluster.password.get_secret_value().encode()
    code, r = lab.master.sync()
    assert code == 0, r
    assert pw.decode() not in json.dumps(r)
    for node in (lab.master, lab.backup):
        # the backup's releases/1 was laid down by the harness (the image's job), not by sync
        holders = [p for p in _holding(node.state, pw) if node is lab.master or "1" not in p.relative_to(node.state).parts[1:2]]
        assert any("staging" in p.parts for p in holders) or node is lab.master, holders
        assert len(holders) >= 2, holders
        wide = [f"{p} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in holders if p.stat().st_mode & 0o077]
        assert wide == [], wide

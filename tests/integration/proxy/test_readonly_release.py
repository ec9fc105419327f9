"""A stale list index in a release the proxy may not write (the Debian unit: ProtectSystem=strict, root's 0700
release): the proxy compiles into its own state dir once and serves, it never fails to start (issue 10's crash loop)."""
from __future__ import annotations

import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from appliance.core import loader
from filters import ruleset
from tests.support.env import APPLIANCE, free_port, need_tool
from tests.support.proxy import fetch, get_local, make_tree
from tests.support.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
ADDED = "added-since-the-index.test"


@pytest.fixture
def stale_release(tmp_path: Path) -> Path:
    """A config tree whose compiled/ index predates a list change (stale by content, not only by mtime)."""
    need_tool("unshare", "mount")
    cfg_path = make_tree(tmp_path)
    ruleset.compile_index(loader.load(cfg_path), cfg_path.parent)
    with open(cfg_path.parent / "lists/blocked/domains", "a") as f:
        f.write(f"{ADDED}\n")
    return cfg_path


def read_only(etc: Path, command: list[str]) -> list[str]:
    """command in a private mount namespace where etc is a read-only bind mount of itself (root's EROFS)."""
    e = shlex.quote(str(etc))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f"mount --bind {e} {e} && mount -o remount,bind,ro {e} && exec {shlex.join(command)}"]


def test_explain_compiles_into_the_state_dir_once(stale_release: Path, tmp_path: Path):
    etc, state = stale_release.parent, tmp_path / "state"
    before = (etc / ruleset.INDEX_NAME).read_bytes()
    env = {"APPLIANCE_STATE_DIR": str(state), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    cmd = read_only(etc, [APPLIANCE, "-c", str(stale_release), "explain", f"http://{ADDED}/", "--json"])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"verdict": "block"' in r.stdout and "is read-only for this process" in r.stderr, (r.stdout, r.stderr)
    fallback = state / ruleset.INDEX_NAME
    first = fallback.stat().st_mtime_ns
    assert (etc / ruleset.INDEX_NAME).read_bytes() == before  # the release is untouched
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "read-only" not in r.stderr, r.stderr  # current now: not compiled again
    assert fallback.stat().st_mtime_ns == first


def test_proxy_starts_and_serves_from_a_read_only_release(stale_release: Path, tmp_path: Path):
    etc, state = stale_release.parent, tmp_path / "state"
    state.mkdir()
    port = free_port()
    err = open(tmp_path / "proxy.stderr", "wb")
    cmd = read_only(etc, [APPLIANCE, "-c", str(stale_release), "proxy", "--listen", f"127.0.0.1:{port}"])
    proc = subprocess.Popen(cmd, env={"APPLIANCE_STATE_DIR": str(state), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "proxy.stderr").read_text()
            try:
                return get_local(port, "/healthz", timeout=1)[0] == 200
            except OSError:
                return False
        wait_until(up, 60, "proxy answering /healthz")
        status, body, _ = fetch(port, f"http://{ADDED}/")
        assert status == 403, body[:200]
        assert (state / ruleset.INDEX_NAME).exists()
    finally:
        proc.send_signal(signal.SIGTERM)  # unshare and sh exec: this PID is the proxy's
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        err.close()

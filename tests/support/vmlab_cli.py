"""`appliance vmlab` as the tests run it: the CLI with the lab root, its one error line, and what must be gone after."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from appliance.ha import ip as netns
from tests.support.env import APPLIANCE, EXAMPLES

CONFIG = EXAMPLES / "debian.yaml"


def cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([APPLIANCE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("appliance: error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr
    return errors[0]


def nothing_left(root: Path, name: str) -> None:
    """No namespace, state dir or process of lab `name` is left."""
    assert not [n for n in netns.netns_list() if n.startswith(name + "-")]
    assert not (root / name).exists()
    assert not [p for p in Path("/proc").glob("[0-9]*") if name in _cmdline(p)]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def fake_images(d: Path, nodes=("fw1", "fw2")) -> Path:
    """Disks that never boot (empty qcow2) with an admin key and host keys, as an image build lays them out."""
    (d / "keys").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "keys/admin_ed25519")], check=True)
    for n in nodes:
        (d / f"keys/hosts/{n}").mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / f"keys/hosts/{n}/ssh_host_ed25519_key")],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / f"{n}.qcow2"), "64M"], check=True)
    return d

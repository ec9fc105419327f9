"""`vmlab up` refused (root, qemu): without root, without qemu, and VMs that never reach multi-user. Each is one
error line and nothing left behind. They need no booted lab and measure nothing, so they are not in the VM part
(`vm`) of make test, whose two guests take both cores, but in its first part."""
from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from appliance.lab.vmmodel import VMLAB_ROOT_ENV
from tests.support.env import APPLIANCE, need_tool
from tests.support.vmlab_cli import CONFIG, cli, fake_images, nothing_left, one_error_line

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_up_refused_without_root(tmp_path: Path) -> None:
    name = f"vn{secrets.token_hex(3)}"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", APPLIANCE, "-c", str(CONFIG),
                        "vmlab", "up", "--name", name, "--images", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, VMLAB_ROOT_ENV: str(tmp_path / "labs")})
    assert "needs root" in one_error_line(r)
    nothing_left(tmp_path / "labs", name)


def test_up_refused_without_qemu(tmp_path: Path) -> None:
    need_tool("qemu-img", "ssh-keygen")
    name = f"vn{secrets.token_hex(3)}"
    r = cli("-c", str(CONFIG), "vmlab", "up", "--name", name, "--images", str(fake_images(tmp_path / "img")),
            timeout=120, env={"PATH": f"{Path(APPLIANCE).parent}:/usr/sbin:/sbin", VMLAB_ROOT_ENV: str(tmp_path / "labs")})
    assert "qemu-system-x86_64" in one_error_line(r)
    nothing_left(tmp_path / "labs", name)


def test_vm_that_never_reaches_multi_user(tmp_path: Path) -> None:
    """Disks with nothing to boot: a bounded wait, the console tail, one error line, everything removed."""
    need_tool("qemu-system-x86_64", "qemu-img", "ssh-keygen")
    name = f"vn{secrets.token_hex(3)}"
    r = cli("-c", str(CONFIG), "vmlab", "up", "--name", name, "--images", str(fake_images(tmp_path / "img")),
            "--wait", "10", timeout=300, env={VMLAB_ROOT_ENV: str(tmp_path / "labs"), "APPLIANCE_VMLAB_ACCEL": "tcg"})
    assert "did not reach multi-user" in one_error_line(r)
    assert "fw1 console (tail)" in r.stderr and "nothing on the serial console" in r.stderr  # what the VM printed
    nothing_left(tmp_path / "labs", name)

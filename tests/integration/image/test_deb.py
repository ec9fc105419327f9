"""`make deb`: the package's contents and modes, lintian, systemd-analyze verify, install + purge offline in a
Debian 12 chroot (nothing left behind), and a second build with no network giving the same bytes."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from image.debian import tree
from tests.support.env import ROOT, need_tool
from tests.support.image import DEBIAN_TREE_SH

# xdist_group: one worker runs this module (its builds share the wheel cache; build_deb.py locks its writes)
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.xdist_group("deb")]

BUILD = ROOT / "packaging" / "build_deb.py"
CACHE = Path(os.environ.get("CARPGUARD_CACHE") or Path.home() / ".cache" / "carpguard")
CHROOT_TAR = CACHE / "bookworm-chroot.tar"
CHROOT_DEPS = ("python3.11,libc6,adduser,init-system-helpers,sudo,openssh-server,openssh-client,rsync,iproute2,"
               "iputils-arping,util-linux,systemd,logrotate")
COMMIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
UNITS = ("appliance-proxy.service", "appliance-carp.service", "appliance-sync.service", "appliance-sync.timer",
         "appliance-lists-update.service", "appliance-lists-update.timer")


def build(out: Path, commit: str, offline: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BUILD), "--out", str(out), "--commit", commit]
    if offline:  # a new network namespace with no interface up: any download attempt fails
        cmd = ["unshare", "--net", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def deb() -> Path:
    """The .deb of HEAD, built once per commit (image/debian/tree.py: the Debian image build of this run uses the same
    one; a second build here checks the bytes)."""
    need_tool("dpkg-deb", "git")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs Debian's /usr/bin/python3 (python3-venv)")
    return tree.carpguard_deb(lambda msg: None)


def contents(deb: Path) -> dict[str, tarfile.TarInfo]:
    raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    import io

    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        return {m.name.lstrip("."): m for m in t.getmembers()}


def test_info_and_contents(deb: Path):
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    for field in ("Package: carpguard", "Architecture: amd64", "python3.11", "sudo", "openssh-server"):
        assert field in info
    assert deb.name == f"carpguard_{info.split('Version: ')[1].split()[0]}_amd64.deb"
    m = contents(deb)
    assert all(i.uid == 0 and i.gid == 0 and i.uname == "root" for i in m.values())
    assert len({i.mtime for i in m.values()}) == 1  # clamped to SOURCE_DATE_EPOCH
    assert m["/usr/bin/appliance"].issym() and m["/usr/bin/appliance"].linkname == "/opt/carpguard/bin/appliance"
    assert m["/opt/carpguard/bin/python"].linkname == "python3"
    assert m["/opt/carpguard/bin/python3"].linkname == "/usr/bin/python3.11"  # Debian's interpreter
    for unit in UNITS:
        assert m[f"/lib/systemd/system/{unit}"].mode == 0o644
    for exe in ("/opt/carpguard/bin/appliance", "/opt/carpguard/libexec/appliance-proxy-start",
                "/opt/carpguard/libexec/appliance-sync-due", "/opt/carpguard/libexec/appliance-lists-due"):
        assert m[exe].mode == 0o755
    assert m["/etc/logrotate.d/appliance"].mode == 0o644
    assert not [n for n in m if n.endswith(".pyc") or "__pycache__" in n]
    assert not [n for n in m if "/site-packages/pip/" in n]
    assert any(n.startswith("/opt/carpguard/lib/python3.11/site-packages/mitmproxy/") for n in m)
    raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"carpguard-deb." not in raw  # the staging dir's name is nowhere (shebangs, activate, pyvenv.cfg)
    ctrl = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"/etc/logrotate.d/appliance" in ctrl  # conffiles


def test_lintian_no_errors(deb: Path):
    need_tool("lintian")
    r = subprocess.run(["lintian", "--no-tag-display-limit", str(deb)], capture_output=True, text=True, timeout=900)
    print(r.stdout)
    errors = [l for l in r.stdout.splitlines() if l.startswith("E:")]
    assert not errors, "\n".join(errors)


def chroot_tar() -> Path:
    """Debian 12 with the package's dependencies, built once by mmdebstrap (Debian mirror) and cached."""
    if CHROOT_TAR.exists():
        return CHROOT_TAR
    need_tool("mmdebstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CHROOT_TAR.with_suffix(".tar.part")
    r = subprocess.run(["mmdebstrap", "--variant=apt", "--format=tar", f"--include={CHROOT_DEPS}", "bookworm", str(tmp)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        pytest.skip(f"mmdebstrap failed (no Debian mirror?): {r.stderr.strip().splitlines()[-1:]}")
    tmp.rename(CHROOT_TAR)
    return CHROOT_TAR


# runs inside the chroot; every step must pass (set -e); prints what the test asserts on
IN_CHROOT = DEBIAN_TREE_SH + r"""
snap /tmp/before
mkdir -p /run/sshd
apt-get install -y -q /tmp/carpguard.deb > /tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
echo "USERS $(getent passwd carpguard | cut -d: -f1,6,7) $(getent passwd appliance-sync | cut -d: -f1,6,7)"
echo "ADMINUSER $(getent passwd carpguard-admin | cut -d: -f1,6,7)"
echo "MODES $(stat -c '%n=%a:%U:%G' /var/lib/appliance /var/lib/appliance/admin /var/lib/appliance/proxy/run /var/log/appliance \
  /var/log/appliance/access.log /etc/sudoers.d/appliance /var/lib/appliance-sync/.ssh)"
echo "PIDLINK $(readlink /var/lib/appliance/run/proxy.pid)"
visudo -c -q && echo VISUDO-OK
sudo -l -U appliance-sync | grep -q "/usr/bin/appliance sync-serve" && echo SUDO-RULE-OK
sshd -t && echo SSHD-OK
echo "FORCE $(sshd -T -C user=appliance-sync,host=peer,addr=192.0.2.7 | grep -i '^forcecommand' | cut -d' ' -f2-)"
echo "ROOTFORCE $(sshd -T -C user=root,host=peer,addr=192.0.2.7 | grep -i '^forcecommand' | cut -d' ' -f2-)"
for u in appliance-proxy.service appliance-carp.service appliance-sync.timer appliance-lists-update.timer; do echo "ENABLED $u $(systemctl is-enabled $u)"; done
systemd-analyze verify --man=no /lib/systemd/system/appliance-*.service /lib/systemd/system/appliance-*.timer \
  && echo VERIFY-OK
appliance --help | grep -q sync-receive && echo CLI-OK
/opt/carpguard/bin/python -c 'import mitmproxy, uvloop, pydantic_core, yaml, filters.engine, sync.keys; print("IMPORTS-OK")'
/opt/carpguard/libexec/appliance-proxy-start --help | grep -qi listen && echo WRAPPER-OK
test -n "$(find /opt/carpguard -name '*.pyc' | head -1)" && echo PYC-COMPILED
apt-get purge -y -q carpguard > /tmp/purge.log 2>&1 || { cat /tmp/purge.log; exit 1; }
snap /tmp/after
diff /tmp/before /tmp/after && echo FILES-SAME
diff /tmp/before.users /tmp/after.users && echo USERS-SAME
"""


def test_install_and_purge_offline_in_chroot(deb: Path, tmp_path: Path):
    need_tool("unshare", "chroot", "tar")
    tar = chroot_tar()
    root = tmp_path / "chroot"
    root.mkdir()
    subprocess.run(["tar", "-x", "-p", "-f", str(tar), "-C", str(root)], check=True)
    shutil.copy(deb, root / "tmp" / "carpguard.deb")
    (root / "tmp" / "run.sh").write_text(IN_CHROOT)
    # private mount + network namespaces: /dev and /proc vanish with the process, and apt has no network at all
    script = (f'mount --rbind /dev "{root}/dev" && mount -t proc proc "{root}/proc" && '
              f'chroot "{root}" /bin/sh /tmp/run.sh')
    r = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=900)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "USERS carpguard:/nonexistent:/usr/sbin/nologin appliance-sync:/var/lib/appliance-sync:/bin/sh" in out
    assert "ADMINUSER carpguard-admin:/nonexistent:/usr/sbin/nologin" in out  # the status page's own user
    for mode in ("/var/lib/appliance=710:root:carpguard-admin", "/var/lib/appliance/admin=750:root:carpguard-admin",
                 "/var/lib/appliance/proxy/run=755:carpguard:carpguard",
                 "/var/log/appliance=750:root:carpguard", "/var/log/appliance/access.log=640:carpguard:adm",
                 "/etc/sudoers.d/appliance=440:root:root", "/var/lib/appliance-sync/.ssh=750:root:appliance-sync"):
        assert mode in out
    assert "PIDLINK ../proxy/run/proxy.pid" in out
    assert "FORCE /usr/bin/sudo -n /usr/bin/appliance sync-serve" in out
    assert "ROOTFORCE none" in out  # the Match block ends with its file: other users keep the main config
    for unit in ("appliance-proxy.service", "appliance-carp.service", "appliance-sync.timer", "appliance-lists-update.timer"):
        assert f"ENABLED {unit} enabled" in out
    for ok in ("VISUDO-OK", "SUDO-RULE-OK", "SSHD-OK", "VERIFY-OK", "CLI-OK", "IMPORTS-OK", "WRAPPER-OK",
               "PYC-COMPILED", "FILES-SAME", "USERS-SAME"):
        assert ok in out, ok


def test_second_build_offline_same_bytes(deb: Path, tmp_path: Path):
    need_tool("unshare")
    r = build(tmp_path, COMMIT, offline=True)
    assert r.returncode == 0, r.stderr
    assert "offline" in r.stdout
    again = tmp_path / deb.name
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(deb.read_bytes()).hexdigest()

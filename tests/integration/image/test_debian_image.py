"""The Debian image (issue 10, section 3): both nodes of examples/debian.yaml built (cached), read back without
mounting (sgdisk, debugfs), two builds byte-identical, and no space left -> one clear error, nothing kept."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.core import loader
from filters import ruleset
from filters.index import read_meta
from image import debian
from image.debian import boot
from tests.support.env import ROOT, need_tool
from tests.support.image import DEBIAN_TREE_SH

pytestmark = [pytest.mark.slow, pytest.mark.root]

UNITS = {"multi-user.target.wants": ["appliance-proxy.service", "appliance-carp.service", "systemd-networkd.service"],
         "timers.target.wants": ["appliance-sync.timer"]}
OFF = [("multi-user.target.wants", "networking.service"), ("network-online.target.wants", "networking.service"),
       ("multi-user.target.wants", "e2scrub_reap.service")]


@pytest.fixture(scope="module")
def config(debian_config: Path) -> Path:
    return debian_config


@pytest.fixture(scope="module")
def deb(debian_deb: Path) -> Path:
    return debian_deb


@pytest.fixture(scope="module")
def dist(debian_dist: tuple[Path, dict]) -> tuple[Path, dict]:
    """The session's one build (tests/support/debian_build.py), also booted by tests/integration/lab/test_vmlab.py."""
    return debian_dist


def debugfs(img: Path, offset: int, cmd: str) -> str:
    """Run a debugfs request on the ext4 root inside the raw disk (a copy of the partition: debugfs has no offset)."""
    part = img.with_name(img.name + ".root")
    if not part.exists():
        subprocess.run(["dd", f"if={img}", f"of={part}", "bs=1M", f"skip={offset}", "iflag=skip_bytes", "conv=sparse",
                        "status=none"], check=True)
    r = subprocess.run(["debugfs", "-R", cmd, str(part)], capture_output=True, text=True)
    return r.stdout


def test_outputs_sums_and_manifest(dist):
    out, res = dist
    names = {p.name for p in out.iterdir()}
    assert {"fw1.img", "fw1.qcow2", "fw2.img", "fw2.qcow2", "SHA256SUMS", "manifest.json", "admin_ed25519"} <= names
    assert not [n for n in names if n.startswith(".")], names  # no work dir or .part left
    subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out, check=True)
    pk = res["packages"]
    assert pk["carpguard"] and pk["linux-image-amd64"] and pk["ucarp"] and pk["openssh-server"] and pk["grub-pc-bin"]
    assert oct((out / "admin_ed25519").stat().st_mode & 0o777) == "0o600"
    info = subprocess.run(["qemu-img", "info", str(out / "fw1.qcow2")], capture_output=True, text=True, check=True).stdout
    assert "file format: qcow2" in info
    for name in ("fw1.img", "fw1.qcow2"):  # they hold private keys and the CARP pass
        assert (out / name).stat().st_mode & 0o077 == 0, name


def test_partition_table(dist):
    out, res = dist
    table = subprocess.run(["sgdisk", "-p", str(out / "fw1.img")], capture_output=True, text=True, check=True).stdout
    rows = [l.split() for l in table.splitlines() if l.strip()[:1].isdigit()]
    assert [r[5] for r in rows] == ["EF02", "EF00", "8304"], table  # BIOS boot, ESP, Linux x86-64 root
    with open(out / "fw1.img", "rb") as f:
        mbr = f.read(512)
        assert mbr[510:] == b"\x55\xaa" and mbr[:2] != b"\0\0"  # GRUB's boot.img, partition table kept
        f.seek(boot.BIOS_FIRST * 512)
        assert f.read(4) == b"RV\xbe\x1b"  # core.img starts with GRUB's diskboot.img
    assert res["nodes"]["fw1"]["disk"]["bios"]["core_sectors"] > 1


def test_root_fs_holds_the_node(dist):
    out, res = dist
    for node, lan in (("fw1", "192.168.1.2/24"), ("fw2", "192.168.1.3/24")):
        img = out / f"{node}.img"
        off = res["nodes"][node]["disk"]["root"]["first_lba"] * 512
        cat = lambda p: debugfs(img, off, f"cat {p}")  # noqa: E731
        assert cat("/etc/hostname") == f"{node}\n"
        assert cat("/var/lib/appliance/node.yaml") == f"node: {node}\n"
        assert f"Address={lan}" in cat("/etc/systemd/network/10-lan.network")
        assert "Name=eth1" in cat("/etc/systemd/network/20-sync.network")
        assert "net.ipv4.ip_nonlocal_bind=1" in cat("/etc/sysctl.d/60-carpguard.conf")
        assert "PasswordAuthentication no" in cat("/etc/ssh/sshd_config.d/10-carpguard.conf")
        assert "ForceCommand /usr/bin/sudo -n /usr/bin/appliance sync-serve" in cat("/etc/ssh/sshd_config.d/appliance-sync.conf")
        assert "console=ttyS0" in cat("/boot/grub/grub.cfg")
        shadow = cat("/etc/shadow")
        assert next(l for l in shadow.splitlines() if l.startswith("root:")).split(":")[1] == "!*"
        for wants, units in UNITS.items():
            listing = debugfs(img, off, f"ls /etc/systemd/system/{wants}")
            for u in units:
                assert u in listing, (node, wants, u)
        for wants, unit in OFF:  # not started at boot (docs/image.md: the boot under TCG)
            assert unit not in debugfs(img, off, f"ls /etc/systemd/system/{wants}"), (node, wants, unit)
        assert "releases/1" in debugfs(img, off, "stat /var/lib/appliance/current")
        assert "/var/lib/appliance/current" in debugfs(img, off, "stat /etc/appliance")
        for secret in ("/etc/ssh/ssh_host_ed25519_key", "/var/lib/appliance/keys/sync_ed25519",
                       "/var/lib/appliance/releases/1/appliance.yaml", "/root/.ssh/authorized_keys"):
            assert "Mode:  0600" in debugfs(img, off, f"stat {secret}"), (node, secret)
        # per-node sync keys: the node's own key above; no sync key in the release (what a sync copies)
        assert "sync_ed25519" not in debugfs(img, off, "ls /var/lib/appliance/releases/1/keys"), node
        assert "Mode:  0640" in debugfs(img, off, "stat /var/lib/appliance-sync/.ssh/authorized_keys")


def sums(out: Path) -> dict[str, str]:
    return {name: digest for digest, name in (l.split() for l in (out / "SHA256SUMS").read_text().splitlines())}


def test_two_builds_are_byte_identical(config, deb, dist, tmp_path):
    """fw1 again from scratch (no image cache; the same base packages, .deb, config and keys): the same bytes. One
    node keeps `make test` short; the node is built by the same code as every other."""
    out, _ = dist
    again = tmp_path / "again"
    debian.build(loader.load(config), config, again, only=["fw1"], deb=deb, use_cache=False, log=lambda m: None)
    first, second = sums(out), sums(again)
    assert {k: second[k] for k in ("fw1.img", "fw1.qcow2")} == {k: first[k] for k in ("fw1.img", "fw1.qcow2")}


def test_no_space_left_is_one_clear_error_and_nothing_kept(config, dist, tmp_path):
    """An out dir on a 64 MiB tmpfs (a private mount namespace): the space check refuses before writing anything."""
    need_tool("unshare")
    small = tmp_path / "small"
    small.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; from appliance.core import loader; "
            f"from image import debian; c = Path({str(config)!r}); "
            f"debian.build(loader.load(c), c, Path({str(small)!r}) / 'dist', use_cache=False, log=lambda m: None)")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                        f"mount -t tmpfs -o size=64m tmpfs {small} && {sys.executable} -c \"{code}\"; "
                        f"rc=$?; ls -A {small}/dist; exit $rc"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "MiB free, the Debian image build needs about" in err and "nothing was written" in err, r.stderr
    assert r.stdout.strip() == "", r.stdout  # the out dir on the tmpfs holds nothing
    assert not os.listdir(small)  # and the tmpfs went away with the namespace


def test_baked_list_index_is_current_on_the_image(dist, tmp_path):
    """The release's list index, read back from the ext4 with the mtimes the node boots with (debugfs rdump keeps
    them): its fast fingerprint matches, so the proxy neither hashes nor compiles (issue 10: it crash-looped)."""
    out, res = dist
    img = out / "fw1.img"
    off = res["nodes"]["fw1"]["disk"]["root"]["first_lba"] * 512
    debugfs(img, off, f"rdump /var/lib/appliance/releases/1 {tmp_path}")
    rel = tmp_path / "1"
    cfg = loader.load(rel / "appliance.yaml")
    meta = read_meta(ruleset.index_path(rel))
    assert meta["fingerprint"] == ruleset.fingerprint(cfg, rel)
    assert meta["content"] == ruleset.content_fingerprint(cfg, rel)


# runs in a copy of fw1's root file system (no network): purge the .deb the image came with, install it again with
# dpkg -i, purge it again; prints what the test asserts on
IN_IMAGE = DEBIAN_TREE_SH + r"""
left() {
  ls -d /opt/carpguard /usr/bin/appliance /var/lib/appliance /var/lib/appliance-sync /etc/sudoers.d/appliance \
        /etc/ssh/sshd_config.d/appliance-sync.conf /lib/systemd/system/appliance-* /etc/systemd/system/*/appliance-* \
        2>/dev/null || true
  getent passwd carpguard appliance-sync || true
}
mkdir -p /run/sshd
dpkg-query -W -f='INSTALLED ${Status}\n' carpguard
apt-get purge -y -q carpguard > /tmp/purge1.log 2>&1 || { cat /tmp/purge1.log; exit 1; }
echo "LEFT1 [$(left | tr '\n' ' ')]"
snap /tmp/purged
dpkg -i /tmp/carpguard.deb > /tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
for u in appliance-proxy.service appliance-carp.service appliance-sync.timer; do echo "ENABLED $u $(systemctl is-enabled $u)"; done
appliance --help | grep -q sync-receive && echo CLI-OK
apt-get purge -y -q carpguard > /tmp/purge2.log 2>&1 || { cat /tmp/purge2.log; exit 1; }
echo "LEFT2 [$(left | tr '\n' ' ')]"
snap /tmp/again
diff /tmp/purged /tmp/again && echo FILES-SAME
diff /tmp/purged.users /tmp/again.users && echo USERS-SAME
"""


def test_purge_and_dpkg_i_in_the_image_leave_nothing(deb, dist, tmp_path):
    """Issue 10: `apt-get purge` of the .deb in the image leaves no unit, user or file of it; `dpkg -i` of the .deb
    then installs it again (enabled units, the CLI), offline, and a second purge leaves the tree as the first did.
    On fw1's root file system (its partition loop-mounted read-only, under an overlay that takes the writes), in
    private mount and network namespaces (no network at all). The image itself is never written."""
    need_tool("unshare", "chroot", "losetup")
    out, res = dist
    off = res["nodes"]["fw1"]["disk"]["root"]["first_lba"] * 512
    lower, upper, work, root = (tmp_path / d for d in ("lower", "upper", "work", "root"))
    for d in (lower, upper, work, root):
        d.mkdir()
    script = (f'mount -o loop,ro,noload,offset={off} "{out / "fw1.img"}" "{lower}" && '
              f'mount -t overlay overlay -o "lowerdir={lower},upperdir={upper},workdir={work}" "{root}" && '
              f'cp "{deb}" "{root}/tmp/carpguard.deb" && printf %s "$IN_IMAGE" > "{root}/tmp/run.sh" && '
              f'mount --rbind /dev "{root}/dev" && mount -t proc proc "{root}/proc" && chroot "{root}" /bin/sh /tmp/run.sh')
    r = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "IN_IMAGE": IN_IMAGE})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "INSTALLED install ok installed" in r.stdout
    assert "LEFT1 []" in r.stdout and "LEFT2 []" in r.stdout, r.stdout
    for unit in ("appliance-proxy.service", "appliance-carp.service", "appliance-sync.timer"):
        assert f"ENABLED {unit} enabled" in r.stdout, r.stdout
    for ok in ("CLI-OK", "FILES-SAME", "USERS-SAME"):
        assert ok in r.stdout, r.stdout

"""--freebsd-dist: a synthetic base.txz/kernel.txz (stand-in bootcode) -> root UFS, GPT disk, qcow2, read back with dissect."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support.env import need_tool
from tests.support.image import attrs, run_image, ufs

PMBR = b"\xfa\x31\xc0PMBR-STAND-IN" + b"\x00" * 400
GPTBOOT = b"GPTBOOT-STAND-IN" * 2048
LOADER_EFI = b"MZ" + b"LOADER-EFI-STAND-IN" * 1000


def _set(path: Path, members: list[tuple]) -> None:
    with tarfile.open(path, "w:xz") as tf:
        for name, kind, mode, data in members:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.uname, ti.gname, ti.mtime = mode, "root", "wheel", 1
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tf.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, data
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


@pytest.fixture
def fake_dist(tmp_path: Path) -> Path:
    d = tmp_path / "freebsd"
    d.mkdir()
    _set(d / "base.txz", [
        ("./", "dir", 0o755, None), ("./bin", "dir", 0o755, None), ("./bin/sh", "file", 0o555, b"\x7fELF stand-in sh"),
        ("./bin/[", "file", 0o555, b"\x7fELF test"), ("./bin/test", "hard", 0o555, "./bin/["),
        ("./boot", "dir", 0o755, None), ("./boot/pmbr", "file", 0o444, PMBR), ("./boot/gptboot", "file", 0o444, GPTBOOT),
        ("./boot/loader.efi", "file", 0o444, LOADER_EFI),
        ("./etc", "dir", 0o755, None), ("./etc/sysctl.conf", "file", 0o644, b"# base sysctl.conf\n"),
        ("./etc/master.passwd", "file", 0o600, b"root:*:0:0::0:0:Charlie &:/root:/bin/csh\n"),
        ("./sbin", "dir", 0o755, None), ("./sbin/init", "file", 0o500, b"\x7fELF init"),
        ("./usr", "dir", 0o755, None), ("./usr/local", "dir", 0o755, None), ("./var", "dir", 0o755, None),
        ("./sys", "sym", 0o755, "usr/src/sys"),
    ])
    _set(d / "kernel.txz", [("./boot/kernel", "dir", 0o755, None), ("./boot/kernel/kernel", "file", 0o555, b"\x7fELF kernel")])
    lines = []
    for name in ("base.txz", "kernel.txz"):
        digest = hashlib.sha256((d / name).read_bytes()).hexdigest()
        lines.append(f'{name}\t{digest}\t10\t{name[:-4]}\t"{name}"\ton')
    (d / "MANIFEST").write_text("\n".join(lines) + "\n")
    return d


def _tools():
    need_tool("makefs", "shellcheck", "ssh-keygen", "sgdisk", "qemu-img", "mkfs.vfat", "mcopy", "mmd")


def test_full_disk_read_back(example_tree: Path, tmp_path: Path, fake_dist: Path):
    _tools()
    from dissect.volume.disk import Disk

    out = tmp_path / "dist"
    r = run_image(example_tree, out, "--freebsd-dist", str(fake_dist), "--only", "fw1")
    assert r.returncode == 0, r.stderr
    img = out / "fw1.img"
    with open(img, "rb") as fh:
        assert fh.read(446)[: len(PMBR.rstrip(b"\x00"))] == PMBR.rstrip(b"\x00")  # pmbr boot code in the protective MBR
        fh.seek(0)
        d = Disk(fh)
        parts = sorted(d.partitions, key=lambda p: p.offset)
        assert [p.name for p in parts] == ["gptboot0", "efiboot0", "rootfs"]
        assert [str(p.type).lower() for p in parts] == ["83bd6b9d-7f41-11dc-be0b-001560b84f0f", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
                                                       "516e7cb6-6ecf-11d6-8ff8-00022d09712b"]
        fh.seek(parts[0].offset)
        assert fh.read(len(GPTBOOT)) == GPTBOOT
        root = ufs(parts[2].open())
        assert root.get("/bin/sh").open().read() == b"\x7fELF stand-in sh"
        assert attrs(root, "/bin/sh") == (0o555, 0, 0)
        assert attrs(root, "/sbin/init") == (0o500, 0, 0)
        assert attrs(root, "/etc/master.passwd") == (0o600, 0, 0)
        assert root.get("/bin/test").inum == root.get("/bin/[").inum  # hard link kept
        assert root.get("/boot/kernel/kernel").open().read() == b"\x7fELF kernel"
        assert b"net.inet.carp.preempt=1" in root.get("/etc/sysctl.conf").open().read()  # overlay wins over base
        assert b'hostname="fw1"' in root.get("/etc/rc.conf").open().read()
        assert attrs(root, "/etc/rc.conf.d/netif") == (0o600, 0, 0)
        assert b"/dev/gpt/rootfs\t/" in root.get("/etc/fstab").open().read()
        assert root.get("/sys").link == "usr/src/sys"
        fh.seek(parts[1].offset)
        esp = fh.read(parts[1].size)
    espf = tmp_path / "esp.img"
    espf.write_bytes(esp)
    got = subprocess.run(["mtype", "-i", str(espf), "::/EFI/BOOT/BOOTX64.EFI"], capture_output=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    assert got.returncode == 0 and got.stdout == LOADER_EFI
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out / "fw1.qcow2")], capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == img.stat().st_size
    sums = (out / "SHA256SUMS").read_text()
    for name in ("fw1.img", "fw1.qcow2", "fw1-root.ufs", "fw1.ufs", "manifest.json"):
        assert f"  {name}\n" in sums
    man = json.loads((out / "manifest.json").read_text())
    assert man["nodes"]["fw1"]["disk"]["root"]["label"] == "rootfs"
    # same input, same bytes: the disk path is reproducible too
    out2 = tmp_path / "dist2"
    assert run_image(example_tree, out2, "--freebsd-dist", str(fake_dist), "--only", "fw1").returncode == 0
    assert (out2 / "SHA256SUMS").read_text() == sums


def test_dist_checksum_mismatch(example_tree: Path, tmp_path: Path, fake_dist: Path):
    _tools()
    with open(fake_dist / "kernel.txz", "ab") as f:
        f.write(b"tampered")
    r = run_image(example_tree, tmp_path / "d", "--freebsd-dist", str(fake_dist))
    assert r.returncode == 2 and "kernel.txz: SHA-256" in r.stderr and "does not match MANIFEST" in r.stderr


def test_dist_without_manifest_or_bootcode(example_tree: Path, tmp_path: Path, fake_dist: Path):
    _tools()
    (fake_dist / "MANIFEST").rename(fake_dist / "MANIFEST.x")
    r = run_image(example_tree, tmp_path / "d", "--freebsd-dist", str(fake_dist))
    assert r.returncode == 2 and "MANIFEST: missing" in r.stderr
    (fake_dist / "MANIFEST.x").rename(fake_dist / "MANIFEST")
    _set(fake_dist / "base.txz", [("./bin", "dir", 0o755, None), ("./bin/sh", "file", 0o555, b"sh")])
    digest = hashlib.sha256((fake_dist / "base.txz").read_bytes()).hexdigest()
    mf = (fake_dist / "MANIFEST").read_text().splitlines()
    mf[0] = f'base.txz\t{digest}\t1\tbase\t"b"\ton'
    (fake_dist / "MANIFEST").write_text("\n".join(mf) + "\n")
    r = run_image(example_tree, tmp_path / "d2", "--freebsd-dist", str(fake_dist))
    assert r.returncode == 2 and "has no boot/pmbr, boot/gptboot, boot/loader.efi" in r.stderr

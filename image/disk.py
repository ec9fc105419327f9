"""A bootable raw GPT disk (freebsd-boot + EFI system partition + freebsd-ufs root) built with sgdisk, and its qcow2."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

from image.errors import BuildError, MissingTool

SECTOR = 512
MIB = 1 << 20
BOOT_START = 40  # sectors; what gpart uses for freebsd-boot on a fresh GPT
BOOT_SIZE = 1024  # 512 KiB: gptboot must fit (gpart's limit is 545 KiB)
ESP_SIZE = 40 * MIB  # FAT32 needs at least ~33 MiB with 512-byte sectors
LABELS = {"boot": "gptboot0", "efi": "efiboot0", "root": "rootfs"}
TYPES = {"boot": "a501", "efi": "ef00", "root": "a503"}  # sgdisk codes: freebsd-boot, EFI system, freebsd-ufs
NAMESPACE = uuid.UUID("6b1c2a3e-7d2f-4c55-9a7e-5b0f3c1d2e4f")


def tool(name: str, package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise MissingTool(name, package, "to build the disk image")
    return exe


def _run(cmd: list[str], env: dict | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise BuildError(f"{Path(cmd[0]).name} failed ({' '.join(cmd)}):\n{(r.stderr or r.stdout).strip()}")


def esp_image(path: Path, files: dict[str, Path], epoch: int, label: str = "EFISYS", size: int = ESP_SIZE,
              volid: str = "c4a9b00d") -> None:
    """FAT32 ESP holding `files` ({"EFI/BOOT/BOOTX64.EFI": source}); fixed volume id, every time the epoch."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1"}
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    _run([tool("mkfs.vfat", "dosfstools"), "-F", "32", "-S", str(SECTOR), "-n", label, "-i", volid, "--invariant", str(path)], env)
    mmd, mcopy = tool("mmd", "mtools"), tool("mcopy", "mtools")
    dirs = sorted({"/".join(dest.split("/")[:i]) for dest in files for i in range(1, dest.count("/") + 1)})
    if dirs:
        _run([mmd, "-i", str(path), *(f"::/{d}" for d in dirs)], env)
    for dest, src in sorted(files.items()):
        os.utime(src, (epoch, epoch))
        _run([mcopy, "-m", "-i", str(path), str(src), f"::/{dest}"], env)


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _copy_sparse(src: Path, f) -> None:
    """Copy src at f's position; runs of zeros become holes (the disk file was truncated to size: they read as 0)."""
    zero = bytes(MIB)
    with open(src, "rb") as s:
        while chunk := s.read(MIB):
            if chunk == zero[:len(chunk)]:
                f.seek(len(chunk), os.SEEK_CUR)
            else:
                f.write(chunk)


def gpt_disk(path: Path, node: str, epoch: int, parts: list[dict], mbr_code: bytes = b"", tail: int = MIB) -> dict:
    """A raw GPT disk of `parts` in order ({name, type (sgdisk code), label, first (sector), sectors, src (a file
    written at the partition's start, or None)}); disk and partition GUIDs derived from node, epoch and name."""
    sgdisk = tool("sgdisk", "gdisk")
    end = max(p["first"] + p["sectors"] for p in parts)
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(end * SECTOR + tail)  # room for the backup GPT
    guid = lambda what: str(uuid.uuid5(NAMESPACE, f"{node}:{epoch}:{what}")).upper()  # noqa: E731
    cmd = [sgdisk, "--clear", "-a", "8", "-U", guid("disk")]
    for i, p in enumerate(parts, 1):
        cmd += ["-n", f"{i}:{p['first']}:{p['first'] + p['sectors'] - 1}", "-t", f"{i}:{p['type']}", "-c", f"{i}:{p['label']}",
                "-u", f"{i}:{guid(p['name'])}"]
    _run(cmd + [str(path)])
    with open(path, "r+b") as f:
        if mbr_code:
            f.seek(0)
            f.write(mbr_code[:446])  # boot code only: keep sgdisk's protective partition table
        for p in parts:
            if p.get("src") is not None:
                f.seek(p["first"] * SECTOR)
                _copy_sparse(p["src"], f)
    return {p["name"]: {"first_lba": p["first"], "last_lba": p["first"] + p["sectors"] - 1, "label": p["label"],
                        "type": p["type"], "guid": guid(p["name"])} for p in parts}


def build_disk(path: Path, node: str, rootfs: Path, pmbr: Path, gptboot: Path, loader_efi: Path, epoch: int, work: Path) -> dict:
    """FreeBSD's raw GPT disk (freebsd-boot, ESP, UFS root) with deterministic GUIDs; returns the layout (sectors)."""
    if gptboot.stat().st_size > BOOT_SIZE * SECTOR:
        raise BuildError(f"{gptboot}: {gptboot.stat().st_size} bytes does not fit the {BOOT_SIZE * SECTOR}-byte freebsd-boot partition")
    esp = work / "esp.img"
    esp_image(esp, {"EFI/BOOT/BOOTX64.EFI": loader_efi, "EFI/FreeBSD/loader.efi": loader_efi}, epoch)
    esp_start = MIB // SECTOR
    root_start = esp_start + ESP_SIZE // SECTOR
    parts = [
        {"name": "boot", "first": BOOT_START, "sectors": BOOT_SIZE, "src": gptboot},
        {"name": "efi", "first": esp_start, "sectors": ESP_SIZE // SECTOR, "src": esp},
        {"name": "root", "first": root_start, "sectors": _align(rootfs.stat().st_size, MIB) // SECTOR, "src": rootfs},
    ]
    for p in parts:
        p.update(type=TYPES[p["name"]], label=LABELS[p["name"]])
    layout = gpt_disk(path, node, epoch, parts, pmbr.read_bytes())
    esp.unlink()
    for v in layout.values():
        v.pop("guid")
    return layout


def qcow2(raw: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    _run([tool("qemu-img", "qemu-utils"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)])

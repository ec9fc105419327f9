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


def esp_image(path: Path, loader_efi: Path, epoch: int, label: str = "EFISYS") -> None:
    """FAT32 ESP with loader.efi as the removable-media path and FreeBSD's own; fixed volume id and times."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1"}
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(ESP_SIZE)
    _run([tool("mkfs.vfat", "dosfstools"), "-F", "32", "-S", str(SECTOR), "-n", label, "-i", "c4a9b00d", "--invariant", str(path)], env)
    mmd, mcopy = tool("mmd", "mtools"), tool("mcopy", "mtools")
    os.utime(loader_efi, (epoch, epoch))
    _run([mmd, "-i", str(path), "::/EFI", "::/EFI/BOOT", "::/EFI/FreeBSD"], env)
    _run([mcopy, "-m", "-i", str(path), str(loader_efi), "::/EFI/BOOT/BOOTX64.EFI"], env)
    _run([mcopy, "-m", "-i", str(path), str(loader_efi), "::/EFI/FreeBSD/loader.efi"], env)


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def build_disk(path: Path, node: str, rootfs: Path, pmbr: Path, gptboot: Path, loader_efi: Path, epoch: int, work: Path) -> dict:
    """Raw GPT disk with deterministic GUIDs; returns the partition layout (sectors)."""
    sgdisk = tool("sgdisk", "gdisk")
    if gptboot.stat().st_size > BOOT_SIZE * SECTOR:
        raise BuildError(f"{gptboot}: {gptboot.stat().st_size} bytes does not fit the {BOOT_SIZE * SECTOR}-byte freebsd-boot partition")
    esp = work / "esp.img"
    esp_image(esp, loader_efi, epoch)
    esp_start = MIB // SECTOR
    esp_sectors = ESP_SIZE // SECTOR
    root_start = esp_start + esp_sectors
    root_sectors = _align(rootfs.stat().st_size, MIB) // SECTOR
    total = (root_start + root_sectors) * SECTOR + MIB  # room for the backup GPT
    layout = {
        "boot": (BOOT_START, BOOT_START + BOOT_SIZE - 1),
        "efi": (esp_start, esp_start + esp_sectors - 1),
        "root": (root_start, root_start + root_sectors - 1),
    }
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(total)
    guid = lambda what: str(uuid.uuid5(NAMESPACE, f"{node}:{epoch}:{what}")).upper()  # noqa: E731
    cmd = [sgdisk, "--clear", "-a", "8", "-U", guid("disk")]
    for i, part in enumerate(("boot", "efi", "root"), 1):
        s, e = layout[part]
        cmd += ["-n", f"{i}:{s}:{e}", "-t", f"{i}:{TYPES[part]}", "-c", f"{i}:{LABELS[part]}", "-u", f"{i}:{guid(part)}"]
    _run(cmd + [str(path)])
    with open(path, "r+b") as f:
        code = pmbr.read_bytes()[:446]  # boot code only: keep sgdisk's protective partition table
        f.seek(0)
        f.write(code)
        for part, src in (("boot", gptboot), ("efi", esp), ("root", rootfs)):
            f.seek(layout[part][0] * SECTOR)
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 1 << 20)
    esp.unlink()
    return {part: {"first_lba": s, "last_lba": e, "label": LABELS[part], "type": TYPES[part]} for part, (s, e) in layout.items()}


def qcow2(raw: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    _run([tool("qemu-img", "qemu-utils"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)])

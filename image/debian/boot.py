"""GRUB for BIOS and UEFI from the image's own grub-pc-bin/grub-efi-amd64-bin, and the disk: BIOS boot + ESP + ext4."""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

from image import disk
from image.debian.rootfs import run
from image.errors import BuildError

SECTOR = disk.SECTOR
MIB = disk.MIB
BIOS_FIRST, BIOS_SECTORS = 40, 2008  # sectors 40-2047: GRUB's core.img (about 100 KiB here) with room to spare
ESP_SIZE = 64 * MIB
ESP_VOLID = "ca5b0071"  # fixed FAT volume id (the ESP is not mounted on the node: nothing there updates GRUB)
TYPES = {"bios": "ef02", "esp": "ef00", "root": "8304"}  # BIOS boot, EFI system, Linux x86-64 root (discoverable)
LABELS = {"bios": "bios-boot", "esp": "EFI system", "root": "root"}
COMMON = ["part_gpt", "ext2", "search", "search_fs_uuid", "normal", "linux", "echo", "test", "configfile", "serial",
          "terminal", "gzio", "minicmd", "ls", "cat", "reboot", "halt"]
MODULES = {"i386-pc": ["biosdisk", *COMMON], "x86_64-efi": ["fat", "efi_gop", "all_video", *COMMON]}


def in_tree(root: Path, program: str, *args: str) -> list[str]:
    """Run one of the tree's programs on the host through the tree's dynamic loader and libraries (no chroot, so
    its paths are the host's): GRUB's tools then match the modules they package."""
    libs = ":".join(str(root / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
    return [str(root / "lib64/ld-linux-x86-64.so.2"), "--library-path", libs, str(root / program.lstrip("/")), *args]


def kernel_version(root: Path) -> str:
    kernels = sorted(p.name[len("vmlinuz-"):] for p in (root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1 or not (root / "boot" / f"initrd.img-{kernels[0]}").exists():
        raise BuildError(f"{root}/boot: expected one kernel with its initrd, found {kernels or 'none'}")
    return kernels[0]


def install_modules(root: Path) -> None:
    """What grub-install copies: /boot/grub/<platform>/*.mod, so `insmod` finds any module at boot."""
    for platform in MODULES:
        src, dst = root / "usr/lib/grub" / platform, root / "boot/grub" / platform
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.suffix in (".mod", ".lst", ".img") and f.is_file():
                shutil.copyfile(f, dst / f.name)
                os.chmod(dst / f.name, 0o644)


def grub_images(root: Path, early_cfg: Path, work: Path) -> dict[str, Path]:
    """core.img (BIOS) and BOOTX64.EFI (UEFI), each with the early config that finds the root by its UUID."""
    out = {}
    for platform, name in (("i386-pc", "core.img"), ("x86_64-efi", "BOOTX64.EFI")):
        target = work / name
        run(in_tree(root, "/usr/bin/grub-mkimage", "-d", str(root / "usr/lib/grub" / platform), "-O", platform,
                    "-o", str(target), "-c", str(early_cfg), "-p", "/boot/grub", *MODULES[platform]), f"grub-mkimage {platform}")
        out[platform] = target
    return out


# GRUB's i386-pc boot.img fields (include/grub/i386/pc/boot.h) and diskboot's first blocklist (the last 12 bytes of
# core.img's first sector: start LBA u64, sector count u16, load segment u16), as grub-bios-setup fills them
BPB = slice(0x03, 0x5A)
KERNEL_SECTOR, BOOT_DRIVE, DRIVE_CHECK = 0x5C, 0x64, 0x66
PART_TABLE = slice(0x1B8, 0x1FE)  # disk signature + the (protective) partition table, kept from sgdisk's MBR
BLOCKLIST = SECTOR - 12
KERNEL_SEG = 0x800 + (SECTOR >> 4)  # GRUB_BOOT_I386_PC_KERNEL_SEG + one sector: where the second sector loads


def bios_embed(img: Path, boot_img: bytes, core: bytes, first: int, sectors: int) -> int:
    """What grub-bios-setup does for a GPT disk with a BIOS boot partition at `first`, done on the file (it cannot
    run on a disk file: it insists on finding the device of its module directory). Without Reed-Solomon codes
    (grub-bios-setup --no-rs-codes): core.img is written whole, so the boot loader finds it as one contiguous run."""
    nsec = (len(core) + SECTOR - 1) // SECTOR
    if nsec > sectors:
        raise BuildError(f"GRUB core.img is {nsec} sectors; the BIOS boot partition holds {sectors}")
    core_b = bytearray(core + bytes(nsec * SECTOR - len(core)))
    struct.pack_into("<QHH", core_b, BLOCKLIST, first + 1, nsec - 1, KERNEL_SEG)
    struct.pack_into("<QHH", core_b, BLOCKLIST - 12, 0, 0, 0)  # the terminator
    with open(img, "r+b") as f:
        mbr = f.read(SECTOR)
        boot = bytearray(boot_img[:SECTOR])
        boot[BPB] = mbr[BPB]
        boot[PART_TABLE] = mbr[PART_TABLE]
        boot[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"  # a hard disk: no floppy drive check (buggy BIOSes)
        boot[BOOT_DRIVE] = 0xFF
        struct.pack_into("<Q", boot, KERNEL_SECTOR, first)
        f.seek(first * SECTOR)
        f.write(core_b)
        f.seek(0)
        f.write(boot)
    return nsec


def make_disk(img: Path, node: str, epoch: int, rootfs: Path, root: Path, early_cfg: Path, work: Path) -> dict:
    """The raw GPT disk: BIOS boot (GRUB core.img), ESP (BOOTX64.EFI), the ext4 root; boots on BIOS and UEFI."""
    images = grub_images(root, early_cfg, work)
    esp = work / "esp.img"
    efi = images["x86_64-efi"]
    disk.esp_image(esp, {"EFI/BOOT/BOOTX64.EFI": efi, "EFI/debian/grubx64.efi": efi}, epoch, label="EFI", size=ESP_SIZE,
                   volid=ESP_VOLID)
    esp_first = BIOS_FIRST + BIOS_SECTORS
    parts = [{"name": "bios", "first": BIOS_FIRST, "sectors": BIOS_SECTORS, "src": None},
             {"name": "esp", "first": esp_first, "sectors": ESP_SIZE // SECTOR, "src": esp},
             {"name": "root", "first": esp_first + ESP_SIZE // SECTOR, "sectors": rootfs.stat().st_size // SECTOR, "src": rootfs}]
    for p in parts:
        p.update(type=TYPES[p["name"]], label=LABELS[p["name"]])
    layout = disk.gpt_disk(img, node, epoch, parts)
    layout["bios"]["core_sectors"] = bios_embed(img, (root / "usr/lib/grub/i386-pc/boot.img").read_bytes(),
                                                images["i386-pc"].read_bytes(), BIOS_FIRST, BIOS_SECTORS)
    esp.unlink()
    return layout

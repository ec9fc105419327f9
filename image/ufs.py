"""UFS images with Debian's makefs, made reproducible: frozen clock, then heap pointers and inode generations normalised."""
from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from image.errors import BuildError, MissingTool

DEFAULT_VERSION = 1  # see README: makefs puts UFS2's superblock at 8192, where FreeBSD looks only for UFS1
SBLOCK = 8192  # where makefs writes the primary superblock, UFS1 and UFS2 alike
FS_UFS1_MAGIC = 0x011954
FS_UFS2_MAGIC = 0x19540119
# struct fs offsets (sys/ufs/ffs/fs.h; tests compare them with dissect.ffs's definition)
OFF = {"sblkno": 8, "iblkno": 16, "old_cgoffset": 24, "old_cgmask": 28, "ncg": 44, "fsize": 52, "frag": 56,
       "ipg": 184, "fpg": 188, "metackhash": 1308, "flags": 1312, "magic": 1372}
INCORE = (728, 856)  # fs_ocsp padding + fs_si: in-core pointers that makefs writes from its heap
DI_GEN = {1: (128, 108), 2: (256, 80)}  # dinode size, offset of di_gen


def makefs_bin() -> str:
    exe = shutil.which("makefs")
    if exe is None:
        raise MissingTool("makefs", "makefs", "to build UFS images")
    return exe


def userdb(dirpath: Path, users: dict[str, tuple[int, int]]) -> Path:
    """A FreeBSD-style master.passwd/group for makefs -N, so names in the spec resolve the same on every build host."""
    dirpath.mkdir(parents=True, exist_ok=True)
    pw = ["root:*:0:0::0:0:Charlie &:/root:/bin/sh"]
    grp = ["wheel:*:0:root"]
    for name, (uid, gid) in sorted(users.items()):
        if name in ("root", "wheel"):
            continue
        pw.append(f"{name}:*:{uid}:{gid}::0:0:{name}:/nonexistent:/usr/sbin/nologin")
        grp.append(f"{name}:*:{gid}:")
    (dirpath / "master.passwd").write_text("\n".join(pw) + "\n")
    (dirpath / "group").write_text("\n".join(grp) + "\n")
    return dirpath


def build(image: Path, root: Path, spec: Path, epoch: int, users: dict[str, tuple[int, int]], version: int = DEFAULT_VERSION,
          size: int | None = None, free: str = "10%", free_files: str = "10%") -> dict:
    """Run makefs on `root` with `spec` (owners/modes/times), then normalise; returns the normalisation report."""
    if version not in (1, 2):
        raise BuildError(f"UFS version must be 1 or 2 (got {version})")
    exe = makefs_bin()
    with tempfile.TemporaryDirectory(prefix="carpguard-db-") as d:
        db = userdb(Path(d), users)
        cmd = [exe, "-t", "ffs", "-B", "le", "-o", f"version={version},bsize=32768,fsize=4096,minfree=8,optimization=time",
               "-T", str(epoch), "-F", str(spec), "-N", str(db), "-f", free_files]
        cmd += ["-s", str(size)] if size else ["-b", free]
        cmd += [str(image), str(root)]
        env = {**os.environ, "TZ": "UTC", "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not image.exists():
        raise BuildError(f"makefs failed ({' '.join(cmd)}):\n{(r.stderr or r.stdout).strip()}")
    return normalise(image, seed=epoch)


def _gen(seed: int, ino: int) -> int:
    g = int.from_bytes(hashlib.sha256(f"{seed}:{ino}".encode()).digest()[:4], "little")
    return g or 1


def normalise(image: Path, seed: int = 0) -> dict:
    """Zero the in-core pointer fields in every superblock copy and derive inode generations from the inode number."""
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        def i32(off: int) -> int:
            return struct.unpack_from("<i", m, off)[0]

        magic = i32(SBLOCK + OFF["magic"])
        if magic not in (FS_UFS1_MAGIC, FS_UFS2_MAGIC):
            raise BuildError(f"{image}: no UFS superblock at {SBLOCK} (magic {magic:#x})")
        version = 1 if magic == FS_UFS1_MAGIC else 2
        p = {k: i32(SBLOCK + v) for k, v in OFF.items()}
        if p["metackhash"] and p["flags"] & 0x100:  # FS_METACKHASH
            raise BuildError(f"{image}: metadata check-hashes are on; normalising would break them")
        fsize, ncg = p["fsize"], p["ncg"]

        def cgstart(c: int) -> int:
            base = p["fpg"] * c
            if version == 1:
                base += p["old_cgoffset"] * (c & ~p["old_cgmask"])
            return base

        sbs = [SBLOCK] + [(cgstart(c) + p["sblkno"]) * fsize for c in range(ncg)]
        zeroed = 0
        for off in sbs:
            if off + 1376 > len(m) or i32(off + OFF["magic"]) != magic:
                raise BuildError(f"{image}: expected a superblock copy at byte {off}")
            lo, hi = INCORE
            if any(m[off + lo:off + hi]):
                zeroed += 1
            m[off + lo:off + hi] = bytes(hi - lo)
        dsize, goff = DI_GEN[version]
        gens = 0
        for c in range(ncg):
            table = (cgstart(c) + p["iblkno"]) * fsize
            for i in range(p["ipg"]):
                off = table + i * dsize + goff
                if off + 4 > len(m):
                    break
                if struct.unpack_from("<I", m, off)[0]:
                    struct.pack_into("<I", m, off, _gen(seed, c * p["ipg"] + i))
                    gens += 1
        m.flush()
    return {"version": version, "superblocks": len(sbs), "pointer_fields_zeroed": zeroed, "generations_set": gens, "cylinder_groups": ncg}

"""Read a list source safely: a tarball's members (no absolute paths, no '..', links and devices never extracted,
member count and size caps) or a directory's regular files, and copy chosen files out of it."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from appliance.lists.errors import refused

MAX_MEMBERS = 100_000  # UT1 has about 400 members; a bound on the walk and the header reads
MAX_TOTAL = 4 << 30  # bytes of all regular members together (a decompression bomb stops here)
CHUNK = 1 << 20
_BROKEN = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
# tarfile's stream reader takes a compressed stream that just stops as a shorter archive: the compressors' own
# readers check the end marker and the checksum, so a cut download is refused instead of read as fewer lists
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))


@dataclass
class Listing:
    """A source's regular files (relative POSIX path -> size) and what was not taken (links, devices...)."""

    files: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _clean(name: str, shown: str) -> str:
    """A member name as a relative path; absolute paths and '..' are refused (the whole archive: it is hostile)."""
    if name.startswith("/"):
        raise refused(f"{shown}: member {name[:200]!r} has an absolute path; nothing was unpacked")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise refused(f"{shown}: member {name[:200]!r} leads out of the archive ('..'); nothing was unpacked")
    return "/".join(parts)


class TarSource:
    """A tarball (any compression tarfile reads), read twice as a stream: once for the names, once to copy; always
    from the one open file whose SHA-256 was checked (never reopened by its path, which may change meanwhile)."""

    def __init__(self, file: BinaryIO | Path, shown: str):
        self.file = open(file, "rb") if isinstance(file, Path) else file  # noqa: SIM115 - a path: the tests' tarballs
        self.shown = shown

    def _members(self) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
        try:
            self.file.seek(0)
            with tarfile.open(fileobj=self.file, mode="r|*") as tf:
                for n, m in enumerate(tf):  # bounded: MAX_MEMBERS
                    if n >= MAX_MEMBERS:
                        raise refused(f"{self.shown}: more than {MAX_MEMBERS} members; not a list archive")
                    yield tf, m
        except _BROKEN as e:
            raise refused(f"{self.shown}: not a readable tarball, or truncated ({type(e).__name__}: {e}); "
                          f"nothing was unpacked") from None

    def verify(self) -> None:
        """Read a compressed tarball through to its end marker and checksum (bounded by MAX_TOTAL and a block)."""
        self.file.seek(0)
        magic = self.file.read(6)
        opener = next((o for m, o in _COMPRESSED if magic.startswith(m)), None)
        if opener is None:
            return
        seen = 0
        try:
            self.file.seek(0)
            with opener(self.file) as z:
                while chunk := z.read(CHUNK):  # bounded: the byte cap ends it
                    seen += len(chunk)
                    if seen > MAX_TOTAL + CHUNK:
                        raise refused(f"{self.shown}: over {MAX_TOTAL >> 20} MiB unpacked; not a list archive")
        except _BROKEN as e:
            raise refused(f"{self.shown}: not a readable tarball, or truncated ({type(e).__name__}: {e}); "
                          f"nothing was unpacked") from None

    def listing(self) -> Listing:
        self.verify()
        out, total, seen = Listing(), 0, set()
        for _, m in self._members():
            name = _clean(m.name, self.shown)
            if m.isdir() or not name:
                continue
            if name in seen:  # `a/b` then `./a/b`: the listing and the copy would each take another one
                raise refused(f"{self.shown}: member {name[:200]!r} appears twice; nothing was unpacked")
            seen.add(name)
            if not m.isreg():  # symlinks, hard links, devices, FIFOs: never extracted
                out.skipped.append(name)
                continue
            total += m.size
            if total > MAX_TOTAL:
                raise refused(f"{self.shown}: over {MAX_TOTAL >> 20} MiB unpacked; not a list archive")
            out.files[name] = m.size
        return out

    def copy(self, targets: dict[str, Path]) -> None:
        """Append each wanted member (name -> destination file) to its destination, in archive order."""
        left = dict(targets)
        for tf, m in self._members():
            if not left:
                return
            name = _clean(m.name, self.shown)
            if m.isreg() and name in left:
                src = tf.extractfile(m)
                if src is None:
                    continue
                try:
                    _append(src, left.pop(name), m.size)
                except _BROKEN as e:
                    raise refused(f"{self.shown}: {name}: truncated ({e}); nothing was applied") from None


class DirSource:
    """A directory in SquidGuard, UT1 or Shallalist layout; symlinks and special files are never followed."""

    def __init__(self, path: Path, shown: str):
        self.path, self.shown = path, shown

    def listing(self) -> Listing:
        out, seen, total = Listing(), 0, 0
        for dirpath, dirnames, filenames in os.walk(self.path):  # os.walk does not follow directory links
            for name in sorted(dirnames + filenames):
                seen += 1
                if seen > MAX_MEMBERS:
                    raise refused(f"{self.shown}: more than {MAX_MEMBERS} entries; not a list directory")
                full = Path(dirpath) / name
                rel = full.relative_to(self.path).as_posix()
                st = full.lstat()
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    out.skipped.append(rel)
                    continue
                total += st.st_size
                if total > MAX_TOTAL:
                    raise refused(f"{self.shown}: over {MAX_TOTAL >> 20} MiB of files; not a list directory")
                out.files[rel] = st.st_size
        return out

    def copy(self, targets: dict[str, Path]) -> None:
        for rel, dest in targets.items():
            fd = os.open(self.path / rel, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as src:
                _append(src, dest, os.fstat(fd).st_size)


def _append(src, dest: Path, size: int) -> None:
    """Copy at most `size` bytes of src to the end of dest (0644), ending it with a newline."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        left, last = size, b"\n"
        while left > 0:  # bounded by size
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise EOFError(f"{size - left} of {size} bytes")
            out.write(chunk)
            left -= len(chunk)
            last = chunk[-1:]
        if last != b"\n":
            out.write(b"\n")
    os.chmod(dest, 0o644)


def open_source(kind: str, path: Path | BinaryIO, shown: str) -> TarSource | DirSource:
    """A directory by its path; a tarball as the open file that was hashed."""
    return DirSource(path, shown) if kind == "directory" else TarSource(path, shown)  # type: ignore[arg-type]

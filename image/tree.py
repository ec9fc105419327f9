"""The in-memory image tree: files, directories and symlinks with owner, mode and contents."""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

ROOT_OWNER = ("root", "wheel", 0, 0)


@dataclass
class Entry:
    path: str  # absolute path inside the image, e.g. "/etc/rc.conf"
    kind: Literal["file", "dir", "link"]
    mode: int
    uname: str = "root"
    gname: str = "wheel"
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    secret: bool = False  # must never be readable by group/other
    source: str = ""  # where it came from (template name or file), for messages

    @property
    def rel(self) -> str:
        return "." + self.path if self.path != "/" else "."


@dataclass
class Tree:
    entries: dict[str, Entry] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent and parent != path and parent not in self.entries:
            self._parents(parent)
            self.entries[parent] = Entry(parent, "dir", 0o755)

    def add(self, e: Entry) -> Entry:
        if not e.path.startswith("/") or posixpath.normpath(e.path) != e.path:
            raise ValueError(f"bad image path {e.path!r}")
        self._parents(e.path)
        self.entries[e.path] = e
        return e

    def file(self, path: str, data: bytes | str, mode: int = 0o644, secret: bool = False, source: str = "", owner=ROOT_OWNER) -> Entry:
        if isinstance(data, str):
            data = data.encode()
        u, g, uid, gid = owner
        return self.add(Entry(path, "file", mode, u, g, uid, gid, data=data, secret=secret, source=source))

    def dir(self, path: str, mode: int = 0o755, owner=ROOT_OWNER) -> Entry:
        u, g, uid, gid = owner
        return self.add(Entry(path, "dir", mode, u, g, uid, gid))

    def link(self, path: str, target: str) -> Entry:
        return self.add(Entry(path, "link", 0o777, target=target))

    def __iter__(self) -> Iterator[Entry]:
        """Entries in a stable order: sorted by path components (a directory before what it holds)."""
        if "/" not in self.entries:
            self.entries["/"] = Entry("/", "dir", 0o755)
        for p in sorted(self.entries, key=lambda p: [] if p == "/" else p.strip("/").split("/")):
            yield self.entries[p]

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def write(self, root: Path) -> None:
        """Materialise the tree under `root` (modes set; ownership is carried by the mtree spec)."""
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        for e in self:
            if e.path == "/":
                continue
            dst = root / e.path.lstrip("/")
            if e.kind == "dir":
                dst.mkdir(exist_ok=True)
                os.chmod(dst, 0o755)  # writable by the builder; fixed below
            elif e.kind == "link":
                os.symlink(e.target, dst)
            else:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, e.mode & 0o600 | 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(e.data)
                os.chmod(dst, e.mode)
        for e in sorted(self, key=lambda e: -e.path.count("/")):
            if e.kind == "dir" and e.path != "/":
                os.chmod(root / e.path.lstrip("/"), e.mode | 0o700)

"""The compiled list index: an open-addressing hash table in one file that every worker mmaps (built once, shared)."""
from __future__ import annotations

import json
import mmap
import struct
import zlib
from array import array
from pathlib import Path
from typing import Any

from appliance.core.fsio import write_atomic

MAGIC = b"CGIDX\x02\x00\x00"  # format 2: slots hold record offsets (format 1: record numbers)
HEADER = struct.Struct("<8sQQQQQQ")  # magic, nslots, slots_off, nrec, records_off, meta_off, meta_len
HIT = struct.Struct("<HI")  # category id, line
NHIT = struct.Struct("<HHI")  # a record's hit count, then its first hit
_KEY_LENGTH_PREFIX = [struct.pack("<H", n) for n in range(256)]  # a record's key length prefix
FORMAT = 2


class IndexFormatError(Exception):
    """The index file is missing, truncated or from another format."""


def _slots_for(n: int) -> int:
    size = 1024
    while size < n * 2:  # load factor <= 0.5: short probe runs
        size <<= 1
    return size


def write_index(path: Path, categories: list[dict], domains: dict[bytes, Any], meta: dict) -> int:
    """domains: key -> int (cat_id << 32 | line) or list of such ints. Written to a temp file, then renamed."""
    n = len(domains)
    nslots = _slots_for(n)
    mask = nslots - 1
    slots = array("Q", bytes(8 * nslots))  # crc32 << 32 | file offset of the record: one random read less per probe
    blob = bytearray()
    crc = zlib.crc32
    pack_hit = HIT.pack
    base_off = HEADER.size + 8 * nslots
    for key, val in domains.items():
        rec = base_off + len(blob)
        if rec > 0xFFFFFFFF:
            raise ValueError("list index larger than 4 GB")
        vals = val if isinstance(val, list) else (val,)
        blob += struct.pack("<H", len(key)) + key + struct.pack("<H", len(vals))
        for v in vals:
            blob += pack_hit(v >> 32, v & 0xFFFFFFFF)
        h = crc(key)
        i = h & mask
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = (h << 32) | rec
    meta = {**meta, "format": FORMAT, "categories": categories, "entries": n}
    mbytes = json.dumps(meta, separators=(",", ":")).encode()
    meta_off = base_off + len(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    ign = path.parent / ".gitignore"  # generated, never committed with the example tree
    if not ign.exists():
        ign.write_text("*\n")

    def write(f) -> None:
        f.write(HEADER.pack(MAGIC, nslots, HEADER.size, n, base_off, meta_off, len(mbytes)))
        f.write(slots.tobytes())
        f.write(blob)
        f.write(mbytes)

    write_atomic(path, write, 0o644)
    return meta_off + len(mbytes)


def read_meta(path: Path) -> dict:
    """Only the header and metadata (cheap: used for the staleness check)."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) != HEADER.size:
            raise IndexFormatError(f"{path}: truncated index")
        magic, nslots, so, nrec, ro, moff, mlen = HEADER.unpack(head)
        if magic != MAGIC:
            raise IndexFormatError(f"{path}: not a carpguard list index")
        f.seek(moff)
        data = f.read(mlen)
    if len(data) != mlen:
        raise IndexFormatError(f"{path}: truncated index")
    try:
        return json.loads(data)
    except ValueError:
        raise IndexFormatError(f"{path}: corrupt index metadata") from None


class DomainIndex:
    """Read-only view of an index file; lookup(host) -> [(category, "file:line", entry)] or None."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm = self._mm
        if len(mm) < HEADER.size:
            raise IndexFormatError(f"{path}: truncated index")
        magic, nslots, so, nrec, ro, moff, mlen = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or moff + mlen > len(mm):
            raise IndexFormatError(f"{path}: not a complete carpguard list index")
        self.meta = json.loads(mm[moff:moff + mlen])
        self.entries = nrec
        self._mask = nslots - 1
        view = memoryview(mm)
        self._slots = view[so:so + 8 * nslots].cast("Q")
        cats = self.meta["categories"]
        self._cat_names = [c["name"] for c in cats]
        self._cat_files = [c.get("domains") or f"{c['name']}/domains" for c in cats]

    def lookup(self, host: str):
        key = host.encode()
        h = zlib.crc32(key)
        slots, mask = self._slots, self._mask
        i = h & mask
        while True:
            v = slots[i]
            if not v:
                return None
            if v >> 32 == h:
                off = v & 0xFFFFFFFF
                mm = self._mm
                klen = mm[off] | (mm[off + 1] << 8)
                if mm[off + 2:off + 2 + klen] == key:
                    return self._read_hits(off + 2 + klen, host)
            i = (i + 1) & mask

    def lookup_host(self, h: str, depths: tuple[int, ...]) -> tuple:
        """Hits of a normalised ASCII name and of its parent domains whose label count is in `depths` (descending), most
        specific first, as one flat tuple: category, file, line, entry, category, ... (one object per host, and the source
        "file:line" is formatted only when read): lookup() for each such suffix, in one call (the engine's cold path)."""
        hb = h.encode()
        slots, mask, mm, crc = self._slots, self._mask, self._mm, zlib.crc32
        res = ()
        k = hb.count(b".") + 1  # labels in hb[i + 1:]
        i = -1
        for d in depths:
            if d > k:
                continue
            while k > d:
                i = hb.find(b".", i + 1)
                k -= 1
            key = hb[i + 1:] if i >= 0 else hb
            hv = crc(key)
            j = hv & mask
            while True:
                v = slots[j]
                if not v:
                    break
                if v >> 32 == hv:
                    off = v & 0xFFFFFFFF
                    kl = len(key)
                    p = off + 2 + kl
                    if mm[off:p] == (_KEY_LENGTH_PREFIX[kl] if kl < 256 else struct.pack("<H", kl)) + key:  # length + key
                        n, cat, line = NHIT.unpack_from(mm, p)
                        if n == 1:
                            found = (self._cat_names[cat], self._cat_files[cat], line, h[i + 1:])
                        else:
                            e, found = h[i + 1:], ()
                            for c, ln in HIT.iter_unpack(mm[p + 2:p + 2 + 6 * n]):
                                found += (self._cat_names[c], self._cat_files[c], ln, e)
                        res = found if not res else res + found
                        break
                j = (j + 1) & mask
        return res

    def _read_hits(self, off: int, host: str) -> list[tuple[str, str, str]]:
        mm, names, files, unpack = self._mm, self._cat_names, self._cat_files, HIT.unpack_from
        n = mm[off] | (mm[off + 1] << 8)
        if n == 1:
            cat, line = unpack(mm, off + 2)
            return [(names[cat], f"{files[cat]}:{line}", host)]
        out = []
        for k in range(n):
            cat, line = unpack(mm, off + 2 + 6 * k)
            out.append((names[cat], f"{files[cat]}:{line}", host))
        return out

    def close(self) -> None:
        try:
            self._slots.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass  # still referenced by an in-flight decision; the GC closes it later

"""The compiled list index: one file every worker mmaps (built once, shared), with one section per category."""
from __future__ import annotations

import json
import mmap
import struct
import zlib
from array import array
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from itertools import repeat
from operator import add
from pathlib import Path
from typing import Any

from appliance.core.fsio import write_atomic

MAGIC = b"CGIDX\x03\x00\x00"  # format 3: category sections; a slot holds its record (format 2: a record offset)
FORMAT = 3
# magic, nslots, slots_off, nrec, recs_off, multi_off, multi_len, blob_off, blob_len, meta_off, meta_len
HEADER = struct.Struct("<8s10Q")
# A record is 4 uint32s, read as 2 little-endian uint64 words: crc32(key + newline) << 32 | the key's file offset,
# category << 32 | line. A slot is a record's copy, so a hit costs two random reads (slot, key), not three.
REC = 4
M32 = 0xFFFFFFFF
MULTI = M32  # a slot's category for a key listed in several categories: its line is an offset in the multi array


class IndexFormatError(Exception):
    """The index file is missing, truncated or from another format."""


def _slots_for(n: int) -> int:
    size = 1024
    while size < n * 2:  # load factor <= 0.5: short probe runs
        size <<= 1
    return size


@dataclass
class Section:
    """One category's domain records: recs (REC uint32s each, key offsets relative to blob), blob (keys, each
    followed by a newline), the label counts of its keys."""
    recs: array
    blob: bytes
    depths: set

    @classmethod
    def from_part(cls, part: Any, cid: int) -> Section:
        """From a parsed domains file (filters.lists.DomainPart)."""
        n = part.count
        recs = array("I", bytes(4 * REC * n))
        recs[0::REC], recs[1::REC], recs[2::REC] = part.offsets, part.hashes, part.lines
        recs[3::REC] = array("I", [cid]) * n
        return cls(recs, part.blob, set(part.depths))

    @classmethod
    def empty(cls) -> Section:
        return cls(array("I"), b"", set())


class _Blobs:
    """The sections' blobs as one address space, without copying them into one bytes object."""

    def __init__(self, blobs: list[bytes], base: int):
        self.blobs, self.starts, self.base, pos = blobs, [], base, 0
        for b in blobs:
            self.starts.append(pos)
            pos += len(b)
        self.size = pos

    def key_at(self, off: int) -> bytes:
        """The key (with its newline) at a file offset."""
        off -= self.base
        k = bisect_right(self.starts, off) - 1
        while not self.blobs[k] or off - self.starts[k] >= len(self.blobs[k]):  # empty sections share a start
            k += 1
        b, rel = self.blobs[k], off - self.starts[k]
        return b[rel:b.index(b"\n", rel) + 1]


def _table(recs: array, n: int) -> tuple[array, list[int]]:
    """Open addressing, linear probing, 2 words per slot (a record; first word 0 = empty, as no key is at offset
    0). Also every record's first word whose crc32 an earlier record has (that one is in the run it probes past)."""
    nslots = _slots_for(n)
    mask = 2 * nslots - 1
    slots = array("Q", bytes(16 * nslots))
    words = memoryview(recs).cast("B").cast("Q")
    clashes = []
    for a, b in zip(words[2::2], words[3::2]):  # record 0 is the empty placeholder
        h = a >> 32
        i = (h << 1) & mask
        v = slots[i]
        while v:
            if v >> 32 == h:
                clashes.append(v)
                clashes.append(a)
            i = (i + 2) & mask
            v = slots[i]
        slots[i] = a
        slots[i + 1] = b
    words.release()
    return slots, clashes


def _duplicates(blob: _Blobs, slots: array, clashes: list[int]) -> tuple[int, array]:
    """Records that share a key get one answer: per category the first line, a key in several categories all of
    them in category order (an entry of the multi array: count, then category << 32 | line words; the slots' second
    word is MULTI << 32 | its offset). Every slot of such a key gets that answer, so the first one a lookup meets
    is right. Returns (records that are not a distinct key, the multi array)."""
    by_hash: dict[int, set[int]] = defaultdict(set)
    for a in clashes:
        by_hash[a >> 32].add(a)
    mask, dropped, marr = len(slots) - 1, 0, array("Q")
    where = {}  # first word -> slot
    for h, members in by_hash.items():
        i = (h << 1) & mask
        while slots[i]:
            if slots[i] in members:
                where[slots[i]] = i
            i = (i + 2) & mask
        by_key: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
        for a in members:
            by_key[blob.key_at(a & M32)].append((slots[where[a] + 1], a))
        for group in by_key.values():
            if len(group) == 1:
                continue  # a crc32 collision of distinct keys: both stay as they are
            group.sort()  # category, then line
            kept = [w for k, (w, _) in enumerate(group) if k == 0 or group[k - 1][0] >> 32 != w >> 32]
            dropped += len(group) - 1
            answer = kept[0]
            if len(kept) > 1:
                answer = MULTI << 32 | len(marr)
                marr.append(len(kept))
                marr.extend(kept)
            for _, a in group:
                slots[where[a] + 1] = answer
    return dropped, marr


def write_index(path: Path, sections: list[Section], meta: dict) -> int:
    """Merge the category sections (one per meta["categories"] entry, consumed) into one index file, written to a
    temp file, then renamed. meta gets "format" and "entries" (distinct keys), each category its section's record
    range, blob range and checksum (what a later compile needs to reuse it). Returns the file's size."""
    if len(meta["categories"]) != len(sections):
        raise ValueError("one section per category")
    recs = array("I", bytes(4 * REC))  # record 0: a placeholder, so that record numbers start at 1
    ranges = []
    for s in sections:
        ranges.append((len(recs) // REC, len(s.recs) // REC))
        recs += s.recs
        s.recs = array("I")  # copied: not held twice
    n = len(recs) // REC - 1
    nslots = _slots_for(n)
    recs_off = HEADER.size + 16 * nslots
    blob = _Blobs([s.blob for s in sections], recs_off + 4 * len(recs))
    if blob.base + blob.size + 8 * n > M32:  # the multi array: at most a word per record
        raise ValueError("list index larger than 4 GB")
    for (first, cnt), pos in zip(ranges, blob.starts):  # key offsets into the file
        sl = slice(first * REC, (first + cnt) * REC, REC)
        recs[sl] = array("I", map(add, recs[sl], repeat(blob.base + pos)))
    slots, clashes = _table(recs, n)
    dropped, marr = _duplicates(blob, slots, clashes)
    multi_off = blob.base + blob.size
    for c, s, (first, cnt), pos in zip(meta["categories"], sections, ranges, blob.starts):
        sec = memoryview(recs)[first * REC:(first + cnt) * REC]
        c["section"] = {"rec": [first, cnt], "blob": [blob.base + pos, len(s.blob)], "depths": sorted(s.depths),
                        "crc": zlib.crc32(s.blob, zlib.crc32(sec))}
    meta.update({"format": FORMAT, "entries": n - dropped})
    mbytes = json.dumps(meta, separators=(",", ":")).encode()
    meta_off = multi_off + 8 * len(marr)
    head = HEADER.pack(MAGIC, nslots, HEADER.size, n + 1, recs_off, multi_off, len(marr), blob.base, blob.size,
                       meta_off, len(mbytes))

    def write(f) -> None:
        for part in (head, slots, recs, *blob.blobs, marr, mbytes):
            f.write(part)

    path.parent.mkdir(parents=True, exist_ok=True)
    ign = path.parent / ".gitignore"  # generated, never committed with the example tree
    if not ign.exists():
        ign.write_text("*\n")
    write_atomic(path, write, 0o644)
    return meta_off + len(mbytes)


def read_meta(path: Path) -> dict:
    """Only the header and metadata (cheap: used for the staleness check)."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) != HEADER.size or head[:5] != MAGIC[:5]:
            raise IndexFormatError(f"{path}: not a carpguard list index" if len(head) == HEADER.size
                                   else f"{path}: truncated index")
        if head[:8] != MAGIC:
            raise IndexFormatError(f"{path}: a list index of another format")
        moff, mlen = HEADER.unpack(head)[-2:]
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
        if len(mm) < HEADER.size or mm[:8] != MAGIC:
            raise IndexFormatError(f"{path}: not a carpguard list index of format {FORMAT}")
        _, nslots, so, nrec, ro, mo, ml, bo, bl, moff, mlen = HEADER.unpack_from(mm, 0)
        if not (so + 16 * nslots <= ro and ro + 4 * REC * nrec <= bo and bo + bl <= mo and mo + 8 * ml <= moff
                and moff + mlen == len(mm)) or nslots & (nslots - 1):
            raise IndexFormatError(f"{path}: not a complete carpguard list index")
        try:
            self.meta = json.loads(mm[moff:moff + mlen])
        except ValueError:
            raise IndexFormatError(f"{path}: corrupt index metadata") from None
        self.entries = self.meta.get("entries", nrec - 1)
        self._mask = 2 * nslots - 1  # in words: a slot is two
        view = memoryview(mm)
        self._slots = view[so:so + 16 * nslots].cast("Q")
        self._multi = view[mo:mo + 8 * ml].cast("Q")
        self._recs_off = ro
        cats = self.meta["categories"]
        self._cat_names = [c["name"] for c in cats]
        self._cat_files = [c.get("domains") or f"{c['name']}/domains" for c in cats]
        # what the engine's cold path reads, in one tuple (one attribute load per decision)
        self.probe = (self._slots, self._mask, mm, self._cat_names, self._cat_files, self)

    def section(self, cid: int) -> Section | None:
        """A category's records and keys as written (key offsets made relative again), None when its checksum does
        not match: what a later compile reuses instead of parsing that category's lists again."""
        sec = self.meta["categories"][cid].get("section")
        if not sec:
            return None
        (first, cnt), (boff, blen) = sec["rec"], sec["blob"]
        recs = array("I")
        recs.frombytes(self._mm[self._recs_off + 4 * REC * first:self._recs_off + 4 * REC * (first + cnt)])
        blob = self._mm[boff:boff + blen]
        if len(recs) != cnt * REC or len(blob) != blen or zlib.crc32(blob, zlib.crc32(recs)) != sec["crc"]:
            return None
        recs[0::REC] = array("I", map(add, recs[0::REC], repeat(-boff)))
        return Section(recs, blob, set(sec["depths"]))

    def multi(self, w: int, entry: str) -> tuple:
        """The flat hits of a key listed in several categories (a slot's second word w: MULTI << 32 | offset)."""
        m, names, files = self._multi, self._cat_names, self._cat_files
        k = w & M32
        out: tuple = ()
        for x in m[k + 1:k + 1 + m[k]]:
            out += (names[x >> 32], files[x >> 32], x & M32, entry)
        return out

    def _hits(self, j: int, key: bytes, entry: str) -> tuple:
        """The flat hits (category, file, line, entry, ...) of slot word j when its key is `key`, else ()."""
        o = self._slots[j] & M32
        if self._mm[o:o + len(key)] != key:
            return ()
        w = self._slots[j + 1]
        c = w >> 32
        if c == MULTI:
            return self.multi(w, entry)
        return self._cat_names[c], self._cat_files[c], w & M32, entry

    def lookup(self, host: str):
        key = host.encode() + b"\n"
        h = zlib.crc32(key)
        slots, mask = self._slots, self._mask
        j = (h << 1) & mask
        while v := slots[j]:
            if v >> 32 == h:
                found = self._hits(j, key, host)
                if found:
                    return [(found[k], f"{found[k + 1]}:{found[k + 2]}", host) for k in range(0, len(found), 4)]
            j = (j + 2) & mask
        return None

    def lookup_host(self, h: str, depths: tuple[int, ...]) -> tuple:
        """Hits of a normalised ASCII name and of its parent domains whose label count is in `depths` (descending), most
        specific first, as one flat tuple: category, file, line, entry, category, ... (one object per host, and the source
        "file:line" is formatted only when read): lookup() for each such suffix, in one call. The engine's decide()
        has the same loop inline."""
        hb = h.encode() + b"\n"  # keys are stored with their newline: one slice compares key and length
        slots, mask = self._slots, self._mask
        res: tuple = ()
        k = hb.count(b".") + 1  # labels in hb[i + 1:]
        i = -1
        for d in depths:
            if d > k:
                continue
            while k > d:
                i = hb.find(b".", i + 1)
                k -= 1
            key = hb[i + 1:]
            hv = zlib.crc32(key)
            j = (hv << 1) & mask
            while v := slots[j]:
                if v >> 32 == hv:
                    found = self._hits(j, key, h[i + 1:])
                    if found:
                        res += found
                        break
                j = (j + 2) & mask
        return res

    def close(self) -> None:
        self.probe = None
        try:
            self._slots.release()
            self._multi.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass  # still referenced by an in-flight decision; the GC closes it later

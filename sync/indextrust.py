"""Which list indexes root compiled itself: their sha256 in <state>/sync/ (root only), checked before one is reused."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from appliance.core.fsio import write_json_atomic
from filters import ruleset
from sync.releases import PRIVATE_MODE, Releases, ensure_dir

log = logging.getLogger("appliance.sync")
RECORD = "indexes.json"  # {generation: sha256 of releases/<gen>/compiled/filter.idx as root wrote it}


def _record_path(rel: Releases) -> Path:
    return rel.state / "sync" / RECORD


def _read(rel: Releases) -> dict:
    try:
        data = json.loads(_record_path(rel).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record(rel: Releases, gen: int, index: Path) -> None:
    """Remember the sha256 of the index root just compiled for release <gen> (`index`: a path only root can write
    now, the release's fresh compiled/ or its 0700 incoming copy). Entries of removed releases are dropped."""
    keep = {str(g) for g in rel.generations()} | {str(gen)}
    data = {g: h for g, h in _read(rel).items() if g in keep}
    try:
        data[str(gen)] = _sha256(index)
    except OSError:
        data.pop(str(gen), None)  # no index: nothing to reuse from this release
    ensure_dir(_record_path(rel).parent, PRIVATE_MODE)
    write_json_atomic(_record_path(rel), data, mode=0o600)


@contextmanager
def trusted_previous(rel: Releases, gen: int | None) -> Iterator[Path]:
    """A private copy of release <gen>'s index when its bytes are the ones root recorded, else ruleset.NO_PREVIOUS
    (a full compile). On FreeBSD the live release's compiled/ belongs to the proxy user, who could rewrite it to
    plant entries or crash the compiler: the copy, in root's 0700 sync dir, is hashed as it is made, so what is
    checked is what is read. Removed on exit."""
    want = _read(rel).get(str(gen)) if gen is not None else None
    copy = rel.state / "sync" / f".previous-{os.getpid()}.idx"
    try:
        if want and _copy_hashed(ruleset.index_path(rel.path(gen)), copy) == want:
            yield copy
        else:
            if gen is not None:
                log.info("the index of release %s is not one this node recorded: full compile", gen)
            yield ruleset.NO_PREVIOUS
    finally:
        copy.unlink(missing_ok=True)


def _copy_hashed(src: Path, dst: Path) -> str | None:
    """Copy src to dst (0600, never through a link), returning the sha256 of the bytes written; None on any error."""
    h = hashlib.sha256()
    try:
        ensure_dir(dst.parent, PRIVATE_MODE)
        dst.unlink(missing_ok=True)
        # no link, and never a FIFO or device the proxy user put there (a read that blocks or never ends)
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        fi = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            fi.close()
            return None
        with fi, os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                                      0o600), "wb") as fo:
            while chunk := fi.read(1 << 20):
                h.update(chunk)
                fo.write(chunk)
    except OSError as e:
        log.info("previous list index %s not copied: %s", src, e)
        return None
    return h.hexdigest()

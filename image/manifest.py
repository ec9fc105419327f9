"""dist/SHA256SUMS and dist/manifest.json: what each node's images hold and their digests."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sums(out: Path, files: list[Path]) -> Path:
    """sha256sum -c compatible, sorted by name, paths relative to `out`."""
    lines = [f"{sha256(f)}  {f.relative_to(out).as_posix()}" for f in sorted(files, key=lambda p: p.relative_to(out).as_posix())]
    p = out / "SHA256SUMS"
    p.write_text("\n".join(lines) + "\n")
    return p


def write_manifest(out: Path, doc: dict) -> Path:
    p = out / "manifest.json"
    p.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return p

"""File writes that readers can trust: atomic replace, JSON records, and secrets that are 0600 from creation."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def write_atomic(path: Path, write: Callable[[BinaryIO], None], mode: int = 0o644) -> None:
    """Let `write` fill a temp file in the same directory, fsync, rename over `path`: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    write_atomic(path, lambda f: f.write(text.encode()), mode)


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_secret(path: Path, data: bytes | str) -> Path:
    """Write a secret (CARP pass, private key, sshd config) that is never readable by others, not even for a moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # O_TRUNC keeps an existing, wider file's mode: narrow it before the secret goes in
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path

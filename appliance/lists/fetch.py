"""Where an update's lists come from: an https URL (downloaded with certificate checks, a size cap and timeouts),
a tarball or a directory; the SHA-256 of a tarball is checked before anything is unpacked."""
from __future__ import annotations

import hashlib
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.core.model import Appliance
from appliance.lists.errors import failed, refused

CA_ENV = "APPLIANCE_LISTS_CA_FILE"  # a CA bundle to trust instead of the system's (tests: their own test CA)
MAX_DOWNLOAD = 512 << 20  # UT1's whole tarball is about 20 MiB; anything near this is not a list archive
TIMEOUT = 60.0  # seconds one connect or read may take
DEADLINE = 1800.0  # seconds the whole download may take
CHUNK = 1 << 16


@dataclass
class Source:
    text: str  # as given (shown in messages and the report)
    kind: str  # "url" | "tarball" | "directory"
    path: Path | None  # the local tarball or directory (a URL: None until downloaded)
    sha256: str | None  # expected SHA-256 of the tarball, or None
    file: BinaryIO | None = None  # the tarball, open: hashed and unpacked from this one file (update closes it)


def parse_sha(text: str, what: str = "--sha256") -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text or ""):
        raise refused(f"{what} {text!r}: not a SHA-256 (64 hex digits)")
    return text.lower()


def resolve(arg: str | None, sha_arg: str | None, cfg: Appliance, base: Path) -> Source:
    """SOURCE (or lists.source) and the SHA-256 that applies to it: --sha256, else lists.sha256 when the source is
    lists.source (the pinned digest belongs to that source only)."""
    text = arg or cfg.lists.source
    if not text:
        raise refused("no SOURCE given and lists.source is not set in the cluster file")
    sha = parse_sha(sha_arg) if sha_arg is not None else (cfg.lists.sha256 if text == cfg.lists.source else None)
    if "://" in text:
        if not text.lower().startswith("https://"):
            raise refused(f"{text}: only https:// URLs are fetched (a list download must be authenticated)")
        return Source(text, "url", None, sha)
    path = Path(text)
    if not path.is_absolute() and arg is None:  # lists.source: relative to the cluster file, like filter.lists
        path = base / path
    if path.is_dir():
        if sha is not None:
            raise refused(f"{'--sha256' if sha_arg else 'lists.sha256'}: {text} is a directory; a SHA-256 applies "
                          f"to a tarball or a download")
        return Source(text, "directory", path, None)
    if path.is_file():
        return Source(text, "tarball", path, sha)
    raise refused(f"{text}: no such file or directory (SOURCE is an https URL, a tarball or a directory)")


def file_sha256(f: BinaryIO) -> str:
    """The SHA-256 of an open file, read from its start."""
    h = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def check_sha(f: BinaryIO, expected: str | None, shown: str) -> str:
    """The open file's SHA-256; a mismatch with `expected` is refused before anything is unpacked. The caller
    unpacks from this same open file, so what was hashed is what is read."""
    got = file_sha256(f)
    if expected is not None and got != expected:
        raise refused(f"{shown}: SHA-256 {got} is not the expected {expected}; nothing was unpacked")
    return got


class _HttpsOnlyRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect may move the download, never off https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if not newurl.lower().startswith("https://"):
            raise refused(f"{req.full_url}: redirected to {newurl}, which is not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    cafile = os.environ.get(CA_ENV) or None
    try:
        ctx = ssl.create_default_context(cafile=cafile)  # verifies the chain and the host name
    except (OSError, ssl.SSLError) as e:
        raise refused(f"${CA_ENV}={cafile}: cannot load the CA file ({e})") from None
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _HttpsOnlyRedirect())


def download(url: str, dest: Path, max_bytes: int = MAX_DOWNLOAD, deadline_s: float = DEADLINE) -> int:
    """Fetch url into dest (0600); returns the byte count. Refuses more than max_bytes; exit 1 when the network or
    the server fails, exit 2 when what came is not acceptable (too large, certificate refused)."""
    deadline = time.monotonic() + deadline_s
    got = 0
    try:
        with _opener().open(urllib.request.Request(url, headers={"User-Agent": "carpguard-lists"}),
                            timeout=TIMEOUT) as r:
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise refused(f"{url}: {int(length)} bytes is over the {max_bytes >> 20} MiB cap of a list download")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                # read1: what has arrived (at most CHUNK), after at most TIMEOUT s of silence; r.read(CHUNK) would
                # wait for the whole chunk, so a server trickling a byte a minute never reached the deadline check
                while chunk := r.read1(CHUNK):  # bounded: the byte cap and the deadline end it
                    got += len(chunk)
                    if got > max_bytes:
                        raise refused(f"{url}: more than the {max_bytes >> 20} MiB cap of a list download")
                    if time.monotonic() > deadline:
                        raise failed(f"{url}: the download took over {deadline_s:.0f} s")
                    out.write(chunk)
    except urllib.error.HTTPError as e:
        raise failed(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise refused(f"{url}: certificate not trusted ({reason.verify_message})") from None
        raise failed(f"{url}: {reason}") from None
    except (OSError, TimeoutError) as e:
        raise failed(f"{url}: {e}") from None
    return got

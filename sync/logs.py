"""The sync key's read-only `logs` verb: a peer streams its access-log records (gzip) to `appliance report --cluster`."""
from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import tempfile
import threading
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from appliance.core.loader import load
from appliance.core.logfiles import open_text, with_rotations
from appliance.core.paths import Paths
from sync.check import CONFIG_NAME
from sync.errors import BAD_INPUT, PEER_FAILED, SyncError, from_reply
from sync.peer import MAX_REPLY, Peer, one_line
from sync.releases import Releases

MAGIC = "#carpguard-logs 1\n"
MAX_BYTES = 4 << 30  # uncompressed record bytes one `logs` sends at most (a month of a busy LAN), and a client reads
TIMEOUT = 1800  # seconds a client waits for one peer's whole stream
# Only lines shaped as Squid native records leave the node (bracketed extras allowed: the appliance's tag): whatever
# file proxy.access_log names in the live config, the sync key can read nothing else through this verb.
RECORD = re.compile(r"\d{1,11}\.\d{3} +-?\d{1,10} \S+ [A-Z_]+/\d{3} \d{1,18} \S+ \S+ \S+ [A-Z_]+/\S+ \S+"
                    r"(?: \[[^\]\s]*\])*\n?")
_CHUNK = 1 << 16


def parse_args(argv: list[str]) -> float | None:
    """`logs` or `logs --since EPOCH` -> since (None: everything)."""
    if argv == ["logs"]:
        return None
    if len(argv) == 3 and argv[1] == "--since" and re.fullmatch(r"\d{1,11}", argv[2]):
        return float(argv[2])
    raise SyncError(f"logs: expected `logs [--since EPOCH-SECONDS]` (got {' '.join(argv)[:200]!r}); it takes no path",
                    BAD_INPUT)


def log_files(paths: Paths) -> list[Path]:
    """This node's access log and its rotations, oldest first, from the live config's proxy.access_log."""
    try:
        cfg = load(Releases(paths.state).current / CONFIG_NAME)
    except Exception as e:  # noqa: BLE001 - no live config, or one that does not load: nothing to serve
        raise SyncError(f"logs: no live config here to name the access log ({type(e).__name__})", PEER_FAILED) from None
    log = cfg.proxy.access_log
    if log in ("-", "none", ""):
        raise SyncError(f"logs: proxy.access_log is {log!r} on this node: no log file", PEER_FAILED)
    return with_rotations(Path(log))


def serve(argv: list[str], paths: Paths, out: BinaryIO) -> dict:
    """Write the records of every log file (since `--since`) to `out` as one gzip stream: MAGIC, `#file NAME` before
    each file's records, `#end SENT DROPPED`; lines that are not records are dropped, never sent."""
    since = parse_args(argv)
    files = log_files(paths)
    sent = dropped = size = 0
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        buf = [MAGIC]
        for f in files:
            if since is not None and f.stat().st_mtime < since:
                continue
            buf.append(f"#file {one_line(f.name, 200).replace(' ', '_')}\n")
            with open_text(f) as fh:
                for line in fh:
                    if not RECORD.fullmatch(line) or (since is not None and float(line[:14].split()[0]) < since):
                        dropped += 1
                        continue
                    size += len(line)
                    if size > MAX_BYTES:
                        break
                    sent += 1
                    buf.append(line if line.endswith("\n") else line + "\n")
                    if len(buf) >= 512:
                        gz.write("".join(buf).encode())
                        buf = []
            if size > MAX_BYTES:
                buf.append("#truncated\n")
                break
        buf.append(f"#end {sent} {dropped}\n")
        gz.write("".join(buf).encode())
    out.flush()
    return {"ok": True, "sent": sent, "dropped": dropped}


class _Bounded(io.RawIOBase):
    """A pipe read as a raw stream, `prefix` first, OverflowError past `limit` bytes."""

    def __init__(self, prefix: bytes, pipe: BinaryIO, limit: int):
        self.prefix, self.pipe, self.left = prefix, pipe, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.prefix or self.pipe.read1(min(len(b), _CHUNK))  # type: ignore[attr-defined]
        self.prefix = b""
        self.left -= len(data)
        if self.left < 0:
            raise OverflowError
        b[: len(data)] = data
        return len(data)


def remote_lines(peer: Peer, since: float | None = None, max_bytes: int = MAX_BYTES,
                 timeout: float = TIMEOUT) -> Iterator[tuple[str, str]]:
    """(file name, record line) from the peer's `logs`, over the sync key's ssh; SyncError when the peer refuses,
    the stream is cut short, is over max_bytes compressed, or takes more than `timeout` seconds."""
    cmd = "logs" if since is None else f"logs --since {int(since)}"
    argv = peer.ssh_argv() + ["-T", f"{peer.user}@{peer.address}", cmd]
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            yield from _read(peer, p, err, max_bytes)
        except OverflowError:
            raise SyncError(f"{peer.name}: its logs are over {max_bytes} bytes compressed: not read", PEER_FAILED) from None
        finally:
            timer.cancel()
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()  # type: ignore[union-attr]


def _read(peer: Peer, p: subprocess.Popen, err: BinaryIO, max_bytes: int) -> Iterator[tuple[str, str]]:
    head = p.stdout.read(2)  # type: ignore[union-attr]
    if head != b"\x1f\x8b":  # not a stream: the failure reply (JSON), or ssh's own failure
        said = (head + p.stdout.read(MAX_REPLY)).decode(errors="replace")  # type: ignore[union-attr]
        code = p.wait()
        err.seek(0)
        tail = one_line(err.read(MAX_REPLY).decode(errors="replace")[-300:])
        try:
            data = json.loads(said) if said.strip() else None
        except ValueError:
            data = None
        from_reply(data, code or PEER_FAILED, f"{peer.name}: logs: exit {code}: {tail or one_line(said)}")
        raise SyncError(f"{peer.name}: logs: no stream", PEER_FAILED)
    name, ended = "-", False
    try:
        with gzip.GzipFile(fileobj=io.BufferedReader(_Bounded(head, p.stdout, max_bytes))) as gz:  # type: ignore[arg-type]
            text = io.TextIOWrapper(gz, encoding="utf-8", errors="replace")
            if text.readline() != MAGIC:
                raise SyncError(f"{peer.name}: logs: not a carpguard log stream", PEER_FAILED)
            for line in text:
                if line.startswith("#"):
                    if line.startswith("#file "):
                        name = line[6:].strip()
                    elif line.startswith("#end "):
                        ended = True
                        break
                    continue
                yield name, line
    except (EOFError, gzip.BadGzipFile, zlib.error):
        ended = False
    if not ended:
        raise SyncError(f"{peer.name}: logs: the stream ended before its end mark (cut short)", PEER_FAILED)

"""The sync key's read-only `logs` verb: a peer streams its access-log records (gzip) to `appliance report --cluster`."""
from __future__ import annotations

import gzip
import io
import json
import logging
import lzma
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from appliance.core.loader import load
from appliance.core.logfiles import log_dir, open_binary, open_regular, rotation_names
from appliance.core.paths import Paths
from sync.check import CONFIG_NAME
from sync.errors import BAD_INPUT, PEER_FAILED, SyncError, from_reply
from sync.journal import note
from sync.peer import MAX_REPLY, Peer, one_line
from sync.releases import Releases

MAGIC = b"#carpguard-logs 1\n"
MAX_BYTES = 4 << 30  # uncompressed record bytes one `logs` sends at most (a month of a busy LAN), and a client reads
MAX_READ = 2 * MAX_BYTES  # uncompressed bytes one `logs` reads at most, sent or dropped (a bomb stops here)
MAX_LINE = 8192  # a record is one short line; a longer one is dropped after this many bytes, never kept whole
SERVE_SECONDS = 900  # wall clock and CPU of one `logs` on the peer (the client waits TIMEOUT at most)
SERVE_MEM = 512 << 20  # address space one `logs` may add to what it has when it starts reading
TIMEOUT = 1800  # seconds a client waits for one peer's whole stream
# Only lines shaped as Squid native records leave the node, printable ASCII only (no terminal escapes), each field
# bounded (bracketed extras allowed: the appliance's tag); and only files in this node's own log directory.
_F = rb"[\x21-\x7e]{1,%d}"
RECORD = re.compile(rb"\d{1,11}\.\d{3} {1,12}-?\d{1,10} " + _F % 256 + rb" [A-Z_]{1,64}/\d{3} \d{1,18} " + _F % 64
                    + b" " + _F % MAX_LINE + b" " + _F % 256 + rb" [A-Z_]{1,64}/" + _F % 256 + b" " + _F % 256
                    + rb"(?: \[[\x21-\x5c\x5e-\x7e]{0,256}\]){0,16}\n?")
_NAME = re.compile(r"[^\x21-\x7e]")
REFUSED_PATH = ("logs: proxy.access_log is not a file in this node's log directory: nothing is served "
                "(docs/security.md)")
FAILED = "logs: this node could not read its access log (details in its sync log)"
_CHUNK = 1 << 16
_UNREADABLE = (OSError, EOFError, zlib.error, lzma.LZMAError)  # gzip.BadGzipFile is an OSError


def parse_args(argv: list[str]) -> float | None:
    """`logs` or `logs --since EPOCH` -> since (None: everything)."""
    if argv == ["logs"]:
        return None
    if len(argv) == 3 and argv[1] == "--since" and re.fullmatch(r"\d{1,11}", argv[2]):
        return float(argv[2])
    raise SyncError(f"logs: expected `logs [--since EPOCH-SECONDS]` (got {' '.join(argv)[:200]!r}); it takes no path",
                    BAD_INPUT)


def log_base(paths: Paths) -> str:
    """The access log's name in this node's log directory, from the live config's proxy.access_log; a path anywhere
    else is refused without looking at it (a pushed config must not point the verb at another file)."""
    try:
        cfg = load(Releases(paths.state).current / CONFIG_NAME)
    except Exception as e:  # noqa: BLE001 - no live config, or one that does not load: nothing to serve
        raise SyncError(f"logs: no live config here to name the access log ({type(e).__name__})", PEER_FAILED) from None
    log = cfg.proxy.access_log
    if log in ("-", "none", ""):
        raise SyncError(f"logs: proxy.access_log is {log!r} on this node: no log file", PEER_FAILED)
    path = os.path.normpath(log)
    base = os.path.basename(path)
    if os.path.dirname(path) != os.path.normpath(str(log_dir())) or base in ("", ".", ".."):
        raise SyncError(REFUSED_PATH, PEER_FAILED)
    return base


class _Budget:
    """What one `logs` may still read (bytes, sent or dropped) and until when (monotonic)."""

    def __init__(self, max_read: int, seconds: float):
        self.left, self.deadline = max_read, time.monotonic() + seconds

    def take(self, n: int) -> bool:
        self.left -= n
        return self.left >= 0 and time.monotonic() < self.deadline


def _records(fh: BinaryIO, since: float | None, budget: _Budget) -> Iterator[bytes | None]:
    """The record lines of one file (None once the budget is spent); an over-long line is skipped in bounded reads."""
    while True:  # bounded: the budget (bytes and time) ends it
        line = fh.readline(MAX_LINE + 1)
        if not line:
            return
        if not budget.take(len(line)):
            yield None
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the over-long line, never kept
                line = fh.readline(_CHUNK)
                if not budget.take(len(line)):
                    yield None
                    return
            continue
        if RECORD.fullmatch(line) and (since is None or float(line[:14].split()[0]) >= since):
            yield line if line.endswith(b"\n") else line + b"\n"


def serve(argv: list[str], paths: Paths, out: BinaryIO, max_read: int = MAX_READ,
          seconds: float = SERVE_SECONDS) -> dict:
    """Write the records of every log file (since `--since`) to `out` as one gzip stream: MAGIC, `#file NAME` before
    each file's records, `#end SENT`. Lines that are not records are dropped, never sent or counted to the client;
    `#truncated` before the end when the byte or time budget ran out."""
    since = parse_args(argv)
    base = log_base(paths)
    try:
        dfd = os.open(log_dir(), os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise SyncError(FAILED, PEER_FAILED) from None
    try:
        names = rotation_names(base, os.listdir(dfd)) + [base]
        sent, stopped = _stream(names, dfd, since, out, _Budget(max_read, seconds), paths.state)
    finally:
        os.close(dfd)
    return {"ok": True, "sent": sent, "truncated": stopped}


def _stream(names: list[str], dfd: int, since: float | None, out: BinaryIO, budget: _Budget,
            state: Path) -> tuple[int, bool]:
    sent = size = 0
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        buf, stopped = [MAGIC], False
        for name in names:
            fd = open_regular(name, dfd)
            if fd is None:
                continue
            if since is not None and os.fstat(fd).st_mtime < since:
                os.close(fd)
                continue
            buf.append(b"#file " + _NAME.sub("_", name[:200]).encode() + b"\n")
            try:
                with open_binary(fd, name) as fh:
                    for rec in _records(fh, since, budget):
                        size += len(rec) if rec is not None else 0
                        if rec is None or size > MAX_BYTES:
                            stopped = True
                            break
                        sent += 1
                        buf.append(rec)
                        if len(buf) >= 512:
                            gz.write(b"".join(buf))
                            buf = []
            except _UNREADABLE as e:  # a cut or mislabelled rotation: the next file still counts; its bytes unsaid
                if isinstance(e, BrokenPipeError):  # the client is gone: stop
                    raise
                note(state, f"logs: {name[:200]!r} unreadable after {sent} records ({type(e).__name__})",
                     logging.WARNING)
                buf.append(b"#unreadable\n")
            if stopped:
                buf.append(b"#truncated\n")
                break
        buf.append(b"#end %d\n" % sent)
        gz.write(b"".join(buf))
    out.flush()
    return sent, stopped


def _bound_process() -> None:
    """The forced command's own process: CPU, address space and a wall-clock alarm (SIGALRM ends it)."""
    resource.setrlimit(resource.RLIMIT_CPU, (SERVE_SECONDS, SERVE_SECONDS + 5))
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        size = 0  # no /proc (FreeBSD without linprocfs): no address-space limit (its base is not known)
    if size:
        resource.setrlimit(resource.RLIMIT_AS, (size + SERVE_MEM,) * 2)
    signal.alarm(SERVE_SECONDS + 30)


def run(argv: list[str], paths: Paths, out: BinaryIO) -> int:
    """`logs` as the forced command runs it: bounded, and any failure is one generic line on stderr (its details,
    never a file's content, go to this node's own sync log); the exit status."""
    _bound_process()
    try:
        serve(argv, paths, out)
    except SyncError:
        raise
    except Exception as e:  # noqa: BLE001 - nothing of a file (a traceback quotes bytes) reaches the client
        note(paths.state, f"logs: stopped by {type(e).__name__}", logging.WARNING)
        sys.stderr.write(FAILED + "\n")
        return PEER_FAILED
    return 0


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
                 timeout: float = TIMEOUT, max_unpacked: int = MAX_BYTES + (64 << 20)) -> Iterator[tuple[str, str]]:
    """(file name, record line) from the peer's `logs`, over the sync key's ssh; SyncError when the peer refuses,
    the stream is cut short, is over max_bytes compressed or max_unpacked unpacked, has a line over MAX_LINE, or
    takes more than `timeout` seconds."""
    cmd = "logs" if since is None else f"logs --since {int(since)}"
    argv = peer.ssh_argv() + ["-T", f"{peer.user}@{peer.address}", cmd]
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            yield from _read(peer, p, err, max_bytes, max_unpacked)
        except OverflowError:
            raise SyncError(f"{peer.name}: its logs are over {max_bytes} bytes compressed: not read", PEER_FAILED) from None
        finally:
            timer.cancel()
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()  # type: ignore[union-attr]


def _refusal(peer: Peer, p: subprocess.Popen, err: BinaryIO, head: bytes) -> SyncError:
    """The peer's failure reply (JSON) or ssh's own failure, as the error to raise."""
    said = (head + p.stdout.read(MAX_REPLY)).decode(errors="replace")  # type: ignore[union-attr]
    code = p.wait()
    err.seek(0)
    tail = one_line(err.read(MAX_REPLY).decode(errors="replace")[-300:])
    try:
        data = json.loads(said) if said.strip() else None
    except ValueError:
        data = None
    try:
        from_reply(data, code or PEER_FAILED, f"{peer.name}: logs: exit {code}: {tail or one_line(said)}")
    except SyncError as e:
        return SyncError(one_line(str(e), 500), e.exit_code)  # a peer's words: no control characters
    return SyncError(f"{peer.name}: logs: no stream", PEER_FAILED)


def _read(peer: Peer, p: subprocess.Popen, err: BinaryIO, max_bytes: int,
          max_unpacked: int) -> Iterator[tuple[str, str]]:
    head = p.stdout.read(2)  # type: ignore[union-attr]
    if head != b"\x1f\x8b":  # not a stream: the failure reply (JSON), or ssh's own failure
        raise _refusal(peer, p, err, head)
    name, ended, left = "-", False, max_unpacked
    try:
        with gzip.GzipFile(fileobj=io.BufferedReader(_Bounded(head, p.stdout, max_bytes))) as gz:  # type: ignore[arg-type]
            if gz.readline(len(MAGIC)) != MAGIC:
                raise SyncError(f"{peer.name}: logs: not a carpguard log stream", PEER_FAILED)
            while raw := gz.readline(MAX_LINE + 1):  # bounded: max_unpacked ends it
                left -= len(raw)
                if left < 0 or len(raw) > MAX_LINE:
                    raise SyncError(f"{peer.name}: logs: over {max_unpacked} bytes unpacked or a line over "
                                    f"{MAX_LINE} bytes: not a log stream", PEER_FAILED)
                if raw.startswith(b"#file "):
                    name = _NAME.sub("_", raw[6:].strip().decode("ascii", "replace"))[:200] or "-"
                elif raw.startswith(b"#end "):
                    ended = True
                    break
                elif not raw.startswith(b"#"):
                    yield name, raw.decode("utf-8", "replace")  # not a RECORD (a hostile peer): a bad line, escaped
    except (EOFError, gzip.BadGzipFile, zlib.error):
        ended = False
    if not ended:
        raise SyncError(f"{peer.name}: logs: the stream ended before its end mark (cut short)", PEER_FAILED)

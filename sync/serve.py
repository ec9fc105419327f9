"""The forced command of the sync key: dispatch SSH_ORIGINAL_COMMAND to status, a staging-only rsync server, or receive."""
from __future__ import annotations

import fcntl
import logging
import os
import pwd
import re
import select
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from appliance.core.loader import load
from appliance.core.paths import Paths
from appliance.core.state import role_of
from sync import lock, logs, tree
from sync import receive as rcv
from sync.errors import BAD_INPUT, BUSY, PEER_FAILED, SPLIT_BRAIN, SyncError
from sync.peer import AFTER_TRANSFER, STAGED
from sync.journal import note
from sync.releases import STAGING_TOKEN, Releases, mirror, parse_generation, parse_hash

# What the peer's rsync server runs with, whatever the client asked for: recursive, times and permissions, regular
# files and directories only (no -l/-D/-o/-g/-H/-A/-X: no links, devices, specials, owners, groups), the modes
# stripped of group/world write and setuid/setgid/sticky, no file over sync.max_file_mb, a mirror (--delete) with
# cut-off files kept for the next run (--partial). The client's letters must be a subset of CLIENT_LETTERS (the
# others change rsync's wire format, so the server could not just drop them); its -e capability string is kept.
SERVER_LETTERS = "rtp"
CLIENT_LETTERS = set("rtpvn")  # -n (dry run) must reach the server; -v only changes what is said
CHMOD = "--chmod=go-w,ug-s,-t"
PINNED = ["--no-l", "--no-D", "--no-o", "--no-g", "--delete", "--partial", CHMOD]
_SHORT = re.compile(r"-([A-Za-z]+?)(e\.[A-Za-z]*)?")   # fullmatch; -e only as `e.<caps>`
_DELETE = {"--delete", "--delete-during", "--delete-delay", "--delete-after", "--delete-before"}
_LONG_VALUES = {  # passed on as given (they change only what is said, how fast, or how long to wait)
    "--timeout": re.compile(r"^\d{1,6}$"),
    "--bwlimit": re.compile(r"^\d{1,9}[KkMm]?$"),
    "--log-format": re.compile(r"^%[a-zA-Z]( ?%[a-zA-Z])*$"),
    "--out-format": re.compile(r"^%[a-zA-Z]( ?%[a-zA-Z])*$"),
}
_IGNORED = {"--stats", "--partial"}  # the server keeps its own
# A `receive --after-transfer` waits for the transfer at most this many times the live sync.timeout (the master
# then falls back to the plain receive), and only one waits at a time: a stolen key cannot pin many processes.
AFTER_TRANSFER_TIMEOUTS = 5
AFTER_TRANSFER_MAX = 900.0
WAIT_LOCK = "receive-wait.lock"


def _client_options(opts: list[str]) -> tuple[str, str, list[str], bool]:
    """(dry-run letter, -e capability string, long options kept, --delete seen) from the client's options."""
    letters, caps, kept, delete = "", "", [], False
    for o in opts:
        m = _SHORT.fullmatch(o)
        if m and not o.startswith("--"):
            bad = sorted((set(m.group(1)) - CLIENT_LETTERS) | (set(m.group(2) or "") & set("Dog")))
            if bad:
                flags = " ".join("-" + c for c in bad)
                raise SyncError(f"rsync: option {flags} is not allowed: this peer receives only regular files and "
                                f"directories (rsync --server -{SERVER_LETTERS} {CHMOD}; no links, devices, owners, "
                                f"groups, hard links, ACLs or xattrs); the master sends -rtp --delete", BAD_INPUT)
            letters += m.group(1)
            caps = m.group(2) or caps
            continue
        name, eq, value = o.partition("=")
        if o in _DELETE:
            delete = True
        elif o in _IGNORED:
            continue
        elif eq and name in _LONG_VALUES:
            if not _LONG_VALUES[name].match(value):
                raise SyncError(f"rsync: bad value for {name}: {value!r}", BAD_INPUT)
            kept.append(o)
        else:
            raise SyncError(f"rsync: option {o!r} is not allowed for a sync push", BAD_INPUT)
    if "r" not in letters or not delete:
        raise SyncError("rsync: a sync push is recursive and mirrors (-r --delete); the master sends -rtp --delete", BAD_INPUT)
    return ("n" if "n" in letters else ""), caps, kept, delete


def rsync_server_argv(argv: list[str], staging: Path, max_file_bytes: int = tree.MAX_FILE_BYTES) -> list[str]:
    """Check the rsync server command line the master sent and build the one this peer runs: its own fixed
    options (SERVER_LETTERS, PINNED, --max-size), the real staging dir as the only target.

    Only a receiving server (`rsync --server ... . staging`), only the options the master's push uses."""
    if len(argv) < 4 or argv[0] != "rsync" or argv[1] != "--server":
        raise SyncError(f"rsync: expected `rsync --server OPTIONS . {STAGING_TOKEN}` (got {shlex.join(argv)[:200]!r})", BAD_INPUT)
    if "--sender" in argv:
        raise SyncError("rsync: --sender is not allowed (this key only pushes into the staging dir)", BAD_INPUT)
    if "." not in argv[2:]:
        raise SyncError("rsync: missing the `.` separator before the target", BAD_INPUT)
    dot = argv.index(".", 2)
    opts, targets = argv[2:dot], argv[dot + 1:]
    if len(targets) != 1:
        raise SyncError(f"rsync: exactly one target allowed, got {len(targets)} ({' '.join(targets)[:200]!r})", BAD_INPUT)
    target = targets[0]
    if ".." in target.split("/"):
        raise SyncError(f"rsync: target {target[:200]!r} contains '..' (path traversal refused)", BAD_INPUT)
    allowed_targets = {STAGING_TOKEN, STAGING_TOKEN + "/", str(staging), str(staging) + "/"}
    if target not in allowed_targets:
        raise SyncError(f"rsync: target {target[:200]!r} is not the staging dir ({STAGING_TOKEN})", BAD_INPUT)
    dry, caps, kept, _ = _client_options(opts)
    exe = shutil.which("rsync") or "/usr/bin/rsync"
    return [exe, "--server", f"-{dry}{SERVER_LETTERS}{caps}", *kept, *PINNED, f"--max-size={max_file_bytes}",
            ".", f"{staging}/"]


def parse_receive(argv: list[str]) -> tuple[int, str, bool]:
    """`receive GEN HASH [--force]` -> (gen, hash, force), with a clear error for anything else."""
    args = argv[1:]
    force = False
    if args and args[-1] == "--force":
        force, args = True, args[:-1]
    if len(args) != 2:
        raise SyncError(f"receive: expected `receive GENERATION HASH [--force]` (got {shlex.join(argv)!r})", BAD_INPUT)
    return parse_generation(args[0]), parse_hash(args[1]), force


def wait_for_transfer(stream, timeout: float = AFTER_TRANSFER_MAX) -> None:
    """`receive ... --after-transfer`: the master starts the receive while its rsync runs (the ssh connection and
    this process's start-up overlap the transfer) and says STAGED on stdin once the transfer is done. Anything
    else, end of file or no word within `timeout`: SyncError, before the lock is taken or the staging dir touched
    (a cut-off transfer keeps what arrived, the next push's delta base)."""
    fd, got, deadline = stream.fileno(), b"", time.monotonic() + timeout
    while len(got) < len(STAGED) and not got.endswith(b"\n"):  # bounded: at most len(STAGED) bytes
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, len(STAGED) - len(got))
        if not chunk:
            break
        got += chunk
    if got != STAGED:
        raise SyncError(f"receive {AFTER_TRANSFER}: the master did not say the transfer was done "
                        f"(within {timeout:.0f} s); nothing done", PEER_FAILED)


def after_transfer_wait(paths: Paths) -> float:
    """Seconds a waiting receive waits: AFTER_TRANSFER_TIMEOUTS x this node's live sync.timeout (default 60)."""
    try:
        t = load(Releases(paths.state).current / "appliance.yaml").sync.timeout
    except Exception:  # noqa: BLE001 - no live config yet, or it does not load: the model's default
        t = 60
    return min(AFTER_TRANSFER_TIMEOUTS * t, AFTER_TRANSFER_MAX)


@contextmanager
def one_waiter(run_dir: Path) -> Iterator[None]:
    """Hold <run>/receive-wait.lock while waiting for a transfer; a second waiter is refused at once (BUSY) with
    words the master's finish_receive knows, so a real push then runs the plain receive."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / WAIT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SyncError(f"receive {AFTER_TRANSFER}: another receive is waiting for its transfer here; refused "
                            f"(send the plain receive after the transfer)", BUSY) from None
        yield
    finally:
        os.close(fd)


def seed_staging(rel: Releases, max_file_bytes: int = tree.MAX_FILE_BYTES) -> None:
    """Before rsync writes: the state dirs with their modes, a staging dir that holds nothing unsafe (else it is
    emptied), and before the first push a copy of the live release so rsync sends only the difference."""
    rel.prepare_dirs()
    if tree.check_staged(rel.staging, max_file_bytes):
        rel.clear_staging()
    if rel.staging_meta() is None:
        live = rel.live()
        if live is not None:
            mirror(rel.path(live), rel.staging, transfer=True)
            rel.write_staging_meta(live, rel.meta(live)["hash"])


def running_as() -> str:
    """Who this process is (by effective uid, not $USER), and who it runs for under doas/sudo: for messages."""
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = f"uid {os.geteuid()}"
    for var, tool in (("DOAS_USER", "doas"), ("SUDO_USER", "sudo")):
        if os.environ.get(var):
            return f"{me} (for {os.environ[var]} via {tool})"
    return me


def _parse(command: str | None) -> list[str]:
    """The peer's SSH_ORIGINAL_COMMAND as argv, refusing anything that is not one short sync command line."""
    if command is None:
        raise SyncError("SSH_ORIGINAL_COMMAND is not set: sync-serve runs only as the forced command of the sync key, "
                        "for the sync commands (status, rsync --server, receive); no shell. Through doas or sudo the "
                        "rule must keep it (doas.conf: setenv { SSH_ORIGINAL_COMMAND }, sudoers: "
                        "env_keep += SSH_ORIGINAL_COMMAND)", BAD_INPUT)
    if not command.strip():
        raise SyncError("this key runs only sync commands (status, rsync --server, receive); no shell", BAD_INPUT)
    if len(command) > 4096:
        raise SyncError("command too long", BAD_INPUT)
    try:
        return shlex.split(command)
    except ValueError as e:
        raise SyncError(f"cannot parse the command: {e}", BAD_INPUT) from None


def _run(argv: list[str], paths: Paths) -> dict:
    verb = argv[0]
    if verb == "status" and len(argv) == 1:
        return rcv.status(paths)
    if verb == "rsync":
        if role_of(paths) == "MASTER":  # no one pushes to a master (the master refuses split brain before pushing)
            raise SyncError("split brain: this node is MASTER; refusing a transfer into its staging dir (its base "
                            "for the next sync's checks)", SPLIT_BRAIN)
        rel = Releases(paths.state)
        cap = rcv.max_file_bytes(paths)
        new_argv = rsync_server_argv(argv, rel.staging, cap)
        with lock.held(paths.run, wait=30):  # not while a receive checks or copies the staged tree
            seed_staging(rel, cap)
        sys.stdout.flush()
        os.execv(new_argv[0], new_argv)  # rsync speaks its own protocol on stdout from here
    if verb in ("receive", "sync-receive"):
        after = argv[-1] == AFTER_TRANSFER
        gen, digest, force = parse_receive(argv[:-1] if after else argv)
        if after:  # started beside the transfer: nothing is touched before the master says it is done
            with one_waiter(paths.run):
                wait_for_transfer(sys.stdin.buffer, after_transfer_wait(paths))
        return rcv.receive(paths, gen, digest, force, source=rcv.source_of_connection())
    if verb == "logs":  # read-only: this node's access-log records, nothing else; bounded (sync/logs.py)
        raise SystemExit(logs.run(argv, paths, sys.stdout.buffer))  # stdout holds the gzip stream: no JSON after it
    raise SyncError(f"unknown sync command {verb!r} (allowed: status, rsync --server, receive|sync-receive, logs)",
                    BAD_INPUT)


def dispatch(command: str | None, paths: Paths) -> dict:
    """Run one sync command for a peer; returns its JSON reply, raises SyncError (with the exit code) when refused.

    Only `command` (the peer's SSH_ORIGINAL_COMMAND) decides what runs; nothing depends on which user logged in
    or whether doas/sudo made this process root, so the whitelist is the same either way."""
    state = paths.state
    try:
        return _run(_parse(command), paths)
    except PermissionError as e:
        msg = (f"sync-serve runs as {running_as()} and cannot write {e.filename}: {e.strerror} "
               f"(it needs {state} and the right to signal the proxy: run the forced command through "
               f"`doas -n` / `sudo -n` with the one-command rule `appliance keys init` prints, or use sync.user: root)")
        note(state, msg, logging.ERROR)
        raise SyncError(msg, PEER_FAILED) from None
    except SyncError as e:
        if e.exit_code == BAD_INPUT:
            note(state, f"refused sync command {str(command)[:200]!r} from {rcv.source_of_connection()} "
                        f"as {running_as()}: {str(e).splitlines()[0]}", logging.WARNING)
        raise

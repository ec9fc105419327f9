"""The master's side of one peer: ssh with the pinned host key, its JSON replies, and rsync over the same ssh."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from appliance.core.model import Appliance
from sync import keys as keymod
from sync import tree
from sync.errors import PEER_FAILED, SyncError, from_reply
from sync.releases import STAGING_TOKEN


@dataclass
class Peer:
    """How to reach one peer on the sync link, with the pinned host key and the sync key."""

    name: str
    address: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    bind: str | None
    timeout: int
    control: Path | None = None  # an OpenSSH control socket: every command of one push shares one connection

    def ssh_argv(self) -> list[str]:
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.key), "-p", str(self.port),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"ConnectTimeout={self.timeout}", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
        if self.control is not None:
            # the first command opens the connection and leaves it to a background master (stdio on /dev/null) that
            # the later ones reuse; shared_connections() ends it, and it ends itself after MUX_IDLE s without a session
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control}", "-o", f"ControlPersist={MUX_IDLE}"]
        if self.bind:
            argv += ["-b", self.bind]
        return argv

    def close_master(self) -> None:
        """End the shared connection, if one was opened (`ssh -O exit`: its master closes it and exits)."""
        if self.control is None or not self.control.exists():
            return
        try:
            subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.control}", "-O", "exit",
                            f"{self.user}@{self.address}"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass  # the master ends itself after MUX_IDLE s without a session

    def start(self, command: str) -> subprocess.Popen:
        """Start a sync command that waits for one line on its stdin (`receive ... --after-transfer`): the ssh
        connection and the peer's start-up happen while the transfer runs. Finish it with run(command, started)."""
        return subprocess.Popen(self._argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def _argv(self, command: str) -> list[str]:
        if not self.key.is_file():
            raise SyncError(f"{self.key}: missing (the sync key; run `appliance keys init` on this node)", PEER_FAILED)
        return self.ssh_argv() + ["-T", f"{self.user}@{self.address}", command]

    def run(self, command: str, started: subprocess.Popen | None = None, line: bytes = b"") -> tuple[int, str, str]:
        """Run one sync command on the peer (its forced command dispatches it) with the OpenSSH client, the same
        client and options as rsync's transport: the pinned host key only, no config file, no agent, no tty.
        `started`: the command as start() began it, sent `line` and end of file on its stdin now.
        SyncError when the key is missing (ssh would fall back to root's own keys), when ssh itself fails (exit
        255: no connection, a host key that is not the pinned one, the key refused), when the peer does not answer
        within 10 x sync.timeout, or says more than MAX_REPLY bytes (a reply is one JSON line)."""
        argv = self._argv(command)
        try:
            code, out, err = _bounded(argv, self.timeout * 10, started, line)
        except subprocess.TimeoutExpired:
            raise SyncError(f"{self.name} ({self.address}:{self.port}): no answer to {command.split()[0]!r} within "
                            f"{self.timeout * 10} s", PEER_FAILED) from None
        except OverflowError:
            raise SyncError(f"{self.name} ({self.address}:{self.port}): its answer to {command.split()[0]!r} is over "
                            f"{MAX_REPLY} bytes: not read", PEER_FAILED) from None
        except OSError as e:  # no ssh binary
            raise SyncError(f"{self.name}: cannot run ssh: {e}", PEER_FAILED) from None
        if code == 255:
            raise SyncError(f"{self.name} ({self.address}:{self.port}): ssh: {_tail(err) or 'exit 255'}", PEER_FAILED)
        return code, out, err


MAX_REPLY = 1 << 20      # bytes of a peer's stdout, and of its stderr, the master reads (a reply is one JSON line)
MUX_IDLE = 15            # s a shared connection outlives its last session when the push could not end it
MUX_ROOT = Path("/tmp")  # short (a socket path has a length limit) and there on both systems; private to the Debian unit
MUX_MAX_PATH = 88        # sun_path holds 107 bytes, and OpenSSH binds "<ControlPath>.<16 random characters>" first
RSYNC_MAX = 3600         # s one transfer may take in all (rsync's --timeout bounds each stall): then it is killed


def mux_dir() -> Path | None:
    """The directory of this user's control sockets, None (no sharing) unless it is a real directory owned by this user
    and closed to everyone else: a name under /tmp is predictable, so one made by anyone else is never used."""
    d = MUX_ROOT / f"carpguard-sync-{os.geteuid()}"
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = d.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return d


@contextmanager
def shared_connections(peers: list[Peer], scope: str) -> Iterator[None]:
    """One ssh connection per peer for a whole push: status, rsync and receive each paid for a handshake (and the
    peer's sshd start-up) of their own, about 0.3 s, on the sync's critical path. Each command on the shared
    connection is still a session of its own, so the peer's forced command decides it. A socket is named for `scope`
    (this node's state dir) and the peer's user, address and port, so it only ever leads to that peer; one a killed
    push left is closed first (the sync lock keeps pushes apart), and the push closes its own before it reports."""
    d = mux_dir()
    for p in peers if d is not None else ():
        path = d / hashlib.sha256(f"{scope}|{p.user}@{p.address}:{p.port}".encode()).hexdigest()[:16]
        if len(str(path)) <= MUX_MAX_PATH:
            p.control = path
            p.close_master()
    try:
        yield
    finally:
        for p in peers:
            p.close_master()
            p.control = None


def _bounded(argv: list[str], timeout: float, started: subprocess.Popen | None = None,
             line: bytes = b"") -> tuple[int, str, str]:
    """Run argv with stdin closed (or finish `started`: `line` and end of file on its stdin); (exit code, stdout,
    stderr) as text. TimeoutExpired after `timeout` s and OverflowError past MAX_REPLY bytes on either stream, the
    process killed in both cases."""
    import selectors

    p = started or subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if started is not None:
        try:
            p.stdin.write(line)  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:  # it has answered already (a refusal): read what it said
            pass
        finally:
            try:
                p.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass
    bufs = {p.stdout: bytearray(), p.stderr: bytearray()}
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            for f in bufs:
                sel.register(f, selectors.EVENT_READ)
            while sel.get_map():  # bounded by the deadline and MAX_REPLY
                left = deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(argv, timeout)
                for key, _ in sel.select(min(left, 1.0)):
                    chunk = key.fileobj.read1(65536)  # type: ignore[union-attr]
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    bufs[key.fileobj] += chunk  # type: ignore[index]
                    if len(bufs[key.fileobj]) > MAX_REPLY:  # type: ignore[index]
                        raise OverflowError
        code = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except BaseException:
        p.kill()
        p.wait()
        raise
    finally:
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    return code, bufs[p.stdout].decode(errors="replace"), bufs[p.stderr].decode(errors="replace")


def make_peers(cfg: Appliance, node: str, config_dir: Path, key: Path | None = None) -> list[Peer]:
    """The other nodes, reached with `key` (this node's own sync key; default: the tree's old shared key)."""
    me = cfg.nodes[node]
    return [Peer(name, str(n.sync.ip), cfg.sync.ssh_port, cfg.sync.user, key or keymod.sync_key(config_dir),
                 keymod.known_hosts(config_dir), str(me.sync.ip), cfg.sync.timeout)
            for name, n in cfg.peers(node).items()]


def one_line(text: str, limit: int = 300) -> str:
    """A peer's words for a message: one line, no control characters (terminal escapes), at most `limit` chars."""
    flat = "".join(c if c.isprintable() else " " for c in str(text))
    flat = " ".join(flat.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _tail(text: str) -> str:
    """What a failed command last said on stderr, for the message (never parsed)."""
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return one_line(lines[-1]) if lines else ""


def ask(peer: Peer, command: str, what: str, started: subprocess.Popen | None = None, line: bytes = b"") -> dict:
    """Run one sync command on the peer (or finish `started`, see Peer.run) and return its JSON reply; SyncError
    with the peer's code when it refused."""
    code, out, err = peer.run(command, started, line)
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        data = None
    if data is None and code == 0:
        raise SyncError(f"{peer.name}: {what} answer is not JSON: {out[:200]!r}", PEER_FAILED)
    tail = _tail(err)
    try:
        return from_reply(data, code, f"exit {code}" + (f": {tail}" if tail else ""))
    except SyncError as e:  # the peer's own words: one line, bounded, no escapes
        said = one_line(str(e))
        raise SyncError(f"{peer.name}: {what} failed: {said}" if what == "status" else f"{peer.name} {what}: {said}",
                        e.exit_code) from None


def remote_status(peer: Peer) -> dict:
    try:
        return ask(peer, "status", "status")
    except SyncError:
        raise
    except Exception as e:  # network, auth or host key failure: this peer only
        raise SyncError(f"{peer.name} ({peer.address}:{peer.port}): cannot ask its status: {type(e).__name__}: {e}", PEER_FAILED) from None


_ITEM = re.compile(r"^([<>ch.*][fdLDS]\S{9}|\*deleting)\s+(.*)$")
_SENT = re.compile(r"Total bytes sent:\s*([\d,.]+)")
_RECV = re.compile(r"Total bytes received:\s*([\d,.]+)")


def parse_rsync_output(text: str) -> dict:
    """Files added / changed / removed from --itemize-changes lines, bytes from --stats."""
    added, changed, removed = [], [], []
    for line in text.splitlines():
        m = _ITEM.match(line.rstrip())
        if not m:
            continue
        flags, name = m.group(1), m.group(2)
        if flags == "*deleting":
            if not name.endswith("/"):
                removed.append(name)
        elif flags[1] == "f" and flags[0] in "<>c":
            (added if "+++++++" in flags else changed).append(name)
    num = lambda rx: int(rx.search(text).group(1).replace(",", "").replace(".", "")) if rx.search(text) else None
    return {"added": added, "changed": changed, "removed": removed, "bytes_sent": num(_SENT), "bytes_received": num(_RECV)}


def rsync_to(peer: Peer, src: Path, dry_run: bool = False, bwlimit: int | None = None) -> dict:
    """rsync (built through sysrsync) the release into the peer's staging dir; --partial keeps cut-off files."""
    from sysrsync.command_maker import get_rsync_command

    # -rtp, never -a: the peer's rsync server runs with its own fixed options (sync/serve.py) and refuses -l/-D/-o/-g
    options = ["-rtp", "--itemize-changes", "--stats", "--delete", "--partial", f"--timeout={peer.timeout}",
               "-e", shlex.join(peer.ssh_argv())]
    if dry_run:
        options.append("--dry-run")
    if bwlimit:
        options.append(f"--bwlimit={int(bwlimit)}")
    cmd = get_rsync_command(source=str(src), destination=STAGING_TOKEN, destination_ssh=f"{peer.user}@{peer.address}",
                            options=options, exclusions=tree.rsync_excludes(), sync_source_contents=True)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=RSYNC_MAX)
    except subprocess.TimeoutExpired:  # a peer that never ends the transfer (its session held open, say)
        raise SyncError(f"{peer.name}: the transfer did not end within {RSYNC_MAX} s; stopped", PEER_FAILED) from None
    if r.returncode != 0:
        raise SyncError(f"{peer.name}: rsync exited {r.returncode}: {r.stderr.strip() or 'no message'}", PEER_FAILED)
    out = parse_rsync_output(r.stdout)
    out["transfer_seconds"] = round(time.monotonic() - t0, 3)
    return out


AFTER_TRANSFER = "--after-transfer"  # receive waits for STAGED on its stdin: sync/serve.py
STAGED = b"staged\n"


def start_receive(peer: Peer, command: str) -> subprocess.Popen | None:
    """`receive ...` started before the transfer, waiting for it (the ssh connection and the peer's start-up
    overlap the rsync); None when ssh cannot even be started (the plain receive reports that)."""
    try:
        return peer.start(f"{command} {AFTER_TRANSFER}")
    except (OSError, SyncError):
        return None


def finish_receive(peer: Peer, command: str, started: subprocess.Popen | None, what: str) -> dict:
    """The reply of a receive start_receive began, told that the transfer is done. A peer that does not know
    --after-transfer (an older version) or stopped waiting for it gets the plain `receive` instead."""
    if started is not None:
        try:
            return ask(peer, f"{command} {AFTER_TRANSFER}", what, started, STAGED)
        except SyncError as e:
            if "expected `receive GENERATION HASH" not in str(e) and f"receive {AFTER_TRANSFER}:" not in str(e):
                raise
    return ask(peer, command, what)


def cancel_receive(started: subprocess.Popen | None, timeout: float = 30) -> None:
    """The transfer failed: end of file, no STAGED, so the waiting receive changes nothing and exits (killed after
    `timeout` s)."""
    if started is None:
        return
    try:
        started.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        started.kill()
        started.wait()
        # not read to end of file: on a shared connection the ssh master holds the other end of these pipes
        started.stdout.close()  # type: ignore[union-attr]
        started.stderr.close()  # type: ignore[union-attr]

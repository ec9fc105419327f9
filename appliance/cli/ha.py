"""`appliance role|carp|status|demote|promote|watchdog`: the node's CARP role, engine supervisor and maintenance."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from appliance.cli import Ctx, emit_json, fail, main
from appliance.core import pids, state
from appliance.core.model import check_iface
from appliance.ha import ip as netns
from appliance.ha import liveness, liveness_report, role, watch, watchdog
from appliance.ha import supervisor as carp
from sync import catchup

IS_FREEBSD = sys.platform.startswith("freebsd")


@main.command("role")
@click.argument("new_role", metavar="master|backup", type=click.Choice(["master", "backup"], case_sensitive=False))
@click.option("--vhid", type=int, help="which CARP group (default: cluster.vhid)")
@click.option("--iface", metavar="IF", help="interface carrying the VIP (default: cluster.interface)")
@click.option("--seq", type=int, hidden=True, help="ordering token; a lower one never undoes a higher one")
@click.option("--fork-seq", is_flag=True, hidden=True,
              help="the ordering token is this process's fork time (the up/down scripts exec into this command)")
@click.option("--no-vip", is_flag=True, help="do not add/remove the VIP (something else manages the address)")
@click.option("--garp/--no-garp", default=True, help="send gratuitous ARP when becoming MASTER (the CARP engines send their own)")
@click.pass_obj
def role_cmd(ctx: Ctx, new_role: str, vhid: int | None, iface: str | None, seq: int | None, fork_seq: bool,
             no_vip: bool, garp: bool) -> None:
    """Become MASTER or BACKUP: record it, move the VIP (Linux), run hooks.d/<role>/. Idempotent."""
    cfg, node = ctx.cfg, ctx.node
    boot = None
    if fork_seq:
        if seq is not None:
            fail("--seq and --fork-seq exclude each other")
        boot, seq = pids.fork_order() or (None, None)
    if iface is not None:
        try:
            check_iface(iface)
        except ValueError as e:
            fail(f"--iface {iface!r}: {e}")
    try:
        role.apply(ctx.paths, cfg, node, new_role, vhid, iface, ctx.config_path, seq=seq, boot=boot,
                   manage_vip=False if (no_vip or IS_FREEBSD) else None, send_garp=garp)
    except ValueError as e:
        fail(str(e))
    except RuntimeError as e:
        fail(str(e), 1)


@main.command("carp")
@click.option("--engine", type=click.Choice(carp.ENGINES), default=None,
              help=f"CARP speaker to run (default {carp.DEFAULT_ENGINE})")
@click.option("--deadratio", type=click.IntRange(1, 10), default=None, help="adverts missed before the master is dead")
@click.option("--no-watchdog", is_flag=True, help="do not tie the advskew to the local proxy's health")
@click.option("--check", metavar="HOST:PORT", help="where the watchdog sends GET /healthz (default: the proxy's listen)")
@click.pass_obj
def carp_cmd(ctx: Ctx, engine: str | None, deadratio: int | None, no_watchdog: bool, check: str | None) -> None:
    """Run the CARP engine(s) of this node (Linux) under supervision; stays in the foreground."""
    if IS_FREEBSD:
        fail("on FreeBSD CARP is in the kernel (ifconfig ... vhid); devd calls `appliance role`", 2)
    cfg, node = ctx.cfg, ctx.node
    config_path = Path(os.path.abspath(ctx.config_path))
    try:
        # a node back from an outage waits, demoted, for the generation the master cut meanwhile (ha/catchup.py)
        sup = carp.CarpSupervisor(cfg, node, config_path, ctx.paths, engine or carp.DEFAULT_ENGINE, deadratio,
                                  not no_watchdog, check, ahead=lambda log: catchup.ahead(cfg, node, config_path, ctx.paths, log))
        sys.exit(sup.run_forever())
    except (RuntimeError, ValueError) as e:
        fail(str(e), 1 if isinstance(e, RuntimeError) else 2)


def _fmt_since(since: float | None) -> str:
    if not since:
        return "unknown"
    age = int(time.time() - since)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))} ({age // 3600}h{age % 3600 // 60:02d}m{age % 60:02d}s ago)"


PROBE_TIMEOUT = 1.0


def probe_peer(src: str, dst: str, port: int, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """One TCP connect from our sync address to the peer's sync sshd: an answer (even a refusal) means the
    peer is up on the link. Bounded by `timeout`; nothing else is sent."""
    import errno
    import socket

    t0 = time.monotonic()
    try:
        with socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0)):
            return True, f"sshd answers on port {port} ({(time.monotonic() - t0) * 1000:.0f} ms)"
    except ConnectionRefusedError:
        return True, f"up, but nothing listens on port {port}"
    except socket.timeout:
        return False, f"no answer within {timeout:.0f} s"
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            return False, f"our sync address {src} is not configured"
        return False, e.strerror or type(e).__name__


def probe_peers(cfg, node: str, others: dict) -> dict[str, tuple[bool | None, str]]:
    """Probe each peer's sync address, only over the sync link: our own sync address must be on
    cluster.sync_interface here (else nothing is sent: (None, why)); peers in parallel, 1 s each."""
    from concurrent.futures import ThreadPoolExecutor

    me = cfg.nodes[node].sync
    try:
        here = IS_FREEBSD or netns.has_address(cfg.cluster.sync_interface, me)
    except (OSError, RuntimeError, ValueError) as e:  # no `ip` here
        return {name: (None, f"not probed: {e}") for name in others}
    if not here:
        why = f"not probed: {me.ip} is not on {cfg.cluster.sync_interface} here"
        return {name: (None, why) for name in others}
    if not others:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(others))) as ex:
        futs = {name: ex.submit(probe_peer, str(me.ip), str(n.sync.ip), cfg.sync.ssh_port) for name, n in others.items()}
        return {name: f.result() for name, f in futs.items()}


def collect_status(ctx: Ctx, probe: bool = True) -> dict:
    cfg, node = ctx.cfg, ctx.node
    paths = ctx.paths
    info = carp.status_info(paths) or {}
    ha = state.read_ha(paths)
    vhids = []
    for g in role.groups(cfg, node):
        r = state.read_role(paths, None if g.main else g.vhid) or {}
        eng = (info.get("engines") or {}).get(str(g.vhid), {})
        demoted = bool(ha.get("demoted") or info.get("demoted"))
        vhids.append({
            "vhid": g.vhid, "role": r.get("role", "INIT"), "vip": str(g.vip), "iface": r.get("iface", cfg.cluster.interface),
            "advbase": cfg.cluster.advbase,
            "advskew": eng.get("advskew", carp.effective_advskew(cfg, g, demoted)),
            "configured_advskew": g.advskew, "since": r.get("since"),
            "engine_pid": eng.get("pid"),
        })
    peers = {}
    others = {name: n for name, n in cfg.nodes.items() if name != node}
    answers = probe_peers(cfg, node, others) if probe else {}
    for name, n in others.items():
        st = netns.neighbour_state(str(n.sync.ip)) if not IS_FREEBSD else None
        seen, what = answers.get(name, (None, "not probed"))
        if seen is None:  # not probed: fall back to what the kernel already knows
            seen = bool(st and "FAILED" not in st and "INCOMPLETE" not in st)
        peers[name] = {"sync": str(n.sync.ip), "seen": seen, "probe": what, "neighbour": st}
    try:
        ppid, pstale = pids.verified_pid(paths.proxy_pid, "proxy"), None
    except pids.StalePidfile as e:
        ppid, pstale = None, str(e)
    return {
        "node": node, **{k: vhids[0][k] for k in ("role", "vhid", "advbase", "advskew", "vip", "since")},
        "preempt": cfg.cluster.preempt,
        "demoted": bool(ha.get("demoted")), "health_demoted": bool(ha.get("health_demoted")),
        "carp": {"running": bool(info), "engine": info.get("engine"), "supervisor_pid": info.get("pid"),
                 "healthy": info.get("healthy"), "health": info.get("health_last"),
                 "demoted_reason": info.get("demoted_reason") or None},
        "vhids": vhids, "peers": peers,
        "proxy": {"up": ppid is not None, "pid": ppid, "stale": pstale},
        "sync_generation": state.sync_generation(paths),
        "carp_watch": watch.read_state(paths),
        "fast": liveness.read_status(paths) if info else None,
    }


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--no-probe", is_flag=True, help="do not probe the peers over the sync link (neighbour table only)")
@click.pass_obj
def status_cmd(ctx: Ctx, as_json: bool, no_probe: bool) -> None:
    """Role, vhid, advbase/advskew, VIP and since when; the peer on the sync link (probed: TCP connect to its
    sync sshd, 1 s at most); proxy; sync generation."""
    s = collect_status(ctx, probe=not no_probe)
    if as_json:
        emit_json(s)
        return
    click.echo(f"node: {s['node']}")
    for v in s["vhids"]:
        click.echo(f"carp: {v['role']} vhid {v['vhid']} advbase {v['advbase']} advskew {v['advskew']}")
        click.echo(f"      vip {v['vip']} on {v['iface']} since {_fmt_since(v['since'])}")
    flags = []
    if s["demoted"]:
        flags.append("demoted by admin (appliance promote to undo)")
    if s["health_demoted"]:
        flags.append("demoted by watchdog: proxy unhealthy")
    if (s["carp"]["demoted_reason"] or "").startswith("sync catch-up"):
        flags.append("demoted: " + s["carp"]["demoted_reason"])
    if flags:
        click.echo("      " + "; ".join(flags))
    c = s["carp"]
    click.echo(f"engine: {c['engine'] + ' (supervisor pid ' + str(c['supervisor_pid']) + ')' if c['running'] else 'not running'}")
    for name, p in s["peers"].items():
        click.echo(f"peer: {name} {p['sync']} {'seen' if p['seen'] else 'not seen'} on the sync link"
                   f" ({p['probe']}{', neighbour ' + p['neighbour'] if p['neighbour'] else ''})")
    click.echo(f"proxy: {'up (pid ' + str(s['proxy']['pid']) + ')' if s['proxy']['up'] else 'down'}"
               f"{' (' + s['proxy']['stale'] + ')' if s['proxy'].get('stale') else ''}")
    gen = s["sync_generation"]
    click.echo(f"sync: {'generation ' + str(gen) if gen is not None else 'no release yet'}")
    for line in liveness_report.summary(s["fast"]):
        click.echo(line)
    watched = watch.summary(s["carp_watch"])
    if watched:
        click.echo(f"carp-watch: {watched}")


def _freebsd_advskew(ctx: Ctx, demote: bool) -> None:
    cfg = ctx.cfg
    for g in role.groups(cfg, ctx.node):
        skew = carp.effective_advskew(cfg, g, demote)
        argv = ["ifconfig", cfg.cluster.interface, "vhid", str(g.vhid), "advskew", str(skew)]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"{' '.join(argv)}: {r.stderr.strip()}", 1)
        click.echo(f"vhid {g.vhid}: advskew {skew}")


def _set_demoted(ctx: Ctx, demote: bool) -> None:
    cfg = ctx.cfg
    verb = "demote" if demote else "promote"
    if not cfg.cluster.preempt:
        fail(f"refusing to {verb}: preemption is off (cluster.preempt: false in {ctx.config_path}), so a changed "
             f"advskew would not move the VIP; set preempt: true (net.inet.carp.preempt=1 / ucarp --preempt)", 2)
    node = ctx.node
    if not IS_FREEBSD:
        pids.verified_pid(ctx.paths.carp_pid, "carp")  # a stale pidfile: refuse before anything changes
    state.write_ha(ctx.paths, demoted=demote, reason=f"appliance {verb}")
    role.log_line(f"carp: {verb}d by admin (advskew {cfg.ha.demote_advskew if demote else 'as configured'})", ctx.paths)
    if IS_FREEBSD:
        _freebsd_advskew(ctx, demote)
        return
    # re-arm with the new advskew (SIGHUP would also re-read the config)
    pid = pids.signal_pidfile(ctx.paths.carp_pid, signal.SIGUSR1, "carp")
    if pid is None:
        click.echo(f"{node}: {verb}d; `appliance carp` is not running, it will start "
                   f"{'demoted' if demote else 'with the configured advskew'}")
        return
    click.echo(f"{node}: {verb}d; engine re-armed (supervisor pid {pid})")


@main.command("demote")
@click.pass_obj
def demote_cmd(ctx: Ctx) -> None:
    """Planned maintenance: advskew ha.demote_advskew so the VIP moves to a peer (kept across restarts)."""
    _set_demoted(ctx, True)


@main.command("promote")
@click.pass_obj
def promote_cmd(ctx: Ctx) -> None:
    """Undo `appliance demote`: back to the configured advskew (with preempt the VIP returns)."""
    _set_demoted(ctx, False)


@main.command("watchdog")
@click.option("--check", metavar="HOST:PORT", help="where to send GET /healthz (default: the proxy's listen)")
@click.option("--once", is_flag=True, help="probe once: exit 0 when the proxy answers, 1 when not")
@click.pass_obj
def watchdog_cmd(ctx: Ctx, check: str | None, once: bool) -> None:
    """Probe the local proxy every advbase; on ha.failures failures demote (the `carp` supervisor also does this)."""
    cfg = ctx.cfg
    try:
        target = watchdog.check_target(cfg, check)
    except ValueError as e:
        fail(str(e))
    if once:
        ok, why = watchdog.probe(*target)
        click.echo(f"proxy {target[0]}:{target[1]}: {'ok' if ok else why}")
        sys.exit(0 if ok else 1)
    health = watchdog.Health(cfg.ha.failures)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        t0 = time.monotonic()
        ok, why = watchdog.probe(*target, timeout=cfg.ha.check_timeout)
        change = health.record(ok, why)
        if change is not None:
            state.write_ha(ctx.paths, health_demoted=not change, health_reason=why)
            role.log_line(f"watchdog: proxy {'healthy' if change else 'unhealthy: ' + why}", ctx.paths)
            try:
                pids.signal_pidfile(ctx.paths.carp_pid, signal.SIGUSR1, "carp")
            except pids.StalePidfile as e:
                role.log_line(f"watchdog: {e}", ctx.paths)
        time.sleep(max(0.05, health.interval(cfg.cluster.advbase) - (time.monotonic() - t0)))


class PeerRoles:
    """watch.PeerRole over the sync link: each peer's role from its sync-serve `status`, asked in the background
    (one question per peer at a time, at most every `every` seconds), so the watcher never waits on SSH."""

    def __init__(self, cfg, node: str, config_dir: Path, node_key: Path, every: float = 5.0):
        import threading

        from sync import keys as keymod  # deferred: the sync client, only when a watcher asks its peers
        from sync import peer as syncpeer  # deferred: as above

        self.ask = syncpeer.remote_status
        # the key a sync pushes with: this node's own, else the tree's old shared one (not the shared one first)
        key = keymod.push_key(node_key, config_dir)
        self.peers = {p.name: p for p in syncpeer.make_peers(cfg, node, config_dir, key)}
        self.answers: dict[str, tuple[str, float]] = {}
        self.asked: dict[str, float] = {}
        self.every, self.lock, self.threading = every, threading.Lock(), threading

    def __call__(self, name: str, after: float) -> tuple[str, float] | None:
        with self.lock:
            have = self.answers.get(name)
            due = time.time() - self.asked.get(name, 0.0) >= self.every and (have is None or have[1] <= after
                                                                               or time.time() - have[1] > self.every)
            if due and name in self.peers:
                self.asked[name] = time.time()
                self.threading.Thread(target=self._ask, args=(name,), daemon=True).start()
        return have

    def _ask(self, name: str) -> None:
        try:
            said = str(self.ask(self.peers[name]).get("role") or "UNKNOWN").upper()
        except Exception:  # noqa: BLE001 - unreachable or refusing: no answer, nothing decided
            return
        with self.lock:
            self.answers[name] = (said, time.time())


@main.command("carp-watch")
@click.option("--iface", metavar="IF", help="LAN interface to listen on (default: cluster.interface)")
@click.option("--source", type=click.Choice(["raw", "tcpdump"]), default=None,
              help="raw IPv4 socket (Linux default) or `tcpdump -w -` (FreeBSD default: kernel CARP takes protocol 112 first)")
@click.option("--no-peers", is_flag=True, help="do not ask the peers over the sync link whether they are BACKUP")
@click.option("--seconds", type=click.FloatRange(0.1, None), help="stop after this long (default: run until SIGTERM)")
@click.pass_obj
def carp_watch_cmd(ctx: Ctx, iface: str | None, source: str | None, no_peers: bool, seconds: float | None) -> None:
    """Listen to CARP adverts on the LAN (read-only) and flag forged ones: valid pass, but no configured node sends
    them. Logged (rate-limited) to ha.log, counted in <run>/carp-watch.json (`appliance status`) and .prom."""
    cfg, node = ctx.cfg, ctx.node
    iface = iface or cfg.cluster.interface
    try:
        check_iface(iface)
    except ValueError as e:
        fail(f"--iface {iface!r}: {e}")
    exp = watch.Expect.from_config(cfg)
    ctx.paths.run.mkdir(parents=True, exist_ok=True)
    tally = watch.Tally(watch.state_file(ctx.paths))
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    end = time.monotonic() + seconds if seconds else None
    done = lambda: bool(stop) or (end is not None and time.monotonic() >= end)  # noqa: E731
    config_dir = Path(os.path.abspath(ctx.config_path)).parent
    peers = None if no_peers or len(cfg.nodes) < 2 else PeerRoles(cfg, node, config_dir, ctx.paths.sync_key)
    say = f"carp-watch: listening for CARP adverts on {iface} (vhids {', '.join(map(str, exp.vips))})"
    if (source or ("tcpdump" if IS_FREEBSD else "raw")) == "raw":
        try:
            sock = watch.open_raw(iface)
        except OSError as e:
            fail(f"carp-watch: cannot listen on {iface}: {e}", 1)
        role.log_line(say, ctx.paths)
        watch.watch(exp, watch.raw_packets(sock, done), tally, lambda m: role.log_line(m, ctx.paths), peers)
        return
    argv = ["tcpdump", "-i", iface, "-U", "-n", "-s", "128", "-w", "-", "ip proto 112"]
    role.log_line(say + " (tcpdump)", ctx.paths)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as p:
        try:
            watch.watch(exp, watch.pcap_packets(p.stdout, done), tally, lambda m: role.log_line(m, ctx.paths), peers)
        finally:
            p.terminate()

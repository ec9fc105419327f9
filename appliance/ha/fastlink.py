"""The CARP supervisor's side of the fast liveness layer: start it, tell it this node's roles, pass its commands
to the speakers' control sockets, and decide whether a crashed master's engine restarts as master."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from appliance.core.fsio import read_json
from appliance.ha import engine_ctl, liveness, role

if TYPE_CHECKING:  # the supervisor imports this module; the types only name it
    from appliance.ha.supervisor import CarpProcess, CarpSupervisor

RESTART_AS_MASTER_AFTER = 1.0    # an engine that dies sooner after its start is in a crash loop: the normal path


def engine_role(sup: CarpSupervisor, e: CarpProcess) -> str:
    """The role the vhid's running engine last wrote ('' while no engine of ours runs or it has not written yet;
    MASTER while one restarted as master has not written yet)."""
    if e.proc is None:
        return ""
    st = read_json(sup.paths.engine_state(e.group.vhid)) or {}
    if st.get("pid") == e.proc.pid:
        return str(st.get("state") or "")
    return "MASTER" if e.as_master else ""


def view(sup: CarpSupervisor) -> liveness.View:
    return liveness.View(roles={e.group.vhid: engine_role(sup, e) for e in sup.engines},
                         advskew={e.group.vhid: e.advskew for e in sup.engines}, demoted=sup.demoted()[0])


def settings(sup: CarpSupervisor) -> tuple:
    """What the running layer was started with: a reload that changes any of it starts a new one."""
    c = sup.cfg
    return (c.ha.fast_interval, c.ha.fast_misses, c.ha.fast_port, c.ha.fast_check_timeout, c.cluster.interface,
            c.cluster.password.get_secret_value(), c.cluster.password_next and c.cluster.password_next.get_secret_value(),
            tuple((n, str(x.lan.ip), str(x.sync.ip)) for n, x in sorted(c.nodes.items())), sup.target,
            tuple(c.ha.lan_witness), c.cluster.sync_interface)


def stop(sup: CarpSupervisor) -> None:
    if sup.fast is not None:
        sup.fast_stop.set()
        sup.fast.join()
        sup.fast = None


def restart_if_changed(sup: CarpSupervisor, before: tuple) -> None:
    """After a reload: the layer again with the new settings when they changed (a heartbeat gap of one interval)."""
    if settings(sup) != before:
        stop(sup)
        sup.fast = start(sup)


def start(sup: CarpSupervisor) -> liveness.Liveness | None:
    """The layer, running, when ha.fast_interval > 0; it acts through the speaker only (ucarp: report only)."""
    if sup.cfg.ha.fast_interval <= 0:
        return None
    sup.fast_stop = threading.Event()
    sender = engine_ctl.Sender()
    def log(msg: str) -> None:
        role.log_line(msg, sup.paths)

    fast = liveness.Liveness(sup.cfg, sup.node, sup.paths, lambda: view(sup),
                             lambda vhid, verb, cause: sender.send(sup.paths.engine_control(vhid), verb, cause),
                             log, on_failure=sup.rearm.set, acting=sup.engine == "speaker", check=sup.target)
    try:
        fast.start(sup.fast_stop)
    except OSError as e:
        log(f"fast: liveness layer not started, CARP alone decides: cannot open its sockets ({e.strerror or e})")
        return None
    log(f"fast: liveness every {sup.cfg.ha.fast_interval:g} s on the sync link and the LAN (udp {fast.port}), "
        f"takeover after {sup.cfg.ha.fast_misses} missed on both"
        + ("" if fast.acting else "; report only: ucarp has no control, CARP decides"))
    return fast


def keep_master(sup: CarpSupervisor, e: CarpProcess, now: float) -> bool:
    """An engine that exited while MASTER on a healthy node restarts as master and the VIP stays (no failover):
    only with the layer acting, after a run of more than a second, and while no peer says it is MASTER now."""
    fast = sup.fast
    if fast is None or not fast.acting or e.proc is None or now - e.started < RESTART_AS_MASTER_AFTER:
        return False
    st = read_json(sup.paths.engine_state(e.group.vhid)) or {}
    if st.get("pid") != e.proc.pid or st.get("state") != "MASTER" or sup.demoted()[0]:
        return False
    if not fast.keep_master(e.group.vhid, time.monotonic()):
        return False
    e.restarts += 1
    return True

"""The CARP engines' up/down scripts: written by the supervisor, run as `python -I -m appliance.ha.transition`.

The CARP supervisor writes the plan (this node, its groups, the interface, the hook timeout: what a role change needs
from the cluster file) whenever it writes the scripts. A transition then costs a Python start and the role engine,
not the appliance's CLI and the config's model (pydantic): 0.5 s against 7 s in an idle TCG guest, and more than the
engine's 60 s script limit in one that is booting. `appliance role` stays the admin's and FreeBSD devd's command;
both end in role.apply_group.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.core import pids
from appliance.core.errors import EXIT_FAILED, ApplianceError, BadInput, report
from appliance.core.fsio import write_json_atomic, write_text_atomic
from appliance.core.paths import Paths, appliance_bin
from appliance.ha import ip as netns
from appliance.ha import role

if TYPE_CHECKING:
    from appliance.core.model import Appliance

PLAN_FILE = "carp-roles.json"


def plan_path(paths: Paths) -> Path:
    return paths.run / PLAN_FILE


def write_plan(paths: Paths, cfg: Appliance, node: str, config_path: Path) -> Path:
    """The plan for this node from the loaded config; written atomically, root-readable only."""
    data = {"node": node, "config": str(config_path), "interface": cfg.cluster.interface,
            "hook_timeout": cfg.ha.hook_timeout,
            "groups": [{"vhid": g.vhid, "vip": str(g.vip), "advskew": g.advskew, "main": g.main}
                       for g in role.groups(cfg, node)]}
    path = plan_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, 0o600)
    return path


def read_plan(path: Path) -> tuple[str, Path, str, float, list[role.Group]]:
    """(node, config path, interface, hook timeout, groups); BadInput naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        groups = [role.Group(int(g["vhid"]), ipaddress.IPv4Interface(g["vip"]), int(g["advskew"]), bool(g["main"]))
                  for g in data["groups"]]
        return str(data["node"]), Path(data["config"]), str(data["interface"]), float(data["hook_timeout"]), groups
    except OSError as e:
        raise BadInput(f"{path}: cannot read the role plan ({e.strerror}); `appliance carp` writes it") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: not a role plan `appliance carp` wrote ({type(e).__name__}: {e})") from None


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m appliance.ha.transition",
                                 description="Become MASTER or BACKUP of one vhid, from the CARP supervisor's plan.")
    ap.add_argument("role", choices=("master", "backup"))
    ap.add_argument("--plan", type=Path, required=True, help="the plan `appliance carp` wrote (run/carp-roles.json)")
    ap.add_argument("--vhid", type=int, help="which group (default: the cluster's main vhid)")
    ap.add_argument("--iface", help="the interface the engine names; it must be the plan's")
    ap.add_argument("--fork-seq", action="store_true", help="order by this process's fork time (pids.fork_order)")
    a = ap.parse_args(argv)
    node, config, iface, hook_timeout, groups = read_plan(a.plan)
    g = next((g for g in groups if a.vhid is None or g.vhid == a.vhid), None)
    if g is None:
        raise BadInput(f"--vhid {a.vhid} is not in {a.plan} (known: {', '.join(str(x.vhid) for x in groups)})")
    if a.iface is not None and a.iface != iface:
        raise BadInput(f"--iface {a.iface!r}: the plan {a.plan} is for {iface}")
    boot, seq = (pids.fork_order() or (None, None)) if a.fork_seq else (None, None)
    # the gratuitous ARP comes from the engine or, with the speaker, from the script, which also moved the VIP
    # before it exec'd this (apply_group then finds the VIP in place)
    return role.apply_group(Paths.default(), g, node, a.role, iface, hook_timeout, config, seq=seq, boot=boot,
                            send_garp=False)


def write_scripts(config_path: Path, node: str, paths: Paths, cfg: Appliance | None = None,
                  move_vip: bool = True, detach: bool = False) -> tuple[Path, Path]:
    """up/down scripts for the engine: a role change for vhid $3 on $1 (ucarp's $1 iface, $2 VIP, $3 xparam). Given
    the config, the change runs from a plan (transition.py: no CLI, no pydantic), else as `appliance role`. With
    `move_vip` on Linux, each first adds (and announces with a gratuitous ARP) or removes the vhid's VIP itself with
    `ip`: that takes milliseconds, where a Python start takes about 0.5 s on hardware and 5-40 s in an emulated VM,
    and a VIP left on a node that became BACKUP meanwhile is a second holder. The role engine then finds the VIP in
    place, records the role and runs the hooks. Speaker only (one script at a time).

    `detach` (ucarp): the script starts the change in the background and exits at once. ucarp 1.5.2 waits for its
    script (waitpid) and neither sends nor reads an advert meanwhile: a Python start under load (seconds) kept a new
    master from advertising and a second master from hearing it, and the 3-node lab had two masters of one vhid
    for 25 s. The fork-time token still orders the changes (each shell forks its Python before it exits)."""
    d = paths.run
    d.mkdir(parents=True, exist_ok=True)
    sdir = str(paths.state)
    vips = [(g.vhid, str(g.vip)) for g in role.groups(cfg, node)] if cfg is not None and move_vip and role.IS_LINUX else []
    plan = write_plan(paths, cfg, node, config_path) if cfg is not None else None
    out = []
    for r in ("master", "backup"):
        p = d / f"carp-{'up' if r == 'master' else 'down'}.sh"
        move = ""
        if vips:
            # MASTER: the gratuitous ARP goes out with the move, in the background: the speaker's own comes only when
            # this script has exited, a Python start later, and until then clients still send to the old master
            garp = {vhid: f"; {shlex.quote(netns.tool('arping'))} -q -U -c 1 -I \"$1\" {vip.split('/')[0]} "
                          f"</dev/null >/dev/null 2>&1 &" if r == "master" else "" for vhid, vip in vips}
            cases = "".join(f"  {vhid}) {shlex.quote(netns.tool('ip'))} -4 addr {'add' if r == 'master' else 'del'} "
                            f"{vip} dev \"$1\" 2>/dev/null{garp[vhid]} ;;\n" for vhid, vip in vips)
            move = f"case \"$3\" in\n{cases}esac\n"
        text = (
            "#!/bin/sh\n"
            f"# written by `appliance carp`: the engine calls it with $1 interface, $2 VIP, $3 vhid\n"
            + move +
            f"APPLIANCE_STATE_DIR={shlex.quote(sdir)} {'' if detach else 'exec '}" + (
                f"{shlex.quote(sys.executable)} -I -m appliance.ha.transition --plan {shlex.quote(str(plan))} "
                if plan is not None else
                f"{shlex.quote(appliance_bin())} -c {shlex.quote(str(config_path))} --node {shlex.quote(node)} role ")
            + f"{r} --vhid \"$3\" --iface \"$1\" --fork-seq" + (" --no-garp" if plan is None else "")
            + (" </dev/null &\n" if detach else "\n")
        )
        write_text_atomic(p, text, 0o755)
        out.append(p)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except ApplianceError as e:
        return report(e)
    except RuntimeError as e:  # the role engine's "failed" (exit 1), as `appliance role` reports it
        return report(ApplianceError(str(e), EXIT_FAILED))
    return 0


if __name__ == "__main__":
    sys.exit(main())

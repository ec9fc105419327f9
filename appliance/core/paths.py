"""Where things are: the cluster file, this node's identity, and one Paths object for the node-local state."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.core.errors import ConfigError

if TYPE_CHECKING:  # the role scripts' entry (appliance/ha/transition.py) needs Paths, not the config's model
    from appliance.core.model import Appliance

LINUX_CONFIG = Path("/etc/appliance/appliance.yaml")
FREEBSD_CONFIG = Path("/usr/local/etc/appliance/appliance.yaml")


def _freebsd() -> bool:
    return sys.platform.startswith("freebsd")


def default_config_path() -> Path:
    return FREEBSD_CONFIG if _freebsd() else LINUX_CONFIG


def config_path(explicit: str | None = None) -> Path:
    """-c FILE, else $APPLIANCE_CONFIG, else the platform default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("APPLIANCE_CONFIG")
    return Path(env) if env else default_config_path()


def state_dir() -> Path:
    """Where node-local state lives (role, releases, pidfiles): $APPLIANCE_STATE_DIR or the platform default."""
    env = os.environ.get("APPLIANCE_STATE_DIR")
    if env:
        return Path(env)
    return Path("/var/db/appliance") if _freebsd() else Path("/var/lib/appliance")


def run_dir() -> Path:
    return state_dir() / "run"


def appliance_bin() -> str:
    """The `appliance` entry point of this install (beside the running interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / "appliance"
    if here.exists():
        return str(here)
    arg0 = Path(sys.argv[0])
    return str(arg0.resolve()) if arg0.name == "appliance" and arg0.exists() else "appliance"


def hooks_dir() -> Path:
    """Where this node's role hooks live: $APPLIANCE_HOOKS_DIR, else a node-local dir beside (never inside) the
    config dir, which sync never writes (the config dir itself may be a link to the synced release)."""
    env = os.environ.get("APPLIANCE_HOOKS_DIR")
    if env:
        return Path(env)
    return Path("/usr/local/etc/appliance-hooks.d") if _freebsd() else Path("/etc/appliance-hooks.d")


@dataclass(frozen=True)
class Paths:
    """The node-local state dir and every file in it that more than one module knows about."""

    state: Path
    hooks_root: Path | None = None  # the hooks dir when not the default (tests); see hooks_dir()

    @property
    def hooks(self) -> Path:
        """hooks/<role>/ holds this node's role hooks: root-owned, node-local, never synced (docs/ha.md#hooks)."""
        return self.hooks_root if self.hooks_root is not None else hooks_dir()

    @property
    def keys(self) -> Path:
        """This node's own keys (0700): its sync key pair, never synced, never in a release."""
        return self.state / "keys"

    @property
    def sync_key(self) -> Path:
        """This node's private sync key (the public half beside it, .pub); its peers authorise the public half."""
        return self.keys / "sync_ed25519"

    @classmethod
    def default(cls) -> "Paths":
        return cls(state_dir())

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def releases(self) -> Path:
        return self.state / "releases"

    @property
    def current(self) -> Path:
        return self.state / "current"

    @property
    def node_file(self) -> Path:
        return self.state / "node.yaml"

    def role_file(self, vhid: int | None = None) -> Path:
        """role.json for the cluster's main vhid; role-<vhid>.json for further vhids."""
        return self.state / ("role.json" if vhid is None else f"role-{vhid}.json")

    def role_lock(self, vhid: int) -> Path:
        return self.run / f"role-{vhid}.lock"

    @property
    def ha_file(self) -> Path:
        return self.state / "ha.json"

    @property
    def ha_log(self) -> Path:
        return self.state / "ha.log"

    @property
    def proxy_pid(self) -> Path:
        return self.run / "proxy.pid"

    @property
    def carp_pid(self) -> Path:
        """The CARP supervisor's pidfile (also its single-instance lock)."""
        return self.run / "carp.pid"

    @property
    def carp_stopped(self) -> Path:
        """Written when the CARP supervisor is stopped on purpose (SIGTERM/SIGINT), with the boot it happened in."""
        return self.run / "carp.stopped"

    @property
    def carp_status(self) -> Path:
        return self.run / "carp.json"

    @property
    def carp_pass(self) -> Path:
        return self.run / "carp.pass"

    @property
    def carp_pass_next(self) -> Path:
        """The pass being rotated in (cluster.password_next), absent outside a rotation; the speaker accepts both."""
        return self.run / "carp.pass.next"

    def engine_pid(self, vhid: int) -> Path:
        return self.run / f"carp-{vhid}.engine.pid"

    def engine_state(self, vhid: int) -> Path:
        return self.run / f"carp-{vhid}.engine.json"

    def engine_control(self, vhid: int) -> Path:
        """The speaker's --control socket for a vhid (the fast liveness layer's commands)."""
        return self.run / f"carp-{vhid}.ctl"

    def engine_advskew(self, vhid: int) -> Path:
        """The speaker's --advskew-file for a vhid: this node's advskew now (demoted or not)."""
        return self.run / f"carp-{vhid}.advskew"

    def engine_peers(self, vhid: int) -> Path:
        """The speaker's --peers-file for a vhid (the other nodes, one spec a line)."""
        return self.run / f"carp-{vhid}.peers"


def node_identity_file(cfg_path: Path) -> Path:
    return Path(cfg_path).parent / "node.yaml"


def _identity(cfg_path: Path) -> tuple[str | None, str]:
    """(name, where it came from) from node.yaml beside the config, else in the state dir."""
    ident = node_identity_file(cfg_path)
    if not ident.exists():
        ident = Paths.default().node_file
    if not ident.exists():
        return None, ""
    from appliance.core.loader import parse_yaml

    data = parse_yaml(ident.read_text(encoding="utf-8"), str(ident))
    if not isinstance(data, dict) or set(data) - {"node"} or not isinstance(data.get("node"), str):
        raise ConfigError(f"{ident}:1: node: the identity file must hold exactly `node: NAME`")
    return data["node"], str(ident)


def node_name(cfg: Appliance, cfg_path: Path, explicit: str | None = None) -> str:
    """--node NAME, else $APPLIANCE_NODE, else node.yaml (`node: fw1`) beside the config, else in the state dir."""
    name, source = explicit, "--node"
    if not name and os.environ.get("APPLIANCE_NODE"):
        name, source = os.environ["APPLIANCE_NODE"], "APPLIANCE_NODE"
    if not name:
        name, source = _identity(cfg_path)
    if not name:
        raise ConfigError(
            f"cannot tell which node this is: pass --node NAME, set APPLIANCE_NODE, or write `node: NAME` to {node_identity_file(cfg_path)}"
        )
    if name not in cfg.nodes:
        raise ConfigError(f"{source}: node: {name!r} is not one of the nodes in {cfg_path} ({', '.join(cfg.nodes)})")
    return name

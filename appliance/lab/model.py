"""The lab's state: a typed Lab (LAN, client, nodes, PIDs, namespaces it made), saved as <lab dir>/lab.json."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from appliance.core.errors import ApplianceError
from appliance.core.fsio import read_json, write_json_atomic

LAB_ROOT_ENV = "APPLIANCE_LAB_DIR"
STATE_FILE = "lab.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,9}")  # it prefixes namespace names: `<name>-fw1`


class LabError(ApplianceError):
    """A lab that cannot be built, found or measured."""


def lab_root() -> Path:
    return LAB.root()


def check_name(name: str) -> str:
    """A lab name as `lab up` and `lab down` accept it: 1-10 ASCII letters, digits or '-', not starting with '-'.
    Never a path ('.', '..', '/x', 'a/b' are refused): LabError, exit 2."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LabError(f"--name {name!r}: a lab name is 1-10 letters, digits or '-' (it prefixes namespace names; "
                       f"not a path)", 2)
    return name


def lab_dir(name: str) -> Path:
    """<lab root>/<name>, for a valid name only (check_name)."""
    return LAB.dir(name)


@dataclass(frozen=True)
class LabKind:
    """Where the namespace lab (LAB) and the VM lab (vmmodel.VMLAB) keep their state, and the words their messages
    use: one set of functions finds, loads and removes either."""

    what: str             # in messages: "lab", "VM lab"
    command: str          # the CLI group: "lab", "vmlab"
    root_env: str         # the lab root's variable ($APPLIANCE_LAB_DIR) ...
    default_root: str     # ... and its default
    name_env: str         # the lab to use when no --name is given ($APPLIANCE_LAB)
    state_file: str       # <lab dir>/<state_file>
    cls: type             # Lab or a subclass, made from the state file
    mismatch: str = ""    # added to the error for a state file that names another lab

    def root(self) -> Path:
        return Path(os.environ.get(self.root_env, self.default_root))

    def dir(self, name: str) -> Path:
        """<root>/<name>, for a valid name only (check_name: never a path)."""
        return self.root() / check_name(name)

    def names(self) -> list[str]:
        """The labs of this kind that are up: directories under the root holding a state file."""
        root = self.root()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / self.state_file).exists())

    def load(self, name: str | None = None) -> Any:
        """The lab's state file; with no name ($name_env or) the only lab of this kind there is, else an error
        listing them."""
        name = name or os.environ.get(self.name_env)
        if not name:
            labs = self.names()
            if not labs:
                raise LabError(f"no {self.what} is up (nothing in {self.root()}); run `appliance {self.command} up`")
            if len(labs) > 1:
                raise LabError(f"several {self.what}s are up ({', '.join(labs)}); pass --name")
            name = labs[0]
        path = self.dir(name) / self.state_file
        data = read_json(path)
        if data is None:
            raise LabError(f"no {self.what} named {name!r} (no {path})")
        lab = self.cls.from_json(data)
        if lab.name != name:
            raise LabError(f"{path}: names lab {lab.name!r}, not {name!r}{self.mismatch}")
        return lab

    def recorded(self, name: str | None) -> Any:
        """What `down` takes apart: the lab from its state file or, when there is none but a name was given (a crash
        before the file was written), an empty lab of that name. Its dir comes from the checked name, never from
        what the state file says."""
        if name is not None:
            check_name(name)
        try:
            lab = self.load(name)
        except LabError:
            if not name:
                raise
            lab = self.cls(name=name, dir=self.dir(name))
        lab.dir = self.dir(lab.name)
        return lab

    def remove_dir(self, d: Path) -> None:
        """Delete a lab's directory: only a real directory (not a symlink) directly under the root, holding the
        state file."""
        root = self.root().resolve()
        if d.is_symlink() or not d.is_dir():
            return
        if d.resolve().parent != root or not (d / self.state_file).is_file():
            raise LabError(f"{d}: not a {self.what} directory under {root} (no {self.state_file}); not removed")
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class LanSegment:
    """The LAN: a bridge in a namespace of its own, which also carries the origin's address."""

    netns: str = ""
    bridge: str = "br0"
    origin_ip: str = ""


@dataclass
class Client:
    """The LAN client's namespace and its address on the LAN."""

    netns: str = ""
    ip: str = ""
    lan_if: str = "eth0"


class Addressed:
    """A node of either lab: its `lan` and `sync` interface addresses (e.g. 192.168.1.2/24), and as lan_ip and
    sync_ip without the prefix length."""

    lan: str
    sync: str

    @property
    def lan_ip(self) -> str:
        return self.lan.split("/")[0]

    @property
    def sync_ip(self) -> str:
        return self.sync.split("/")[0]


@dataclass
class LabNode(Addressed):
    """One appliance node: its namespace, interfaces, addresses, files and the PIDs of its daemons."""

    netns: str
    lan_if: str
    sync_if: str
    lan: str        # interface address, e.g. 192.168.1.2/24
    sync: str
    config: Path    # the live cluster file (through the `current` release link)
    state: Path     # the node's APPLIANCE_STATE_DIR
    dir: Path       # the node's directory in the lab dir (logs, sshd)
    engine_pid: int | None = None
    proxy_pid: int | None = None
    carp_pid: int | None = None
    sshd_pid: int | None = None
    admin_pid: int | None = None  # the status page (appliance admin serve)

    @property
    def sshd_dir(self) -> Path:
        return self.dir / "sshd"


@dataclass
class Lab:
    """A whole cluster in namespaces; `save()` after every change, so `down` works from the file after a crash."""

    name: str
    dir: Path
    source_config: str = ""
    engine: str | None = None
    deadratio: int | None = None
    vip: str = ""
    vips: dict[str, str] = field(default_factory=dict)   # vhid (as text) -> VIP address
    proxy_port: int = 0
    origin: str = ""                                       # the origin's URL
    lan: LanSegment = field(default_factory=LanSegment)
    client: Client = field(default_factory=Client)
    nodes: dict[str, LabNode] = field(default_factory=dict)
    created_netns: list[str] = field(default_factory=list)
    origin_pid: int | None = None
    proxy_cmd: list[str] | None = None                     # $APPLIANCE_LAB_PROXY instead of `appliance proxy`

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def main_vhid(self) -> int:
        return int(next(iter(self.vips)))

    def node(self, name: str) -> LabNode:
        if name not in self.nodes:
            raise LabError(f"no node {name!r} in lab {self.name} ({', '.join(self.nodes)})")
        return self.nodes[name]

    def node_by_ip(self) -> dict[str, str]:
        return {n.lan_ip: name for name, n in self.nodes.items()}

    def save(self) -> None:
        write_json_atomic(self.state_file, self.to_json())

    def to_json(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Lab":
        try:
            lab = _build(cls, data)
            lab.lan = _build(LanSegment, data.get("lan") or {})
            lab.client = _build(Client, data.get("client") or {})
            lab.nodes = {k: _build(LabNode, v) for k, v in (data.get("nodes") or {}).items()}
        except (TypeError, AttributeError) as e:
            raise LabError(f"{data.get('name', '?')}: not a lab state file ({e})") from None
        return lab


def _plain(v: Any) -> Any:
    """JSON-ready: dataclasses as dicts of their fields, paths as text."""
    if is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _build(cls: type, data: dict[str, Any]) -> Any:
    """cls from the known keys of data (unknown keys ignored), text made a Path where the field is one."""
    kw = {}
    for f in fields(cls):
        if f.name in data:
            v = data[f.name]
            kw[f.name] = Path(v) if str(f.type).startswith("Path") and isinstance(v, str) else v
    return cls(**kw)


LAB = LabKind(what="lab", command="lab", root_env=LAB_ROOT_ENV, default_root="/run/appliance-lab",
              name_env="APPLIANCE_LAB", state_file=STATE_FILE, cls=Lab, mismatch="; not a state file of this lab")


def list_labs() -> list[str]:
    return LAB.names()


def load(name: str | None = None) -> Lab:
    """The lab's state file; with no name ($APPLIANCE_LAB or) the only lab there is, else an error listing them."""
    return LAB.load(name)

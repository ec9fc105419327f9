"""The cluster model: one appliance.yaml for every node, validated with pydantic v2."""
from __future__ import annotations

import ipaddress
import os
import re
import sys
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from appliance.core.schedule import Schedule

# carp(4): the key is a char[CARP_KEY_LEN=20] copied with strlcpy, so 19 usable bytes;
# a longer pass is silently truncated by ifconfig, which would break the pairing with ucarp.
CARP_PASS_MAX = 19
IFACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*[0-9]+(\.[0-9]+)?$|^[A-Za-z][A-Za-z0-9_.-]{0,14}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
CATEGORY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
CRON_FIELD_RE = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")

LINUX_CONFIG = Path("/etc/appliance/appliance.yaml")
FREEBSD_CONFIG = Path("/usr/local/etc/appliance/appliance.yaml")


class ConfigError(Exception):
    """A config problem, already formatted as `file:line: field: message (got value)`."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _iface(v: str) -> str:
    if not IFACE_RE.match(v) or len(v) > 15:
        raise ValueError("not an interface name (letters, digits, '.', '_', '-', at most 15 characters)")
    return v


class ExtraVhid(_Model):
    """A further CARP group on the same interface (active/active split: each node master of one)."""

    vhid: int = Field(ge=1, le=255, description="virtual host id of this group (unique)")
    vip: IPv4Interface = Field(description="this group's address on the LAN")
    advskew: dict[str, int] = Field(default_factory=dict, description="per-node advskew for this vhid; missing nodes use their own")

    @field_validator("advskew")
    @classmethod
    def _skews(cls, v: dict[str, int]) -> dict[str, int]:
        for name, skew in v.items():
            if not 0 <= skew <= 254:
                raise ValueError(f"advskew of {name} must be between 0 and 254")
        return v


class Cluster(_Model):
    vip: IPv4Interface = Field(description="the address clients use, with the LAN prefix")
    vhid: int = Field(1, ge=1, le=255, description="CARP virtual host id (1-255)")
    password: SecretStr = Field(description=f"CARP pass (1-{CARP_PASS_MAX} bytes); written 0600, never logged")
    advbase: int = Field(1, ge=1, le=255, description="seconds between advertisements")
    preempt: bool = Field(True, description="net.inet.carp.preempt=1 / ucarp --preempt")
    interface: str = Field("em0", description="LAN interface carrying the VIP")
    sync_interface: str = Field("em1", description="interface of the dedicated sync link")
    freebsd: str = Field("14.3", description="image target release; below 10 selects the legacy carp0 syntax")
    extra_vhids: list[ExtraVhid] = Field(default_factory=list, description="more CARP groups (active/active)")

    _check_iface = field_validator("interface", "sync_interface")(classmethod(lambda cls, v: _iface(v)))

    @field_validator("password")
    @classmethod
    def _password(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if not raw:
            raise ValueError("must not be empty")
        if len(raw.encode()) > CARP_PASS_MAX:
            raise ValueError(f"is {len(raw.encode())} bytes; carp(4) keeps at most {CARP_PASS_MAX}")
        if any(c.isspace() or not c.isprintable() for c in raw):
            raise ValueError("must be printable without spaces (it is passed to ifconfig and ucarp)")
        return v

    @field_validator("freebsd")
    @classmethod
    def _release(cls, v: str) -> str:
        if not re.match(r"^\d+(\.\d+)?$", str(v)):
            raise ValueError("must be a FreeBSD release such as 14.3")
        return str(v)

    @field_serializer("password", when_used="json")
    def _dump_password(self, v: SecretStr) -> str:
        return v.get_secret_value()

    @property
    def freebsd_major(self) -> int:
        return int(self.freebsd.split(".")[0])

    @property
    def legacy_carp(self) -> bool:
        return self.freebsd_major < 10


class Node(_Model):
    lan: IPv4Interface = Field(description="this node's LAN address with prefix")
    sync: IPv4Interface = Field(description="this node's address on the dedicated sync link")
    advskew: int = Field(0, ge=0, le=254, description="CARP skew; the lowest is master")
    hostname: Optional[str] = Field(None, description="defaults to the node's name")


class Policy(_Model):
    name: Optional[str] = Field(None, description="shown in logs and explain; defaults to policy[N]")
    clients: list[IPv4Network] = Field(min_length=1, description="subnets this policy applies to")
    block: list[str] = Field(default_factory=list, description="categories blocked for these clients")
    allow: list[str] = Field(default_factory=list, description="categories always allowed for these clients")
    schedule: Optional[Schedule] = Field(None, description='when it applies, e.g. "mon-fri 08:00-17:00"; always if unset')

    @field_validator("clients", mode="before")
    @classmethod
    def _strict_nets(cls, v: Any) -> Any:
        return [_network(x) for x in v] if isinstance(v, list) else v


def _network(x: Any) -> Any:
    if isinstance(x, str):
        try:
            return ipaddress.IPv4Network(x, strict=True)
        except ValueError as e:
            if "has host bits set" in str(e):
                raise ValueError(f"{x} has host bits set (did you mean {ipaddress.IPv4Network(x, strict=False)}?)")
            raise ValueError(f"{x} is not an IPv4 network") from None
    return x


class Proxy(_Model):
    port: int = Field(3128, ge=1, le=65535, description="proxy port on the VIP")
    listen: Union[Literal["any", "vip"], IPv4Address] = Field("any", description="any | vip | an address")
    clients: list[IPv4Network] = Field(min_length=1, description="who may use the proxy (never an open proxy)")
    open_proxy: bool = Field(False, description="must be true to allow 0.0.0.0/0 in clients")
    tls: Literal["sni", "intercept"] = Field("sni", description="sni: filter CONNECT by host/SNI; intercept: appliance CA")
    workers: Union[Literal["auto"], int] = Field("auto", description="worker processes; auto = number of cores")
    access_log: str = Field("/var/log/appliance/access.log", description="Squid native format; reopened on SIGUSR1")
    admin_contact: str = Field("your network administrator", description="shown on the block page")
    metrics_port: int = Field(9128, ge=1, le=65535, description="Prometheus /metrics, bound to 127.0.0.1")

    @field_validator("clients", mode="before")
    @classmethod
    def _strict_nets(cls, v: Any) -> Any:
        return [_network(x) for x in v] if isinstance(v, list) else v

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("must be auto or 1-256")
        return v

    def worker_count(self) -> int:
        return os.cpu_count() or 1 if self.workers == "auto" else int(self.workers)


class Filter(_Model):
    lists: str = Field("lists/", description="SquidGuard layout: <dir>/<category>/{domains,urls,expressions}; relative to the config file")
    block: list[str] = Field(default_factory=list, description="categories blocked for everyone")
    allow: list[str] = Field(default_factory=list, description="categories that always win")
    intercept_exempt: list[str] = Field(default_factory=list, description="with tls: intercept, hosts tunnelled untouched")
    policies: list[Policy] = Field(default_factory=list, description="per-subnet / per-schedule overrides")
    bad_lines: Literal["skip", "reject"] = Field("skip", description="a bad list line: skip it (and count it) or reject the list")

    @field_validator("block", "allow", "intercept_exempt")
    @classmethod
    def _cats(cls, v: list[str]) -> list[str]:
        for c in v:
            if not CATEGORY_RE.match(c):
                raise ValueError(f"{c!r} is not a category directory name")
        return v

    def categories(self) -> set[str]:
        cats = set(self.block) | set(self.allow) | set(self.intercept_exempt)
        for p in self.policies:
            cats |= set(p.block) | set(p.allow)
        return cats


class Sync(_Model):
    schedule: str = Field("*/5 * * * *", description="cron schedule of `appliance sync`")
    user: str = Field("appliance-sync", description="SSH user on the peers")
    keep_releases: int = Field(5, ge=1, le=100, description="releases kept on each node")
    ssh_port: int = Field(22, ge=1, le=65535, description="sshd port on the sync link")
    timeout: int = Field(60, ge=1, le=3600, description="seconds before a push to one peer is abandoned")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        fields = v.split()
        if v.startswith("@"):
            if v not in ("@hourly", "@daily", "@weekly", "@monthly", "@reboot"):
                raise ValueError("unknown cron shorthand")
            return v
        if len(fields) != 5 or not all(CRON_FIELD_RE.match(f) for f in fields):
            raise ValueError("must be a 5-field cron schedule such as '*/5 * * * *'")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", v):
            raise ValueError("not a valid user name")
        return v


class HA(_Model):
    watchdog: bool = Field(True, description="check the local proxy every advbase; demote after `failures`")
    failures: int = Field(3, ge=1, le=100, description="failed checks before the node demotes itself")
    demote_advskew: int = Field(240, ge=1, le=254, description="advskew used while demoted")
    hook_timeout: int = Field(10, ge=1, le=600, description="seconds a hooks.d script may run")


class Appliance(_Model):
    cluster: Cluster
    nodes: dict[str, Node]
    proxy: Proxy
    filter: Filter = Field(default_factory=Filter)
    sync: Sync = Field(default_factory=Sync)
    ha: HA = Field(default_factory=HA)

    @field_validator("nodes")
    @classmethod
    def _names(cls, v: dict[str, Node]) -> dict[str, Node]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"node name {name!r} must be a lower-case host name (a-z, 0-9, '-')")
        if len(v) < 2:
            raise ValueError(f"a cluster needs at least two nodes (got {len(v)})")
        return v

    @model_validator(mode="after")
    def _cluster_rules(self, info: ValidationInfo) -> "Appliance":
        c, nodes = self.cluster, self.nodes
        problems: list[tuple[str, str]] = []
        seen_skew: dict[int, str] = {}
        seen_addr: dict[IPv4Address, str] = {}
        sync_nets = {str(n.sync.network) for n in nodes.values()}
        for name, n in nodes.items():
            if c.vip.ip not in n.lan.network:
                problems.append((f"nodes.{name}.lan", f"{n.lan} is not on the VIP's subnet ({c.vip.ip} not in {n.lan.network})"))
            if n.lan.ip == c.vip.ip:
                problems.append((f"nodes.{name}.lan", f"{n.lan.ip} equals the VIP"))
            if n.advskew in seen_skew:
                problems.append((f"nodes.{name}.advskew", f"{n.advskew} is also {seen_skew[n.advskew]}'s advskew (ambiguous master)"))
            seen_skew.setdefault(n.advskew, name)
            for field, addr in (("lan", n.lan.ip), ("sync", n.sync.ip)):
                if addr in seen_addr:
                    problems.append((f"nodes.{name}.{field}", f"{addr} is already used by {seen_addr[addr]}"))
                seen_addr.setdefault(addr, f"{name}")
            if n.sync.network.overlaps(n.lan.network) or n.sync.ip == c.vip.ip:
                problems.append((f"nodes.{name}.sync", f"{n.sync} is on the LAN; the sync link must be its own subnet"))
            for f, iface in (("lan", n.lan), ("sync", n.sync)):
                if iface.ip in (iface.network.network_address, iface.network.broadcast_address) and iface.network.prefixlen < 31:
                    problems.append((f"nodes.{name}.{f}", f"{iface} is the subnet's network or broadcast address"))
        if len(sync_nets) > 1:
            first = next(iter(nodes))
            for name, n in nodes.items():
                if str(n.sync.network) != str(nodes[first].sync.network):
                    problems.append((f"nodes.{name}.sync", f"{n.sync} is not in {first}'s sync subnet {nodes[first].sync.network}"))
                    break
        if c.interface == c.sync_interface:
            problems.append(("cluster.sync_interface", f"{c.sync_interface} is also the LAN interface; the sync link must be dedicated"))
        vhids = {c.vhid: "cluster.vhid"}
        for i, x in enumerate(c.extra_vhids):
            if x.vhid in vhids:
                problems.append((f"cluster.extra_vhids[{i}].vhid", f"{x.vhid} is already used by {vhids[x.vhid]}"))
            vhids.setdefault(x.vhid, f"cluster.extra_vhids[{i}]")
            for name in x.advskew:
                if name not in nodes:
                    problems.append((f"cluster.extra_vhids[{i}].advskew.{name}", "no such node"))
            for name, n in nodes.items():
                if x.vip.ip not in n.lan.network or x.vip.ip in seen_addr or x.vip.ip == c.vip.ip:
                    problems.append((f"cluster.extra_vhids[{i}].vip", f"{x.vip} must be a free address on {n.lan.network}"))
                    break
        if not self.proxy.open_proxy:
            for i, net in enumerate(self.proxy.clients):
                if net.prefixlen == 0:
                    problems.append((f"proxy.clients[{i}]", f"{net} makes an open proxy; set proxy.open_proxy: true if you really mean it"))
        if isinstance(self.proxy.listen, IPv4Address):
            ok = self.proxy.listen == c.vip.ip or any(self.proxy.listen == n.lan.ip for n in nodes.values())
            if not ok and not self.proxy.listen.is_loopback:
                problems.append(("proxy.listen", f"{self.proxy.listen} is neither the VIP, a node's LAN address nor loopback"))
        for i, p in enumerate(self.filter.policies):
            for f in ("block", "allow"):
                for cat in getattr(p, f):
                    if not CATEGORY_RE.match(cat):
                        problems.append((f"filter.policies[{i}].{f}", f"{cat!r} is not a category directory name"))
        base = (info.context or {}).get("base_dir") if info and info.context else None
        if base is not None:
            problems.extend(self._check_lists(Path(base)))
        if problems:
            raise ClusterRuleError(problems)
        return self

    def _check_lists(self, base: Path) -> list[tuple[str, str]]:
        lists = self.lists_dir(base)
        out: list[tuple[str, str]] = []
        if not lists.is_dir():
            return [("filter.lists", f"directory {lists} does not exist")]
        refs: list[tuple[str, list[str]]] = [
            ("filter.block", self.filter.block),
            ("filter.allow", self.filter.allow),
            ("filter.intercept_exempt", self.filter.intercept_exempt),
        ]
        for i, p in enumerate(self.filter.policies):
            refs += [(f"filter.policies[{i}].block", p.block), (f"filter.policies[{i}].allow", p.allow)]
        for path, cats in refs:
            for j, cat in enumerate(cats):
                if not (lists / cat).is_dir():
                    out.append((f"{path}[{j}]", f"category {cat!r} has no directory {lists / cat}"))
        return out

    def lists_dir(self, base: Path) -> Path:
        p = Path(self.filter.lists)
        return p if p.is_absolute() else (base / p)

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def peers(self, name: str) -> dict[str, Node]:
        return {k: v for k, v in self.nodes.items() if k != name}


class ClusterRuleError(ValueError):
    """Cross-field problems found after the fields themselves validated: [(path, message)]."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (a second `fw1:` must not silently win)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_map(node: yaml.Node | None, prefix: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Field path (as a tuple of keys/indexes) -> 1-based line in the YAML source."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
            out[prefix + (key,)] = k.start_mark.line + 1
            _line_map(v, prefix + (key,), out)
            out[prefix + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[prefix + (i,)] = v.start_mark.line + 1
            _line_map(v, prefix + (i,), out)
    return out


def _fmt_path(loc: tuple) -> str:
    s = ""
    for part in loc:
        if isinstance(part, int):
            s += f"[{part}]"
        else:
            s += ("." if s else "") + str(part)
    return s


def _parse_path(path: str) -> tuple:
    parts: list = []
    for m in re.finditer(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(m.group(2)) if m.group(2) is not None else m.group(1))
    return tuple(parts)


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _shown(value: Any, loc: tuple) -> str:
    if any(str(p) == "password" for p in loc):
        return "(hidden)"
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds the union member / validator names to the location; drop them
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("function-after", "literal['any','vip']", "IPv4Address", "int", "str", "literal['auto']"))))


def validate(data: Any, source: str = "<config>", text: str | None = None, base_dir: Path | None = None) -> Appliance:
    """Validate parsed YAML; raise ConfigError with one `file:line: path: message (got value)` per problem."""
    lines: dict[tuple, int] = {}
    if text is not None:
        try:
            lines = _line_map(yaml.compose(text, Loader=yaml.SafeLoader))
        except yaml.YAMLError:
            lines = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the file must be a mapping with cluster, nodes, proxy, ... (got {type(data).__name__})")
    ctx = {"base_dir": base_dir} if base_dir is not None else None
    try:
        return Appliance.model_validate(data, context=ctx)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, ClusterRuleError):
                for path, msg in ctx_err.problems:
                    loc = _parse_path(path)
                    line = _line_for(lines, loc)
                    problems.append(_problem(source, line, path, msg, _value_at(data, loc)))
                continue
            loc = _clean_loc(tuple(err["loc"]))
            line = _line_for(lines, loc)
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            problems.append(_problem(source, line, _fmt_path(loc) or "(top)", msg, err.get("input")))
        raise ConfigError("\n".join(problems), problems) from None


def _problem(source: str, line: int | None, path: str, msg: str, value: Any) -> str:
    where = f"{source}:{line}" if line else source
    got = "" if value is None or isinstance(value, (dict,)) else f" (got {_shown(value, _parse_path(path))})"
    return f"{where}: {path}: {msg}{got}"


def _value_at(data: Any, loc: tuple) -> Any:
    for p in loc:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: YAML error: {e}") from None


def load(path: str | os.PathLike, check_lists: bool = True) -> Appliance:
    """Read and validate a cluster file; list directories are checked relative to it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    data = parse_yaml(text, str(p))
    return validate(data, str(p), text, p.resolve().parent if check_lists else None)


def to_data(cfg: Appliance, reveal_secrets: bool = True) -> dict:
    data = cfg.model_dump(mode="json", exclude_defaults=False)
    if not reveal_secrets:
        data["cluster"]["password"] = "**********"
    return data


def dump_yaml(cfg: Appliance, reveal_secrets: bool = True) -> str:
    return yaml.safe_dump(to_data(cfg, reveal_secrets), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------- where things are


def default_config_path() -> Path:
    return FREEBSD_CONFIG if sys.platform.startswith("freebsd") else LINUX_CONFIG


def config_path(explicit: str | None = None) -> Path:
    """-c FILE, else $APPLIANCE_CONFIG, else the platform default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("APPLIANCE_CONFIG")
    return Path(env) if env else default_config_path()


def node_identity_file(cfg_path: Path) -> Path:
    return cfg_path.parent / "node.yaml"


def node_name(cfg: Appliance, cfg_path: Path, explicit: str | None = None) -> str:
    """--node NAME, else $APPLIANCE_NODE, else node.yaml (`node: fw1`) beside the config, else in the state dir."""
    source = "--node"
    name = explicit
    if not name and os.environ.get("APPLIANCE_NODE"):
        name, source = os.environ["APPLIANCE_NODE"], "APPLIANCE_NODE"
    if not name:
        ident = node_identity_file(cfg_path)
        if not ident.exists():
            ident = state_dir() / "node.yaml"
        if ident.exists():
            source = str(ident)
            data = parse_yaml(ident.read_text(encoding="utf-8"), str(ident))
            if not isinstance(data, dict) or set(data) - {"node"} or not isinstance(data.get("node"), str):
                raise ConfigError(f"{ident}:1: node: the identity file must hold exactly `node: NAME`")
            name = data["node"]
    if not name:
        raise ConfigError(
            f"cannot tell which node this is: pass --node NAME, set APPLIANCE_NODE, or write `node: NAME` to {node_identity_file(cfg_path)}"
        )
    if name not in cfg.nodes:
        raise ConfigError(f"{source}: node: {name!r} is not one of the nodes in {cfg_path} ({', '.join(cfg.nodes)})")
    return name


def state_dir() -> Path:
    """Where node-local state lives (role, releases, pidfiles): $APPLIANCE_STATE_DIR or the platform default."""
    env = os.environ.get("APPLIANCE_STATE_DIR")
    if env:
        return Path(env)
    return Path("/var/db/appliance") if sys.platform.startswith("freebsd") else Path("/var/lib/appliance")


def run_dir() -> Path:
    return state_dir() / "run"

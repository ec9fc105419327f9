"""The cluster model: one appliance.yaml for every node, as typed pydantic v2 models with their own checks."""
from __future__ import annotations

import ipaddress
import os
import re
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from appliance.core import rules
from appliance.core.rules import CATEGORY_RE, ClusterRuleError
from appliance.core.schedule import Schedule
from appliance.core.modelbase import StrictNetworks, _Model, check_cron
from appliance.core.model_admin import Admin
from appliance.core.model_lists import Lists

# carp(4): the key is a char[CARP_KEY_LEN=20] copied with strlcpy, so 19 usable bytes;
# a longer pass is silently truncated by ifconfig, which would break the pairing with ucarp.
CARP_PASS_MAX = 19
IFACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*[0-9]+(\.[0-9]+)?$|^[A-Za-z][A-Za-z0-9_.-]{0,14}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
DEBIAN_RELEASES = ("12",)  # cluster.debian: what image/debian can build (12 = bookworm)


def check_iface(v: str) -> str:
    """An interface name as ifconfig/ip take it; ValueError saying why not."""
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
    password_next: Optional[SecretStr] = Field(
        None, description="the pass being rotated in (docs/security.md): every node also accepts adverts signed with it; "
                          "`appliance carp-rotate` makes it the pass")
    advbase: int = Field(1, ge=1, le=255, description="seconds between advertisements")
    preempt: bool = Field(True, description="net.inet.carp.preempt=1 / ucarp --preempt")
    interface: str = Field("em0", description="LAN interface carrying the VIP")
    sync_interface: str = Field("em1", description="interface of the dedicated sync link")
    freebsd: str = Field("14.3", description="image target release; below 10 selects the legacy carp0 syntax "
                         "(cluster.os: freebsd only)")
    os: Literal["freebsd", "debian"] = Field("freebsd", description="what the nodes run: freebsd (kernel CARP, rc.d, "
                                             "devd; the FreeBSD image) or debian (the .deb's systemd units, the speaker "
                                             "or ucarp; the Debian image, NICs eth0, eth1, ...)")
    debian: str = Field("12", description="Debian release of the image (cluster.os: debian only); 12 is bookworm")
    extra_vhids: list[ExtraVhid] = Field(default_factory=list, description="more CARP groups (active/active)")

    _check_iface = field_validator("interface", "sync_interface")(classmethod(lambda cls, v: check_iface(v)))

    @field_validator("password", "password_next")
    @classmethod
    def _password(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        raw = v.get_secret_value()
        if not raw:
            raise ValueError("must not be empty")
        if len(raw.encode()) > CARP_PASS_MAX:
            raise ValueError(f"is {len(raw.encode())} bytes; carp(4) keeps at most {CARP_PASS_MAX}")
        if any(c.isspace() or not c.isprintable() for c in raw):
            raise ValueError("must be printable without spaces (it is passed to ifconfig and ucarp)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _os_defaults(cls, data: Any) -> Any:
        """A Debian node's NICs are eth0 (LAN) and eth1 (sync link) unless the file names others."""
        if isinstance(data, dict) and data.get("os") == "debian":
            data = {"interface": "eth0", "sync_interface": "eth1", **data}
        return data

    @field_validator("debian", mode="before")
    @classmethod
    def _debian(cls, v: Any) -> str:
        if str(v) not in DEBIAN_RELEASES:
            raise ValueError(f"{v!r} is not a Debian release the image supports ({', '.join(DEBIAN_RELEASES)})")
        return str(v)

    @field_validator("freebsd")
    @classmethod
    def _release(cls, v: str) -> str:
        if not re.match(r"^\d+(\.\d+)?$", str(v)):
            raise ValueError("must be a FreeBSD release such as 14.3")
        return str(v)

    @field_serializer("password", "password_next", when_used="json")
    def _dump_password(self, v: SecretStr | None) -> str | None:
        return None if v is None else v.get_secret_value()

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


def _any_network(x: Any) -> Any:
    """An IPv4/IPv6 network or address (a /32 or /128) for proxy.deny_destinations; ValueError saying why not."""
    if isinstance(x, str):
        try:
            return ipaddress.ip_network(x.strip(), strict=True)
        except ValueError as e:
            if "has host bits set" in str(e):
                raise ValueError(f"{x} has host bits set (did you mean {ipaddress.ip_network(x.strip(), strict=False)}?)")
            raise ValueError(f"{x!r} is not an IP address or network (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/8)") from None
    return x


def _port_spec(x: Any) -> Any:
    """A port (1-65535) or a range 'a-b' for proxy.connect_ports / safe_ports; ValueError saying why not."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise ValueError(f"{x!r} is not a port or a port range 'a-b'")
    if isinstance(x, int) or x.strip().isdigit():
        port = int(x)
        if not 0 < port < 65536:
            raise ValueError(f"port {x!r} is not within 1-65535")
        return port
    a, sep, b = x.strip().partition("-")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise ValueError(f"{x!r} is not a port or a port range 'a-b'")
    lo, hi = int(a), int(b)
    if not 0 < lo <= hi < 65536:
        raise ValueError(f"port range {x!r} must be low-high within 1-65535")
    return f"{lo}-{hi}"




class Policy(_Model):
    name: Optional[str] = Field(None, description="shown in logs and explain; defaults to policy[N]")
    clients: StrictNetworks = Field(min_length=1, description="subnets this policy applies to")
    block: list[str] = Field(default_factory=list, description="categories blocked for these clients")
    allow: list[str] = Field(default_factory=list, description="categories always allowed for these clients")
    schedule: Optional[Schedule] = Field(None, description='when it applies, e.g. "mon-fri 08:00-17:00"; always if unset')



class Proxy(_Model):
    port: int = Field(3128, ge=1, le=65535, description="proxy port on the VIP")
    listen: Union[Literal["any", "vip"], IPv4Address] = Field("any", description="any | vip | an address")
    clients: StrictNetworks = Field(min_length=1, description="who may use the proxy (never an open proxy)")
    open_proxy: bool = Field(False, description="must be true to allow 0.0.0.0/0 in clients")
    tls: Literal["sni", "intercept"] = Field("sni", description="sni: filter CONNECT by host/SNI; intercept: appliance CA")
    workers: Union[Literal["auto"], int] = Field("auto", description="worker processes; auto = number of cores")
    access_log: str = Field("/var/log/appliance/access.log", description="Squid native format; reopened on SIGUSR1")
    admin_contact: str = Field("your network administrator", description="shown on the block page")
    metrics_port: int = Field(9128, ge=1, le=65535, description="Prometheus /metrics, bound to 127.0.0.1")
    # timeouts and limits (issue 11): Squid-like defaults; docs/filter.md#timeouts-and-limits says where each applies
    header_timeout: float = Field(30.0, gt=0, le=3600, description="seconds to receive a whole request header "
                                  "(Squid request_timeout is 5 min; 30 s is ample for any real client and frees a "
                                  "slowloris connection 10x sooner); then the connection is closed")
    idle_timeout: float = Field(120.0, gt=0, le=86400, description="seconds a keep-alive client connection may sit "
                                "idle between requests (Squid client_idle_pconn_timeout)")
    tunnel_idle_timeout: float = Field(900.0, gt=0, le=86400, description="seconds a CONNECT tunnel may pass no byte "
                                       "either way before it is closed (Squid read_timeout)")
    hello_timeout: float = Field(10.0, gt=0, le=600, description="tls: sni: seconds to receive the whole TLS "
                                 "ClientHello after 200 Connection established; a partial one is cut then")
    max_header_size: int = Field(65536, ge=1024, le=1 << 20, description="bytes of request line plus headers "
                                 "(Squid request_header_max_size); more gets 431")
    max_url_length: int = Field(8192, ge=256, le=1 << 20, description="bytes of the request target (Squid's "
                                "MAX_URL); longer gets 414")
    max_client_connections: int = Field(256, ge=1, le=1 << 20, description="open connections per client address "
                                        "(each worker allows its share, rounded up); more are answered 503 and closed "
                                        "(counted)")
    max_worker_connections: Union[Literal["auto"], int] = Field("auto", description="open client connections per "
                                                                "worker; auto = half the file-descriptor limit less "
                                                                "64 (a connection may need an upstream socket too)")
    # destinations and ports the proxy refuses (issue 11): docs/filter.md#what-the-proxy-refuses-by-default
    deny_destinations: list[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]] = Field(
        default_factory=list, description="more networks never proxied (an address is its /32 or /128), on top of "
        "loopback, link-local, multicast, unspecified and every cluster address; checked after DNS")
    connect_ports: list[Union[int, str]] = Field(
        [443], description="ports CONNECT may reach: numbers or ranges 'a-b' (Squid SSL_ports)")
    safe_ports: list[Union[int, str]] = Field(
        [80, 21, 443, 70, 210, "1025-65535", 280, 488, 591, 777],
        description="ports plain HTTP may reach: numbers or ranges 'a-b' (default: Squid's Safe_ports)")
    http_fast_path: bool = Field(True, description="serve plain HTTP/1.1 requests on the workers' own asyncio path "
                                 "(same checks, block page, log line and counters; anything unusual still goes to "
                                 "mitmproxy; docs/filter.md#the-plain-http-fast-path); applied on reload")


    @field_validator("workers")
    @classmethod
    def _workers(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("must be auto or 1-256")
        return v

    @field_validator("max_worker_connections")
    @classmethod
    def _max_worker_connections(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and not 16 <= v <= 1 << 20:
            raise ValueError("must be auto or 16-1048576")
        return v

    @field_validator("deny_destinations", mode="before")
    @classmethod
    def _deny_destinations(cls, v: Any) -> Any:
        return [_any_network(x) for x in v] if isinstance(v, list) else v

    @field_validator("connect_ports", "safe_ports", mode="before")
    @classmethod
    def _port_specs(cls, v: Any) -> Any:
        return [_port_spec(x) for x in v] if isinstance(v, list) else v

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
    max_file_mb: int = Field(256, ge=1, le=4096, description="largest file a sync carries (MiB); a peer refuses a "
                             "larger one (rsync --max-size, then its tree check), by its own live setting")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        return check_cron(v)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", v):
            raise ValueError("not a valid user name")
        return v


class HA(_Model):
    watchdog: bool = Field(True, description="check the local proxy every advbase; demote after `failures`")
    failures: int = Field(3, ge=1, le=100, description="failed checks before the node demotes itself")
    check_timeout: float = Field(1.0, ge=0.1, le=30, description="seconds one proxy check may take before it "
                                 "counts as failed (raise it on slow hardware or emulated VMs)")
    demote_advskew: int = Field(240, ge=1, le=254, description="advskew used while demoted")
    hook_timeout: int = Field(10, ge=1, le=600, description="seconds a hooks.d script may run")
    fast_interval: float = Field(0.1, ge=0, le=1.0, description="seconds between the fast liveness heartbeats on "
                                 "the sync link and the LAN (docs/ha.md); 0 turns the fast layer off (CARP alone)")
    fast_misses: int = Field(3, ge=2, le=50, description="heartbeat intervals a master may be silent on both paths "
                             "before a backup takes over")
    fast_port: int = Field(7407, ge=1024, le=65535, description="UDP port of the heartbeats (sync and LAN address)")
    lan_witness: list[IPv4Address] = Field(default_factory=list, max_length=4, description="LAN hosts that answer "
                                           "ARP (the gateway): they tell a master cut off from the LAN (carrier up) "
                                           "from a backup cut off; without one, neither moves (docs/ha.md)")
    fast_check_timeout: float = Field(0.35, ge=0.05, le=5, description="seconds the master's fast proxy check may "
                                      "go unanswered before it counts the proxy as hung and hands the VIP over")

    @field_validator("fast_interval")
    @classmethod
    def _fast_interval(cls, v: float) -> float:
        if 0 < v < 0.02:
            raise ValueError("must be 0 (off) or at least 0.02 s")
        return v


class Appliance(_Model):
    cluster: Cluster
    nodes: dict[str, Node]
    proxy: Proxy
    filter: Filter = Field(default_factory=Filter)
    sync: Sync = Field(default_factory=Sync)
    ha: HA = Field(default_factory=HA)
    admin: Admin = Field(default_factory=Admin)
    lists: Lists = Field(default_factory=Lists)

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
        base = (info.context or {}).get("base_dir") if info and info.context else None
        problems = rules.cluster_rules(self, Path(base) if base is not None else None)
        if problems:
            raise ClusterRuleError(problems)
        return self

    def lists_dir(self, base: Path) -> Path:
        p = Path(self.filter.lists)
        return p if p.is_absolute() else (base / p)

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def peers(self, name: str) -> dict[str, Node]:
        return {k: v for k, v in self.nodes.items() if k != name}

    def expected_master(self) -> str:
        """The node CARP elects when every node is up: the lowest advskew (unique, checked above)."""
        return min(self.nodes, key=lambda n: self.nodes[n].advskew)

    def by_preference(self) -> list[str]:
        """Node names from the preferred master down (ascending advskew)."""
        return sorted(self.nodes, key=lambda n: self.nodes[n].advskew)

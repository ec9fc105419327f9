"""One Debian node's overlay (image/templates/debian/): identity, networkd, sysctls, sshd, keys, the config release."""
from __future__ import annotations

from pathlib import Path

from appliance.core.model import Appliance
from sync import keys
from sync.tree import DERIVED

from image import checks, keygen, render
from image.errors import CheckFailed
from image.tree import Entry, Tree

APPLIANCE_BIN = "/usr/bin/appliance"  # the .deb's
STATE_DIR = "/var/lib/appliance"  # the .deb's state dir (root:carpguard-admin 0710); the proxy's is STATE_DIR/proxy
RELEASE = f"{STATE_DIR}/releases/1"  # the image's one release; its list index is compiled by tree.bake_index
CONFIG_LINK = "/etc/appliance"  # -> STATE_DIR/current -> releases/1, where the units read appliance.yaml
ADMIN_GROUP = "carpguard-admin"  # the status page's user and group (the .deb's postinst makes them)
SYNC_HOME = "/var/lib/appliance-sync"  # the .deb's sync user's home (root:appliance-sync 0750)
ADMIN_KEY = "admin_ed25519"  # keys/admin_ed25519[.pub] in the config dir: root's login key (made once if missing)
ROOT = ("root", "root", 0, 0)
WAIT_ONLINE_TIMEOUT = 20
CMDLINE = "console=tty0 console=ttyS0,115200n8 net.ifnames=0 biosdevname=0"
SYSCTL = "/etc/sysctl.d/60-carpguard.conf"
SSHD_DROPIN = "/etc/ssh/sshd_config.d/10-carpguard.conf"


def admin_key(config_dir: Path) -> Path:
    return keys.keys_dir(config_dir) / ADMIN_KEY


def ensure_admin_key(config_dir: Path) -> list[Path]:
    """keys/admin_ed25519.pub goes to root's authorized_keys; a .pub alone (your own key) is used as it is."""
    key = admin_key(config_dir)
    if key.with_name(ADMIN_KEY + ".pub").exists():
        return []
    keygen._keygen(key, "root@carpguard-admin")
    return [key]


def _t(name: str, **values) -> str:
    return render.template(f"debian/{name}", **values)


def explicit_dir(t: Tree, path: str, mode: int, owner=ROOT) -> None:
    """A directory whose mode and owner the overlay sets (an implicit parent keeps what the package made)."""
    u, g, uid, gid = owner
    t.add(Entry(path, "dir", mode, u, g, uid, gid, source="overlay"))


def drop_derived(t: Tree, release: str) -> None:
    """Leave out the compiled/ that running the proxy or a check left in the config dir: it was made for that dir's
    mtimes (or older lists), so the booted proxy would find it stale. The build compiles the release's own."""
    for d in DERIVED:
        for p in [p for p in t.entries if p == f"{release}/{d}" or p.startswith(f"{release}/{d}/")]:
            del t.entries[p]


def _network(t: Tree, cfg: Appliance, node: str) -> None:
    c, n = cfg.cluster, cfg.nodes[node]
    links = [("lan", "LAN", c.interface, n.lan, True), ("sync", "sync link", c.sync_interface, n.sync, False)]
    vlans: dict[str, list[str]] = {}
    for i, (field, role, iface, addr, required) in enumerate(links, 1):
        if "." in iface:
            parent, tag = iface.split(".", 1)
            vlans.setdefault(parent, []).append(iface)
            t.file(f"/etc/systemd/network/{i}0-{iface}.netdev", _t("vlan.netdev.j2", iface=iface, tag=tag), source="template:debian/vlan.netdev.j2")
        t.file(f"/etc/systemd/network/{i}0-{field}.network",
               _t("network.j2", node=node, field=field, role=role, iface=iface, address=addr, required=required, vlans=[]),
               source="template:debian/network.j2")
    for j, (parent, children) in enumerate(sorted(vlans.items())):
        if parent in (c.interface, c.sync_interface):
            continue
        t.file(f"/etc/systemd/network/0{j}-{parent}.network",
               _t("network.j2", node=node, field="parent", role="VLAN parent", iface=parent, address=None, required=False,
                  vlans=children),
               source="template:debian/network.j2")
    t.file("/etc/systemd/system/systemd-networkd-wait-online.service.d/carpguard.conf",
           _t("wait-online.conf.j2", timeout=WAIT_ONLINE_TIMEOUT), source="template:debian/wait-online.conf.j2")


def _keys(t: Tree, cfg: Appliance, node: str, config_dir: Path, sync_gid: int) -> None:
    hostname = cfg.nodes[node].hostname or node
    hk = keys.host_key(config_dir, node)
    t.file("/etc/ssh/ssh_host_ed25519_key", hk.read_bytes(), 0o600, secret=True, source=str(hk), owner=ROOT)
    t.file("/etc/ssh/ssh_host_ed25519_key.pub", keygen.public_key(hk) + f" root@{hostname}\n", 0o644, owner=ROOT)
    explicit_dir(t, "/root", 0o700)
    explicit_dir(t, "/root/.ssh", 0o700)
    admin = admin_key(config_dir).with_name(ADMIN_KEY + ".pub").read_text().strip()
    lines = [admin]
    # each other node's own sync key, from its sync address only (one line each: `appliance keys revoke` one alone)
    if cfg.sync.user == "root":
        lines += render.sync_authorized_lines(cfg, config_dir, node, APPLIANCE_BIN, "none")
    else:  # the .deb's layout: root owns the key file, the sync user's group may read it
        group = ("root", cfg.sync.user, 0, sync_gid)
        explicit_dir(t, SYNC_HOME, 0o750, group)
        explicit_dir(t, f"{SYNC_HOME}/.ssh", 0o750, group)
        auth = render.sync_authorized_lines(cfg, config_dir, node, APPLIANCE_BIN, "sudo")
        t.file(f"{SYNC_HOME}/.ssh/authorized_keys", "".join(l + "\n" for l in auth), 0o640, owner=group,
               source="keys:authorized_keys")
    t.file("/root/.ssh/authorized_keys", "".join(l + "\n" for l in lines), 0o600, owner=ROOT, source="keys:admin")


def render_overlay(cfg: Appliance, config_path: Path, node: str, exclude: list[Path] = (), sync_gid: int = 0,
                   admin_gid: int = 0) -> Tree:
    """The overlay written over the Debian tree (with the .deb installed) for `node`; keys must exist."""
    c, n = cfg.cluster, cfg.nodes[node]
    config_dir = config_path.resolve().parent
    hostname = n.hostname or node
    t = Tree()
    t.file("/etc/hostname", hostname + "\n", owner=ROOT)
    peers = [{"name": p, "sync": cfg.nodes[p].sync.ip} for p in sorted(cfg.nodes)]
    t.file("/etc/hosts", _t("hosts.j2", hostname=hostname, peers=peers), owner=ROOT, source="template:debian/hosts.j2")
    _network(t, cfg, node)
    t.file(SYSCTL, _t("sysctl.conf.j2", iface=c.interface), owner=ROOT, source="template:debian/sysctl.conf.j2")
    t.file(SSHD_DROPIN, _t("sshd.conf.j2", port=cfg.sync.ssh_port), owner=ROOT, source="template:debian/sshd.conf.j2")
    _keys(t, cfg, node, config_dir, sync_gid)
    # as the .deb's postinst makes it: the status page's user may pass through (role, ha.log, run/, admin/), list nothing
    explicit_dir(t, STATE_DIR, 0o710, owner=("root", ADMIN_GROUP, 0, admin_gid))
    render.own_sync_key(t, config_dir, node, STATE_DIR, owner=ROOT)     # this node's push key, in its image only
    explicit_dir(t, f"{STATE_DIR}/releases", 0o700)
    render.config_release(t, cfg, config_path, list(exclude), state_dir=STATE_DIR)
    drop_derived(t, RELEASE)
    t.link(f"{STATE_DIR}/current", "releases/1")
    t.file(f"{STATE_DIR}/node.yaml", f"node: {node}\n", 0o644, owner=ROOT)
    t.link(CONFIG_LINK, f"{STATE_DIR}/current")
    for e in t:  # FreeBSD's wheel is Debian's root group
        if e.gname == "wheel":
            e.gname = "root"
    return t


def boot_files(t: Tree, cfg: Appliance, node: str, kernel: str, root_uuid: str) -> None:
    """/etc/fstab (the root by its fixed UUID; the ESP is not mounted) and /boot/grub/grub.cfg (serial console,
    predictable names off)."""
    t.file("/etc/fstab", _t("fstab.j2", root_uuid=root_uuid), owner=ROOT, source="template:debian/fstab.j2")
    t.file("/boot/grub/grub.cfg", _t("grub.cfg.j2", node=node, release=cfg.cluster.debian, kernel=kernel, root_uuid=root_uuid,
                                     cmdline=CMDLINE, timeout=1), owner=ROOT, source="template:debian/grub.cfg.j2")


def check(t: Tree, password: bytes) -> None:
    """The checks that apply to a Debian overlay: secrets 0600, no template leftovers, sysctl and sshd syntax."""
    problems = checks.check_secrets(t, password) + checks.check_templates(t)
    for e in t:
        if e.kind == "file" and e.path == SYSCTL:
            problems += checks.check_sysctl_conf(e.path, e.data)
        elif e.kind == "file" and e.path.startswith("/etc/ssh/sshd_config.d/"):
            problems += checks.parse_sshd_config(e.path, e.data)[2]
    if problems:
        raise CheckFailed(problems)

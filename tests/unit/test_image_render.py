"""Unit tests of the image overlay: rendered files, CARP syntaxes, devd rules, keys, and the build-time checks."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from appliance.core import loader as cfgmod
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from sync import keys
from image import checks, keygen, render
from image.debian import overlay
from image.errors import BuildError, CheckFailed
from tests.support.env import need_tool


def _load(cfg_path: Path, **changes) -> Appliance:
    data = yaml.safe_load(cfg_path.read_text())
    for dotted, value in changes.items():
        d = data
        *head, last = dotted.split("__")
        for k in head:
            d = d[k]
        d[last] = value
    cfg_path.write_text(yaml.safe_dump(data))
    return cfgmod.load(cfg_path)


@pytest.fixture
def rendered(example_tree: Path):
    cfg = cfgmod.load(example_tree)
    keygen.ensure_keys(cfg, example_tree.parent)
    return cfg, example_tree, {n: render.render_node(cfg, example_tree, n) for n in cfg.nodes}


def text(tree, path: str) -> str:
    return tree.get(path).data.decode()


def test_rc_conf_and_carp_modern(rendered):
    cfg, _, trees = rendered
    fw1, fw2 = trees["fw1"], trees["fw2"]
    rc = text(fw1, "/etc/rc.conf")
    assert 'hostname="fw1"' in rc and 'appliance_enable="YES"' in rc and 'sshd_enable="YES"' in rc
    assert 'ifconfig_em0="inet 192.168.1.2/24"' in rc and 'ifconfig_em1="inet 192.168.200.1/30"' in rc
    assert "change-me" not in rc and fw1.get("/etc/rc.conf").mode == 0o644
    netif = fw2.get("/etc/rc.conf.d/netif")
    assert netif.mode == 0o600
    assert 'ifconfig_em0_alias0="inet vhid 1 advbase 1 advskew 100 pass change-me alias 192.168.1.50/32"' in netif.data.decode()
    assert text(fw1, "/boot/loader.conf").count('carp_load="YES"') == 1
    assert "net.inet.carp.preempt=1" in text(fw1, "/etc/sysctl.conf")
    assert fw1.get("/usr/src/sys/amd64/conf/CARP") is None


def test_preempt_off_drops_sysctl(example_tree):
    cfg = _load(example_tree, cluster__preempt=False)
    keygen.ensure_keys(cfg, example_tree.parent)
    t = render.render_node(cfg, example_tree, "fw1")
    assert "preempt" not in text(t, "/etc/sysctl.conf").replace("# without preempt", "")
    assert "net.inet.carp.log=1" in text(t, "/etc/sysctl.conf")


def test_legacy_carp_syntax_and_kernel_config(example_tree):
    cfg = _load(example_tree, cluster__freebsd="9.3", cluster__extra_vhids=[{"vhid": 2, "vip": "192.168.1.51/24", "advskew": {"fw1": 100, "fw2": 0}}])
    keygen.ensure_keys(cfg, example_tree.parent)
    t = render.render_node(cfg, example_tree, "fw1")
    netif = text(t, "/etc/rc.conf.d/netif")
    assert 'cloned_interfaces="carp0 carp1"' in netif
    assert 'ifconfig_carp0="vhid 1 advbase 1 advskew 0 pass change-me 192.168.1.50/24"' in netif
    assert 'ifconfig_carp1="vhid 2 advbase 1 advskew 100 pass change-me 192.168.1.51/24"' in netif
    kern = text(t, "/usr/src/sys/amd64/conf/CARP")
    assert re.search(r"^include\s+GENERIC$", kern, re.M) and re.search(r"^ident\s+CARP$", kern, re.M) and re.search(r"^device\s+carp$", kern, re.M)
    assert "carp_load" not in text(t, "/boot/loader.conf")
    rules = checks.parse_devd("carp.conf", t.get("/usr/local/etc/devd/carp.conf").data)
    got = {(dict(r["matches"])["subsystem"], dict(r["matches"])["type"], r["actions"][0]) for r in rules}
    assert ("^carp1$", "^LINK_UP$", "/usr/local/bin/appliance role master --vhid 2 --iface carp1") in got
    assert ("^carp0$", "^LINK_DOWN$", "/usr/local/bin/appliance role backup --vhid 1 --iface carp0") in got
    assert all(dict(r["matches"])["system"] == "IFNET" for r in rules)
    assert checks.run_all(t, b"change-me") == []


def test_vlan_interface_and_extra_vhids(example_tree):
    cfg = _load(example_tree, cluster__interface="em0.5",
                cluster__extra_vhids=[{"vhid": 7, "vip": "192.168.1.60/24", "advskew": {"fw1": 200}}])
    keygen.ensure_keys(cfg, example_tree.parent)
    t = render.render_node(cfg, example_tree, "fw1")
    rc = text(t, "/etc/rc.conf")
    assert 'vlans_em0="5"' in rc and 'ifconfig_em0="up"' in rc and 'ifconfig_em0_5="inet 192.168.1.2/24"' in rc
    netif = text(t, "/etc/rc.conf.d/netif")
    assert 'ifconfig_em0_5_alias1="inet vhid 7 advbase 1 advskew 200 pass change-me alias 192.168.1.60/32"' in netif
    rules = checks.parse_devd("carp.conf", t.get("/usr/local/etc/devd/carp.conf").data)
    subs = {dict(r["matches"])["subsystem"] for r in rules}
    assert subs == {"^1@em0[.]5$", "^7@em0[.]5$"}
    rx = re.compile("^1@em0[.]5$")
    assert rx.search("1@em0.5") and not rx.search("1@em0x5") and not rx.search("11@em0.5")
    assert checks.run_all(t, b"change-me") == []


def test_password_with_shell_characters_is_escaped(example_tree):
    cfg = _load(example_tree, cluster__password='a"b$c`d\\e')
    keygen.ensure_keys(cfg, example_tree.parent)
    t = render.render_node(cfg, example_tree, "fw1")
    line = [l for l in text(t, "/etc/rc.conf.d/netif").splitlines() if "alias0" in l][0]
    assert 'pass a\\"b\\$c\\`d\\\\e alias' in line
    assert checks.run_all(t, 'a"b$c`d\\e'.encode()) == []


def test_keys_layout_modes_and_release(rendered):
    cfg, cfg_path, trees = rendered
    t = trees["fw1"]
    cdir = cfg_path.parent
    assert t.get("/etc/ssh/ssh_host_ed25519_key").data == keys.host_key(cdir, "fw1").read_bytes()
    assert t.get("/etc/ssh/ssh_host_ed25519_key").mode == 0o600
    auth = t.get("/home/appliance-sync/.ssh/authorized_keys")
    # root owns the key file: the sync user reads it through its group but cannot lift its own restrictions
    assert (auth.mode, auth.uname, auth.gname, auth.gid) == (0o640, "root", "appliance-sync", 1990)
    ssh_dir = t.get("/home/appliance-sync/.ssh")
    assert (ssh_dir.mode, ssh_dir.uid, ssh_dir.gid) == (0o750, 0, 1990) and t.get("/home/appliance-sync").uid == 0
    # per-node keys: fw1 authorises fw2's own key, from fw2's sync address only, tagged with its owner (revocable alone)
    pub = keygen.public_key(keys.node_sync_key(cdir, "fw2"))
    assert auth.data.decode() == keys.authorized_keys_line(cfg, "fw1", pub, "/usr/local/bin/appliance", elevate="doas",
                                                           owner="fw2") + "\n"
    assert auth.data.decode().startswith('command="/usr/local/bin/doas -n /usr/local/bin/appliance sync-serve",from="192.168.200.2",restrict ')
    assert auth.data.decode().endswith(" appliance-sync@fw2\n")
    # fw1's own key where `appliance sync` pushes with it (sync.keys.push_key prefers Paths.sync_key), 0600 in 0700
    own = Paths(Path(render.STATE_DIR)).sync_key
    assert keys.push_key(own, Path("/nonexistent")) == own
    assert t.get(str(own)).data == keys.node_sync_key(cdir, "fw1").read_bytes()
    assert (t.get(str(own)).mode, t.get(str(own)).uid, t.get(str(own.parent)).mode) == (0o600, 0, 0o700)
    assert t.get(f"{own}.pub").data == keys.node_sync_key(cdir, "fw1").with_suffix(".pub").read_bytes()
    assert t.get(f"{own}.pub").mode == 0o644
    rel = "/var/db/appliance/releases/1"
    assert t.get(f"{rel}/keys/sync_ed25519") is None and t.get(f"{rel}/keys/sync_ed25519.pub") is None  # no shared key
    assert not [e.path for e in t if e.path.startswith(rel + "/") and render.is_private_key(e.data)]  # never synced
    assert t.get(f"{rel}/keys/hosts") is None and t.get(f"{rel}/keys/hosts/fw1/ssh_host_ed25519_key") is None
    kh = text(t, f"{rel}/keys/known_hosts").splitlines()
    assert kh[1].split()[0] == "192.168.200.2" and kh[1].split()[1:] == keys.host_key(cdir, "fw2").with_suffix(".pub").read_text().split()[:2]
    assert t.get(f"{rel}/appliance.yaml").mode == 0o600
    assert t.get(f"{rel}/lists/adult/domains").data == (cdir / "lists/adult/domains").read_bytes()
    assert t.get("/var/db/appliance/current").target == "releases/1"
    assert t.get("/usr/local/etc/appliance").target == "/var/db/appliance/current"
    assert text(t, "/var/db/appliance/node.yaml") == "node: fw1\n"
    assert text(trees["fw2"], "/var/db/appliance/node.yaml") == "node: fw2\n"
    assert "python311" in text(t, "/usr/local/share/carpguard/packages.txt")
    cron = text(t, "/usr/local/etc/cron.d/appliance")
    assert "*/5 * * * *\troot\t/usr/local/bin/appliance -c /usr/local/etc/appliance/appliance.yaml sync" in cron


def test_keys_generated_once_then_reused(example_tree):
    need_tool("ssh-keygen")
    shutil.rmtree(example_tree.parent / "keys", ignore_errors=True)  # examples/keys/ exists once `make image` ran
    cdir = example_tree.parent
    cfg = cfgmod.load(example_tree)
    made = keygen.ensure_keys(cfg, cdir)
    want = {keys.host_key(cdir, n) for n in cfg.nodes} | {keys.node_sync_key(cdir, n) for n in cfg.nodes}
    assert set(made) == want and len(made) == 4
    assert not keys.sync_key(cdir).exists()  # no shared key for a FreeBSD cluster
    for n in cfg.nodes:
        sk = keys.node_sync_key(cdir, n)
        assert sk == cdir / "keys" / "hosts" / n / "sync_ed25519"
        assert os.stat(sk).st_mode & 0o777 == 0o600 and os.stat(sk.parent).st_mode & 0o777 == 0o700
        assert sk.with_suffix(".pub").read_text().split()[-1] == f"appliance-sync@{n}"
    before = {p: p.read_bytes() for p in want}
    assert keygen.ensure_keys(cfg, cdir) == []
    assert {p: p.read_bytes() for p in want} == before


def test_a_tree_with_only_the_old_shared_key_builds_with_per_node_keys(example_tree):
    """An existing config dir from before per-node keys (shared keys/sync_ed25519 + host keys): the build makes each
    node's own key, renders per-node lines, and carries the shared key nowhere (nor authorises it)."""
    need_tool("ssh-keygen")
    cdir = example_tree.parent
    shutil.rmtree(cdir / "keys", ignore_errors=True)
    cfg = cfgmod.load(example_tree)
    keys.keygen(keys.sync_key(cdir), "appliance-sync@carpguard")
    for n in cfg.nodes:
        keys.keygen(keys.host_key(cdir, n), f"root@{n}")
    made = keygen.ensure_keys(cfg, cdir)
    assert set(made) == {keys.node_sync_key(cdir, n) for n in cfg.nodes}
    shared_priv, shared_pub = keys.sync_key(cdir).read_bytes(), keygen.public_key(keys.sync_key(cdir)).split()[1]
    for n in cfg.nodes:
        t = render.render_node(cfg, example_tree, n)
        assert not [e.path for e in t if e.kind == "file" and (shared_priv in e.data or shared_pub.encode() in e.data)]
        assert checks.run_all(t, b"change-me") == []


def test_a_sync_key_copied_to_another_node_is_refused(example_tree):
    """Two nodes with the same sync key could not be told apart (nor one revoked alone): the build stops."""
    need_tool("ssh-keygen")
    cdir = example_tree.parent
    cfg = cfgmod.load(example_tree)
    keygen.ensure_keys(cfg, cdir)
    for suffix in ("", ".pub"):
        src = keys.node_sync_key(cdir, "fw1").with_name("sync_ed25519" + suffix)
        shutil.copy2(src, keys.node_sync_key(cdir, "fw2").with_name("sync_ed25519" + suffix))
    with pytest.raises(BuildError, match="fw2/sync_ed25519 is the same key as .*fw1/sync_ed25519"):
        keygen.ensure_keys(cfg, cdir)


def test_an_earlier_build_output_in_the_config_dir_is_refused_not_copied(example_tree):
    """Review: an old OUT dir inside the config dir went into every node's release, with fw2's private keys in it
    (0600, so the secrets check let it through). Any private key outside keys/ now stops the build, named."""
    need_tool("ssh-keygen")
    cdir = example_tree.parent
    cfg = cfgmod.load(example_tree)
    keygen.ensure_keys(cfg, cdir)
    old_out = cdir / "dist-old" / "fw2-overlay" / "var" / "db" / "appliance" / "keys"
    old_out.mkdir(parents=True)
    shutil.copy2(keys.node_sync_key(cdir, "fw2"), old_out / "sync_ed25519")
    with pytest.raises(BuildError, match=r"dist-old/.*sync_ed25519: holds a private key"):
        render.render_node(cfg, example_tree, "fw1")


def test_no_node_image_carries_another_nodes_private_key(example_tree):
    """Three nodes: each image holds its own private sync key (once, in <state>/keys/) and no other node's private key
    (sync or host), anywhere; each authorises exactly the two others' public keys."""
    data = yaml.safe_load(example_tree.read_text())
    data["nodes"]["fw3"] = {"lan": "192.168.1.4/24", "sync": "192.168.200.3/29", "advskew": 200}
    for n in ("fw1", "fw2"):
        data["nodes"][n]["sync"] = data["nodes"][n]["sync"].replace("/30", "/29")
    example_tree.write_text(yaml.safe_dump(data, sort_keys=False))
    cdir = example_tree.parent
    cfg = cfgmod.load(example_tree)
    keygen.ensure_keys(cfg, cdir)
    secret = {n: {"sync": keys.node_sync_key(cdir, n).read_bytes(), "host": keys.host_key(cdir, n).read_bytes()}
              for n in cfg.nodes}
    # the 4th base64 line holds the private scalar (the first ones are a header every ed25519 key shares)
    bodies = {n: {k: v.split(b"\n")[4] for k, v in d.items()} for n, d in secret.items()}
    own = str(Paths(Path(render.STATE_DIR)).sync_key)
    for node in cfg.nodes:
        t = render.render_node(cfg, example_tree, node)
        files = [e for e in t if e.kind == "file"]
        for other in set(cfg.nodes) - {node}:
            for kind, body in bodies[other].items():
                assert not [e.path for e in files if body in e.data], (node, other, kind)
        assert [e.path for e in files if bodies[node]["sync"] in e.data] == [own]
        auth = text(t, "/home/appliance-sync/.ssh/authorized_keys").splitlines()
        assert sorted(l.split()[-1] for l in auth) == [f"appliance-sync@{o}" for o in sorted(set(cfg.nodes) - {node})]
        assert checks.run_all(t, b"change-me") == []  # every line agrees with doas.conf and sshd's ForceCommand


def test_rc_d_script_has_all_commands(rendered):
    _, _, trees = rendered
    rcd = trees["fw1"].get("/usr/local/etc/rc.d/appliance")
    s = rcd.data.decode()
    assert rcd.mode == 0o555
    for needle in ('pidfile="/var/db/appliance/run/proxy.pid"', 'extra_commands="reload"', "kill -HUP", 'status_cmd="appliance_status"',
                   'stop_cmd="appliance_stop"', 'start_cmd="appliance_start"', 'run_rc_command "$1"', "# PROVIDE: appliance"):
        assert needle in s


# ---------------------------------------------------------------- the checks catch what they should


@pytest.mark.parametrize("bad", ['sshd_enable=YES', 'echo hi', 'sshd_enable="YES', 'x="a"; rm -rf /', 'bad-name="1"', 'v="$(id)"'])
def test_rc_conf_check_rejects(bad):
    assert checks.check_rc_conf("/etc/rc.conf", f'# ok\nhostname="a"\n{bad}\n'.encode())


@pytest.mark.parametrize("bad", ['net.inet.carp.preempt="1"', "net.inet.carp.preempt = 1", "preempt", "net.inet.carp.preempt=1 2"])
def test_sysctl_check_rejects(bad):
    assert checks.check_sysctl_conf("/etc/sysctl.conf", f"net.inet.carp.log=1\n{bad}\n".encode())


def test_devd_check(rendered):
    _, _, trees = rendered
    t = trees["fw1"]
    good = t.get("/usr/local/etc/devd/carp.conf").data
    assert checks.check_devd("c", good, t) == []
    unbalanced = good.replace(b"};", b"}", 1)
    assert checks.check_devd("c", unbalanced, t)
    badrx = good.replace(b'"^MASTER$"', b'"^(MASTER$"')
    assert "does not compile" in checks.check_devd("c", badrx, t)[0]
    nomatch = good.replace(b'match "type"', b'match "type" "x"', 1)
    assert checks.check_devd("c", nomatch, t)
    missing = good.replace(b"/usr/local/bin/appliance role master", b"/usr/local/bin/nothere role master")
    assert "not in the image" in checks.check_devd("c", missing, t)[0]
    t.get("/usr/local/bin/appliance").mode = 0o755
    assert "must be 0555" in checks.check_devd("c", good, t)[0]


def test_secret_and_template_checks(rendered):
    _, _, trees = rendered
    t = trees["fw1"]
    t.file("/etc/leak.conf", "pass change-me\n", 0o644)
    t.file("/etc/leftover", "x={{ nope }}\n", source="template:leftover.j2")
    t.get("/etc/ssh/ssh_host_ed25519_key").mode = 0o640
    with pytest.raises(CheckFailed) as e:
        checks.enforce(t, b"change-me")
    msg = str(e.value)
    assert "/etc/leak.conf: holds a secret" in msg and "/etc/ssh/ssh_host_ed25519_key: holds a secret" in msg
    assert "/etc/leftover:1: unresolved template" in msg


def test_undefined_template_variable_is_an_error():
    from image.errors import BuildError

    with pytest.raises(BuildError, match="undefined"):
        render.template("cron.j2", schedule="* * * * *")  # appliance_bin missing


def test_shellcheck_flags_a_bad_script(rendered):
    need_tool("shellcheck")
    _, _, trees = rendered
    t = trees["fw1"]
    assert checks.check_scripts(t) == []
    t.file("/usr/local/etc/rc.d/broken", "#!/bin/sh\nif [ $1 = x ] then echo\n", 0o555, source="template:x.j2")
    assert any("broken" in p for p in checks.check_scripts(t))


# ---------------------------------------------------------------- sync access: doas, sshd_config, authorized_keys


def test_sync_user_runs_only_doas_sync_serve(rendered):
    cfg, _, trees = rendered
    t = trees["fw2"]
    doas = t.get("/usr/local/etc/doas.conf")
    assert (doas.mode, doas.uid, doas.gid) == (0o640, 0, 0)
    rules = checks.parse_doas(doas.path, doas.data)
    assert [(r["action"], r["options"], r["setenv"], r["identity"], r["target"], r["cmd"], r["args"]) for r in rules] == [
        ("permit", ["nopass"], ["SSH_ORIGINAL_COMMAND", "SSH_CLIENT"], "appliance-sync", "root", "/usr/local/bin/appliance", ["sync-serve"])]
    assert "doas" in text(t, "/usr/local/share/carpguard/packages.txt").splitlines()
    glob, blocks, problems = checks.parse_sshd_config("/etc/ssh/sshd_config", t.get("/etc/ssh/sshd_config").data)
    assert problems == [] and glob["permitrootlogin"] == "no"
    m = blocks["User appliance-sync"]
    assert m["forcecommand"] == "/usr/local/bin/doas -n /usr/local/bin/appliance sync-serve"
    assert (m["permittty"], m["allowtcpforwarding"], m["x11forwarding"]) == ("no", "no", "no")
    fb = text(t, "/usr/local/etc/rc.d/appliance_firstboot")
    assert 'chown "root:appliance-sync" "/home/appliance-sync/.ssh"' in fb and "chown -R" not in fb
    assert checks.check_sync_access(t) == []


@pytest.mark.parametrize("rule, needle", [
    ("permit nopass appliance-sync as root cmd /usr/local/bin/appliance args sync-serve", "must keep SSH_ORIGINAL_COMMAND"),
    ("permit nopass setenv { SSH_ORIGINAL_COMMAND } appliance-sync as root", "must name `as root`, `cmd"),
    ("permit nopass keepenv setenv { SSH_ORIGINAL_COMMAND } appliance-sync as root cmd /usr/local/bin/appliance args sync-serve",
     "option keepenv"),
    ("permit nopass setenv { SSH_ORIGINAL_COMMAND LD_PRELOAD } appliance-sync as root cmd /usr/local/bin/appliance args sync-serve",
     "setenv passes LD_PRELOAD"),
    ("permit nopass setenv { SSH_ORIGINAL_COMMAND } :wheel as root cmd /usr/local/bin/appliance args sync-serve", "only the sync user"),
    ("permit nopass setenv { SSH_ORIGINAL_COMMAND } appliance-sync as root cmd appliance args sync-serve", "not an absolute path"),
    ("permit nopass setenv { SSH_ORIGINAL_COMMAND } appliance-sync as root cmd /usr/local/bin/appliance args sync-serve --x",
     "no doas.conf rule lets appliance-sync run"),
    ("allow appliance-sync", "starts with permit or deny"),
    ("permit nopass setenv SSH_ORIGINAL_COMMAND appliance-sync", "setenv needs"),
])
def test_doas_check_rejects(rendered, rule, needle):
    _, _, trees = rendered
    t = trees["fw1"]
    t.get("/usr/local/etc/doas.conf").data = (rule + "\n").encode()
    problems = checks.check_sync_access(t)
    assert any(needle in p for p in problems), problems
    assert all(p.startswith("/usr/local/etc/doas.conf") or p.startswith("/home/") for p in problems), problems


def test_doas_mode_owner_and_newline_checked(rendered):
    _, _, trees = rendered
    t = trees["fw1"]
    e = t.get("/usr/local/etc/doas.conf")
    e.mode = 0o664
    assert any("mode 0664 (must be root:wheel 0600 or 0640)" in p for p in checks.check_sync_access(t))
    e.mode, e.uid, e.uname = 0o600, 1990, "appliance-sync"
    assert any("owner appliance-sync:wheel" in p for p in checks.check_sync_access(t))
    e.uid, e.uname = 0, "root"
    e.data = e.data.rstrip(b"\n")
    assert any("must end with a newline" in p for p in checks.check_sync_access(t))


def test_sshd_and_authorized_keys_must_agree(rendered):
    _, _, trees = rendered
    t = trees["fw1"]
    sshd = t.get("/etc/ssh/sshd_config")
    good = sshd.data
    sshd.data = good.replace(b"ForceCommand /usr/local/bin/doas -n ", b"ForceCommand ")
    assert any("is not the key's forced command" in p for p in checks.check_sync_access(t))
    sshd.data = good.replace(b"PermitTTY no", b"PermitTTY yes")
    assert any("needs permittty no" in p for p in checks.check_sync_access(t))
    sshd.data = good.replace(b"PermitRootLogin no", b"PermitRootLogin yes")
    assert any("PermitRootLogin yes" in p for p in checks.check_sync_access(t))
    sshd.data = good + b"\tPort 2222\n"
    assert any("not allowed inside a Match block" in p for p in checks.check_sync_access(t))
    sshd.data = good
    auth = t.get("/home/appliance-sync/.ssh/authorized_keys")
    line = auth.data
    auth.data = line.replace(b"/usr/local/bin/doas -n ", b"")
    assert any("does not run through `doas -n`" in p for p in checks.check_sync_access(t))
    auth.data = line.replace(b",restrict", b"")
    assert any("needs command=" in p for p in checks.check_sync_access(t))
    auth.data, auth.uid, auth.uname = line, 1990, "appliance-sync"
    assert any("must be root-owned" in p for p in checks.check_sync_access(t))
    auth.uid, auth.uname = 0, "root"
    with pytest.raises(CheckFailed):
        t.get("/usr/local/etc/doas.conf").data = b"permit appliance-sync\n"
        checks.enforce(t, b"change-me")


def test_sync_user_root_uses_forced_commands_only(example_tree):
    cfg = _load(example_tree, sync__user="root")
    keygen.ensure_keys(cfg, example_tree.parent)
    t = render.render_node(cfg, example_tree, "fw1")
    assert t.get("/usr/local/etc/doas.conf") is None and t.get("/home/root") is None
    assert "doas" not in text(t, "/usr/local/share/carpguard/packages.txt").splitlines()
    auth = t.get("/root/.ssh/authorized_keys")
    assert (auth.mode, auth.uid) == (0o600, 0) and auth.data.startswith(b'command="/usr/local/bin/appliance sync-serve",')
    assert "PermitRootLogin forced-commands-only" in text(t, "/etc/ssh/sshd_config")
    assert "Match User" not in text(t, "/etc/ssh/sshd_config") and "pw useradd" not in text(t, "/usr/local/etc/rc.d/appliance_firstboot")
    assert checks.run_all(t, b"change-me") == []


# ---------------------------------------------------------------- cluster.os: debian (issue 10, sections 2 and 3)

def _debian(example_tree: Path) -> Path:
    p = example_tree.with_name("debian.yaml")
    assert p.exists()
    return p


def test_debian_example_loads_with_linux_names(example_tree):
    cfg = cfgmod.load(_debian(example_tree))
    assert (cfg.cluster.os, cfg.cluster.debian, cfg.cluster.interface, cfg.cluster.sync_interface) == ("debian", "12", "eth0", "eth1")
    assert cfgmod.load(example_tree).cluster.os == "freebsd"  # no os: key keeps meaning FreeBSD


def test_debian_nics_default_to_eth0_eth1(example_tree):
    data = yaml.safe_load(_debian(example_tree).read_text())
    del data["cluster"]["interface"], data["cluster"]["sync_interface"]
    cfg = cfgmod.validate(data, base_dir=example_tree.parent)
    assert (cfg.cluster.interface, cfg.cluster.sync_interface) == ("eth0", "eth1")


@pytest.mark.parametrize("dotted, value, needle", [
    ("cluster__interface", "em0", "cluster.interface: em0 is a FreeBSD interface name"),
    ("cluster__sync_interface", "vtnet1", "cluster.sync_interface: vtnet1 is a FreeBSD interface name"),
    ("cluster__freebsd", "14.3", "cluster.freebsd: is a setting of cluster.os: freebsd nodes"),
    ("cluster__debian", "11", "cluster.debian"),
    ("sync__user", "syncer", "sync.user: syncer is not a sync user the Debian package sets up"),
])
def test_debian_bad_input_names_the_field(example_tree, dotted, value, needle):
    with pytest.raises(Exception) as e:
        _load(_debian(example_tree), **{dotted: value})
    msg = str(e.value)
    assert needle in msg and "debian.yaml:" in msg, msg
    assert len(msg.strip().splitlines()) == 1, msg


def test_debian_missing_sync_link_is_one_line(example_tree):
    path = _debian(example_tree)
    data = yaml.safe_load(path.read_text())
    del data["nodes"]["fw2"]["sync"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception) as e:
        cfgmod.load(path)
    assert "nodes.fw2.sync" in str(e.value) and len(str(e.value).strip().splitlines()) == 1


@pytest.mark.parametrize("dotted, value, needle", [
    ("cluster__debian", "12", "cluster.debian: is a setting of cluster.os: debian nodes"),
    ("cluster__interface", "eth0", "cluster.interface: eth0 is a Linux interface name"),
    ("cluster__sync_interface", "enp0s3", "cluster.sync_interface: enp0s3 is a Linux interface name"),
])
def test_freebsd_refuses_debian_settings(example_tree, dotted, value, needle):
    with pytest.raises(Exception) as e:
        _load(example_tree, **{dotted: value})
    assert needle in str(e.value)


def test_render_dispatches_to_the_debian_templates(example_tree):
    path = _debian(example_tree)
    cfg = cfgmod.load(path)
    keygen.ensure_keys(cfg, path.parent)
    overlay.ensure_admin_key(path.parent)
    t = render.render_node(cfg, path, "fw2", sync_gid=997)
    paths = {e.path for e in t}
    assert not {"/etc/rc.conf", "/boot/loader.conf", "/usr/local/etc/devd/carp.conf"} & paths  # nothing FreeBSD
    assert text(t, "/etc/hostname") == "fw2\n"
    assert text(t, "/var/lib/appliance/node.yaml") == "node: fw2\n"
    assert t.get("/var/lib/appliance/current").target == "releases/1"
    assert t.get("/etc/appliance").target == "/var/lib/appliance/current"
    assert t.get("/var/lib/appliance/releases/1/appliance.yaml").mode == 0o600
    lan, sync = text(t, "/etc/systemd/network/10-lan.network"), text(t, "/etc/systemd/network/20-sync.network")
    assert "Name=eth0" in lan and "Address=192.168.1.3/24" in lan and "RequiredForOnline=yes" in lan
    assert "Name=eth1" in sync and "Address=192.168.200.2/30" in sync
    assert "net.ipv4.ip_nonlocal_bind=1" in text(t, "/etc/sysctl.d/60-carpguard.conf")
    sshd = text(t, "/etc/ssh/sshd_config.d/10-carpguard.conf")
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin prohibit-password" in sshd
    for secret in ("/etc/ssh/ssh_host_ed25519_key", "/var/lib/appliance/keys/sync_ed25519", "/root/.ssh/authorized_keys"):
        assert t.get(secret).mode == 0o600 and t.get(secret).gname == "root", secret
    assert t.get("/var/lib/appliance/keys").mode == 0o700
    # per-node keys: fw2's own key (and no release copy of any sync key), fw1's key authorised from fw1's address
    assert t.get("/var/lib/appliance/keys/sync_ed25519").data == keys.node_sync_key(example_tree.parent, "fw2").read_bytes()
    assert t.get("/var/lib/appliance/releases/1/keys/sync_ed25519") is None
    auth = t.get("/var/lib/appliance-sync/.ssh/authorized_keys")
    assert (auth.mode, auth.uname, auth.gname, auth.gid) == (0o640, "root", "appliance-sync", 997)
    line = auth.data.decode()
    assert 'command="/usr/bin/sudo -n /usr/bin/appliance sync-serve",from="192.168.200.1",restrict ssh-ed25519' in line
    assert line.count("\n") == 1 and line.rstrip().endswith("appliance-sync@fw1")
    known = text(t, "/var/lib/appliance/releases/1/keys/known_hosts")
    assert "192.168.200.1" in known and "192.168.200.2" in known
    overlay.boot_files(t, cfg, "fw2", "6.1.0-0-amd64", "u-u-i-d")
    grub = text(t, "/boot/grub/grub.cfg")
    assert "console=ttyS0,115200n8" in grub and "net.ifnames=0" in grub and "root=UUID=u-u-i-d" in grub
    assert "UUID=u-u-i-d\t/\text4" in text(t, "/etc/fstab")
    overlay.check(t, cfg.cluster.password.get_secret_value().encode())


def test_debian_check_refuses_a_readable_secret(example_tree):
    path = _debian(example_tree)
    cfg = cfgmod.load(path)
    keygen.ensure_keys(cfg, path.parent)
    overlay.ensure_admin_key(path.parent)
    t = render.render_node(cfg, path, "fw1")
    t.get("/etc/ssh/ssh_host_ed25519_key").mode = 0o644
    with pytest.raises(CheckFailed, match="ssh_host_ed25519_key: holds a secret"):
        overlay.check(t, cfg.cluster.password.get_secret_value().encode())


def test_the_release_holds_the_cluster_file_given_with_c(example_tree):
    """Built from examples/debian.yaml, the release's appliance.yaml is that file, not the FreeBSD example beside it."""
    cfg_path = _debian(example_tree)
    cfg = cfgmod.load(cfg_path)
    keygen.ensure_keys(cfg, cfg_path.parent)
    overlay.ensure_admin_key(cfg_path.parent)
    t = render.render_node(cfg, cfg_path, "fw1", exclude=[])
    rel = [p for p in t.entries if p.endswith("/releases/1/appliance.yaml")]
    assert len(rel) == 1, rel
    assert t.get(rel[0]).data == cfg_path.read_bytes()
    assert not [p for p in t.entries if p.endswith("/releases/1/debian.yaml")]

"""Unit tests of the image overlay: rendered files, CARP syntaxes, devd rules, keys, and the build-time checks."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from appliance import config as cfgmod
from appliance import keys
from image import checks, keygen, render
from image.errors import CheckFailed
from tests.conftest import need_tool


def _load(cfg_path: Path, **changes) -> cfgmod.Appliance:
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
    assert auth.mode == 0o600 and auth.uname == "appliance-sync" and t.get("/home/appliance-sync/.ssh").mode == 0o700
    pub = keygen.public_key(keys.sync_key(cdir))
    assert auth.data.decode().strip() == keys.authorized_keys_line(cfg, "fw1", pub, "/usr/local/bin/appliance")
    rel = "/var/db/appliance/releases/1"
    assert t.get(f"{rel}/keys/sync_ed25519").mode == 0o600
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
    assert "*/5 * * * *\troot\t/usr/local/bin/appliance sync" in cron


def test_keys_generated_once_then_reused(example_tree):
    need_tool("ssh-keygen")
    cfg = cfgmod.load(example_tree)
    made = keygen.ensure_keys(cfg, example_tree.parent)
    assert {p.name for p in made} == {"sync_ed25519", "ssh_host_ed25519_key"} and len(made) == 3
    sk = keys.sync_key(example_tree.parent)
    assert os.stat(sk).st_mode & 0o777 == 0o600
    before = sk.read_bytes()
    assert keygen.ensure_keys(cfg, example_tree.parent) == []
    assert sk.read_bytes() == before


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

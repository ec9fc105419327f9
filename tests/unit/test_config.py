"""The cluster model: every invalid case exits 2 naming file, line and field; valid configs round-trip."""
from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.core import loader as c
from appliance.core import paths
from appliance.core.errors import ConfigError
from appliance.core.model import Appliance
from appliance.cli import main
from tests.support.env import APPLIANCE, EXAMPLES


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def tree_state(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def edit(cfg_path: Path, fn) -> Path:
    data = yaml.safe_load(cfg_path.read_text())
    fn(data)
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg_path


def test_example_checks_ok_and_prints_summary():
    r = run("check", "-c", str(EXAMPLES / "appliance.yaml"))
    assert r.exit_code == 0, r.output
    assert "192.168.1.50/24" in r.output and "fw1" in r.output and "MASTER" in r.output
    assert "change-me" not in r.output


def test_check_json_summary():
    r = run("check", "-c", str(EXAMPLES / "appliance.yaml"), "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["cluster"]["expected_master"] == "fw1"
    assert s["nodes"]["fw2"]["advskew"] == 100
    assert s["filter"]["lists"]["adult"]["entries"] >= 2


def test_console_script_real_process():
    p = subprocess.run([APPLIANCE, "check", "-c", str(EXAMPLES / "appliance.yaml")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout


CASES = [
    ("vhid high", lambda d: d["cluster"].update(vhid=256), "cluster.vhid", "256"),
    ("vhid zero", lambda d: d["cluster"].update(vhid=0), "cluster.vhid", "0"),
    ("advskew high", lambda d: d["nodes"]["fw2"].update(advskew=255), "nodes.fw2.advskew", "255"),
    ("advskew negative", lambda d: d["nodes"]["fw2"].update(advskew=-1), "nodes.fw2.advskew", "-1"),
    ("advbase zero", lambda d: d["cluster"].update(advbase=0), "cluster.advbase", "0"),
    ("advbase high", lambda d: d["cluster"].update(advbase=256), "cluster.advbase", "256"),
    ("same advskew", lambda d: d["nodes"]["fw2"].update(advskew=0), "nodes.fw2.advskew", "ambiguous master"),
    ("password long", lambda d: d["cluster"].update(password="x" * 20), "cluster.password", "at most 19"),
    ("password empty", lambda d: d["cluster"].update(password=""), "cluster.password", "empty"),
    ("vip outside lan", lambda d: d["cluster"].update(vip="10.9.9.9/24"), "nodes.fw1.lan", "not on the VIP's subnet"),
    ("vip is node addr", lambda d: d["cluster"].update(vip="192.168.1.3/24"), "nodes.fw2.lan", "equals the VIP"),
    ("sync subnets differ", lambda d: d["nodes"]["fw2"].update(sync="192.168.201.2/30"), "nodes.fw2.sync", "sync subnet"),
    ("sync on lan", lambda d: [d["nodes"][n].update(sync=a) for n, a in (("fw1", "192.168.1.10/24"), ("fw2", "192.168.1.11/24"))], "nodes.fw1.sync", "on the LAN"),
    ("duplicate lan addr", lambda d: d["nodes"]["fw2"].update(lan="192.168.1.2/24"), "nodes.fw2.lan", "already used by fw1"),
    ("duplicate sync addr", lambda d: d["nodes"]["fw2"].update(sync="192.168.200.1/30"), "nodes.fw2.sync", "already used by fw1"),
    ("one node", lambda d: d["nodes"].pop("fw2"), "nodes", "at least two nodes"),
    ("witness off the lan", lambda d: d["ha"].update(lan_witness=["10.1.1.1"]), "ha.lan_witness[0]", "not on the LAN"),
    ("witness is a node", lambda d: d["ha"].update(lan_witness=["192.168.1.3"]), "ha.lan_witness[0]", "fw2's"),
    ("witness is the vip", lambda d: d["ha"].update(lan_witness=["192.168.1.50"]), "ha.lan_witness[0]", "a VIP's"),
    ("fast interval tiny", lambda d: d["ha"].update(fast_interval=0.001), "ha.fast_interval", "at least 0.02"),
    ("fast misses one", lambda d: d["ha"].update(fast_misses=1), "ha.fast_misses", "1"),
    ("unknown top key", lambda d: d.update(proxxy={"port": 1}), "proxxy", "unknown key"),
    ("unknown nested key", lambda d: d["cluster"].update(advskw=3), "cluster.advskw", "unknown key"),
    ("unknown node key", lambda d: d["nodes"]["fw1"].update(lann="1.2.3.4/24"), "nodes.fw1.lann", "unknown key"),
    ("missing category dir", lambda d: d["filter"]["block"].append("gambling"), "filter.block[3]", "gambling"),
    ("missing allow dir", lambda d: d["filter"].update(allow=["nothere"]), "filter.allow[0]", "nothere"),
    ("open proxy", lambda d: d["proxy"].update(clients=["0.0.0.0/0"]), "proxy.clients[0]", "open proxy"),
    ("bad schedule", lambda d: d["filter"]["policies"][0].update(schedule="mon-fry 08:00-17:00"), "filter.policies[0].schedule", "fry"),
    ("host bits", lambda d: d["proxy"].update(clients=["192.168.1.1/24"]), "proxy.clients", "host bits"),
    ("bad cron", lambda d: d["sync"].update(schedule="every 5 minutes"), "sync.schedule", "cron"),
    ("bad vip", lambda d: d["cluster"].update(vip="192.168.1.500/24"), "cluster.vip", "192.168.1.500"),
]


@pytest.mark.parametrize("name,mutate,field,needle", CASES, ids=[c[0] for c in CASES])
def test_invalid_config_exits_2_naming_field(example_tree: Path, name, mutate, field, needle):
    edit(example_tree, mutate)
    before = tree_state(example_tree.parent)
    r = run("check", "-c", str(example_tree))
    assert r.exit_code == 2, r.output
    err = r.output
    assert f"{example_tree}:" in err, err  # names the file
    assert f" {field}:" in err, err  # names the field path
    assert needle in err, err
    assert "change-me" not in err  # the CARP pass never shows up in errors
    assert tree_state(example_tree.parent) == before  # nothing written


def test_error_names_the_line(example_tree: Path):
    text = example_tree.read_text().replace("vhid: 1", "vhid: 300")
    example_tree.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "vhid: 300" in l)
    r = run("check", "-c", str(example_tree))
    assert r.exit_code == 2
    assert f"{example_tree}:{line}: cluster.vhid:" in r.output and "(got 300)" in r.output


def test_password_value_is_hidden_in_errors(example_tree: Path):
    edit(example_tree, lambda d: d["cluster"].update(password="s3cret-but-too-long-for-carp"))
    r = run("check", "-c", str(example_tree))
    assert r.exit_code == 2
    assert "s3cret" not in r.output and "(hidden)" in r.output


def test_open_proxy_allowed_when_explicit(example_tree: Path):
    edit(example_tree, lambda d: d["proxy"].update(clients=["0.0.0.0/0"], open_proxy=True))
    assert run("check", "-c", str(example_tree)).exit_code == 0


def test_duplicate_node_name_in_yaml(example_tree: Path):
    text = example_tree.read_text().replace(
        "  fw2: {lan: 192.168.1.3/24", "  fw1: {lan: 192.168.1.4/24, sync: 192.168.200.2/30, advskew: 50}\n  fw2: {lan: 192.168.1.3/24"
    )
    example_tree.write_text(text)
    r = run("check", "-c", str(example_tree))
    assert r.exit_code == 2
    assert "duplicate key 'fw1'" in r.output and f"{example_tree}:" in r.output


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path):
    f = tmp_path / "appliance.yaml"
    f.write_text("cluster:\n  vip: 192.168.1.50/24\n  vhid: [1\nnodes: {}\n")
    r = run("check", "-c", str(f))
    assert r.exit_code == 2
    import re

    assert re.search(rf"{re.escape(str(f))}:\d+:\d+: YAML syntax error", r.output), r.output


def test_missing_config_file(tmp_path: Path):
    r = run("check", "-c", str(tmp_path / "nope.yaml"))
    assert r.exit_code == 2 and "no such config file" in r.output


def test_missing_lists_dir(example_tree: Path):
    edit(example_tree, lambda d: d["filter"].update(lists="/nonexistent/lists"))
    r = run("check", "-c", str(example_tree))
    assert r.exit_code == 2 and "filter.lists" in r.output


def test_config_path_from_env(example_tree: Path):
    r = run("check", env={"APPLIANCE_CONFIG": str(example_tree)})
    assert r.exit_code == 0, r.output
    assert str(example_tree) in r.output.replace("\n", "")


def test_default_config_path_is_platform_specific(monkeypatch):
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr(paths.sys, "platform", "freebsd14")
    assert paths.config_path() == Path("/usr/local/etc/appliance/appliance.yaml")
    monkeypatch.setattr(paths.sys, "platform", "linux")
    assert paths.config_path() == Path("/etc/appliance/appliance.yaml")


def test_render_picks_node_by_flag_env_and_file(example_tree: Path, state_dir: Path):
    r = run("render", "-c", str(example_tree), "--node", "fw2", "--json")
    assert r.exit_code == 0, r.output
    eff = json.loads(r.output)
    assert eff["node"] == "fw2" and eff["carp"]["advskew"] == 100 and eff["carp"]["srcip"] == "192.168.1.3"
    assert eff["carp"]["password"] == "**********" and list(eff["peers"]) == ["fw1"]
    assert eff["role_expected"] == "BACKUP"
    r = run("render", "-c", str(example_tree), "--json", env={"APPLIANCE_NODE": "fw1"})
    assert json.loads(r.output)["node"] == "fw1"
    (state_dir / "node.yaml").write_text("node: fw2\n")
    r = run("render", "-c", str(example_tree), "--json", env={"APPLIANCE_NODE": None})
    assert json.loads(r.output)["node"] == "fw2"
    (example_tree.parent / "node.yaml").write_text("node: fw1\n")  # beside the config wins over the state dir
    r = run("render", "-c", str(example_tree), "--json", env={"APPLIANCE_NODE": None})
    assert json.loads(r.output)["node"] == "fw1"
    r = run("render", "-c", str(example_tree), "--show-secrets", "--json", env={"APPLIANCE_NODE": None})
    assert json.loads(r.output)["carp"]["password"] == "change-me"


def test_render_unknown_or_missing_node(example_tree: Path, state_dir: Path):
    r = run("render", "-c", str(example_tree), "--node", "fw9")
    assert r.exit_code == 2 and "'fw9' is not one of the nodes" in r.output
    r = run("render", "-c", str(example_tree), env={"APPLIANCE_NODE": None})
    assert r.exit_code == 2 and "cannot tell which node this is" in r.output
    (state_dir / "node.yaml").write_text("nod: fw1\n")
    r = run("render", "-c", str(example_tree), env={"APPLIANCE_NODE": None})
    assert r.exit_code == 2 and "node.yaml:1: node:" in r.output


def test_shared_options_work_before_and_after_command(example_tree: Path):
    assert run("-c", str(example_tree), "--node", "fw1", "render").exit_code == 0
    assert run("render", "-c", str(example_tree), "--node", "fw1").exit_code == 0


def test_every_command_has_help():
    from appliance.cli import COMMANDS

    for name in COMMANDS:
        r = run(name, "--help")
        assert r.exit_code == 0 and "Usage" in r.output, name


def test_schedule_parsing_and_matching():
    import datetime as dt

    from appliance.core.schedule import parse

    s = parse("mon-fri 08:00-17:00")
    assert s.matches(dt.datetime(2026, 11, 23, 9, 0))  # Monday
    assert not s.matches(dt.datetime(2026, 11, 23, 17, 0))  # end is exclusive
    assert not s.matches(dt.datetime(2026, 11, 22, 9, 0))  # Sunday
    night = parse("fri 22:00-06:00")
    assert night.matches(dt.datetime(2026, 11, 27, 23, 0)) and night.matches(dt.datetime(2026, 11, 28, 5, 59))
    assert not night.matches(dt.datetime(2026, 11, 28, 23, 0))
    assert parse("sat,sun").matches(dt.datetime(2026, 11, 22, 3, 0))
    for bad in ("", "mon-fry", "mon 25:00-26:00", "mon 08:00", "mon 08:00-08:00"):
        with pytest.raises(ValueError):
            parse(bad)


# ---------------------------------------------------------------- property: model -> YAML -> model

octet = st.integers(min_value=1, max_value=250)


@st.composite
def cluster_configs(draw) -> dict:
    n = draw(st.integers(min_value=2, max_value=5))
    a, b = draw(octet), draw(octet)
    prefix = draw(st.sampled_from([16, 20, 24]))
    lan = ipaddress.IPv4Network(f"10.{a}.{b}.0/{prefix}", strict=False)
    hosts = draw(st.lists(st.integers(min_value=1, max_value=200), min_size=n + 1, max_size=n + 1, unique=True))
    skews = draw(st.lists(st.integers(min_value=0, max_value=254), min_size=n, max_size=n, unique=True))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=n, max_size=n, unique=True))
    sync_net = ipaddress.IPv4Network(f"172.{draw(st.integers(16, 31))}.{draw(octet)}.0/28")
    base = int(lan.network_address)
    nodes = {
        name: {"lan": f"{ipaddress.IPv4Address(base + hosts[i])}/{prefix}", "sync": f"{sync_net.network_address + i + 1}/28", "advskew": skews[i]}
        for i, name in enumerate(names)
    }
    schedule = draw(st.sampled_from([None, "mon-fri 08:00-17:00", "sat,sun", "daily 22:00-06:00", "mon 08:00-12:00,13:00-17:00; fri 09:00-10:00"]))
    policy = {"clients": [str(lan)], "block": ["social"]}
    if schedule:
        policy["schedule"] = schedule
    return {
        "cluster": {
            "vip": f"{ipaddress.IPv4Address(base + hosts[-1])}/{prefix}",
            "vhid": draw(st.integers(1, 255)),
            "password": draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_!@#", min_size=1, max_size=19)),
            "advbase": draw(st.integers(1, 255)),
            "preempt": draw(st.booleans()),
        },
        "nodes": nodes,
        "proxy": {
            "port": draw(st.integers(1, 65535)),
            "clients": [str(lan)],
            "tls": draw(st.sampled_from(["sni", "intercept"])),
            "workers": draw(st.one_of(st.just("auto"), st.integers(1, 16))),
        },
        "filter": {"block": ["adult"], "allow": draw(st.sampled_from([[], ["allowlist"]])), "policies": draw(st.sampled_from([[], [policy]]))},
        "sync": {"keep_releases": draw(st.integers(1, 100))},
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_configs())
def test_accepted_config_round_trips_through_yaml(data: dict):
    try:
        cfg = c.validate(data)
    except ConfigError:
        return  # the generator may produce a rejected config; the property is about accepted ones
    text = c.dump_yaml(cfg)
    again = c.validate(c.parse_yaml(text, "<rendered>"), "<rendered>", text)
    assert again == cfg
    assert c.dump_yaml(again) == text


def test_generator_mostly_produces_valid_configs():
    from hypothesis import find

    # the round-trip property is only meaningful if accepted configs are common
    found = find(cluster_configs(), lambda d: isinstance(_try(d), Appliance), settings=settings(max_examples=50))
    assert isinstance(_try(found), Appliance)


def _try(d: dict):
    try:
        return c.validate(d)
    except ConfigError as e:
        return e

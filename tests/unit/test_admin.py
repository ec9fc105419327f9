"""The status page's access rules (source addresses, HTTP Basic with bcrypt, failure delay), bind addresses, the
admin: config section's errors and `appliance admin hash-password`."""
from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import bcrypt
import pytest
from click.testing import CliRunner

from appliance.admin import access
from appliance.admin.gather import split_line, tail
from appliance.cli import main
from appliance.core.errors import ConfigError
from appliance.core.loader import load
from appliance.core.model_admin import BCRYPT_RE
from tests.support.env import EXAMPLES

HASH = bcrypt.hashpw(b"s3cret pass", bcrypt.gensalt(10)).decode()  # the lowest cost the config takes (~0.1 s, once)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def cluster(tmp_path: Path, admin: str = "") -> Path:
    shutil.copytree(EXAMPLES / "lists", tmp_path / "lists")
    cfg = tmp_path / "appliance.yaml"
    cfg.write_text((EXAMPLES / "appliance.yaml").read_text() + admin)
    return cfg


@pytest.fixture
def opened(tmp_path: Path):
    return load(cluster(tmp_path, f"admin:\n  listen: [loopback, sync, lan, 10.9.9.9]\n  allow: [10.20.0.0/24]\n"
                                  f"  user: ops\n  password_hash: '{HASH}'\n"))


def test_bind_addresses_resolve_per_node(opened) -> None:
    assert access.bind_addresses(opened, "fw1") == ["127.0.0.1", "192.168.200.1", "192.168.1.2", "10.9.9.9"]
    assert access.bind_addresses(opened, "fw2") == ["127.0.0.1", "192.168.200.2", "192.168.1.3", "10.9.9.9"]


def test_sources_loopback_sync_and_allow_only(opened) -> None:
    g = access.Gate.from_config(opened, "fw1")
    for ok in ("127.0.0.1", "127.5.5.5", "192.168.200.2", "10.20.0.77", "::ffff:10.20.0.1"):
        assert g.source_ok(ok), ok
    for bad in ("192.168.1.10", "10.20.1.1", "8.8.8.8", "::1x", ""):
        assert not g.source_ok(bad), bad


def test_password_for_everyone_but_a_peer_asking_our_sync_listener_for_status_json(opened) -> None:
    g = access.Gate.from_config(opened, "fw1")  # fw1's sync address 192.168.200.1, its peer fw2's 192.168.200.2
    assert g.peers == {"192.168.200.2"} and g.own_sync == "192.168.200.1"
    assert not g.needs_password("192.168.200.2", "192.168.200.1", "/status.json")
    assert not g.needs_password("::ffff:192.168.200.2", "::ffff:192.168.200.1", "/status.json")
    # F1: a local user binding this node's own sync address, on any listener and path, needs the password
    for local in ("127.0.0.1", "192.168.200.1", "192.168.1.2"):
        for path in ("/", "/status.json", "/metrics"):
            assert g.needs_password("192.168.200.1", local, path), (local, path)
    # the peer's address: only /status.json and only on our sync listener
    assert g.needs_password("192.168.200.2", "127.0.0.1", "/status.json")
    assert g.needs_password("192.168.200.2", "192.168.1.2", "/status.json")
    assert g.needs_password("192.168.200.2", "192.168.200.1", "/")
    assert g.needs_password("192.168.200.2", "192.168.200.1", "/metrics")
    assert g.needs_password("127.0.0.1", "127.0.0.1", "/status.json") and g.needs_password("10.20.0.5", "x", "/")


def test_no_hash_no_password(tmp_path: Path) -> None:
    g = access.Gate.from_config(load(cluster(tmp_path)), "fw1")
    assert not g.needs_password("127.0.0.1", "127.0.0.1", "/")
    assert not g.check("127.0.0.1", basic("admin", "anything"))


@pytest.mark.parametrize("header", [None, "", "Bearer x", "Basic !!!", basic("ops", "wrong"), basic("admin", "s3cret pass"),
                                    "Basic " + base64.b64encode(b"no-colon").decode()])
def test_wrong_credentials_fail(opened, header) -> None:
    assert not access.Gate.from_config(opened, "fw1").check("10.20.0.5", header)


def test_right_credentials_pass(opened) -> None:
    assert access.Gate.from_config(opened, "fw1").check("10.20.0.5", basic("ops", "s3cret pass"))


def test_failure_records_stay_bounded(opened, monkeypatch) -> None:
    monkeypatch.setattr(access, "MAX_CLIENTS", 5)
    g = access.Gate.from_config(opened, "fw1")
    monkeypatch.setattr(access.bcrypt, "checkpw", lambda pw, h: False)
    for i in range(20):
        g.check(f"10.20.0.{i}", basic("ops", "nope"))
    assert len(g.failures) == 5


@pytest.mark.parametrize("admin, field", [
    ("admin:\n  password_hash: '$2b$04$" + "a" * 53 + "'\n", "cost 10 or more"),  # a well-formed cost-4 hash
    ("admin:\n  listen: [lan]\n", "admin.listen goes beyond loopback and sync: admin.allow"),
    ("admin:\n  listen: [lan]\n  allow: [10.0.0.0/24]\n", "admin.password_hash is required"),
    ("admin:\n  password_hash: '$2b$12$tooshort'\n", "admin.password_hash: not a bcrypt hash"),
    ("admin:\n  listen: [wan]\n", "admin.listen"),
    ("admin:\n  port: 0\n", "admin.port"),
    ("admin:\n  user: 'a b'\n", "admin.user"),
    ("admin:\n  allow: [10.0.0.1/24]\n", "admin.allow"),
])
def test_bad_admin_config_names_the_field(tmp_path: Path, admin: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(cluster(tmp_path, admin))
    assert field in str(e.value) and "appliance.yaml:" in str(e.value)


def test_a_bad_hash_is_not_echoed(tmp_path: Path) -> None:
    almost = HASH[:-1]  # one character short: still secret material
    with pytest.raises(ConfigError) as e:
        load(cluster(tmp_path, f"admin:\n  password_hash: '{almost}'\n"))
    assert almost not in str(e.value) and "(hidden)" in str(e.value)


def test_hash_password_from_stdin() -> None:
    r = CliRunner().invoke(main, ["admin", "hash-password", "--rounds", "10"], input="correct horse\n")
    assert r.exit_code == 0, r.output
    h = r.output.strip()
    assert BCRYPT_RE.match(h) and h.startswith("$2b$10$")
    assert bcrypt.checkpw(b"correct horse", h.encode())


@pytest.mark.parametrize("text, why", [("\n", "empty password"), ("x" * 73 + "\n", "72 bytes")])
def test_hash_password_refuses(text: str, why: str) -> None:
    r = CliRunner().invoke(main, ["admin", "hash-password"], input=text)
    assert r.exit_code == 2 and why in r.output and "$2b$" not in r.output


def test_tail_reads_the_end_only(tmp_path: Path) -> None:
    log = tmp_path / "ha.log"
    log.write_text("".join(f"2024-01-0{1 + i % 9}T10:00:00 line {i}\n" for i in range(20000)))
    assert [split_line(x)["text"] for x in tail(log, 2)] == ["line 19998", "line 19999"]
    assert tail(tmp_path / "missing", 3) == []
    assert split_line("no time here") == {"at": "", "text": "no time here"}


def test_admin_cert_makes_the_pair_once_and_gives_it_to_the_owner(tmp_path: Path, monkeypatch) -> None:
    import pwd  # deferred: this test only

    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path / "state"))
    cfg = cluster(tmp_path)
    me = pwd.getpwuid(os.getuid()).pw_name
    r = CliRunner().invoke(main, ["-c", str(cfg), "--node", "fw1", "admin", "cert", "--owner", me])
    assert r.exit_code == 0, r.output
    key = tmp_path / "state" / "admin" / "admin-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == os.getuid()
    first = key.read_bytes()
    assert CliRunner().invoke(main, ["-c", str(cfg), "--node", "fw1", "admin", "cert"]).exit_code == 0
    assert key.read_bytes() == first
    r = CliRunner().invoke(main, ["-c", str(cfg), "--node", "fw1", "admin", "cert", "--owner", "no-such-user-x9"])
    assert r.exit_code != 0 and "no user 'no-such-user-x9'" in r.output

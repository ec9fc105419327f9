"""The FreeBSD rc.d script runs the proxy unprivileged: `daemon -u` with a system user it creates, owning only what the
proxy writes (issue 11, Privileges)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "image" / "templates" / "rc.d-appliance.j2"


def render() -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(TEMPLATE.read_text()).render(header="test", pidfile="/var/db/appliance/run/proxy.pid",
                                                        appliance_bin="/usr/local/bin/appliance")


def test_proxy_started_with_daemon_u_and_an_unprivileged_user():
    s = render()
    start = [line for line in s.splitlines() if "/usr/sbin/daemon" in line]
    assert len(start) == 1 and ' -u "$appliance_user" ' in start[0]
    assert ': "${appliance_user:=appliance-proxy}"' in s
    assert re.search(r'pw useradd "\$appliance_user" .*-s /usr/sbin/nologin', s)
    assert 'chgrp "$appliance_user" "$appliance_config" && chmod 0640' in s  # reads the cluster file, never writes it
    assert "appliance_user_setup || return 1" in s


def test_rc_script_is_clean_shell():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", "-s", "sh", "-"], input=render(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout

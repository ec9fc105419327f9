"""The benchmarks' squid: one squid.conf writer for every side-by-side run (a module the bench runner does not run:
its name does not start with bench_)."""
from __future__ import annotations

import os
from pathlib import Path


def write_squid_conf(root: Path, port: int, acls: str = "", rules: str = "", extra: str = "") -> Path:
    """<root>/squid/squid.conf for squid on 127.0.0.1:port serving 127.0.0.0/8 only, no cache, no access log, its
    cache log and pidfile in <root>/squid; `acls` go before the localnet acl, `rules` after it (before
    `http_access allow localnet`), `extra` at the end. The dir is 0777 and root 0755 (squid drops root); 0644."""
    d = squid_dir(root)
    conf = d / "squid.conf"
    conf.write_text(f"""http_port 127.0.0.1:{port}
{acls}acl localnet src 127.0.0.0/8
{rules}http_access allow localnet
http_access deny all
cache deny all
cache_mem 8 MB
access_log none
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
shutdown_lifetime 1 seconds
{extra}""")
    os.chmod(conf, 0o644)
    return conf


def squid_dir(root: Path) -> Path:
    """<root>/squid, made writable for squid's own user."""
    d = root / "squid"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(d, 0o777)
    return d

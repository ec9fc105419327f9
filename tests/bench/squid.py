"""The benchmarks' squid: one squid.conf writer for every side-by-side run, plain or ssl-bump (a module the bench
runner does not run: its name does not start with bench_)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CERTGEN = "/usr/lib/squid/security_file_certgen"  # Debian's squid-openssl helper that mints the bumped certificates


def write_squid_conf(root: Path, port: int, acls: str = "", rules: str = "", extra: str = "", port_opts: str = "") -> Path:
    """<root>/squid/squid.conf for squid on 127.0.0.1:port serving 127.0.0.0/8 only, no cache, no access log, its
    cache log and pidfile in <root>/squid; `acls` go before the localnet acl, `rules` after it (before
    `http_access allow localnet`), `extra` at the end, `port_opts` after the http_port address. The dir is 0777 and
    root 0755 (squid drops root); 0644."""
    d = squid_dir(root)
    conf = d / "squid.conf"
    conf.write_text(f"""http_port 127.0.0.1:{port}{' ' + port_opts if port_opts else ''}
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


def bump_options(root: Path, ca_pem: Path, ca_key: Path, origin_ca: Path) -> tuple[str, str]:
    """(port_opts, extra) for squid ssl-bump: every CONNECT bumped (`ssl_bump bump all` after peeking at the SNI),
    certificates minted by the CA ca_pem/ca_key through security_file_certgen with a certificate DB in <root>/squid,
    the origin verified against origin_ca. squid-openssl only (Debian's plain squid has no ssl-bump)."""
    d = squid_dir(root)
    db = d / "ssl_db"
    shutil.rmtree(db, ignore_errors=True)
    subprocess.run([CERTGEN, "-c", "-s", str(db), "-M", "16MB"], check=True, capture_output=True, timeout=60)
    for dirpath, dirs, files in os.walk(db):  # squid's own user writes new certificates into it
        for name in dirs + files:
            os.chmod(os.path.join(dirpath, name), 0o777 if name in dirs else 0o666)
    os.chmod(db, 0o777)
    for p in (ca_pem, ca_key, origin_ca):
        os.chmod(p, 0o644)
    port_opts = (f"ssl-bump tls-cert={ca_pem} tls-key={ca_key} generate-host-certificates=on "
                 "dynamic_cert_mem_cache_size=16MB")
    extra = f"""sslcrtd_program {CERTGEN} -s {db} -M 16MB
sslcrtd_children 4 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={origin_ca}
"""
    return port_opts, extra

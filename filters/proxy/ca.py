"""The appliance CA for tls: intercept: <config dir>/ca/, generated on first start, key files mode 0600."""
from __future__ import annotations

import os
from pathlib import Path

BASENAME = "mitmproxy"  # mitmproxy's certstore file names: <dir>/mitmproxy-ca.pem (key+cert), -ca-cert.pem
CA_DIR = "ca"
SECRET_FILES = ("mitmproxy-ca.pem", "mitmproxy-ca.p12")


def ca_dir(base: Path) -> Path:
    return Path(base) / CA_DIR


def cert_path(base: Path) -> Path:
    return ca_dir(base) / f"{BASENAME}-ca-cert.pem"


def ensure_ca(base: Path, common_name: str = "carpguard appliance CA") -> Path:
    """Create the CA once (same on every node: it lives in the synced tree); returns the cert path."""
    d = ca_dir(base)
    if not (d / f"{BASENAME}-ca.pem").exists():
        from mitmproxy import certs  # deferred on purpose: only intercept mode needs it, and only on first start

        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        old = os.umask(0o077)
        try:
            certs.CertStore.create_store(d, BASENAME, 2048, organization="carpguard", cn=common_name)
        finally:
            os.umask(old)
    for name in SECRET_FILES:
        p = d / name
        if p.exists() and p.stat().st_mode & 0o077:
            os.chmod(p, 0o600)
    return cert_path(base)

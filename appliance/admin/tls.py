"""The status page's TLS certificate: the appliance's own under the state dir, made at first start (key 0600),
signed by the appliance CA (the proxy's tls: intercept CA) when there is one, else self-signed."""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.core.paths import Paths

VALID_DAYS = 825  # what browsers accept for a leaf certificate


def cert_files(paths: Paths) -> tuple[Path, Path]:
    """(certificate, private key) of the admin listener: <state>/admin/admin-cert.pem, admin-key.pem."""
    d = paths.state / "admin"
    return d / "admin-cert.pem", d / "admin-key.pem"


def ensure_cert(paths: Paths, node: str, addresses: list[str], ca_pem: Path | None = None) -> tuple[Path, Path]:
    """The certificate and key, made once: for the node's name and addresses, signed by the CA in ca_pem (a file
    holding the CA key and certificate, as mitmproxy writes it) when it exists, else self-signed."""
    cert, key = cert_files(paths)
    if cert.exists() and key.exists():
        if key.stat().st_mode & 0o077:  # only when needed: the service's own view of <state>/admin is read-only
            os.chmod(key, 0o600)
        return cert, key
    cert.parent.mkdir(parents=True, exist_ok=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    issuer_key, issuer_cert = _load_ca(ca_pem) if ca_pem is not None and ca_pem.exists() else (None, None)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"carpguard {node} status page")])
    sans: list[x509.GeneralName] = [x509.DNSName(node), x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(addresses)]
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
               .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.SubjectAlternativeName(sans), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    signed = builder.sign(issuer_key if issuer_key is not None else leaf_key, hashes.SHA256())
    old = os.umask(0o077)
    try:
        tmp = key.with_name(key.name + ".tmp")
        tmp.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(tmp, 0o600)
        os.replace(tmp, key)
        chain = signed.public_bytes(serialization.Encoding.PEM)
        if issuer_cert is not None:
            chain += issuer_cert.public_bytes(serialization.Encoding.PEM)
        tmp = cert.with_name(cert.name + ".tmp")
        tmp.write_bytes(chain)
        os.replace(tmp, cert)
    finally:
        os.umask(old)
    os.chmod(cert, 0o644)
    return cert, key


def _load_ca(pem: Path):
    """(key, certificate) from one PEM file holding both (mitmproxy-ca.pem)."""
    data = pem.read_bytes()
    return serialization.load_pem_private_key(data, password=None), x509.load_pem_x509_certificate(data)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx

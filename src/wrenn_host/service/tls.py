"""TLS for the host agent's service: the control plane's calls carry capsules' files, commands
and the control token, so they are encrypted by default.

With no certificate of the operator's (`--tls-cert/--tls-key`), the agent makes a self-signed
one once (ECDSA P-256, in `<data-dir>/tls/`) and sends it with its registration; the control
plane then trusts exactly that certificate for this host (pinned: no CA, no hostname to match,
so an address that changes keeps working). A certificate from the operator's CA is sent and
pinned the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wrenn_host.durable import write_durable

CERT_NAME, KEY_NAME = "agent.crt", "agent.key"
VALID_DAYS = 3650


def self_signed(data_dir: Path, names: list[str]) -> tuple[Path, Path]:
    """`<data-dir>/tls/agent.{crt,key}`, made on first use and kept (the control plane pins it)."""
    tls_dir = data_dir / "tls"
    cert_path, key_path = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"wrenn host agent {socket.gethostname()}"[:64])])
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    write_durable(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    write_durable(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def fingerprint(pem: str) -> str:
    """SHA-256 of the certificate (DER), hex: what a registration remembers it by."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf_pem(pem))).hexdigest()


def leaf_pem(pem: str) -> str:
    """The first certificate of a PEM bundle (a CA-issued file may hold its chain after it)."""
    end = "-----END CERTIFICATE-----"
    head, sep, _ = pem.partition(end)
    if not sep or "-----BEGIN CERTIFICATE-----" not in head:
        raise ValueError("not a PEM certificate")
    return head[head.index("-----BEGIN CERTIFICATE-----"):] + end + "\n"


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context that trusts this one certificate and nothing else."""
    ctx = ssl.create_default_context(cadata=leaf_pem(cert_pem))
    ctx.check_hostname = False  # the pin is the identity; the address may be an IP that moves
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a CA-issued leaf is trusted by itself
    return ctx

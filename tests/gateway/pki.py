"""A test CA and ECDSA P-256 certificates for gateways, made with `cryptography`
(the same library the description uses to read them), and gateway.toml writers.

`make_pki(directory, names)` writes ca.pem, ca.key and, per name, <name>.pem and
<name>.key (mode 0600) with subjectAltName DNS:<name>.example.org.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
END = datetime.datetime(2036, 1, 1, tzinfo=datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_ca(
    directory: Path, name: str = "ca"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Rampart test"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Rampart test {name}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(END)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / f"{name}.key", key)
    return cert, key


def make_host(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    fqdn = f"{name}.example.org"
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Rampart test"),
                    x509.NameAttribute(NameOID.COMMON_NAME, fqdn),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(END)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / f"{name}.key", key)


def make_pki(directory: Path, names: tuple[str, ...] = ("gw-a", "gw-b")) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    for name in names:
        make_host(directory, name, ca)
    return directory


def gateway_toml(
    name: str = "gw-a",
    peer: str = "gw-b",
    *,
    public_interface: str = "eth0",
    public_address: str = "192.0.2.1",
    peer_address: str = "192.0.2.2",
    namespace: str = "ipsec",
    local: str = "10.1.0.0/24",
    remote: str = "10.2.0.0/24",
    tunnel_address: str = "10.1.0.1",
    user: str = "strongswan",
    extra: str = "",
) -> str:
    """A complete, valid description of `name` facing `peer`; `extra` is appended."""
    return f"""\
name = "{name}"

[identity]
id = "{name}.example.org"
certificate = "{name}.pem"
ca = "ca.pem"

[public]
interface = "{public_interface}"
addresses = ["{public_address}"]
ping = true

[[public.allow]]
direction = "out"
protocol = "udp"
port = 53
user = "rampart-fetch"

[tunnel]
namespace = "{namespace}"
address = "{tunnel_address}"

[[tunnel.allow]]
direction = "in"
protocol = "tcp"
port = 7000

[[tunnel.allow]]
direction = "out"
protocol = "tcp"
port = 7000
user = "root"

[strongswan]
user = "{user}"

[[peer]]
name = "{peer}"
address = "{peer_address}"
id = "{peer}.example.org"
local_subnets = ["{local}"]
remote_subnets = ["{remote}"]
{extra}"""

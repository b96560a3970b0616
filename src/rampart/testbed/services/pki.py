"""A test PKI made with `cryptography`: ECDSA P-256 certificate authorities and the
certificates they sign, as PEM files (keys unencrypted, mode 0600).

    ca = make_ca(directory, "rootca")                       # rootca.pem, rootca.key
    server = make_cert(directory, "server", ca, ["localhost", "127.0.0.1"])
    pki = make_pki(directory)   # the tests' set: a CA, its server, a wrong host, another CA

A certificate is valid from a day ago for `days` days unless `valid` gives both ends.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Validity = tuple[datetime.datetime, datetime.datetime]
# What a certificate is for: a TLS server; a peer (server and client: an IPsec
# gateway); a signer of bundles (no extended key usage, digitalSignature only).
Usage = Literal["server", "peer", "signer"]


@dataclass(frozen=True)
class Cert:
    """A certificate and its private key, PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority(Cert):
    """A certificate authority: its files, and what it signs with."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Pki:
    """The tests' PKI (`make_pki`)."""

    ca: Authority
    server: Cert  # localhost, 127.0.0.1
    wrong_host: Cert  # signed by the CA, for another name (update.example.org)
    other_ca: Authority
    other_server: Cert  # localhost, signed by the other CA


def validity(days: int = 30) -> Validity:
    """From a day ago (clocks differ) to `days` days from now."""
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The key as unencrypted PKCS#8 PEM, mode 0600 from its creation."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)


def _name(common_name: str, organization: str | None) -> x509.Name:
    attributes = []
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Cert:
    out = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(out.key, key)
    return out


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    directory: Path,
    name: str = "ca",
    *,
    common_name: str | None = None,
    organization: str | None = None,
    valid: Validity | None = None,
) -> Authority:
    """A self-signed CA (path length 0, keyCertSign and cRLSign) as NAME.pem and
    NAME.key in `directory` (made if missing); its subject CN is `common_name` (NAME)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name or name, organization)
    start, end = valid or validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = _write(directory, name, cert, key)
    return Authority(files.cert, files.key, cert, key)


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_cert(
    directory: Path,
    name: str,
    ca: Authority,
    hosts: Sequence[str] = (),
    *,
    usage: Usage = "server",
    common_name: str | None = None,
    organization: str | None = None,
    valid: Validity | None = None,
) -> Cert:
    """A certificate signed by `ca` as NAME.pem and NAME.key in `directory`: for the
    `hosts` (DNS names or IP addresses, its subjectAltName; the first is its CN unless
    `common_name` is given) and the `usage`."""
    if not hosts and (usage != "signer" or common_name is None):
        raise ValueError(f"{name}: a {usage} certificate needs a host (or a signer a name)")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = valid or validity()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or hosts[0], organization))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    if hosts:
        alt_names = x509.SubjectAlternativeName([_alt_name(h) for h in hosts])
        builder = builder.add_extension(alt_names, critical=False)
    if usage == "signer":
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()),
                critical=False,
            )
        )
    else:
        purposes = [ExtendedKeyUsageOID.SERVER_AUTH]
        if usage == "peer":
            purposes.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    return _write(directory, name, builder.sign(ca.private_key, hashes.SHA256()), key)


def make_pki(directory: Path) -> Pki:
    """The tests' PKI in `directory`: rootca, its `server` (localhost, 127.0.0.1) and
    `wrong` (update.example.org) certificates; otherca and its `other-server`
    (localhost)."""
    ca = make_ca(directory, "rootca")
    other = make_ca(directory, "otherca")
    return Pki(
        ca=ca,
        server=make_cert(directory, "server", ca, ["localhost", "127.0.0.1"]),
        wrong_host=make_cert(directory, "wrong", ca, ["update.example.org"]),
        other_ca=other,
        other_server=make_cert(directory, "other-server", other, ["localhost"]),
    )

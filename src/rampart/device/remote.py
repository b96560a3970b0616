"""`rampart remote show|set`: the remote configuration an administrator owns, in the
remote directory (/etc/rampart, on the state partition): remote.toml (the update
server's addresses and the channel) and rootca.pem (the only CA the client trusts
for HTTPS). docs/client.md "The remote configuration"; the admin role runs `set`
through sudo (docs/hardening.md "Roles").

`set` checks the whole new configuration as `rampart update` will read it (HTTPS
URLs without credentials, a channel name, a CA certificate) before it writes
anything; then each file is replaced whole (written aside, fsynced, renamed), the CA
first. A refused change leaves both files as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rampart import files
from rampart.device import config as device_config
from rampart.errors import FormatError, LocalError, UsageError

log = logging.getLogger(__name__)

KEYS = ("update_url", "dist_url", "tuf_url", "channel")  # what `set` may change
REMOTE_FILE = "remote.toml"
ROOT_CA_FILE = "rootca.pem"
MAX_CA_BYTES = 1 << 20
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)


def show(remote_dir: Path) -> dict[str, Any]:
    """The configuration as `rampart update` reads it, and its CA's certificates."""
    remote = device_config.load_remote_config(remote_dir)
    pem = files.read_small(remote.root_ca, "root CA", MAX_CA_BYTES)
    return {
        "update_url": remote.update_url,
        "dist_url": remote.dist_url,
        "tuf_url": remote.tuf_url,
        "channel": remote.channel,
        "root_ca": [_describe(cert) for cert in check_root_ca(pem, str(remote.root_ca))],
    }


def check_root_ca(pem: bytes, where: str) -> list[x509.Certificate]:
    """The certificates of a pinned root CA file: PEM, at least one, each a CA.
    FormatError otherwise."""
    # One block at a time: load_pem_x509_certificates came with cryptography 39, and
    # a Core has Debian 12's 38.
    blocks = _PEM_CERTIFICATE.findall(pem)
    try:
        certs = [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError:
        certs = []
    if not certs:
        raise FormatError(f"{where}: not PEM X.509 certificates")
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise FormatError(f"{where}: {cert.subject.rfc4514_string()} is not a CA certificate")
    return certs


def set_remote(
    remote_dir: Path, changes: Mapping[str, str], root_ca: bytes | None = None
) -> dict[str, Any]:
    """Apply `changes` (keys of KEYS) and, when given, the new root CA; return
    {"changed": [key...], "before": show(), "after": show()}. Nothing is written
    unless the whole result is valid."""
    unknown = set(changes) - set(KEYS)
    if unknown:
        raise UsageError(f"remote set: cannot set {sorted(unknown)[0]!r}")
    if not changes and root_ca is None:
        raise UsageError("remote set: nothing to change (give a URL, --channel or --root-ca)")
    before = show(remote_dir)
    doc = _current(remote_dir / REMOTE_FILE)
    doc.update(changes)
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in sorted(doc.items()))
    ca = root_ca if root_ca is not None else (remote_dir / ROOT_CA_FILE).read_bytes()
    if root_ca is not None:
        if len(root_ca) > MAX_CA_BYTES:
            raise FormatError(f"the new root CA is larger than {MAX_CA_BYTES} bytes")
        check_root_ca(root_ca, "the new root CA")
    # Checked as `rampart update` will read it, in a directory of its own.
    with tempfile.TemporaryDirectory(prefix=".remote-set-", dir=remote_dir) as scratch:
        trial = Path(scratch)
        (trial / REMOTE_FILE).write_text(text, encoding="utf-8")
        (trial / ROOT_CA_FILE).write_bytes(ca)
        device_config.load_remote_config(trial)
    try:
        if root_ca is not None:
            files.replace_whole(remote_dir / ROOT_CA_FILE, root_ca, 0o644)
        files.replace_whole(remote_dir / REMOTE_FILE, text.encode("utf-8"), 0o644)
    except OSError as exc:
        raise LocalError(f"{remote_dir}: cannot write the remote configuration: {exc}") from None
    after = show(remote_dir)
    changed = [key for key in KEYS if before[key] != after[key]]
    if before["root_ca"] != after["root_ca"]:
        changed.append("root_ca")
    for key in changed:
        log.info("remote: %s changed: %s -> %s", key, before[key], after[key])
    return {"changed": changed, "before": before, "after": after}


def _current(path: Path) -> dict[str, str]:
    """remote.toml's keys (the update reads it the same way); only strings."""
    data = files.read_small(path, "configuration file", 1 << 20)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: invalid TOML: {exc}") from None
    for key, value in doc.items():
        if not isinstance(value, str):
            raise FormatError(f"{path}: {key} is not a string: `remote set` keeps only strings")
    return dict(doc)


def not_after(cert: x509.Certificate) -> datetime:
    """The end of the certificate's validity, in UTC. not_valid_after_utc came with
    cryptography 42; a Core has Debian 12's 38, whose not_valid_after is naive UTC."""
    aware = getattr(cert, "not_valid_after_utc", None)
    if isinstance(aware, datetime):
        return aware
    return cert.not_valid_after.replace(tzinfo=UTC)


def _describe(cert: x509.Certificate) -> dict[str, str]:
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "subject": cert.subject.rfc4514_string(),
        "sha256": hashlib.sha256(der).hexdigest(),
        "not_after": not_after(cert).isoformat(),
    }

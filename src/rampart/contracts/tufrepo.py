"""Writing a TUF repository's metadata (python-tuf's Metadata API), for the two sides
that sign it: the vendor's offline ceremonies (`release/tufrepo.py`: root, targets)
and the server's online keys (`server/signer.py`: the channel heads, the snapshot and
the timestamp). The layout is `contracts/tuf.py`'s.

Every file is written under a temporary name, fsynced and renamed in place, so a
reader sees the old file or the new one. Metadata uses consistent snapshots:
`<N>.<role>.json` for every role but the timestamp.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from rampart import files
from rampart.contracts import tuf
from rampart.errors import FormatError, LocalError

Signers = Mapping[str, Sequence[Signer]]  # the signers at hand, by role

TOP_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
DEFAULT_EXPIRY = {
    Root.type: datetime.timedelta(days=365),
    Targets.type: datetime.timedelta(days=365),
    tuf.CHANNELS_ROLE: datetime.timedelta(days=7),
    Snapshot.type: datetime.timedelta(days=7),
    Timestamp.type: datetime.timedelta(days=1),
}
SERIALIZER = JSONSerializer(compact=False)
PASSWORD_ENV = "RAMPART_TUF_PASSWORD"  # noqa: S105 - the name of a variable: a key file's password, for scripts and services


def load_signer(path: Path, password: bytes | None) -> CryptoSigner:
    """The signer of a key file `release.tufrepo.generate_key` wrote; LocalError if the
    file cannot be read or the password is wrong, FormatError if it is not Ed25519."""
    pem = files.read_small(path, "TUF key", 64 << 10)
    try:
        private = serialization.load_pem_private_key(pem, password or None)
    except (TypeError, ValueError) as exc:
        raise LocalError(f"{path}: cannot open the TUF key ({exc})") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise FormatError(f"{path}: not an Ed25519 key")
    return CryptoSigner(private)


def read_password(path: Path | None) -> bytes | None:
    """A key file's password: the first line of `path` (a file only its owner may
    read), else the environment's RAMPART_TUF_PASSWORD, else None (unencrypted)."""
    if path is not None:
        if path.stat().st_mode & 0o077:
            raise LocalError(f"{path}: a password file must be readable by its owner only (0600)")
        return files.read_small(path, "password file", 4096).splitlines()[0]
    value = os.environ.get(PASSWORD_ENV)
    return value.encode() if value else None


def metadata_dir(webroot: Path) -> Path:
    return webroot / tuf.METADATA_DIR


def expiry(
    role: str, now: datetime.datetime | None = None, lifetime: datetime.timedelta | None = None
) -> datetime.datetime:
    start = now or datetime.datetime.now(datetime.UTC)
    return (start + (lifetime or DEFAULT_EXPIRY[role])).replace(microsecond=0)


def file_name(md: Metadata[Any], role: str | None = None) -> str:
    """`timestamp.json`, or `<version>.<role>.json` (`role`: a delegated role's name)."""
    role = role or md.signed.type
    if role == Timestamp.type:
        return "timestamp.json"
    return f"{md.signed.version}.{role}.json"


def write(directory: Path, md: Metadata[Any], role: str | None = None) -> Path:
    """Write `md` under its file name, through a temporary name renamed in place."""
    name = file_name(md, role)
    path = directory / name
    tmp = directory / f".{name}.tmp"
    md.to_file(str(tmp), SERIALIZER)
    files.fsync_file(tmp)
    tmp.replace(path)
    files.fsync_dir(directory)
    return path


def write_target_file(webroot: Path, target: str, data: bytes) -> TargetFile:
    """Write a small target (a channel head) below the webroot, durably; its TargetFile."""
    path = webroot / target
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    files.fsync_file(tmp)
    tmp.replace(path)
    files.fsync_dir(path.parent)
    return TargetFile.from_data(target, data, list(tuf.HASHES))


def sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    """Replace `md`'s signatures with those of `signers`."""
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


def versions(directory: Path, role: str) -> list[int]:
    """The versions of `role` in `directory`, ascending."""
    found = []
    for path in directory.glob(f"*.{role}.json"):
        number, _, rest = path.name.partition(".")
        if number.isdigit() and rest == f"{role}.json":
            found.append(int(number))
    return sorted(found)


def latest(directory: Path, role: str) -> Metadata[Any]:
    """The newest `<N>.<role>.json` in `directory` (LocalError if there is none)."""
    found = versions(directory, role)
    if not found:
        raise LocalError(f"{directory}: no {role} metadata (create the repository first)")
    return Metadata.from_file(str(directory / f"{found[-1]}.{role}.json"))


def delegated_roles(directory: Path) -> list[str]:
    """The roles the latest targets metadata delegates to."""
    targets: Metadata[Targets] = latest(directory, Targets.type)
    delegations = targets.signed.delegations
    if delegations is None or delegations.roles is None:
        return []
    return list(delegations.roles)


def publish_snapshot(webroot: Path, signers: Signers) -> Snapshot:
    """A new snapshot naming the latest version of targets and of every delegated role,
    then a new timestamp naming it (the `snapshot` and `timestamp` signers)."""
    directory = metadata_dir(webroot)
    found = versions(directory, Snapshot.type)
    meta = {}
    for role in (Targets.type, *delegated_roles(directory)):
        role_versions = versions(directory, role)
        if role_versions:
            meta[f"{role}.json"] = MetaFile(version=role_versions[-1])
    snapshot = Snapshot(
        version=found[-1] + 1 if found else 1, expires=expiry(Snapshot.type), meta=meta
    )
    md = Metadata(snapshot)
    sign(md, signers[Snapshot.type])
    write(directory, md)
    refresh_timestamp(webroot, signers, snapshot_version=snapshot.version)
    return snapshot


def refresh_timestamp(
    webroot: Path,
    signers: Signers,
    snapshot_version: int | None = None,
    lifetime: datetime.timedelta | None = None,
) -> Timestamp:
    """Re-sign the timestamp (a new version and expiry), naming the latest snapshot:
    what `rampart serve` does before the timestamp expires."""
    directory = metadata_dir(webroot)
    if snapshot_version is None:
        snapshot_version = latest(directory, Snapshot.type).signed.version
    path = directory / "timestamp.json"
    version = Metadata[Timestamp].from_file(str(path)).signed.version + 1 if path.exists() else 1
    timestamp = Timestamp(
        version=version,
        expires=expiry(Timestamp.type, lifetime=lifetime),
        snapshot_meta=MetaFile(version=snapshot_version),
    )
    md = Metadata(timestamp)
    sign(md, signers[Timestamp.type])
    write(directory, md)
    return timestamp


def channel_heads(webroot: Path) -> dict[str, tuf.ChannelHead]:
    """The channel heads the latest channels metadata signs, by target path."""
    md: Metadata[Targets] = latest(metadata_dir(webroot), tuf.CHANNELS_ROLE)
    return {
        path: tuf.ChannelHead.from_custom(target.custom, path)
        for path, target in md.signed.targets.items()
    }


def sign_channels(
    webroot: Path, heads: Iterable[tuf.ChannelHead], signers: Signers
) -> Targets | None:
    """Sign `heads` as the channels role's targets (their files written below the
    webroot), then a new snapshot and timestamp; None, with nothing written, if the
    latest channels metadata already says exactly that."""
    directory = metadata_dir(webroot)
    wanted = {tuf.channel_target(head.os, head.channel): head for head in heads}
    md: Metadata[Targets] = latest(directory, tuf.CHANNELS_ROLE)
    current = {
        path: tuf.ChannelHead.from_custom(target.custom, path)
        for path, target in md.signed.targets.items()
    }
    if current == wanted:
        return None
    md.signed.targets = {}
    for path, head in sorted(wanted.items()):
        target = write_target_file(webroot, path, head.document())
        target.unrecognized_fields["custom"] = head.to_custom()
        md.signed.targets[path] = target
    md.signed.version += 1
    md.signed.expires = expiry(tuf.CHANNELS_ROLE)
    sign(md, signers[tuf.CHANNELS_ROLE])
    write(directory, md, tuf.CHANNELS_ROLE)
    publish_snapshot(webroot, signers)
    return md.signed

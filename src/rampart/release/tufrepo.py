"""The TUF repository beside a CLIP OS webroot (The Update Framework 1.0, written with
python-tuf's Metadata API): its targets are the webroot's own `dist/` files, so the
minisign `.sig` files and the CLIP OS wire format stay as they are.

    <webroot>/tuf/1.root.json, 2.root.json ...   root, versioned (rotation)
    <webroot>/tuf/<N>.targets.json               what was released (consistent snapshots)
    <webroot>/tuf/<N>.snapshot.json              the versions of every targets file
    <webroot>/tuf/timestamp.json                 the snapshot's version, short-lived

Each target is a release payload, `dist/<V>/<os>-<kind>`, with custom fields that
bind what the minisign signature does not: the OS, the kind, the version, the
security epoch, and for a Core the verity root hash and offsets its UKI pins. A
device checks them against what it is about to install, so a validly signed payload
cannot be moved to another OS, relabelled as another kind or version, or paired
with a Core of another build.

Metadata uses consistent snapshots (versioned file names); the targets do not get
hash-prefixed copies: a client reads them under their own names (python-tuf's
`UpdaterConfig(prefix_targets_with_hash=False)`), so a webroot holds each payload
once and the CLIP OS layout is unchanged.

Roles: root (a k-of-n threshold of offline keys), targets (the release keys,
offline), snapshot and timestamp (online keys, held by the server). Keys are
Ed25519, their private halves PEM files encrypted with a password, mode 0600,
never overwritten.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
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
from rampart.contracts import cmdline, pe, wire
from rampart.contracts.version import Version
from rampart.errors import ConflictError, FormatError, LocalError, UsageError

TOP_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
DEFAULT_EXPIRY = {
    Root.type: datetime.timedelta(days=365),
    Targets.type: datetime.timedelta(days=365),
    Snapshot.type: datetime.timedelta(days=7),
    Timestamp.type: datetime.timedelta(days=1),
}
CUSTOM = "rampart"  # the key of Rampart's fields in a target's `custom`
_SERIALIZER = JSONSerializer(compact=False)


# --- keys ----------------------------------------------------------------------------


def generate_key(path: Path, password: bytes | None) -> SSlibKey:
    """A new Ed25519 key: the private half written to `path` (PEM, encrypted with
    `password` unless None, mode 0600, never overwriting); its public key returned."""
    private = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    files.write_new_file(path, pem, 0o600)
    return SSlibKey.from_crypto(private.public_key())


def load_signer(path: Path, password: bytes | None) -> CryptoSigner:
    """The signer of a key file `generate_key` wrote; LocalError if the file cannot be
    read or the password is wrong, FormatError if it is not an Ed25519 key."""
    pem = files.read_small(path, "TUF key", 64 << 10)
    try:
        private = serialization.load_pem_private_key(pem, password or None)
    except (TypeError, ValueError) as exc:
        raise LocalError(f"{path}: cannot open the TUF key ({exc})") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise FormatError(f"{path}: not an Ed25519 key")
    return CryptoSigner(private)


# --- the repository ------------------------------------------------------------------


def metadata_dir(webroot: Path) -> Path:
    return webroot / "tuf"


def _expiry(role: str, now: datetime.datetime | None = None) -> datetime.datetime:
    start = now or datetime.datetime.now(datetime.UTC)
    return (start + DEFAULT_EXPIRY[role]).replace(microsecond=0)


def _write(directory: Path, md: Metadata[Any], name: str) -> Path:
    """Write `md` as `name` under a temporary name and rename it in place, durably."""
    path = directory / name
    tmp = directory / f".{name}.tmp"
    md.to_file(str(tmp), _SERIALIZER)
    files.fsync_file(tmp)
    tmp.replace(path)
    files.fsync_dir(directory)
    return path


def _file_name(md: Metadata[Any]) -> str:
    role = md.signed.type
    if role == Timestamp.type:
        return "timestamp.json"
    return f"{md.signed.version}.{role}.json"


@dataclass(frozen=True)
class Keys:
    """The public keys of each top-level role, and the root threshold."""

    root: Sequence[SSlibKey]
    targets: Sequence[SSlibKey]
    snapshot: Sequence[SSlibKey]
    timestamp: Sequence[SSlibKey]
    root_threshold: int = 1


def create(
    webroot: Path,
    keys: Keys,
    root_signers: Sequence[Signer],
    targets_signers: Sequence[Signer],
    online_signers: Sequence[Signer],
) -> None:
    """A new, empty repository in `webroot`/tuf: root version 1 (signed by
    `root_signers`, at least its threshold), an empty targets role, a snapshot and a
    timestamp (signed by `online_signers`: the snapshot and timestamp keys).
    ConflictError if the webroot already has one."""
    directory = metadata_dir(webroot)
    if (directory / "1.root.json").exists():
        raise ConflictError(f"{directory}: a TUF repository is already there")
    if not 1 <= keys.root_threshold <= len(keys.root):
        raise UsageError(
            f"root threshold {keys.root_threshold} must be from 1 to the {len(keys.root)} root keys"
        )
    directory.mkdir(parents=True, exist_ok=True)
    root = Root(expires=_expiry(Root.type), consistent_snapshot=True)
    for role, role_keys in (
        (Root.type, keys.root),
        (Targets.type, keys.targets),
        (Snapshot.type, keys.snapshot),
        (Timestamp.type, keys.timestamp),
    ):
        for key in role_keys:
            root.add_key(key, role)
    root.roles[Root.type].threshold = keys.root_threshold
    root_md = Metadata(root)
    _sign(root_md, root_signers)
    _write(directory, root_md, "1.root.json")
    targets_md = Metadata(Targets(expires=_expiry(Targets.type)))
    _sign(targets_md, targets_signers)
    _write(directory, targets_md, _file_name(targets_md))
    _publish_snapshot(directory, targets_md.signed.version, online_signers)


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


def _latest(directory: Path, role: str) -> Metadata[Any]:
    versions = sorted(
        int(p.name.split(".", 1)[0])
        for p in directory.glob(f"*.{role}.json")
        if p.name.split(".", 1)[0].isdigit()
    )
    if not versions:
        raise LocalError(f"{directory}: no {role} metadata (create the repository first)")
    return Metadata.from_file(str(directory / f"{versions[-1]}.{role}.json"))


def _publish_snapshot(
    directory: Path, targets_version: int, online_signers: Sequence[Signer]
) -> None:
    """A new snapshot naming `targets_version`, then a new timestamp naming it."""
    try:
        previous = _latest(directory, Snapshot.type)
        version = previous.signed.version + 1
    except LocalError:
        version = 1
    snapshot = Snapshot(
        version=version,
        expires=_expiry(Snapshot.type),
        meta={"targets.json": MetaFile(version=targets_version)},
    )
    snapshot_md = Metadata(snapshot)
    _sign(snapshot_md, online_signers)
    _write(directory, snapshot_md, _file_name(snapshot_md))
    refresh_timestamp(directory.parent, online_signers, snapshot_version=version)


def refresh_timestamp(
    webroot: Path, online_signers: Sequence[Signer], snapshot_version: int | None = None
) -> Timestamp:
    """Re-sign the timestamp (a new version and expiry), naming the latest snapshot:
    what `rampart serve` does before the timestamp expires."""
    directory = metadata_dir(webroot)
    if snapshot_version is None:
        snapshot_version = _latest(directory, Snapshot.type).signed.version
    path = directory / "timestamp.json"
    version = Metadata[Timestamp].from_file(str(path)).signed.version + 1 if path.exists() else 1
    timestamp = Timestamp(
        version=version,
        expires=_expiry(Timestamp.type),
        snapshot_meta=MetaFile(version=snapshot_version),
    )
    md = Metadata(timestamp)
    _sign(md, online_signers)
    _write(directory, md, "timestamp.json")
    return timestamp


# --- releases ------------------------------------------------------------------------


def target_path(os_name: str, version: Version, kind: str) -> str:
    """A payload's target path: its path below the webroot (`dist/<V>/<os>-<kind>`)."""
    return f"{wire.release_path(version)}/{wire.payload_name(os_name, kind)}"


def payload_fields(
    os_name: str, version: Version, kind: str, line: str, source: str
) -> dict[str, Any]:
    """What a target binds beyond its bytes: OS, kind, version, the security epoch of the
    release's UKI, and for a Core the verity parameters it pins (`line`: the UKI's
    command line, `source` its name for errors)."""
    fields: dict[str, Any] = {
        "os": os_name,
        "kind": kind,
        "version": version.core,
        "epoch": cmdline.cmdline_epoch(line, source),
    }
    root = cmdline.root_hash(line, source) if kind == "core" else None
    if root is not None:
        fields["verity"] = {
            "root_hash": root.root_hash,
            "hash_offset": root.hash_offset,
            "data_blocks": root.data_blocks,
        }
    return fields


def add_release(
    webroot: Path,
    os_name: str,
    version: Version,
    targets_signers: Sequence[Signer],
    online_signers: Sequence[Signer],
) -> Targets:
    """Add the published release `version` of `os_name` (its `dist/` payloads) to the
    targets role, with their custom fields; sign a new targets version with the release
    keys, then a new snapshot and timestamp with the online keys."""
    directory = metadata_dir(webroot)
    targets_md: Metadata[Targets] = _latest(directory, Targets.type)
    release = wire.release_dir(webroot, version)
    uki = release / wire.payload_name(os_name, "efiboot")
    line = pe.cmdline(files.read_small(uki, "UKI", 1 << 30), uki.name) or ""
    for kind in wire.PAYLOADS:
        path = target_path(os_name, version, kind)
        payload = webroot / path
        if not payload.is_file():
            raise LocalError(f"{payload}: not published (run `rampart publish` first)")
        if path in targets_md.signed.targets:
            raise ConflictError(f"{path}: already a target; a release never changes")
        target = TargetFile.from_file(path, str(payload), ["sha256"])
        target.unrecognized_fields["custom"] = {
            CUSTOM: payload_fields(os_name, version, kind, line, uki.name)
        }
        targets_md.signed.targets[path] = target
    targets_md.signed.version += 1
    targets_md.signed.expires = _expiry(Targets.type)
    _sign(targets_md, targets_signers)
    _write(directory, targets_md, _file_name(targets_md))
    _publish_snapshot(directory, targets_md.signed.version, online_signers)
    return targets_md.signed

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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from rampart import files
from rampart.contracts import cmdline, pe, tuf, wire
from rampart.contracts.tufrepo import (
    Signers,
    expiry,
    latest,
    load_signer,
    metadata_dir,
    publish_snapshot,
    refresh_timestamp,
    sign,
    write,
)
from rampart.contracts.version import Version
from rampart.errors import ConflictError, LocalError, UsageError

__all__ = [
    "Keys",
    "Signers",
    "add_release",
    "create",
    "generate_key",
    "load_signer",
    "metadata_dir",
    "payload_fields",
    "refresh_timestamp",
]


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


# --- the repository ------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """The public keys of each role, and the root threshold. `channels`: the online
    key(s) of the delegated channels role (none: no channels role)."""

    root: Sequence[SSlibKey]
    targets: Sequence[SSlibKey]
    snapshot: Sequence[SSlibKey]
    timestamp: Sequence[SSlibKey]
    root_threshold: int = 1
    channels: Sequence[SSlibKey] = ()


def create(webroot: Path, keys: Keys, signers: Signers) -> None:
    """A new, empty repository in `webroot`/tuf: root version 1 (signed by the `root`
    signers, at least its threshold), targets version 1 delegating `heads/*/*` to the
    channels keys (when there are any), an empty channels role, a snapshot and a
    timestamp. ConflictError if the webroot already has one."""
    directory = metadata_dir(webroot)
    if (directory / "1.root.json").exists():
        raise ConflictError(f"{directory}: a TUF repository is already there")
    if not 1 <= keys.root_threshold <= len(keys.root):
        raise UsageError(
            f"root threshold {keys.root_threshold} must be from 1 to the {len(keys.root)} root keys"
        )
    directory.mkdir(parents=True, exist_ok=True)
    root = Root(expires=expiry(Root.type), consistent_snapshot=True)
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
    sign(root_md, signers[Root.type])
    write(directory, root_md)
    targets = Targets(expires=expiry(Targets.type))
    if keys.channels:
        targets.delegations = Delegations(
            keys={key.keyid: key for key in keys.channels},
            roles={
                tuf.CHANNELS_ROLE: DelegatedRole(
                    name=tuf.CHANNELS_ROLE,
                    keyids=[key.keyid for key in keys.channels],
                    threshold=1,
                    terminating=True,
                    paths=[tuf.CHANNEL_PATTERN],
                )
            },
        )
        channels_md = Metadata(Targets(expires=expiry(tuf.CHANNELS_ROLE)))
        sign(channels_md, signers[tuf.CHANNELS_ROLE])
        write(directory, channels_md, tuf.CHANNELS_ROLE)
    targets_md = Metadata(targets)
    sign(targets_md, signers[Targets.type])
    write(directory, targets_md)
    publish_snapshot(webroot, signers)


# --- releases ------------------------------------------------------------------------


def payload_fields(
    os_name: str, version: Version, kind: str, line: str, source: str
) -> tuf.PayloadFields:
    """What a target binds beyond its bytes: OS, kind, version, the security epoch of the
    release's UKI, and for a Core the verity parameters it pins (`line`: the UKI's
    command line, `source` its name for errors)."""
    root = cmdline.root_hash(line, source) if kind == "core" else None
    return tuf.PayloadFields(
        os_name,
        kind,
        version.core,
        cmdline.cmdline_epoch(line, source),
        root.root_hash if root else None,
        root.hash_offset if root else None,
        root.data_blocks if root else None,
    )


def add_release(webroot: Path, os_name: str, version: Version, signers: Signers) -> Targets:
    """Add the published release `version` of `os_name` (its `dist/` payloads) to the
    targets role, with their custom fields; sign a new targets version with the release
    keys, then a new snapshot and timestamp with the online keys."""
    directory = metadata_dir(webroot)
    targets_md: Metadata[Targets] = latest(directory, Targets.type)
    release = wire.release_dir(webroot, version)
    uki = release / wire.payload_name(os_name, "efiboot")
    line = pe.cmdline(files.read_small(uki, "UKI", 1 << 30), uki.name) or ""
    for kind in wire.PAYLOADS:
        path = tuf.payload_target(os_name, version, kind)
        payload = webroot / path
        if not payload.is_file():
            raise LocalError(f"{payload}: not published (run `rampart publish` first)")
        if path in targets_md.signed.targets:
            raise ConflictError(f"{path}: already a target; a release never changes")
        target = TargetFile.from_file(path, str(payload), list(tuf.HASHES))
        target.unrecognized_fields["custom"] = payload_fields(
            os_name, version, kind, line, uki.name
        ).to_custom()
        targets_md.signed.targets[path] = target
    targets_md.signed.version += 1
    targets_md.signed.expires = expiry(Targets.type)
    sign(targets_md, signers[Targets.type])
    write(directory, targets_md)
    publish_snapshot(webroot, signers)
    return targets_md.signed

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

Key ceremonies (`change_keys`, `rotate_root`) make a `Ceremony`: the next version of
root and, when the keys that signed it change, of targets. It is signed with the keys
at hand and kept in `<webroot>/tuf/staged/` until it meets every threshold (a new root
needs a threshold of the previous root's keys and of its own), then `publish` writes
it, re-signs whatever online metadata no longer verifies (channels, snapshot,
timestamp), and empties staged/. A crash in between leaves staged/ as it was, and
publishing it again finishes the job.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signer, SSlibKey
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
    OFFLINE_ROLES,
    Shortfall,
    Signers,
    assign,
    channel_heads,
    delegated_roles,
    expiry,
    incomplete,
    is_stale,
    latest,
    load_signer,
    locked,
    metadata_dir,
    publish_snapshot,
    read_metadata,
    refresh_timestamp,
    require,
    resign_channels,
    role_keys,
    roles_of,
    shortfall,
    sign,
    sign_snapshot,
    sign_timestamp,
    versions,
    write,
)
from rampart.contracts.version import Version, parse_version
from rampart.errors import (
    ConflictError,
    FormatError,
    LocalError,
    RemoteDataError,
    UsageError,
    VerificationError,
)

__all__ = [
    "Ceremony",
    "KeyFile",
    "Keys",
    "Signers",
    "add_release",
    "change_keys",
    "create",
    "discard",
    "generate_key",
    "load_signer",
    "locked",
    "metadata_dir",
    "payload_fields",
    "publish",
    "read_key",
    "refresh_timestamp",
    "rotate_root",
    "stage",
    "staged",
]

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type, tuf.CHANNELS_ROLE)
STAGED_DIR = "staged"
KEYID_PREFIX = 8  # the shortest keyid prefix accepted for a key
PUBLIC_PEM = b"-----BEGIN PUBLIC KEY-----"
PRIVATE_PEM = b"-----BEGIN PRIVATE KEY-----"
ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


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


def public_pem(key: SSlibKey) -> bytes:
    """The public key as a PEM file (SubjectPublicKeyInfo), to hand to a ceremony."""
    raw = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval["public"]))
    return raw.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class KeyFile:
    """A key file read: its public key, and its signer when it is a private key."""

    path: Path
    public: SSlibKey
    signer: Signer | None


def read_key(path: Path, password: Callable[[Path], bytes | None]) -> KeyFile:
    """A key file: a public key (PEM), or a private key `generate_key` wrote (encrypted:
    `password(path)` is asked for its password; private keys must be mode 0600).
    LocalError if it cannot be read or the password is wrong, FormatError if it is no
    Ed25519 PEM key."""
    pem = files.read_small(path, "TUF key", 64 << 10)
    if pem.lstrip().startswith(PUBLIC_PEM):
        try:
            public = serialization.load_pem_public_key(pem)
        except ValueError:
            raise FormatError(f"{path}: not a PEM public key") from None
        if not isinstance(public, Ed25519PublicKey):
            raise FormatError(f"{path}: not an Ed25519 key")
        return KeyFile(path, SSlibKey.from_crypto(public), None)
    encrypted = pem.lstrip().startswith(ENCRYPTED_PEM)
    if not encrypted and not pem.lstrip().startswith(PRIVATE_PEM):
        raise FormatError(f"{path}: not a PEM key (a TUF key file, or its .pub)")
    if path.stat().st_mode & 0o077:
        raise LocalError(f"{path}: a private key must be readable by its owner only (0600)")
    signer = load_signer(path, password(path) if encrypted else None)
    return KeyFile(path, signer.public_key, signer)


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
    timestamp. ConflictError if the webroot already has one; UsageError if a key is given
    twice to a role or is both an offline and an online key; IncompleteError if the
    signers do not meet a threshold. Nothing is written before these checks."""
    directory = metadata_dir(webroot)
    if (directory / "1.root.json").exists():
        raise ConflictError(f"{directory}: a TUF repository is already there")
    if not 1 <= keys.root_threshold <= len(keys.root):
        raise UsageError(
            f"root threshold {keys.root_threshold} must be from 1 to the {len(keys.root)} root keys"
        )
    root = Root(expires=expiry(Root.type), consistent_snapshot=True)
    for role, role_keys_ in (
        (Root.type, keys.root),
        (Targets.type, keys.targets),
        (Snapshot.type, keys.snapshot),
        (Timestamp.type, keys.timestamp),
    ):
        if len({key.keyid for key in role_keys_}) != len(role_keys_):
            raise UsageError(f"the same key is given twice for {role}")
        for key in role_keys_:
            root.add_key(key, role)
    root.roles[Root.type].threshold = keys.root_threshold
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
    check_separation(root, targets)
    require(root, targets, signers, roles_of(targets))
    directory.mkdir(parents=True, exist_ok=True)
    root_md = Metadata(root)
    sign(root_md, signers[Root.type])
    write(directory, root_md)
    if keys.channels:
        channels_md = Metadata(Targets(expires=expiry(tuf.CHANNELS_ROLE)))
        sign(channels_md, signers[tuf.CHANNELS_ROLE])
        write(directory, channels_md, tuf.CHANNELS_ROLE)
    targets_md = Metadata(targets)
    sign(targets_md, signers[Targets.type])
    write(directory, targets_md)
    publish_snapshot(webroot, signers)


def check_separation(root: Root, targets: Targets | None) -> None:
    """UsageError if a key signs both an offline role (root, targets) and an online one
    (snapshot, timestamp, channels): a server holding it would hold the other role too."""
    offline: set[str] = set()
    online: set[str] = set()
    for role in roles_of(targets):
        keyids, _ = role_keys(root, targets, role)
        (offline if role in OFFLINE_ROLES else online).update(keyids)
    both = sorted(offline & online)
    if both:
        raise UsageError(
            f"key {both[0][:16]} would sign both an offline role (root, targets) and an "
            "online one (snapshot, timestamp, channels); an online key must be its own"
        )


def signers_for(webroot: Path, pool: Iterable[Signer]) -> dict[str, list[Signer]]:
    """The signers of `pool` by the roles the repository's latest root and targets let
    them sign."""
    directory = metadata_dir(webroot)
    return assign(latest(directory, Root.type).signed, latest(directory, Targets.type).signed, pool)


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


def documents(release: Path, os_name: str) -> list[tuple[str, str]]:
    """The documents `rampart publish` wrote beside a release's payloads, as (file
    name, target kind): Core's chunk index, its deltas and the boot loader, each a
    target too (a TUF device checks them against their target, not a minisign
    signature)."""
    found = []
    if (release / wire.index_name(os_name)).is_file():
        found.append((wire.index_name(os_name), tuf.INDEX_KIND))
    prefix = f"{wire.payload_name(os_name, 'core')}.from-"
    for path in sorted(release.glob(f"{prefix}*{wire.DELTA_SUFFIX}")):
        if path.is_file():
            found.append((path.name, tuf.DELTA_KIND))
    if (release / wire.loader_name(os_name)).is_file():
        found.append((wire.loader_name(os_name), tuf.LOADER_KIND))
    for variable in wire.SBVARS:
        if (release / wire.sbvar_name(os_name, variable)).is_file():
            found.append((wire.sbvar_name(os_name, variable), tuf.SBVAR_KIND))
    return found


def check_release_signers(webroot: Path, signers: Signers) -> None:
    """What a release verb checks before `add_release` writes: ConflictError while a
    ceremony has a new targets version staged, IncompleteError unless the signers meet
    the thresholds of targets, snapshot and timestamp."""
    directory = metadata_dir(webroot)
    pending = staged(webroot)
    if pending is not None and pending.targets is not None:
        raise ConflictError(
            f"{staged_dir(webroot)}: a key ceremony has targets "
            f"{pending.targets.signed.version} staged; publish it (rampart tuf sign import) "
            "or discard it (rampart tuf sign discard) before adding a release"
        )
    root: Root = latest(directory, Root.type).signed
    targets: Targets = latest(directory, Targets.type).signed
    require(root, targets, signers, (Targets.type, Snapshot.type, Timestamp.type))


def add_release(webroot: Path, os_name: str, version: Version, signers: Signers) -> Targets:
    """Add the published release `version` of `os_name` (its `dist/` payloads, and the
    chunk index and deltas beside them: `documents`) to the targets role, with their
    custom fields; sign a new targets version with the release
    keys, then a new snapshot and timestamp with the online keys. It signs with the
    signers it is given, whoever they are (an attack test forges with it): the verbs
    call `check_release_signers` first."""
    directory = metadata_dir(webroot)
    targets_md: Metadata[Targets] = latest(directory, Targets.type)
    for kind in wire.PAYLOADS:
        payload = webroot / tuf.payload_target(os_name, version, kind)
        if not payload.is_file():
            raise LocalError(f"{payload}: not published (run `rampart publish` first)")
    release = wire.release_dir(webroot, version)
    uki = release / wire.payload_name(os_name, "efiboot")
    line = pe.cmdline(files.read_small(uki, "UKI", 1 << 30), uki.name) or ""
    added = [(tuf.payload_target(os_name, version, kind), kind) for kind in wire.PAYLOADS]
    added += [
        (tuf.document_target(version, name), kind) for name, kind in documents(release, os_name)
    ]
    for path, _ in added:
        if path in targets_md.signed.targets:
            raise ConflictError(f"{path}: already a target; a release never changes")
    for path, kind in added:
        with (webroot / path).open("rb") as handle:
            length, hashes = tuf.payload_hashes(handle.fileno())
        target = TargetFile(length, hashes, path)
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


def prune_releases(
    webroot: Path, os_name: str, keep: int, signers: Signers
) -> tuple[list[str], Targets | None]:
    """Remove from the targets role every release of `os_name` but the `keep` newest and
    those a signed channel head names (its version or its rollout's): the targets
    metadata a device fetches after each release stays bounded (about 1 kB a release).
    The payload files stay in the webroot. The versions removed, and the new targets
    (None, nothing written, when there is nothing to remove)."""
    if keep < 1:
        raise UsageError(f"--keep {keep}: keep at least the newest release")
    directory = metadata_dir(webroot)
    targets_md: Metadata[Targets] = latest(directory, Targets.type)
    versions: dict[str, list[str]] = {}
    for path, target in targets_md.signed.targets.items():
        try:
            fields = tuf.PayloadFields.from_custom(target.custom, path)
        except RemoteDataError:
            continue
        if fields.os == os_name:
            versions.setdefault(fields.version, []).append(path)
    named: set[str] = set()
    if tuf.CHANNELS_ROLE in delegated_roles(directory):
        for head in channel_heads(webroot).values():
            if head.os == os_name:
                named |= {v for v in (head.version, head.rollout_version) if v is not None}
    newest = sorted(versions, key=parse_version, reverse=True)[:keep]
    removed = sorted(set(versions) - set(newest) - named, key=parse_version)
    if not removed:
        return [], None
    for version in removed:
        for path in versions[version]:
            del targets_md.signed.targets[path]
    targets_md.signed.version += 1
    targets_md.signed.expires = expiry(Targets.type)
    sign(targets_md, signers[Targets.type])
    write(directory, targets_md)
    publish_snapshot(webroot, signers)
    return removed, targets_md.signed


# --- key ceremonies ------------------------------------------------------------------------


@dataclass
class Ceremony:
    """The next versions of the offline roles a ceremony changes, with the signatures
    collected so far: a new root, a new targets, or both (in that order)."""

    root: Metadata[Root] | None = None
    targets: Metadata[Targets] | None = None
    signed_by: list[str] = field(default_factory=list)  # the keyids that signed here

    def parts(self) -> list[Metadata[Any]]:
        return [md for md in (self.root, self.targets) if md is not None]

    def names(self) -> list[str]:
        return [f"{md.signed.version}.{md.signed.type}.json" for md in self.parts()]


def staged_dir(webroot: Path) -> Path:
    return metadata_dir(webroot) / STAGED_DIR


def staged(webroot: Path) -> Ceremony | None:
    """The ceremony staged in `<webroot>/tuf/staged/`, or None."""
    directory = staged_dir(webroot)
    if not directory.is_dir():
        return None
    ceremony = Ceremony()
    for path in sorted(directory.glob("*.json")):
        md = read_metadata(path)
        role = md.signed.type
        if role not in OFFLINE_ROLES or getattr(ceremony, role) is not None:
            raise FormatError(f"{path}: staged/ holds one root and one targets at most")
        if path.name != f"{md.signed.version}.{role}.json":
            raise FormatError(f"{path}: holds {role} {md.signed.version}, not what it is named")
        setattr(ceremony, role, md)
    return ceremony if ceremony.parts() else None


def stage(webroot: Path, ceremony: Ceremony) -> list[Path]:
    """Write the ceremony's metadata into staged/ (each file through a temporary name)."""
    directory = staged_dir(webroot)
    directory.mkdir(exist_ok=True)
    return [write(directory, md) for md in ceremony.parts()]


def discard(webroot: Path) -> list[str]:
    """Remove what staged/ holds; the names removed."""
    directory = staged_dir(webroot)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        path.unlink()
        removed.append(path.name)
    directory.rmdir()
    files.fsync_dir(directory.parent)
    return removed


def _nothing_staged(webroot: Path) -> None:
    pending = staged(webroot)
    if pending is not None:
        raise ConflictError(
            f"{staged_dir(webroot)}: a key ceremony is staged ({', '.join(pending.names())}); "
            "publish it (rampart tuf sign import) or discard it (rampart tuf sign discard) first"
        )


def _next(md: Metadata[Any], expires: datetime.datetime) -> Metadata[Any]:
    """A copy of `md` as its next version, unsigned, expiring at `expires`."""
    following: Metadata[Any] = Metadata.from_bytes(md.to_bytes())
    following.signed.version += 1
    following.signed.expires = expires
    following.signatures.clear()
    return following


def _edit(
    delegator: Root | Targets,
    role: str,
    add: Sequence[Key],
    revoke: Sequence[str],
    threshold: int | None,
) -> None:
    """Change the keys and threshold of `role` in `delegator` (root, or targets for a
    delegated role); UsageError or ConflictError for what cannot be done."""
    entry = delegator.get_delegated_role(role)
    for keyid in revoke:
        if keyid not in entry.keyids:
            raise UsageError(f"{keyid[:16]}: not a key of {role}")
        delegator.revoke_key(keyid, role)
    for key in add:
        if key.keyid in entry.keyids:
            raise ConflictError(f"{key.keyid[:16]}: already a key of {role}")
        delegator.add_key(key, role)
    if threshold is not None:
        entry.threshold = threshold
    if not 1 <= entry.threshold <= len(entry.keyids):
        raise UsageError(
            f"{role} would have {len(entry.keyids)} key(s) for a threshold of "
            f"{entry.threshold}: a role needs at least as many keys as its threshold"
        )


def resolve_keyid(webroot: Path, role: str, text: str) -> str:
    """The keyid of a key of `role` that `text` names: the keyid, or a prefix of at
    least 8 hex digits that only it has. UsageError otherwise."""
    directory = metadata_dir(webroot)
    keyids, _ = role_keys(
        latest(directory, Root.type).signed, latest(directory, Targets.type).signed, role
    )
    wanted = text.lower()
    if len(wanted) < KEYID_PREFIX or any(c not in "0123456789abcdef" for c in wanted):
        raise UsageError(f"{text[:80]!r}: not a keyid (at least {KEYID_PREFIX} hex digits)")
    found = [keyid for keyid in keyids if keyid.startswith(wanted)]
    if len(found) != 1:
        what = "no key" if not found else "more than one key"
        raise UsageError(f"{text}: {what} of {role} has this keyid")
    return found[0]


def change_keys(
    webroot: Path,
    role: str,
    add: Sequence[Key] = (),
    revoke: Sequence[str] = (),
    threshold: int | None = None,
    expires: datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
) -> Ceremony:
    """The ceremony that adds `add` to `role`, revokes the keyids `revoke` and sets its
    threshold: a new root for a top-level role's keys (expiring after `expires`), a new
    targets for the channels role's (delegated by targets). When the current targets
    would no longer verify, or carries a signature of a revoked key, the ceremony also
    re-signs it as a new version. Unsigned: see `sign_ceremony`."""
    if role not in ROLES:
        raise UsageError(f"{role!r}: not a role (one of {', '.join(ROLES)})")
    _nothing_staged(webroot)
    directory = metadata_dir(webroot)
    root_md: Metadata[Root] = latest(directory, Root.type)
    targets_md: Metadata[Targets] = latest(directory, Targets.type)
    if role == tuf.CHANNELS_ROLE:
        role_keys(root_md.signed, targets_md.signed, role)  # UsageError without channels
        targets = _next(targets_md, expiry(Targets.type, now))
        _edit(targets.signed, role, add, revoke, threshold)
        check_separation(root_md.signed, targets.signed)
        return Ceremony(targets=targets)
    root = _next(root_md, expiry(Root.type, now, expires))
    _edit(root.signed, role, add, revoke, threshold)
    check_separation(root.signed, targets_md.signed)
    ceremony = Ceremony(root=root)
    if is_stale(root.signed, Targets.type, targets_md):
        ceremony.targets = _next(targets_md, expiry(Targets.type, now))
    return ceremony


def rotate_root(
    webroot: Path,
    threshold: int | None = None,
    expires: datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
) -> Ceremony:
    """The ceremony of a new root version with the same keys: a new expiry (after
    `expires`), and a new root threshold when `threshold` is given."""
    return change_keys(webroot, Root.type, threshold=threshold, expires=expires, now=now)


def next_version(
    webroot: Path,
    role: str,
    expires: datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
) -> Ceremony:
    """The ceremony of the next version of an offline role, the same but for its expiry
    (to sign offline before it expires)."""
    if role == Root.type:
        return rotate_root(webroot, expires=expires, now=now)
    if role != Targets.type:
        raise UsageError(f"{role!r}: only root and targets are signed offline")
    _nothing_staged(webroot)
    targets_md: Metadata[Targets] = latest(metadata_dir(webroot), Targets.type)
    return Ceremony(targets=_next(targets_md, expiry(Targets.type, now, expires)))


def _previous_root(webroot: Path, md: Metadata[Root]) -> Root:
    """The root version a new root `md` follows."""
    path = metadata_dir(webroot) / f"{md.signed.version - 1}.root.json"
    previous: Root = read_metadata(path).signed
    return previous


def _final_root(webroot: Path, ceremony: Ceremony) -> Root:
    """The root once `ceremony` is published."""
    if ceremony.root is not None:
        return ceremony.root.signed
    root: Root = latest(metadata_dir(webroot), Root.type).signed
    return root


def _allowed(webroot: Path, ceremony: Ceremony, role: str) -> dict[str, Key]:
    """The keys whose signatures count on the ceremony's `role`: for a new root, those of
    the previous root's root role and of its own; for a new targets, the targets keys of
    the root it will be published under."""
    if role == Root.type and ceremony.root is not None:
        keys = {}
        for root in (_previous_root(webroot, ceremony.root), ceremony.root.signed):
            keys.update({keyid: root.keys[keyid] for keyid in root.roles[Root.type].keyids})
        return keys
    root = _final_root(webroot, ceremony)
    return {keyid: root.keys[keyid] for keyid in root.roles[Targets.type].keyids}


def sign_ceremony(webroot: Path, ceremony: Ceremony, pool: Iterable[Signer]) -> list[str]:
    """Sign the ceremony's metadata with every signer of `pool` whose signature counts on
    it; the keyids that signed (also added to `ceremony.signed_by`)."""
    signed = []
    pool = list(pool)
    for md in ceremony.parts():
        allowed = _allowed(webroot, ceremony, md.signed.type)
        for signer in pool:
            if signer.public_key.keyid in allowed:
                md.sign(signer, append=True)
                signed.append(signer.public_key.keyid)
    ceremony.signed_by = list(dict.fromkeys([*ceremony.signed_by, *signed]))
    return list(dict.fromkeys(signed))


def merge(
    webroot: Path, ceremony: Ceremony, md: Metadata[Any], source: str
) -> tuple[list[str], list[str]]:
    """Add the signatures of `md` (a copy of one of the ceremony's metadata, signed
    elsewhere) to the ceremony: the keyids merged, and those ignored (keys whose
    signature does not count on it). ConflictError if nothing of its role and version is
    staged; VerificationError if it says anything else than what is staged, or carries a
    signature that does not verify."""
    role, version = md.signed.type, md.signed.version
    mine = getattr(ceremony, role, None) if role in OFFLINE_ROLES else None
    if mine is None or mine.signed.version != version:
        raise ConflictError(f"{source}: {role} {version} is not staged here")
    if md.signed_bytes != mine.signed_bytes:
        raise VerificationError(
            f"{source}: not the staged {role} {version}: what it signs differs "
            "(a changed or another ceremony's copy)"
        )
    allowed = _allowed(webroot, ceremony, role)
    merged, ignored = [], []
    for keyid, signature in md.signatures.items():
        if keyid not in allowed:
            ignored.append(keyid)
            continue
        try:
            allowed[keyid].verify_signature(signature, mine.signed_bytes)
        except UnverifiedSignatureError:
            raise VerificationError(
                f"{source}: the signature of key {keyid[:16]} does not verify"
            ) from None
        mine.signatures[keyid] = signature
        merged.append(keyid)
    return merged, ignored


def shortfalls(webroot: Path, ceremony: Ceremony) -> list[Shortfall]:
    """The signatures the ceremony's metadata still lacks: a new root needs a threshold
    of the previous root's root keys and one of its own; a new targets, a threshold of the
    targets keys of the root it is published under."""
    short: list[Shortfall | None] = []
    if ceremony.root is not None:
        md = ceremony.root
        new, version = md.signed, md.signed.version
        previous = _previous_root(webroot, md)
        result = new.get_root_verification_result(previous, md.signed_bytes, md.signatures)
        old_keys, old_threshold = role_keys(previous, None, Root.type)
        new_keys, new_threshold = role_keys(new, None, Root.type)
        short.append(
            shortfall(
                Root.type,
                version,
                f"the root keys of root {version - 1}",
                old_keys,
                old_threshold,
                result.first.signed,
            )
        )
        if (set(old_keys), old_threshold) != (set(new_keys), new_threshold):
            short.append(
                shortfall(
                    Root.type,
                    version,
                    f"the root keys of root {version}",
                    new_keys,
                    new_threshold,
                    result.second.signed,
                )
            )
    if ceremony.targets is not None:
        md_t = ceremony.targets
        root = _final_root(webroot, ceremony)
        result_t = root.get_verification_result(Targets.type, md_t.signed_bytes, md_t.signatures)
        keyids, threshold = role_keys(root, None, Targets.type)
        short.append(
            shortfall(
                Targets.type,
                md_t.signed.version,
                f"the targets keys of root {root.version}",
                keyids,
                threshold,
                result_t.signed,
            )
        )
    return [s for s in short if s is not None]


def _unpublished(webroot: Path, ceremony: Ceremony) -> Ceremony:
    """The parts of `ceremony` not yet published (a crash may have left some published).
    ConflictError if a part is neither the next version nor the one published: the
    repository moved on since it was staged."""
    directory = metadata_dir(webroot)
    pending = Ceremony(signed_by=ceremony.signed_by)
    for md in ceremony.parts():
        role, version = md.signed.type, md.signed.version
        found = versions(directory, role)
        current = found[-1] if found else 0
        if version == current + 1:
            setattr(pending, role, md)
            continue
        published = directory / f"{version}.{role}.json"
        if (
            version <= current
            and published.exists()
            and read_metadata(published).signed_bytes == md.signed_bytes
        ):
            continue
        raise ConflictError(
            f"staged {role} {version} no longer follows the repository's {role} {current}; "
            "discard it (rampart tuf sign discard) and run the ceremony again"
        )
    return pending


def _stale_online(webroot: Path, root: Root, targets_md: Metadata[Targets]) -> list[str]:
    """The online roles to re-sign once `root` and `targets_md` are published: those whose
    metadata is stale under them (`is_stale`), or names versions no longer the latest."""
    directory = metadata_dir(webroot)
    targets = targets_md.signed
    stale = []
    latest_of = {Targets.type: targets.version}
    if tuf.CHANNELS_ROLE in roles_of(targets) and versions(directory, tuf.CHANNELS_ROLE):
        channels_md = latest(directory, tuf.CHANNELS_ROLE)
        latest_of[tuf.CHANNELS_ROLE] = channels_md.signed.version
        if is_stale(targets, tuf.CHANNELS_ROLE, channels_md):
            stale.append(tuf.CHANNELS_ROLE)
    snapshot_md: Metadata[Snapshot] = latest(directory, Snapshot.type)
    named = {
        name.removesuffix(".json"): meta.version for name, meta in snapshot_md.signed.meta.items()
    }
    if stale or named != latest_of or is_stale(root, Snapshot.type, snapshot_md):
        stale.append(Snapshot.type)
    timestamp_md: Metadata[Timestamp] = read_metadata(directory / "timestamp.json")
    if (
        Snapshot.type in stale
        or timestamp_md.signed.snapshot_meta.version != snapshot_md.signed.version
        or is_stale(root, Timestamp.type, timestamp_md)
    ):
        stale.append(Timestamp.type)
    return stale


def _final_targets(webroot: Path, ceremony: Ceremony) -> Metadata[Targets]:
    if ceremony.targets is not None:
        return ceremony.targets
    targets_md: Metadata[Targets] = latest(metadata_dir(webroot), Targets.type)
    return targets_md


def missing(webroot: Path, ceremony: Ceremony, pool: Iterable[Signer]) -> list[Shortfall]:
    """Everything publishing `ceremony` still lacks: its signatures (`shortfalls`), and
    the online keys in `pool` to re-sign the online metadata it makes stale."""
    pending = _unpublished(webroot, ceremony)
    short: list[Shortfall | None] = [*shortfalls(webroot, pending)]
    root = _final_root(webroot, pending)
    targets = _final_targets(webroot, pending).signed
    signers = assign(root, targets, pool)
    for role in _stale_online(webroot, root, _final_targets(webroot, pending)):
        keyids, threshold = role_keys(root, targets, role)
        have = [signer.public_key.keyid for signer in signers[role]]
        short.append(shortfall(role, None, f"the {role} keys (online)", keyids, threshold, have))
    return [s for s in short if s is not None]


def publish(
    webroot: Path,
    ceremony: Ceremony,
    pool: Iterable[Signer],
    now: datetime.datetime | None = None,
) -> dict[str, int]:
    """Publish the ceremony, once its signatures meet every threshold: the new root, the
    new targets, then whatever online metadata no longer verifies or names an old
    version, re-signed with the online keys of `pool` (channels, snapshot, timestamp, in
    that order), and empty staged/. IncompleteError, with nothing written, if anything
    is missing (`missing`). The versions written, by role.

    The ceremony is staged before the first file is published: after a crash, staged/
    holds it, and publishing it again skips what was already published."""
    pool = list(pool)
    short = missing(webroot, ceremony, pool)
    if short:
        raise incomplete(short, "not published")
    directory = metadata_dir(webroot)
    stage(webroot, ceremony)
    pending = _unpublished(webroot, ceremony)
    root = _final_root(webroot, pending)
    targets_md = _final_targets(webroot, pending)
    online = _stale_online(webroot, root, targets_md)
    signers = assign(root, targets_md.signed, pool)
    written = {}
    for md in pending.parts():
        write(directory, md)
        written[md.signed.type] = md.signed.version
    if tuf.CHANNELS_ROLE in online:
        written[tuf.CHANNELS_ROLE] = resign_channels(webroot, signers, now).version
    if Snapshot.type in online:
        written[Snapshot.type] = sign_snapshot(webroot, signers, now).version
    if Timestamp.type in online:
        written[Timestamp.type] = sign_timestamp(webroot, signers, now=now).version
    discard(webroot)
    return written

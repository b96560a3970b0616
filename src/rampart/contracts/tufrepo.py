"""Writing a TUF repository's metadata (python-tuf's Metadata API), for the two sides
that sign it: the vendor's offline ceremonies (`release/tufrepo.py`: root, targets)
and the server's online keys (`server/signer.py`: the channel heads, the snapshot and
the timestamp). The layout is `contracts/tuf.py`'s.

Every file is written under a temporary name, fsynced and renamed in place, so a
reader sees the old file or the new one. Metadata uses consistent snapshots:
`<N>.<role>.json` for every role but the timestamp.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from rampart import files
from rampart.contracts import tuf
from rampart.errors import (
    FormatError,
    IncompleteError,
    LocalError,
    RemoteDataError,
    UsageError,
)

Signers = Mapping[str, Sequence[Signer]]  # the signers at hand, by role

TOP_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
# The roles whose keys are held offline (the vendor's ceremonies); the others' keys are
# online (the server, a timer). A key is never both, so that a server's compromise never
# reaches root or the release keys.
OFFLINE_ROLES = (Root.type, Targets.type)
MAX_METADATA = 32 << 20  # a metadata file read whole (targets grows with the releases)
DEFAULT_EXPIRY = {
    Root.type: datetime.timedelta(days=365),
    Targets.type: datetime.timedelta(days=365),
    tuf.CHANNELS_ROLE: datetime.timedelta(days=7),
    Snapshot.type: datetime.timedelta(days=7),
    Timestamp.type: datetime.timedelta(days=1),
}
SERIALIZER = JSONSerializer(compact=False)
LOCK_FILE = ".lock"  # in the metadata directory; see `locked`
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
        lines = files.read_small(path, "password file", 4096).splitlines()
        if not lines or not lines[0]:
            raise LocalError(f"{path}: the password file is empty")
        return lines[0]
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
    return write_to(directory / file_name(md, role), md)


def write_to(path: Path, md: Metadata[Any]) -> Path:
    """Write `md` as `path`, through a temporary name beside it, fsynced and renamed in
    place: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    md.to_file(str(tmp), SERIALIZER)
    files.fsync_file(tmp)
    tmp.replace(path)
    files.fsync_dir(path.parent)
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
    snapshot = sign_snapshot(webroot, signers)
    refresh_timestamp(webroot, signers, snapshot_version=snapshot.version)
    return snapshot


def sign_snapshot(
    webroot: Path, signers: Signers, now: datetime.datetime | None = None
) -> Snapshot:
    """A new snapshot naming the latest version of targets and of every delegated role
    (the `snapshot` signers); the timestamp is left to the caller."""
    directory = metadata_dir(webroot)
    found = versions(directory, Snapshot.type)
    meta = {}
    for role in (Targets.type, *delegated_roles(directory)):
        role_versions = versions(directory, role)
        if role_versions:
            meta[f"{role}.json"] = MetaFile(version=role_versions[-1])
    snapshot = Snapshot(
        version=found[-1] + 1 if found else 1, expires=expiry(Snapshot.type, now), meta=meta
    )
    md = Metadata(snapshot)
    sign(md, signers[Snapshot.type])
    write(directory, md)
    return snapshot


def refresh_timestamp(
    webroot: Path,
    signers: Signers,
    snapshot_version: int | None = None,
    lifetime: datetime.timedelta | None = None,
) -> Timestamp:
    """Re-sign the timestamp (a new version and expiry), naming the latest snapshot:
    what `rampart serve` does before the timestamp expires."""
    return sign_timestamp(webroot, signers, snapshot_version, lifetime)


def sign_timestamp(
    webroot: Path,
    signers: Signers,
    snapshot_version: int | None = None,
    lifetime: datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
) -> Timestamp:
    """`refresh_timestamp`, at the time `now` (the expiry counts from it)."""
    directory = metadata_dir(webroot)
    if snapshot_version is None:
        snapshot_version = latest(directory, Snapshot.type).signed.version
    path = directory / "timestamp.json"
    version = Metadata[Timestamp].from_file(str(path)).signed.version + 1 if path.exists() else 1
    timestamp = Timestamp(
        version=version,
        expires=expiry(Timestamp.type, now, lifetime),
        snapshot_meta=MetaFile(version=snapshot_version),
    )
    md = Metadata(timestamp)
    sign(md, signers[Timestamp.type])
    write(directory, md)
    return timestamp


def channel_heads(webroot: Path) -> dict[str, tuf.ChannelHead]:
    """The channel heads the latest channels metadata signs, by target path."""
    return _heads(latest(metadata_dir(webroot), tuf.CHANNELS_ROLE))


def _heads(md: Metadata[Targets]) -> dict[str, tuf.ChannelHead]:
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
    try:
        current: dict[str, tuf.ChannelHead] | None = _heads(md)
    except RemoteDataError:  # not a channel head (another key's work): replaced
        current = None
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


@contextlib.contextmanager
def locked(webroot: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the repository's write lock for the `with` block: an exclusive flock on
    `tuf/.lock` (created if missing), so that two writers never number two files alike
    nor interleave a snapshot and its timestamp. Yields True once held; with
    `wait=False`, False at once (nothing held) if another writer holds it."""
    path = metadata_dir(webroot) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise LocalError(f"{path}: cannot open the repository's lock: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# --- reading, and who may sign what ----------------------------------------------------------


def read_metadata(path: Path) -> Metadata[Any]:
    """A metadata file: LocalError if it cannot be read, FormatError if it is not TUF
    metadata."""
    data = files.read_small(path, "TUF metadata", MAX_METADATA)
    try:
        return Metadata.from_bytes(data)
    except DeserializationError as exc:
        raise FormatError(f"{path}: not TUF metadata ({exc})") from None


def role_keys(root: Root, targets: Targets | None, role: str) -> tuple[list[str], int]:
    """The keyids allowed to sign `role`, and its threshold: root names those of the
    top-level roles, targets those of the roles it delegates (channels). UsageError if
    the repository has no such role."""
    if role in TOP_ROLES:
        entry = root.roles[role]
        return list(entry.keyids), entry.threshold
    delegations = targets.delegations if targets is not None else None
    if delegations is None or delegations.roles is None or role not in delegations.roles:
        raise UsageError(f"{role!r}: not a role of this repository")
    delegated = delegations.roles[role]
    return list(delegated.keyids), delegated.threshold


def roles_of(targets: Targets | None) -> list[str]:
    """Every role of a repository whose latest targets is `targets`."""
    delegations = targets.delegations if targets is not None else None
    delegated = list(delegations.roles) if delegations and delegations.roles else []
    return [*TOP_ROLES, *delegated]


def assign(root: Root, targets: Targets | None, pool: Iterable[Signer]) -> dict[str, list[Signer]]:
    """The signers of `pool` by the roles their keys may sign (a key may sign several)."""
    by_role: dict[str, list[Signer]] = {}
    pool = list(pool)
    for role in roles_of(targets):
        keyids, _ = role_keys(root, targets, role)
        chosen: dict[str, Signer] = {}
        for signer in pool:
            keyid = signer.public_key.keyid
            if keyid in keyids:
                chosen.setdefault(keyid, signer)
        by_role[role] = list(chosen.values())
    return by_role


@dataclass(frozen=True)
class Shortfall:
    """What a role lacks to meet a threshold: `missing` more signatures of `keys` (a
    description: "the keys of root 2"), any of `candidates` (keyids) can give them."""

    role: str
    version: int | None
    keys: str
    missing: int
    candidates: tuple[str, ...]

    def __str__(self) -> str:
        which = f"{self.role} {self.version}" if self.version is not None else self.role
        ids = ", ".join(keyid[:16] for keyid in self.candidates) or "none left"
        return f"{which}: {self.missing} more signature(s) of {self.keys} (any of {ids})"

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "version": self.version,
            "keys": self.keys,
            "missing": self.missing,
            "candidates": list(self.candidates),
        }


def shortfall(
    role: str,
    version: int | None,
    keys: str,
    keyids: Iterable[str],
    threshold: int,
    have: Iterable[str],
) -> Shortfall | None:
    """The Shortfall of `role` when only `have` of `keyids` sign, or None if they meet
    `threshold`."""
    allowed = list(dict.fromkeys(keyids))
    present = set(have) & set(allowed)
    if len(present) >= threshold:
        return None
    others = tuple(keyid for keyid in allowed if keyid not in present)
    return Shortfall(role, version, keys, threshold - len(present), others)


def incomplete(shortfalls: Sequence[Shortfall], what: str) -> IncompleteError:
    """One error line naming every shortfall."""
    return IncompleteError(f"{what}: " + "; ".join(str(s) for s in shortfalls))


def require(root: Root, targets: Targets | None, signers: Signers, roles: Iterable[str]) -> None:
    """IncompleteError unless the signers at hand meet the threshold of each of `roles`
    (checked before anything is written)."""
    short = []
    for role in roles:
        keyids, threshold = role_keys(root, targets, role)
        have = [signer.public_key.keyid for signer in signers.get(role, ())]
        found = shortfall(role, None, f"the {role} keys", keyids, threshold, have)
        if found is not None:
            short.append(found)
    if short:
        raise incomplete(short, "not enough keys at hand")


def is_stale(delegator: Root | Targets, role: str, md: Metadata[Any]) -> bool:
    """Whether `md` must be re-signed under `delegator`: its signatures no longer meet
    the threshold, or one of them is by a key that may no longer sign it (revoked)."""
    entry = delegator.get_delegated_role(role)
    if set(md.signatures) - set(entry.keyids):
        return True
    return not delegator.get_verification_result(role, md.signed_bytes, md.signatures)


# --- keeping the online roles fresh --------------------------------------------------------


def expiring(signed: Any, role: str, now: datetime.datetime) -> bool:
    """Whether `signed` (of `role`) expires within half its default lifetime."""
    left: datetime.timedelta = signed.expires - now
    return left < DEFAULT_EXPIRY[role] / 2


def resign_channels(
    webroot: Path, signers: Signers, now: datetime.datetime | None = None
) -> Targets:
    """The latest channels metadata again, as a new version with a new expiry (the
    `channels` signers): the same channel heads. The snapshot is left to the caller."""
    directory = metadata_dir(webroot)
    md: Metadata[Targets] = latest(directory, tuf.CHANNELS_ROLE)
    md.signed.version += 1
    md.signed.expires = expiry(tuf.CHANNELS_ROLE, now)
    sign(md, signers[tuf.CHANNELS_ROLE])
    write(directory, md, tuf.CHANNELS_ROLE)
    return md.signed


@dataclass(frozen=True)
class Refreshed:
    """What `refresh` signed: always a timestamp; a snapshot and channels when they were
    near their expiry."""

    timestamp: Timestamp
    snapshot: Snapshot | None
    channels: Targets | None


def refresh(
    webroot: Path,
    signers: Signers,
    lifetime: datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
) -> Refreshed:
    """What a static webroot's timer runs: the channels metadata and the snapshot are
    re-signed when they expire within half their lifetime (a new snapshot whenever the
    channels change), then the timestamp, valid for `lifetime` (default a day). The keys
    at hand are checked first: nothing is written unless they suffice."""
    now = now or datetime.datetime.now(datetime.UTC)
    directory = metadata_dir(webroot)
    root: Root = latest(directory, Root.type).signed
    targets: Targets = latest(directory, Targets.type).signed
    stale_channels = tuf.CHANNELS_ROLE in roles_of(targets) and expiring(
        latest(directory, tuf.CHANNELS_ROLE).signed, tuf.CHANNELS_ROLE, now
    )
    stale_snapshot = stale_channels or expiring(
        latest(directory, Snapshot.type).signed, Snapshot.type, now
    )
    roles = [Timestamp.type]
    roles += [Snapshot.type] if stale_snapshot else []
    roles += [tuf.CHANNELS_ROLE] if stale_channels else []
    require(root, targets, signers, roles)
    channels = resign_channels(webroot, signers, now) if stale_channels else None
    snapshot = sign_snapshot(webroot, signers, now) if stale_snapshot else None
    timestamp = sign_timestamp(webroot, signers, lifetime=lifetime, now=now)
    return Refreshed(timestamp, snapshot, channels)

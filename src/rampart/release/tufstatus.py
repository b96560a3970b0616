"""The state of a webroot's TUF repository, checked as a client would: the root chain
from version 1 to the latest (each version signed by a threshold of its predecessor's
root keys and of its own), then timestamp, snapshot, targets and channels, each signed
by a threshold of the keys its delegator names, each naming the latest version of the
next, none expired or about to (`rampart tuf status`).

Time is an input (`now`): a role "expires soon" when less than its warning window is
left: `warn` for the offline roles (root, targets: a ceremony to plan), a quarter of
the default lifetime for the online ones (snapshot, channels, timestamp: a timer that
stopped).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from rampart.contracts.tufrepo import (
    DEFAULT_EXPIRY,
    OFFLINE_ROLES,
    TOP_ROLES,
    Shortfall,
    metadata_dir,
    read_metadata,
    role_keys,
    roles_of,
    versions,
)
from rampart.errors import LocalError, RampartError
from rampart.release import tufrepo

WARN = datetime.timedelta(days=30)  # the default warning window of the offline roles


@dataclass(frozen=True)
class RoleStatus:
    """One role's latest metadata: its version and expiry, the keys that may sign it
    and their threshold, and those whose signature verifies."""

    role: str
    version: int
    expires: datetime.datetime
    keyids: tuple[str, ...]
    threshold: int
    signed_by: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "version": self.version,
            "expires": self.expires.isoformat().replace("+00:00", "Z"),
            "keyids": list(self.keyids),
            "threshold": self.threshold,
            "signed_by": list(self.signed_by),
        }


@dataclass
class Status:
    """What `status` found: the roles, the number of root versions, the staged ceremony
    (its files, the signatures it still lacks) and every problem, one line each."""

    webroot: Path
    roles: list[RoleStatus] = field(default_factory=list)
    root_versions: int = 0
    staged: list[str] = field(default_factory=list)
    missing: list[Shortfall] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "webroot": str(self.webroot),
            "ok": not self.problems,
            "problems": self.problems,
            "root_versions": self.root_versions,
            "roles": {status.role: status.to_json() for status in self.roles},
            "staged": self.staged,
            "missing": [short.to_json() for short in self.missing],
        }


def status(
    webroot: Path, now: datetime.datetime | None = None, warn: datetime.timedelta = WARN
) -> Status:
    """Check the repository of `webroot` (LocalError if it has none)."""
    directory = metadata_dir(webroot)
    if not (directory / "1.root.json").exists():
        raise LocalError(f"{directory}: no TUF repository here (rampart tuf init)")
    now = now or datetime.datetime.now(datetime.UTC)
    found = Status(webroot)
    root = _root_chain(directory, found)
    if root is not None:
        _top_roles(directory, root, found)
    for role_status in found.roles:
        problem = _expiry(role_status, now, warn)
        if problem:
            found.problems.append(problem)
    _staged(webroot, found)
    return found


def _read(path: Path, found: Status) -> Metadata[Any] | None:
    try:
        return read_metadata(path)
    except RampartError as exc:
        found.problems.append(str(exc))
        return None


def _root_chain(directory: Path, found: Status) -> Root | None:
    """Check root 1 to N; the latest root, or None if the chain is broken."""
    numbers = versions(directory, Root.type)
    found.root_versions = len(numbers)
    if numbers != list(range(1, len(numbers) + 1)):
        found.problems.append(f"root versions {numbers} do not run from 1 without a gap")
        return None
    previous: Root | None = None
    md: Metadata[Root] | None = None
    for number in numbers:  # numbers holds 1 at least: 1.root.json is there
        md = _read(directory / f"{number}.root.json", found)
        if md is None:
            return None
        if md.signed.version != number:
            found.problems.append(f"{number}.root.json: holds root version {md.signed.version}")
            return None
        result = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
        if not result:
            found.problems.append(
                f"root {number}: signed by {len(result.first.signed)} of the "
                f"{result.first.threshold} needed keys of root {max(number - 1, 1)} and "
                f"{len(result.second.signed)} of the {result.second.threshold} of its own"
            )
        previous = md.signed
    if md is None:
        return None
    found.roles.append(_role_status(md.signed, None, Root.type, md))
    return md.signed


def _role_status(root: Root, targets: Targets | None, role: str, md: Metadata[Any]) -> RoleStatus:
    keyids, threshold = role_keys(root, targets, role)
    delegator: Root | Targets = root if targets is None else targets
    result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
    return RoleStatus(
        role,
        md.signed.version,
        md.signed.expires,
        tuple(keyids),
        threshold,
        tuple(result.signed),
    )


def _check(
    found: Status, root: Root, targets: Targets | None, role: str, md: Metadata[Any]
) -> None:
    """Record `role`'s status, and a problem if its signatures miss the threshold."""
    role_status = _role_status(root, targets, role, md)
    found.roles.append(role_status)
    if len(role_status.signed_by) < role_status.threshold:
        found.problems.append(
            f"{role} {md.signed.version}: signed by {len(role_status.signed_by)} of the "
            f"{role_status.threshold} keys needed"
        )


def _named(
    directory: Path, found: Status, role: str, version: int | None, by: str
) -> Metadata[Any] | None:
    """The version of `role` that `by` names, read; a problem if it is missing or not the
    latest on disk."""
    if version is None:
        found.problems.append(f"{by} names no {role}")
        return None
    on_disk = versions(directory, role)
    if on_disk and on_disk[-1] != version:
        found.problems.append(
            f"{by} names {role} {version}, not the latest, {on_disk[-1]} (re-sign {by})"
        )
    path = directory / f"{version}.{role}.json"
    if not path.exists():
        found.problems.append(f"{by} names {role} {version}, which is missing")
        return None
    return _read(path, found)


def _top_roles(directory: Path, root: Root, found: Status) -> None:
    """Check timestamp, the snapshot it names, and the targets and channels the snapshot
    names, as a client walks them."""
    timestamp = _read(directory / "timestamp.json", found)
    if timestamp is None:
        return
    _check(found, root, None, Timestamp.type, timestamp)
    snapshot = _named(
        directory, found, Snapshot.type, timestamp.signed.snapshot_meta.version, "timestamp"
    )
    if snapshot is None:
        return
    _check(found, root, None, Snapshot.type, snapshot)
    meta = snapshot.signed.meta
    by = f"snapshot {snapshot.signed.version}"
    targets = _named(directory, found, Targets.type, _version(meta, Targets.type), by)
    if targets is None:
        return
    _check(found, root, None, Targets.type, targets)
    for role in roles_of(targets.signed)[len(TOP_ROLES) :]:
        delegated = _named(directory, found, role, _version(meta, role), by)
        if delegated is not None:
            _check(found, root, targets.signed, role, delegated)


def _version(meta: dict[str, Any], role: str) -> int | None:
    info = meta.get(f"{role}.json")
    return None if info is None else int(info.version)


def _expiry(role_status: RoleStatus, now: datetime.datetime, warn: datetime.timedelta) -> str:
    """A problem if the role has expired or expires within its warning window, else ''."""
    left = role_status.expires - now
    window = warn if role_status.role in OFFLINE_ROLES else DEFAULT_EXPIRY[role_status.role] / 4
    which = f"{role_status.role} {role_status.version}"
    if left <= datetime.timedelta(0):
        return f"{which}: expired at {role_status.expires:%Y-%m-%d %H:%M:%S} UTC"
    if left < window:
        hours = left.total_seconds() / 3600
        when = f"{hours:.1f} hours" if hours < 48 else f"{hours / 24:.0f} days"
        return f"{which}: expires in {when} (re-sign it before)"
    return ""


def _staged(webroot: Path, found: Status) -> None:
    try:
        ceremony = tufrepo.staged(webroot)
        if ceremony is not None:
            found.staged = ceremony.names()
            found.missing = tufrepo.shortfalls(webroot, ceremony)
    except RampartError as exc:
        found.problems.append(f"staged: {exc}")

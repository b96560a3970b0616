"""The TUF repository's contract, written once: where its files live, which roles it
has, and what Rampart's targets and channel heads say beyond their bytes (the
`custom` fields). The vendor's tools write it (`release/tufrepo.py`), the server
signs the channel heads and the timestamp (`server/signer.py`), the device reads it
(`device/trust.py`); docs/formats.md "TUF repository" describes the same bytes.

    <webroot>/tuf/<N>.root.json          root: k-of-n offline keys
    <webroot>/tuf/<N>.targets.json       targets: the release keys (offline)
    <webroot>/tuf/<N>.channels.json      channels: delegated by targets, online
    <webroot>/tuf/<N>.snapshot.json      snapshot: online
    <webroot>/tuf/timestamp.json         timestamp: online, short-lived
    <webroot>/dist/<V>/<os>-<kind>       a payload target (`targets` signs it)
    <webroot>/dist/<V>/<os>-core.caibx   Core's chunk index, a target of kind "index"
    <webroot>/dist/<V>/<os>-core.from-<B>.delta  a delta from B, a target of kind "delta"
    <webroot>/dist/<V>/<os>-bootloader.efi  the boot loader, a target of kind "bootloader"
    <webroot>/heads/<os>/<c>.json        a channel head (`channels` signs it)

Target paths are relative to the webroot; the metadata is at `<webroot>/tuf/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rampart.contracts import hashing, wire
from rampart.contracts.version import Version, parse_version
from rampart.errors import RemoteDataError, UsageError, VerificationError

METADATA_DIR = "tuf"
CHANNELS_ROLE = "channels"
# The only paths the channels role may sign. Not `channels/`: a static webroot keeps
# its channels' version files there (`channels/<c>/update/v1/<os>/version`).
CHANNEL_PATTERN = "heads/*/*"
CUSTOM = "rampart"  # the key of Rampart's fields in a target's `custom`
# The hashes of every target: BLAKE2b-512 is what the device computes as it copies
# a payload (as for a minisign signature); SHA-256 is there for every other client.
HASHES = ("blake2b", "sha256")
DEVICE_HASH = "blake2b"


def payload_hashes(fd: int) -> tuple[int, dict[str, str]]:
    """(length, {"blake2b": hex, "sha256": hex}) of the payload open as `fd`, read
    once (ahead of the hashing), its BLAKE2b-512 from `hashing.blake2b`."""
    blake, sha = hashing.blake2b(), hashlib.sha256()
    length = 0
    with hashing.blocks(fd) as chunks:
        for chunk in chunks:
            blake.update(chunk)
            sha.update(chunk)
            length += len(chunk)
    return length, {"blake2b": blake.digest().hex(), "sha256": sha.hexdigest()}


# --- target paths ----------------------------------------------------------------------


def payload_target(os_name: str, version: Version, kind: str) -> str:
    """A payload's target path: its path below the webroot (`dist/<V>/<os>-<kind>`)."""
    return f"{wire.release_path(version)}/{wire.payload_name(os_name, kind)}"


# A release's documents beside its payloads, targets of their own kind (their bytes
# checked as a payload's): Core's chunk index, its deltas from earlier releases, and
# the boot loader it carries.
INDEX_KIND = "index"
DELTA_KIND = "delta"
LOADER_KIND = "bootloader"  # the boot loader a release carries (`wire.loader_name`)
SBVAR_KIND = "sbvar"  # a signed append to db or dbx (`wire.sbvar_name`)


def document_target(version: Version, name: str) -> str:
    """A release document's target path (`dist/<V>/<name>`: `wire.index_name`,
    `wire.delta_name`)."""
    return f"{wire.release_path(version)}/{name}"


def channel_target(os_name: str, channel: str) -> str:
    """A channel head's target path (`heads/<os>/<channel>.json`)."""
    return f"heads/{os_name}/{channel}.json"


# --- what a payload target binds -----------------------------------------------------------


@dataclass(frozen=True)
class PayloadFields:
    """A payload target's custom fields: the OS, the kind, the version, the security
    epoch of the release's UKI, and for a Core the verity parameters the UKI pins."""

    os: str
    kind: str
    version: str
    epoch: int
    root_hash: str | None = None
    hash_offset: int | None = None
    data_blocks: int | None = None

    def to_custom(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "os": self.os,
            "kind": self.kind,
            "version": self.version,
            "epoch": self.epoch,
        }
        if self.root_hash is not None:
            fields["verity"] = {
                "root_hash": self.root_hash,
                "hash_offset": self.hash_offset,
                "data_blocks": self.data_blocks,
            }
        return {CUSTOM: fields}

    @classmethod
    def from_custom(cls, custom: object, where: str) -> PayloadFields:
        """Parse a target's `custom` (RemoteDataError if it is not Rampart's)."""
        fields = _fields(custom, where, {"os", "kind", "version", "epoch"}, {"verity"})
        verity = fields.get("verity")
        root_hash = hash_offset = data_blocks = None
        if verity is not None:
            verity = _object(
                verity, f"{where}: verity", {"root_hash", "hash_offset", "data_blocks"}
            )
            root_hash = _string(verity["root_hash"], f"{where}: verity.root_hash", 128)
            hash_offset = _integer(verity["hash_offset"], f"{where}: verity.hash_offset")
            data_blocks = _integer(verity["data_blocks"], f"{where}: verity.data_blocks")
        return cls(
            _string(fields["os"], f"{where}: os", 64),
            _string(fields["kind"], f"{where}: kind", 64),
            _string(fields["version"], f"{where}: version", 128),
            _integer(fields["epoch"], f"{where}: epoch"),
            root_hash,
            hash_offset,
            data_blocks,
        )

    def check(self, os_name: str, kind: str, version: Version, where: str) -> None:
        """VerificationError unless this target is `kind` of `os_name`'s `version`: a
        signed payload moved to another OS, relabelled as another kind or version."""
        for name, signed, wanted in (
            ("OS", self.os, os_name),
            ("kind", self.kind, kind),
            ("version", self.version, version.core),
        ):
            if signed != wanted:
                raise VerificationError(
                    f"{where}: its signed {name} is {signed[:64]!r}, not {wanted!r} "
                    "(wrong software: a payload moved or relabelled)"
                )


# --- what a channel head says -------------------------------------------------------------

BUCKETS = 10_000  # 0.01 % resolution
# Signed metadata holds no floats (canonical JSON): a rollout's share is a count of
# buckets, 0 to 10000 (percent * 100).
BUCKET_RULE = "sha256(machine-id NUL version)[0:8] big-endian mod 10000 < buckets"


class RolloutState(StrEnum):
    NONE = "none"
    ACTIVE = "active"
    PAUSED = "paused"  # by an administrator
    HALTED = "halted"  # by itself: too many failures reported


def bucket(machine_id: str, version: str) -> int:
    """A stable number in [0, BUCKETS) for this machine and version (BUCKET_RULE)."""
    digest = hashlib.sha256(f"{machine_id}\x00{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def buckets_of(percent: float) -> int:
    """How many of the BUCKETS a rollout to `percent` % covers."""
    return round(percent * BUCKETS / 100)


def in_rollout(machine_id: str, version: str, percent: float) -> bool:
    return bucket(machine_id, version) < buckets_of(percent)


@dataclass(frozen=True)
class ChannelHead:
    """A channel's head, as the channels role signs it: the version the channel points
    at, and the rollout of a newer one (its version, percentage and state). A device
    computes its own bucket from it (`offer`)."""

    os: str
    channel: str
    version: str | None
    rollout_version: str | None = None
    rollout_buckets: int = 0  # of BUCKETS: buckets_of(percent)
    rollout_state: RolloutState = RolloutState.NONE

    def offer(self, machine_id: str) -> str | None:
        """The version this channel offers `machine_id`."""
        if (
            self.rollout_version is not None
            and self.rollout_state == RolloutState.ACTIVE
            and bucket(machine_id, self.rollout_version) < self.rollout_buckets
        ):
            return self.rollout_version
        return self.version

    def allowed(self) -> set[str]:
        """Every version the channel may offer some machine."""
        versions = {self.version} if self.version else set()
        if self.rollout_version is not None and self.rollout_state == RolloutState.ACTIVE:
            versions.add(self.rollout_version)
        return versions

    def to_custom(self) -> dict[str, Any]:
        rollout = None
        if self.rollout_version is not None:
            rollout = {
                "version": self.rollout_version,
                "buckets": self.rollout_buckets,
                "state": str(self.rollout_state),
                "bucket": BUCKET_RULE,
            }
        return {
            CUSTOM: {
                "os": self.os,
                "channel": self.channel,
                "version": self.version,
                "rollout": rollout,
            }
        }

    def document(self) -> bytes:
        """The channel head's file (`heads/<os>/<c>.json`): its custom fields."""
        return json.dumps(self.to_custom(), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_custom(cls, custom: object, where: str) -> ChannelHead:
        fields = _fields(custom, where, {"os", "channel", "version", "rollout"}, set())
        version = fields["version"]
        if version is not None:
            version = _version(version, f"{where}: version")
        rollout = fields["rollout"]
        if rollout is None:
            return cls(_name(fields["os"], where), _name(fields["channel"], where), version)
        rollout = _object(rollout, f"{where}: rollout", {"version", "buckets", "state", "bucket"})
        if rollout["bucket"] != BUCKET_RULE:
            raise RemoteDataError(f"{where}: unknown rollout bucket rule {rollout['bucket']!r}")
        buckets = rollout["buckets"]
        if type(buckets) is not int or not 0 <= buckets <= BUCKETS:
            raise RemoteDataError(f"{where}: rollout buckets is not an integer from 0 to {BUCKETS}")
        try:
            state = RolloutState(rollout["state"])
        except ValueError:
            raise RemoteDataError(f"{where}: unknown rollout state") from None
        return cls(
            _name(fields["os"], where),
            _name(fields["channel"], where),
            version,
            _version(rollout["version"], f"{where}: rollout.version"),
            buckets,
            state,
        )


# --- strict parsing of signed fields (signed is not the same as well-formed) ---------------


def _object(value: object, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise RemoteDataError(f"{where}: not an object with exactly {', '.join(sorted(keys))}")
    return value


def _fields(custom: object, where: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(custom, dict) or not isinstance(custom.get(CUSTOM), dict):
        raise RemoteDataError(f"{where}: no '{CUSTOM}' custom fields")
    fields: dict[str, Any] = custom[CUSTOM]
    if not required <= set(fields) <= required | optional:
        raise RemoteDataError(
            f"{where}: custom fields are not {', '.join(sorted(required))}"
            + (f" (and optionally {', '.join(sorted(optional))})" if optional else "")
        )
    return fields


def _string(value: object, where: str, cap: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= cap:
        raise RemoteDataError(f"{where}: not a string of 1 to {cap} characters")
    return value


def _integer(value: object, where: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise RemoteDataError(f"{where}: not a non-negative integer")
    return value


def _name(value: object, where: str) -> str:
    try:
        return wire.check_name(_string(value, where, 64), "name")
    except UsageError as exc:
        raise RemoteDataError(f"{where}: {exc}") from None


def _version(value: object, where: str) -> str:
    try:
        return parse_version(_string(value, where, 128), where).core
    except UsageError as exc:
        raise RemoteDataError(str(exc)) from None

"""The device's TUF trust (docs/client.md "Trust modes"): python-tuf's client, ngclient,
refreshes the repository's signed metadata through the unprivileged fetcher and the
pinned TLS, then says which version this machine's channel offers it and what each
payload must be (its length, BLAKE2b-512 digest and signed fields).

In TUF mode a device trusts a root, not a key. The first root comes from, in order:
the local metadata directory (the newest root this device has verified; roots rotate
through it), the remote configuration's `root.json` (written by `rampart install`),
the system configuration's `root.json` (in Core: how a minisign-signed release
delivers the root to a device in the field). With none of them, the mode "auto"
falls back to minisign; "tuf" is an error.

ngclient keeps the metadata it verified in the metadata directory (on the state
partition, root's only): it is what makes a version going backwards, a snapshot of
another state (mix-and-match) or expired metadata (a freeze) detectable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from rampart import files
from rampart.contracts import tuf
from rampart.contracts.version import Version, parse_version
from rampart.device.config import TrustMode
from rampart.device.fetch import Fetcher
from rampart.errors import (
    FormatError,
    FreezeError,
    LocalError,
    OfferError,
    RampartError,
    RemoteDataError,
    RollbackAttackError,
    TransportError,
    UsageError,
    VerificationError,
)

log = logging.getLogger(__name__)

ROOT_FILE = "root.json"  # a pinned root, in the remote or the system configuration
ROOT_CAP = 512 << 10  # ngclient's own cap for a root


@dataclass(frozen=True)
class TufSettings:
    """Where a device in TUF mode finds its trust and its repository."""

    metadata_dir: Path  # ngclient's verified metadata (state partition)
    bootstrap: Path | None  # the pinned root to start from; None: the metadata dir's
    metadata_url: str  # <webroot>/tuf
    targets_url: str  # <webroot>: target paths are relative to it
    channel: str


def settings(
    mode: TrustMode,
    metadata_dir: Path,
    pinned: list[Path],
    metadata_url: str,
    channel: str,
) -> TufSettings | None:
    """The TUF settings of a device in `mode`, or None for minisign. `pinned`: where a
    pinned root may be, in order of preference."""
    if mode == TrustMode.MINISIGN:
        return None
    targets_url = metadata_url.rsplit("/", 1)[0]
    if (metadata_dir / ROOT_FILE).exists():
        return TufSettings(metadata_dir, None, metadata_url, targets_url, channel)
    for path in pinned:
        if path.is_file():
            return TufSettings(metadata_dir, path, metadata_url, targets_url, channel)
    if mode == TrustMode.TUF:
        raise LocalError(
            f"trust mode is tuf, but there is no root to start from: neither "
            f"{metadata_dir / ROOT_FILE} nor {' nor '.join(str(p) for p in pinned)}"
        )
    return None


def check_root(data: bytes, where: str) -> None:
    """FormatError unless `data` is a TUF root signed by a threshold of its own root
    keys (what a device may pin)."""
    try:
        root = Metadata[Root].from_bytes(data)
        if root.signed.type != Root.type:
            raise ValueError(f"a {root.signed.type} metadata, not a root")
        root.verify_delegate(Root.type, root)
    except (DeserializationError, tuf_errors.RepositoryError, ValueError, TypeError) as exc:
        raise FormatError(f"{where}: not a TUF root signed by its own keys: {exc}") from None


def local_state(metadata_dir: Path) -> dict[str, Any]:
    """What the metadata this device verified says (for `rampart status`): the trusted
    root's version, the timestamp's version and expiry, and whether it has expired.
    Read, not verified again; nothing if there is none."""
    state: dict[str, Any] = {"metadata_dir": str(metadata_dir), "root_version": None}
    try:
        root = Metadata[Root].from_bytes(
            files.read_small(metadata_dir / ROOT_FILE, "TUF root", ROOT_CAP)
        )
        state["root_version"] = root.signed.version
        timestamp = Metadata[Timestamp].from_bytes(
            files.read_small(metadata_dir / "timestamp.json", "TUF timestamp", 1 << 16)
        )
    except (RampartError, tuf_errors.RepositoryError, OSError, ValueError):
        return state
    state["timestamp_version"] = timestamp.signed.version
    state["timestamp_expires"] = timestamp.signed.expires.isoformat()
    state["expired"] = timestamp.signed.is_expired()
    return state


@dataclass(frozen=True)
class ExpectedTarget:
    """What a payload must be, as the release keys signed it."""

    path: str
    length: int
    digest: bytes  # BLAKE2b-512 (tuf.DEVICE_HASH)
    fields: tuf.PayloadFields


class _SandboxedFetch(FetcherInterface):
    """ngclient's network, through Rampart's fetcher: an unprivileged process, the
    pinned CA only, and a cap on every document (ngclient's max length for it)."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher

    def _fetch(self, url: str) -> Iterator[bytes]:  # pragma: no cover - never called
        raise LocalError(f"{url}: fetching without a length cap is not supported")

    def download_bytes(self, url: str, max_length: int) -> bytes:
        status, data = self.fetcher.document(url, max_length)
        if status != 200:
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {status}", status)
        return data

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        raise LocalError(f"{url}: targets are fetched by the update, not by ngclient")
        yield  # pragma: no cover


def _refused(exc: Exception, what: str) -> NoReturn:
    """Turn ngclient's exception into Rampart's error, naming the attack it stops."""
    reason = str(exc)[:300]
    if isinstance(exc, RampartError):
        raise exc
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        raise FreezeError(
            f"{what}: {reason} (indefinite freeze: the server or a mirror serves stale "
            "metadata; no update is trusted until fresh metadata arrives)"
        ) from None
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        raise RollbackAttackError(
            f"{what}: {reason} (rollback or mix-and-match: metadata of another version "
            "than this device trusts, or than the snapshot names)"
        ) from None
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        raise VerificationError(
            f"{what}: {reason} (mix-and-match: metadata of another repository state)"
        ) from None
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        raise VerificationError(
            f"{what}: {reason} (not signed by a threshold of the trusted keys)"
        ) from None
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        raise RemoteDataError(f"{what}: {reason} (endless data: larger than its cap)") from None
    if isinstance(exc, tuf_errors.DownloadError):
        raise TransportError(f"{what}: {reason}") from None
    if isinstance(exc, tuf_errors.RepositoryError):
        raise VerificationError(f"{what}: {reason}") from None
    if isinstance(exc, OSError):
        raise LocalError(f"{exc.filename or what}: {exc.strerror or exc}") from None
    if isinstance(exc, ValueError):
        raise FormatError(f"{what}: {reason}") from None
    raise exc


class TufClient:
    """One refresh of the repository's metadata, and what it says."""

    def __init__(self, tuf_settings: TufSettings, fetcher: Fetcher) -> None:
        self.settings = tuf_settings
        directory = tuf_settings.metadata_dir
        bootstrap = None
        if tuf_settings.bootstrap is not None:
            bootstrap = files.read_small(tuf_settings.bootstrap, "TUF root", ROOT_CAP)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.updater = Updater(
                metadata_dir=str(directory),
                metadata_base_url=tuf_settings.metadata_url + "/",
                target_base_url=tuf_settings.targets_url + "/",
                fetcher=_SandboxedFetch(fetcher),
                # Targets are the webroot's own files (dist/<V>/<os>-<kind>).
                config=UpdaterConfig(prefix_targets_with_hash=False),
                bootstrap=bootstrap,
            )
        except (tuf_errors.RepositoryError, OSError, ValueError) as exc:
            _refused(exc, f"{tuf_settings.bootstrap or directory / ROOT_FILE}: trusted root")

    def refresh(self) -> None:
        """Fetch and verify root (rotations), timestamp, snapshot and targets."""
        try:
            self.updater.refresh()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, OSError, ValueError) as exc:
            _refused(exc, f"{self.settings.metadata_url}: update metadata")

    def _targetinfo(self, path: str) -> TargetFile | None:
        try:
            return self.updater.get_targetinfo(path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, OSError, ValueError) as exc:
            _refused(exc, f"{path}: update metadata")

    def channel_head(self, os_name: str) -> tuf.ChannelHead | None:
        """The signed head of this device's channel, or None if no channels role signs
        one (a repository without signed channels)."""
        path = tuf.channel_target(os_name, self.settings.channel)
        info = self._targetinfo(path)
        if info is None:
            return None
        head = tuf.ChannelHead.from_custom(info.custom, path)
        if (head.os, head.channel) != (os_name, self.settings.channel):
            raise VerificationError(f"{path}: signed for {head.os}/{head.channel}")
        return head

    def payload(self, os_name: str, version: Version, kind: str) -> ExpectedTarget:
        """What payload `kind` of `version` must be; VerificationError if the release
        keys never released it (arbitrary software) or signed it for something else."""
        path = tuf.payload_target(os_name, version, kind)
        info = self._targetinfo(path)
        if info is None:
            raise VerificationError(
                f"{path}: not a target the release keys signed (arbitrary software)"
            )
        fields = tuf.PayloadFields.from_custom(info.custom, path)
        fields.check(os_name, kind, version, path)
        digest = info.hashes.get(tuf.DEVICE_HASH)
        try:
            raw = bytes.fromhex(digest) if isinstance(digest, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 64:
            raise FormatError(f"{path}: the target has no {tuf.DEVICE_HASH} (BLAKE2b-512) hash")
        return ExpectedTarget(path, info.length, raw, fields)


def choose(head: tuf.ChannelHead | None, offered: Version, machine_id: str, where: str) -> Version:
    """The version to install: what the signed channel head offers this machine (its
    own bucket, computed here), or the server's offer when no head is signed.
    OfferError if the server offers a version the head does not allow; a server that
    offers an allowed version other than this machine's is overruled, with a warning."""
    if head is None:
        return offered
    allowed = head.allowed()
    if offered.core not in allowed:
        raise OfferError(
            f"{where}: the server offers {offered.core}, which channel {head.channel}'s signed "
            f"head does not allow (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    own = head.offer(machine_id)
    if own is None:
        raise OfferError(f"{where}: channel {head.channel}'s signed head names no version")
    try:
        chosen = parse_version(own, f"channel {head.channel}")
    except UsageError as exc:
        raise FormatError(str(exc)) from None
    if chosen != offered:
        log.warning(
            "the server offers %s, but channel %s's signed head offers this machine %s: "
            "following the signed head",
            offered,
            head.channel,
            chosen,
        )
    return chosen

"""The device's TUF client: python-tuf's ngclient refreshes the repository's signed
metadata through the unprivileged fetcher and the pinned TLS, then says what this
machine's channel head and each payload target are (`device/trust.py` decides with
them). Imported only in TUF mode, and by `status` and `install` when a root is there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from rampart import files
from rampart.contracts import tuf
from rampart.contracts.version import Version
from rampart.device.fetch import Fetcher
from rampart.device.trust import ROOT_CAP, ROOT_FILE, ExpectedTarget, TufSettings
from rampart.errors import (
    FormatError,
    FreezeError,
    LocalError,
    RampartError,
    RemoteDataError,
    RollbackAttackError,
    TransportError,
    VerificationError,
)


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
        expected = self._expected(path, os_name, version, kind)
        if expected is None:
            raise VerificationError(
                f"{path}: not a target the release keys signed (arbitrary software)"
            )
        return expected

    def document(
        self, os_name: str, version: Version, name: str, kind: str
    ) -> ExpectedTarget | None:
        """What a document of `version` beside its payloads (a chunk index, a delta:
        `tuf.document_target`) must be; None if the release keys signed none
        (VerificationError if they signed it for something else)."""
        return self._expected(tuf.document_target(version, name), os_name, version, kind)

    def _expected(
        self, path: str, os_name: str, version: Version, kind: str
    ) -> ExpectedTarget | None:
        info = self._targetinfo(path)
        if info is None:
            return None
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

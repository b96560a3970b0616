"""The update transaction (docs/client.md, "The update transaction").

The order is what makes it safe, atomic and resumable; each step that writes
the disk is durable (fsync of data and directory) before the next starts:

1. check     ask for the latest version; stop unless it is newer than the running one
2. preflight the target slot is not running, open, mounted or mapped; space for it
3. download  UKI and Core with signatures (unprivileged; resumed if an
             earlier run left them); each moved by copying it once, from its end,
             into a directory only root can reach, and that copy verified, with
             the version, before the disk is touched; only the copies are read
             from then on
4. entries   remove every UKI but the running one: the slot about to be
             overwritten is unbootable before it is touched
5. slot      rename the unused LV to core_<new> (or create it); write Core, fsync,
             read it back and check it against the signed digest
6. entry     install the UKI as <name>.new, fsync, rename, fsync the directory:
             only now is the new version bootable
7. ready     <run-dir>/update-ready (a tmpfs: gone at reboot); downloads removed;
             report to the server; reboot if configured

Only one transaction runs at a time (an exclusive flock on the run directory).
A version whose boot entry ran out of boot tries is not installed again.

A crash at any point leaves the running version's entry and LV untouched, and
every entry on the ESP names a complete, verified LV; a rerun redoes the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hmac
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from rampart import files, run
from rampart.contracts import cmdline, hashing, signing, tuf, wire
from rampart.contracts import payload as payload_mod
from rampart.contracts.version import Version, check_release_length
from rampart.device import bootloader, documents, incremental, rollback, secureboot, stream, trust
from rampart.device import esp as esp_mod
from rampart.device import identity as device_identity
from rampart.device.config import DeviceConfig, Identity, RemoteConfig
from rampart.device.corewrite import Checkpoint, write_core
from rampart.device.fetch import (
    Download,
    Fetcher,
    open_directory,
    open_plain_file,
    remove_entry,
)
from rampart.device.slots import (
    Slot,
    SlotBackend,
    busy_reason,
    check_lv_name,
    open_backend,
    slot_name,
)
from rampart.device.tpm import Tpm, secure_boot_enabled
from rampart.device.transport import Limits
from rampart.errors import (
    ConflictError,
    FormatError,
    LocalError,
    RampartError,
    RemoteDataError,
    TransportError,
    UsageError,
    VerificationError,
)

log = logging.getLogger(__name__)

SIG_CAP = 1 << 16
READY_FILE = "update-ready"


class Outcome(StrEnum):
    UP_TO_DATE = "up-to-date"
    UPDATED = "updated"
    PENDING = "pending-reboot"


# Exit codes of `rampart update` besides the error tree's (docs/exit-codes.md).
EXIT_UPDATED = 20
EXIT_PENDING = 21


@dataclass(frozen=True)
class UpdateResult:
    outcome: Outcome
    running: Version
    latest: Version | None = None
    slot: str | None = None
    entry: str | None = None
    removed_entries: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": str(self.outcome),
            "running": self.running.core,
            "latest": None if self.latest is None else self.latest.core,
            "slot": self.slot,
            "entry": self.entry,
            "removed_entries": self.removed_entries,
        }


@dataclass
class Device:
    """One device: its configuration, identity, slots, ESP and working directories."""

    config: DeviceConfig
    remote: RemoteConfig
    identity: Identity
    slots: SlotBackend
    esp: esp_mod.Esp
    download_dir: Path
    run_dir: Path
    target: Version | None = None  # the version being installed, once known (for reports)
    # The TPM holding the rollback counter: "config" (the default) opens the one
    # [tpm] names when it is first needed; None: no TPM (tests inject one).
    tpm: Tpm | Literal["config"] | None = "config"
    proc_cmdline: Path = rollback.PROC_CMDLINE  # where the running epoch is read
    tuf: trust.TufSettings | None = None  # None: minisign mode
    # TUF mode: what each payload of the version being installed must be, by kind
    targets: dict[str, trust.ExpectedTarget] = field(default_factory=dict)
    # TUF mode: what the chunk indexes and the delta the update may use must be, by
    # their path below the dist URL (`<V>/<name>`); those not signed are not here
    documents: dict[str, trust.ExpectedTarget] = field(default_factory=dict)

    @property
    def ready_file(self) -> Path:
        return self.run_dir / READY_FILE

    @property
    def verified_dir(self) -> Path:
        """Where the verified copies of the payloads live: beside the download
        directory, never handed to the fetch user (`<download dir>.verified`)."""
        return self.download_dir.with_name(self.download_dir.name + ".verified")

    def rollback_tpm(self) -> Tpm | None:
        """The machine's TPM (None without one; LocalError if [tpm] required is unmet)."""
        if isinstance(self.tpm, str):
            self.tpm = rollback.machine_tpm(self.config)
        return self.tpm

    def headers(self) -> dict[str, str]:
        return wire.identity_headers(self.identity.machine_id, self.identity.version)

    def signed(self, kind: str, body: bytes = b"") -> dict[str, str]:
        """The headers that sign a check or a report with this device's key (made now if
        it has none: docs/client.md "Device identity"); none when [identity] sign is
        off, or when signing fails (logged: the request goes anonymous, the update on)."""
        if not self.config.sign_requests:
            return {}
        try:
            key = device_identity.ensure(self.config.identity_dir, self.rollback_tpm())
            try:
                epoch: int | None = rollback.running_epoch(self.proc_cmdline)
            except RampartError:
                epoch = None
            request = device_identity.Request(
                kind,
                self.config.os_name,
                self.identity.machine_id,
                self.identity.version.core,
                epoch,
                body,
            )
            return device_identity.signed_headers(key, self.config.identity_dir, request)
        except (RampartError, OSError) as exc:
            log.warning("request not signed (it goes anonymous): %s", exc)
            return {}


def open_device(
    config: DeviceConfig,
    remote: RemoteConfig,
    identity: Identity,
    download_dir: Path,
    run_dir: Path,
    pinned_roots: tuple[Path, ...] = (),
) -> Device:
    """Bind a configuration to its slot backend, its ESP and its trust (`pinned_roots`:
    where a pinned TUF root may be, in order of preference)."""
    tuf_settings = trust.settings(
        config.trust_mode, config.tuf_dir, pinned_roots, remote.tuf_url, remote.channel
    )
    return Device(
        config,
        remote,
        identity,
        open_backend(config),
        esp_mod.Esp(config.esp_directory, config.os_name),
        download_dir,
        run_dir,
        tuf=tuf_settings,
    )


def make_fetcher(device: Device) -> Fetcher:
    """The fetcher for `device`: sandboxed as the fetch user when running as root."""
    config = device.config
    user = config.fetch_user if os.geteuid() == 0 else None
    limits = Limits(
        config.connect_timeout, config.read_timeout, config.min_speed, config.stall_window
    )
    return Fetcher(device.remote.root_ca, device.headers(), limits, user, device.download_dir)


def _no_checkpoint(_: str) -> None:
    return None


def payload_path(device: Device, version: Version, kind: str) -> Path:
    return device.download_dir / f"{device.config.os_name}-{version.core}-{kind}"


def payload_url(device: Device, version: Version, kind: str) -> str:
    return (
        f"{device.remote.dist_url}/{version.core}/{wire.payload_name(device.config.os_name, kind)}"
    )


def check_payload(device: Device, payload: Path, version: Version) -> bytes:
    """Verify `payload` with its `.sig` and the pinned key; its version must be `version`.

    Returns the BLAKE2b-512 digest of the verified bytes.
    """
    sig_path = payload.with_name(payload.name + ".sig")
    signature = signing.load_signature(sig_path)
    digest = signing.verify_file(payload, signature, device.config.public_key)
    _check_signed_version(signature, payload, version)
    return digest


def _check_signed_version(signature: signing.Signature, payload: Path, version: Version) -> None:
    comment = signature.trusted_text(f"{payload}.sig")
    if comment != version.core:
        raise VerificationError(
            f"{payload.name}: signed for version {comment[:80]!r}, expected {version.core!r}"
        )


def check_latest(device: Device, fetcher: Fetcher) -> Version:
    """The version to install: the server's answer (minisign mode), or what this
    machine's signed channel head offers it (TUF mode: check_trust)."""
    url = wire.version_url(device.remote.update_url, device.config.os_name)
    offered, nonce = fetcher.check_version(url, device.signed("version"))
    if device.config.sign_requests:
        device_identity.save_nonce(device.config.identity_dir, nonce)
    if device.tuf is None:
        return offered
    return check_trust(device, device.tuf, fetcher, offered, url)


def check_trust(
    device: Device, settings: trust.TufSettings, fetcher: Fetcher, offered: Version, url: str
) -> Version:
    """TUF mode: refresh the signed metadata (a freeze, a rollback, a mix-and-match or
    an unsigned file is refused here, up to date or not), choose the version the signed
    channel head offers this machine, and if it is newer than the running one, note what
    each of its payloads must be (`device.targets`)."""
    from rampart.device.tufclient import TufClient  # python-tuf: TUF mode only

    client = TufClient(settings, fetcher)
    client.refresh()
    head = client.channel_head(device.config.os_name)
    chosen = trust.choose(head, offered, device.identity.machine_id, url)
    if chosen > device.identity.version:
        os_name, running = device.config.os_name, device.identity.version
        device.targets = {kind: client.payload(os_name, chosen, kind) for kind in wire.PAYLOADS}
        wanted = (
            (chosen, wire.index_name(os_name), tuf.INDEX_KIND),
            (running, wire.index_name(os_name), tuf.INDEX_KIND),
            (chosen, wire.delta_name(os_name, running), tuf.DELTA_KIND),
            (chosen, wire.loader_name(os_name), tuf.LOADER_KIND),
            *((chosen, wire.sbvar_name(os_name, v), tuf.SBVAR_KIND) for v in wire.SBVARS),
        )
        for version, name, kind in wanted:
            expected = client.document(os_name, version, name, kind)
            if expected is not None:
                device.documents[f"{version.core}/{name}"] = expected
    return chosen


def pick_slot(device: Device, target: Version) -> Slot | None:
    """The LV to overwrite: an existing core_* LV that is not in use, or None to create one.

    Prefers the LV already named for the target (a resumed update), then the
    lowest other version; never the running one.
    """
    running = device.identity.version
    candidates = []
    for slot in device.slots.slots():
        if slot.version is None:
            log.warning("ignoring LV %s: not core_<version>", slot.name)
            continue
        reason = busy_reason(slot, running)
        if reason is not None:
            if slot.version != running:
                log.warning("not using %s: %s", slot.name, reason)
            continue
        candidates.append(slot)
    if not candidates:
        return None
    candidates.sort(key=lambda s: (s.version != target, s.version))
    return candidates[0]


def _clean_downloads(device: Device, keep: Version | None) -> None:
    """Remove every download and verified copy but `keep`'s payloads and signatures
    (all if None). Works on directory descriptors and follows no symbolic link."""
    wanted = set()
    if keep is not None:
        for kind in ("efiboot", "core"):
            name = payload_path(device, keep, kind).name
            wanted |= {name, name + ".sig"}
    for directory, kept in ((device.download_dir, wanted), (device.verified_dir, wanted)):
        try:
            dir_fd = open_directory(directory)
        except FileNotFoundError:
            continue
        try:
            for name in os.listdir(dir_fd):  # noqa: PTH208 - a directory descriptor
                fd = open_plain_file(dir_fd, name)
                if fd is None:
                    log.warning("removing %s from %s: not a regular file", name, directory)
                    remove_entry(dir_fd, name)
                    continue
                os.close(fd)
                if name not in kept:
                    log.debug("removing %s from %s", name, directory)
                    _unlink(dir_fd, name)
        finally:
            os.close(dir_fd)


def _unlink(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _open_verified_dir(device: Device) -> int:
    """The directory of verified copies (created 0700), opened without following a
    symbolic link; it must be this user's and writable by no one else, else LocalError."""
    path = device.verified_dir
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        fd = open_directory(path)
    except OSError as exc:
        raise LocalError(
            f"{path}: cannot use the directory of verified copies: {exc.strerror}"
        ) from None
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(fd)
        raise LocalError(
            f"{path}: the directory of verified copies must belong to uid {os.geteuid()} "
            "and be writable by no one else"
        )
    os.fchmod(fd, 0o700)
    return fd


def copy_verified(device: Device, version: Version, kind: str) -> bytes:
    """Move the downloaded payload of `kind` into the directory of verified copies
    by copying it once, and verify the copy; the BLAKE2b-512 digest of the copy.

    The signature and the payload are opened relative to the download directory
    with O_NOFOLLOW and must be regular files with one link (checked with fstat
    on the opened file). The copy, `<download dir>.verified/<name>`, is new
    (O_EXCL, 0600) in a directory only this user can reach, and is what is hashed
    and checked against its signature: what is verified is what every later step
    reads. With room for both, the payload is copied forward and the bytes written
    are hashed on the way; without, it is copied from its end and truncated behind
    what was copied, so the copy needs no more space than the download it replaces
    (a Core can be most of the state partition), then hashed. It is a scratch
    copy, not fsynced: a crash only means downloading again.

    The download is gone afterwards, whether the copy verifies or not. If the
    copy fails part-way (a write error), the download keeps its first part, to
    resume. The signature is kept beside a copy that verified, so that a later
    run can reuse the copy (reuse_verified). RampartError on any failure, with no
    copy left.
    """
    name = payload_path(device, version, kind).name
    source = device.download_dir / name
    copy = device.verified_dir / name
    verified_fd = _open_verified_dir(device)
    try:
        download_fd = open_directory(device.download_dir)
    except OSError as exc:
        os.close(verified_fd)
        raise LocalError(f"{device.download_dir}: cannot open: {exc.strerror}") from None
    try:
        target = device.targets.get(kind)
        raw_signature = b""
        if target is None:
            raw_signature = _read_signature(download_fd, name + ".sig", SIG_CAP, source)
            evidence = _Evidence(signing.parse_signature(raw_signature, f"{source}.sig"))
        else:
            evidence = _Evidence(target=target)
        src = open_plain_file(download_fd, name, writable=True)
        if src is None:
            raise LocalError(f"{source}: missing, or not a regular file with one link")
        try:
            digest = _copy_and_verify(device, src, verified_fd, copy, evidence)
        finally:
            os.close(src)
        _unlink(download_fd, name)  # copied
        if evidence.signature is not None:
            _check_signed_version(evidence.signature, source, version)
            _write_new(verified_fd, name + ".sig", raw_signature)
            _unlink(download_fd, name + ".sig")
    except OSError as exc:
        _unlink(verified_fd, name)
        raise LocalError(f"{copy}: cannot copy the download: {exc.strerror}") from None
    except RampartError:
        _unlink(verified_fd, name)
        _unlink(download_fd, name)  # consumed, or not worth resuming: fetched afresh
        raise
    finally:
        os.close(download_fd)
        os.close(verified_fd)
    return digest


def reuse_verified(device: Device, version: Version, kind: str) -> bytes | None:
    """The BLAKE2b-512 digest of the verified copy of `kind` an earlier run left, if
    it still verifies with the signature kept beside it (a crash may have cut a copy
    that was never fsynced), else None, with the copy removed. These files are this
    user's, in a directory only this user can reach."""
    name = payload_path(device, version, kind).name
    copy = device.verified_dir / name
    if not copy.exists():
        return None
    verified_fd = _open_verified_dir(device)
    try:
        target = device.targets.get(kind)
        if target is None:
            evidence = _Evidence(
                signing.parse_signature(
                    _read_signature(verified_fd, name + ".sig", SIG_CAP, copy), f"{copy}.sig"
                )
            )
        else:
            evidence = _Evidence(target=target)
        fd = open_plain_file(verified_fd, name)
        if fd is None:
            raise LocalError(f"{copy}: not a regular file with one link")
        try:
            digest = _verify_fd(device, fd, copy, evidence)
        finally:
            os.close(fd)
        if evidence.signature is not None:
            _check_signed_version(evidence.signature, copy, version)
    except RampartError as exc:
        log.info("not reusing %s: %s", copy, exc)
        _unlink(verified_fd, name)
        _unlink(verified_fd, name + ".sig")
        return None
    finally:
        os.close(verified_fd)
    return digest


def _new_file(dir_fd: int, name: str) -> int:
    """A read-write descriptor of `name`, created new (O_EXCL, 0600, no symbolic link
    followed) in `dir_fd`, an old file of that name removed first."""
    _unlink(dir_fd, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dir_fd)


def _write_new(dir_fd: int, name: str, data: bytes) -> None:
    """`data` into `name`, a new file (0600) in `dir_fd` (an old one replaced)."""
    fd = _new_file(dir_fd, name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _read_signature(dir_fd: int, name: str, cap: int, payload: Path) -> bytes:
    """A signature file in `dir_fd`, read once (at most `cap` bytes)."""
    fd = open_plain_file(dir_fd, name)
    if fd is None:
        raise LocalError(f"{payload}.sig: signature not found, or not a regular file")
    try:
        data = os.read(fd, cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise FormatError(f"{payload}.sig: signature is larger than {cap} bytes")
    return data


@dataclass(frozen=True)
class _Evidence:
    """What a payload's copy is checked against: its minisign signature (minisign
    mode), or the target the release keys signed (TUF mode: its length and digest)."""

    signature: signing.Signature | None = None
    target: trust.ExpectedTarget | None = None

    @property
    def needs_bytes(self) -> bool:
        """A legacy minisign signature covers the bytes themselves, not a digest."""
        return self.signature is not None and not self.signature.prehashed

    def check_size(self, size: int, path: Path) -> None:
        if self.signature is not None:
            _check_legacy_size(self.signature, size, path)
        elif self.target is not None and size != self.target.length:
            raise VerificationError(
                f"{path.name}: {size} bytes, but the signed target {self.target.path} "
                f"has {self.target.length}"
            )

    def verify(self, device: Device, digest: bytes, data: bytes | None, path: Path) -> None:
        if self.target is not None:
            if not hmac.compare_digest(digest, self.target.digest):
                raise VerificationError(
                    f"{path.name}: its BLAKE2b-512 digest is not the one the release keys "
                    f"signed for {self.target.path}"
                )
            return
        if self.signature is None:
            raise LocalError(f"{path.name}: nothing to check it against")
        try:
            signing.verify(
                device.config.public_key, self.signature, digest if data is None else data
            )
        except VerificationError as exc:
            raise VerificationError(f"{path.name}: {exc}") from None


def _copy_and_verify(
    device: Device, src: int, verified_fd: int, copy: Path, evidence: _Evidence
) -> bytes:
    """Copy `src` (writable) into `copy` (new, 0600) and check the copy against
    `evidence`; the BLAKE2b-512 digest of the copy.

    The copy is made forward in one pass (`_copy_forward`) where the file system
    can punch holes, else from the end of `src`, truncated behind each chunk
    (`_copy_backward`), and then read again to be hashed. Either way the two files
    never take much more room than one."""
    size = os.fstat(src).st_size
    evidence.check_size(size, copy)  # before the download is consumed
    dst = _new_file(verified_fd, copy.name)
    try:
        os.ftruncate(dst, size)  # sparse: blocks are allocated as the chunks arrive
        legacy = bytearray() if evidence.needs_bytes else None
        try:
            digest = _copy_forward(src, dst, size, copy, legacy)
        except OSError:
            os.ftruncate(src, 0)  # holes at its start: not worth resuming
            raise
        if digest is None:
            _copy_backward(src, dst, size, copy)
            return _verify_fd(device, dst, copy, evidence)
        evidence.verify(device, digest, None if legacy is None else bytes(legacy), copy)
        return digest
    finally:
        os.close(dst)


def _copy_forward(
    src: int, dst: int, size: int, copy: Path, legacy: bytearray | None
) -> bytes | None:
    """Copy `src` into `dst` CHUNK at a time from the start, in one pass: each chunk
    is read ahead (in a thread) and its blocks then freed in `src` (a punched
    hole), written to `dst` (in another thread) and hashed, so the bytes hashed are
    the bytes written, the copy costs about the time of hashing it, and `src`
    shrinks as `dst` grows. The BLAKE2b-512 of the copy (`legacy`, if given, gets
    its bytes); None, with nothing changed, where the file system cannot punch."""

    def take(offset: int) -> tuple[bytes, bool]:
        data = os.pread(src, min(signing.CHUNK, size - offset), offset)
        return data, files.punch_hole(src, offset, len(data))

    hasher = hashing.blake2b()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="write-behind") as writer,
    ):
        reading = reader.submit(take, 0)
        writing: Future[None] | None = None
        done = 0
        while done < size:
            data, freed = reading.result()
            if not data:
                raise VerificationError(f"{copy.name}: the download changed while copied")
            if done == 0 and not freed:
                return None
            if done + len(data) < size:
                reading = reader.submit(take, done + len(data))
            if writing is not None:
                writing.result()
            writing = writer.submit(files.pwrite_all, dst, data, done)
            hasher.update(data)
            if legacy is not None:
                legacy += data
            done += len(data)
        if writing is not None:
            writing.result()
    return hasher.digest()


def _copy_backward(src: int, dst: int, size: int, copy: Path) -> None:
    """Copy `src` into `dst` from its end, in CHUNK blocks, truncating `src` behind each."""
    end = size
    while end > 0:
        start = (end - 1) // signing.CHUNK * signing.CHUNK
        data = os.pread(src, end - start, start)
        if len(data) != end - start:
            raise VerificationError(f"{copy.name}: the download changed while copied")
        files.pwrite_all(dst, data, start)
        os.ftruncate(src, start)
        end = start


def _check_legacy_size(signature: signing.Signature, size: int, path: Path) -> None:
    if not signature.prehashed and size > signing.LEGACY_MAX_BYTES:
        raise VerificationError(
            f"{path}: legacy (non-prehashed) signatures are limited to 1 GiB files"
        )


def _verify_fd(device: Device, fd: int, path: Path, evidence: _Evidence) -> bytes:
    """Hash the file open as `fd` (this user's, in a directory only this user can
    reach: its size holds) from its start and check it against `evidence`; its
    BLAKE2b-512 digest. (A legacy signature covers the bytes, held in memory.)"""
    evidence.check_size(os.fstat(fd).st_size, path)
    hasher = hashing.blake2b()
    legacy = bytearray() if evidence.needs_bytes else None
    with hashing.blocks(fd) as chunks:
        for chunk in chunks:
            hasher.update(chunk)
            if legacy is not None:
                legacy += chunk
    digest = hasher.digest()
    evidence.verify(device, digest, None if legacy is None else bytes(legacy), path)
    return digest


def verified_path(device: Device, version: Version, kind: str) -> Path:
    """Where the verified copy of a payload is (`download`)."""
    return device.verified_dir / payload_path(device, version, kind).name


def download(
    device: Device, fetcher: Fetcher, version: Version, kinds: tuple[str, ...] = wire.PAYLOADS
) -> dict[str, bytes]:
    """Fetch the payloads `kinds` of `version` (resuming what an earlier run left in
    the download directory), move them by copying where only this user can reach them,
    and verify the copies (`verified_path`).

    Returns the BLAKE2b-512 digest of each verified copy. Every later step reads these,
    never the download directory. A payload left by an earlier run that does not
    verify is fetched once more.
    """
    device.download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _clean_downloads(device, version)
    caps = {"efiboot": device.config.max_efiboot_size, "core": device.config.max_core_size}
    digests: dict[str, bytes] = {}
    for kind in kinds:
        reused = reuse_verified(device, version, kind)
        if reused is not None:
            log.info(
                "reusing the verified download of %s", payload_path(device, version, kind).name
            )
            digests[kind] = reused
    kinds = tuple(kind for kind in kinds if kind not in digests)
    for attempt in (1, 2):
        if not kinds:
            break
        wanted: list[Download] = []
        cached = []
        for kind in kinds:
            payload = payload_path(device, version, kind)
            sig = payload.with_name(payload.name + ".sig")
            if payload.exists():
                cached.append(kind)
            sig.unlink(missing_ok=True)  # small: always fetched with its payload
            url = payload_url(device, version, kind)
            target = device.targets.get(kind)
            if target is None:
                wanted.append(Download(url + wire.SIGNATURE_SUFFIX, sig, SIG_CAP))
            wanted.append(Download(url, payload, caps[kind] if target is None else target.length))
        log.info("downloading %s", ", ".join(f.url.rsplit("/", 1)[-1] for f in wanted))
        started = time.monotonic()
        sizes = fetcher.download(wanted)
        log.debug("downloaded %d bytes in %.2f s", sum(sizes), time.monotonic() - started)
        retry = []
        for kind in kinds:
            try:
                started = time.monotonic()
                digests[kind] = copy_verified(device, version, kind)
                log.debug("%s copied and verified in %.2f s", kind, time.monotonic() - started)
            except VerificationError as exc:
                if attempt == 2 or kind not in cached:
                    raise
                log.info("%s left by an earlier run: %s; fetching it again", kind, exc)
                retry.append(kind)
        if not retry:
            break
        kinds = tuple(retry)
    return digests


@dataclass(frozen=True)
class _Streaming:
    """A release whose Core streams into its slot (device/stream.py): its verified
    UKI, the root hash it pins, Core's evidence, and either what `stream.plan`
    verified (with the chunks to rebuild Core from, if it can be) or the delta that
    makes Core and what `stream.shape` read of its layout."""

    efiboot: Path
    root: RootHash
    evidence: _Evidence
    url: str
    cap: int  # the most bytes Core may have
    size: int  # Core's, data and tree
    plan: stream.Plan | None
    chunks: incremental.ChunkPlan | None = None  # Core rebuilt from chunks, if it can be
    made: tuple[incremental.DeltaPlan, stream.Shape] | None = None  # Core made by a delta


def stream_plan(
    device: Device, fetcher: Fetcher, version: Version, slot: Slot | None
) -> _Streaming | None:
    """Download and verify the UKI of `version`; if Core can stream (the UKI pins a
    root hash, Core's signature covers a digest, its tree follows its data), fetch
    and check its tree (or, for a delta, its layout) and run the checks
    `_check_download` runs, before the disk is touched. None: Core is downloaded
    whole instead."""
    download(device, fetcher, version, ("efiboot",))
    efiboot = verified_path(device, version, "efiboot")
    facts = _check_uki(device, efiboot, version)  # the UKI read once, and let go
    if facts.root is None:
        return None
    core = payload_path(device, version, "core")
    evidence = _core_evidence(device, fetcher, version)
    if evidence.needs_bytes:
        log.info("%s: a legacy signature covers its bytes: downloaded whole", core.name)
        return None
    target = device.targets.get("core")
    url = payload_url(device, version, "core")
    cap = device.config.max_core_size if target is None else target.length
    made = None
    delta = _delta_plan(device, fetcher, version, facts.root)
    if delta is not None:
        try:
            shape = stream.shape(fetcher, url, facts.root, cap, core.name)
        except (VerificationError, FormatError) as exc:
            log.warning("delta refused (%s): Core is rebuilt from chunks", exc)
            shape = None
        made = None if shape is None else (delta, shape)
    plan = None
    if made is not None:
        size = made[1].size
    else:
        plan = stream.plan(fetcher, url, facts.root, cap, core.name)
        if plan is None:
            return None
        size = plan.size
    streaming = _Streaming(efiboot, facts.root, evidence, url, cap, size, plan, made=made)
    evidence.check_size(streaming.size, core)
    _check_fits(device, streaming.size, latest=version, slot=slot)
    if device.targets:
        check_signed_fields(device, efiboot, facts.root, facts.epoch)
    check_rollback(device, efiboot, version, facts.epoch)
    if plan is not None:
        streaming = dataclasses.replace(
            streaming, chunks=_chunk_plan(device, fetcher, version, plan)
        )
    return streaming


def _seed(device: Device) -> Slot | None:
    """The running Core's LV: what chunks and deltas are read from."""
    running = device.identity.version
    return next((s for s in device.slots.slots() if s.version == running), None)


def _delta_plan(
    device: Device, fetcher: Fetcher, version: Version, root: RootHash
) -> incremental.DeltaPlan | None:
    """The delta that makes Core from the running one (device/incremental.py), None to
    rebuild it from chunks: with a delta from the running version published (and in
    TUF mode signed as a target) and the running Core's LV and root hash known."""
    running = device.identity.version
    seed, entry = _seed(device), device.esp.find(running)
    if seed is None or entry is None:
        return None
    try:
        running_root = cmdline.efi_root_hash(entry.path)
    except RampartError as exc:
        log.info("%s: no root hash (%s): no delta applies", entry.path.name, exc)
        return None
    if running_root is None:
        return None
    try:
        return incremental.delta_plan(
            fetcher, _documents(device), device.remote.dist_url,
            device.config.os_name, version, running, seed, running_root.root_hash, root,
        )  # fmt: skip
    except RampartError as exc:
        log.warning("delta refused (%s): Core is rebuilt from chunks", exc)
        return None


def _prepare_firmware(device: Device, efiboot: Path, version: Version) -> None:
    """With Secure Boot on, before anything changes: the firmware must start the new
    UKI, with db as it is or once the db append the release carries is applied (then
    it is applied now); and the state key is sealed for the boot that follows
    (`secureboot.before_install`)."""
    efivars_dir = device.config.efivars
    if not secure_boot_enabled(efivars_dir):
        return
    config = device.config
    seal = secureboot.sealing(efivars_dir, device.esp, config.tpm_tcti, config.tpm_pcrs)
    secureboot.before_install(
        device.esp, config.loader_dir, version, device.identity.version, efivars_dir,
        efiboot.read_bytes(), seal,
    )  # fmt: skip


def _documents(device: Device) -> documents.Trust:
    """What verifies a release's chunk index or delta: the targets the release keys
    signed (TUF mode), else the pinned minisign key."""
    return device.documents if device.targets else device.config.public_key


def _chunk_plan(
    device: Device, fetcher: Fetcher, version: Version, plan: stream.Plan
) -> incremental.ChunkPlan | None:
    """The chunks to rebuild Core from (device/incremental.py), None to stream it whole:
    with a chunk index for both versions (in TUF mode each signed as a target) and the
    running Core's LV."""
    running = device.identity.version
    seed = _seed(device)
    if seed is None:
        return None
    try:
        return incremental.plan(
            fetcher, _documents(device), device.remote.dist_url,
            device.config.os_name, version, running, seed, plan,
        )  # fmt: skip
    except RampartError as exc:
        log.warning("chunk index refused (%s): Core is streamed whole", exc)
        return None


def _check_uki(device: Device, efiboot: Path, version: Version) -> payload_mod.CheckedUki:
    """`payload.check_uki` on the verified UKI `efiboot` of `version` for this device."""
    require_root_hash = verity_device(device)  # reads the installed UKIs first
    try:
        data = efiboot.read_bytes()
    except OSError as exc:
        raise LocalError(f"{efiboot}: cannot read the payload: {exc.strerror}") from None
    return payload_mod.check_uki(
        data,
        str(efiboot),
        os_name=device.config.os_name,
        version=version,
        vg=payload_mod.device_vg(device.config.backend, device.config.core_destination),
        require_root_hash=require_root_hash,
    )


def _core_evidence(device: Device, fetcher: Fetcher, version: Version) -> _Evidence:
    """What a streamed Core is checked against: its signed TUF target, or its minisign
    signature (fetched alone, read back by root, its version checked)."""
    target = device.targets.get("core")
    if target is not None:
        return _Evidence(target=target)
    core = payload_path(device, version, "core")
    name = core.name + ".sig"
    url = payload_url(device, version, "core")
    (device.download_dir / name).unlink(missing_ok=True)
    fetcher.download([Download(url + wire.SIGNATURE_SUFFIX, device.download_dir / name, SIG_CAP)])
    dir_fd = open_directory(device.download_dir)
    try:
        raw = _read_signature(dir_fd, name, SIG_CAP, core)
        _unlink(dir_fd, name)
    finally:
        os.close(dir_fd)
    signature = signing.parse_signature(raw, f"{core}.sig")
    _check_signed_version(signature, core, version)
    return _Evidence(signature)


RootHash = cmdline.RootHash  # what the new UKI's command line pins


def verity_device(device: Device) -> bool:
    """Whether this device's Cores carry verity: the running kernel or an installed EFI
    binary of this OS pins a verity root hash."""
    try:
        running = device.proc_cmdline.read_bytes()[: 1 << 16].decode("utf-8", "replace")
    except OSError:
        running = ""
    if cmdline.root_hash(running, str(device.proc_cmdline)) is not None:
        return True
    for entry in device.esp.entries():
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            raise LocalError(f"{entry.path}: cannot read the boot entry: {exc.strerror}") from None
        if payload_mod.pins_root_hash(data, entry.path.name):
            return True
    return False


def check_release(device: Device, efiboot: Path, core: Path, version: Version) -> RootHash | None:
    """Check what the verified payloads are (contracts/payload.py): the UKI of this OS and
    `version` booting `core_<version>` on this device's volume group, with a root hash
    on a verity device, and a squashfs Core carrying the tree that root hash pins.
    Called on the verified payload files, before the disk is touched; returns the root
    hash the written slot is checked against."""
    checked = payload_mod.check_release(
        efiboot,
        core,
        os_name=device.config.os_name,
        version=version,
        vg=payload_mod.device_vg(device.config.backend, device.config.core_destination),
        require_root_hash=verity_device(device),
    )
    return checked.efiboot.root


def update(
    device: Device, fetcher: Fetcher, checkpoint: Checkpoint = _no_checkpoint
) -> UpdateResult:
    """Run the whole transaction once, holding the update lock.

    Raises RampartError subclasses on failure (an unexpected OSError becomes a
    LocalError naming the file).
    """
    try:
        device.run_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(device.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        unusable = LocalError(f"{device.run_dir}: cannot use the run directory: {exc.strerror}")
        # No run can hold the lock of a run directory that cannot be opened, so this
        # report's fetch cannot disturb one (unlike a run refused by the lock below).
        send_report(device, fetcher, None, "failure", str(unusable))
        raise unusable from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"{device.run_dir}: another update is running") from None
        # Reports are sent while the lock is held: the report's fetch process
        # must not share the download directory with another run's.
        try:
            result = _update_locked(device, fetcher, checkpoint)
        except OSError as exc:
            error: RampartError = LocalError(f"{exc.filename or 'update'}: {exc.strerror or exc}")
            send_report(device, fetcher, device.target, "failure", str(error))
            raise error from None
        except RampartError as exc:
            send_report(device, fetcher, device.target, "failure", str(exc))
            raise
        if result.outcome == Outcome.UPDATED:
            send_report(device, fetcher, result.latest, "success")
        return result
    finally:
        os.close(lock_fd)


def _update_locked(device: Device, fetcher: Fetcher, checkpoint: Checkpoint) -> UpdateResult:
    running = device.identity.version
    if device.ready_file.exists():
        log.info("an update is already installed and waits for a reboot")
        return UpdateResult(Outcome.PENDING, running)
    checkpoint("check")
    latest = check_latest(device, fetcher)
    if latest <= running:
        if latest < running:
            log.warning("server offers %s, older than the running %s: ignored", latest, running)
        else:
            log.info("up to date (%s)", running)
        return UpdateResult(Outcome.UP_TO_DATE, running, latest)
    log.info("update available: %s -> %s", running, latest)
    device.target = latest
    slot = _preflight(device, latest, checkpoint)

    checkpoint("download")
    streaming = stream_plan(device, fetcher, latest, slot)
    if streaming is None:
        core_digest = download(device, fetcher, latest)["core"]
        efiboot = verified_path(device, latest, "efiboot")
        core = verified_path(device, latest, "core")
        root = _check_download(device, efiboot, core, latest, slot)
    else:
        efiboot, root = streaming.efiboot, streaming.root
    for stage in (bootloader.stage, secureboot.stage):
        stage(
            fetcher, _documents(device), device.remote.dist_url, device.config.os_name, latest,
            device.config.loader_dir,
        )  # fmt: skip
    _prepare_firmware(device, efiboot, latest)

    checkpoint("remove-entries")
    removed = device.esp.remove_all_except(running)

    checkpoint("take-slot")
    slot = _take_slot(device, slot, latest)

    checkpoint("write-core")
    if streaming is None:
        log.info("writing Core %s into %s", latest, slot.path)
        write_core(core, slot, core_digest, checkpoint, root)
    else:
        _install_streamed(device, fetcher, streaming, slot, latest, checkpoint)
    log.info("Core %s written and verified", latest)

    checkpoint("install-entry")
    entry = device.esp.install(efiboot, latest, device.config.boot_tries)

    checkpoint("ready")
    _mark_ready(device, latest)
    return UpdateResult(
        Outcome.UPDATED, running, latest, slot.name, entry.name, [p.name for p in removed]
    )


def _install_streamed(
    device: Device,
    fetcher: Fetcher,
    streaming: _Streaming,
    slot: Slot,
    latest: Version,
    checkpoint: Checkpoint,
) -> None:
    """Core into `slot`: made by a delta, or rebuilt from chunks, if it can be; else
    (or if that fails: a delta that does not make the Core the UKI pins, a chunk
    missing, corrupt or another one) streamed whole from the server, which resumes
    after what was written and verified."""
    evidence, name = streaming.evidence, payload_path(device, latest, "core")

    def check_digest(digest: bytes) -> None:
        evidence.verify(device, digest, None, name)

    plan, chunks = streaming.plan, streaming.chunks
    if streaming.made is not None:
        delta, shape = streaming.made
        log.info("writing Core %s into %s, made by a delta", latest, slot.path)
        feed = incremental.from_delta(delta, shape.size)
        try:
            stream.install_made(feed, shape, slot, check_digest, checkpoint, streaming.root)
            return
        except (TransportError, RemoteDataError, VerificationError, FormatError) as exc:
            log.warning("delta update failed (%s): Core is rebuilt from chunks", exc)
        plan = stream.plan(fetcher, streaming.url, streaming.root, streaming.cap, name.name)
        if plan is None:
            raise RemoteDataError(f"{streaming.url}: the server no longer streams it")
        _check_fits(device, plan.size, latest=latest, slot=slot)
        chunks = _chunk_plan(device, fetcher, latest, plan)
    if plan is None:
        raise LocalError("a streamed Core without a plan")

    def install(feed: stream.Feed) -> None:
        stream.install(feed, plan, slot, check_digest, checkpoint, streaming.root)

    if chunks is not None:
        log.info("writing Core %s into %s, rebuilt from chunks", latest, slot.path)
        try:
            install(incremental.from_chunks(fetcher, chunks, plan))
            return
        except (TransportError, RemoteDataError) as exc:
            log.warning("incremental update failed (%s): streaming Core whole", exc)
    log.info("writing Core %s into %s, streamed from the server", latest, slot.path)
    install(stream.from_server(fetcher, plan))


def _preflight(device: Device, latest: Version, checkpoint: Checkpoint) -> Slot | None:
    """Refuse what would fail or cost the fallback before anything is fetched or
    changed; the slot to overwrite (None: one is created)."""
    running = device.identity.version
    check_names(device, latest)
    failed = device.esp.find(latest)
    if failed is not None and failed.bad:
        raise ConflictError(
            f"{failed.path.name}: version {latest.core} already failed to boot on this machine "
            "(its boot counter ran out); not installing it again until a newer one is offered"
        )

    checkpoint("preflight")
    if device.esp.find(running) is None:
        raise ConflictError(
            f"{device.esp.directory}: no boot entry for the running version {running.core}; "
            "refusing to update a system that could not boot back"
        )
    slot = pick_slot(device, latest)
    if slot is None and device.slots.free_space() < device.config.core_size:
        raise LocalError(
            f"{device.config.core_destination}: not enough free space for a new Core LV "
            f"({device.config.core_size} bytes needed, {device.slots.free_space()} free)"
        )
    return slot


def _check_download(
    device: Device, efiboot: Path, core: Path, latest: Version, slot: Slot | None
) -> RootHash | None:
    """Check the verified payloads before the disk is touched: Core fits the slot, they
    are this device's release of `latest`, and its epoch may boot; the root hash."""
    _check_fits(device, core.stat().st_size, latest, slot)
    root = check_release(device, efiboot, core, latest)
    if device.targets:
        check_signed_fields(device, efiboot, root)
    if root is None:
        log.warning(
            "%s carries no verity root hash: Core is checked against its signature only",
            efiboot.name,
        )
    check_rollback(device, efiboot, latest)
    return root


def _check_fits(device: Device, core_size: int, latest: Version, slot: Slot | None) -> None:
    target_size = slot.size if slot is not None else device.config.core_size
    if core_size > target_size:
        raise LocalError(
            f"Core {latest} ({core_size} bytes) does not fit the target LV ({target_size} bytes)"
        )


def check_signed_fields(
    device: Device, efiboot: Path, root: RootHash | None, epoch: int | None = None
) -> None:
    """TUF mode: the release's UKI says what its signed targets say: the security epoch
    (`epoch`, else read from `efiboot`), and the verity parameters of its Core
    (VerificationError otherwise: a release whose UKI and Core were signed for another
    pairing)."""
    epoch = rollback.uki_epoch(efiboot) if epoch is None else epoch
    for target in device.targets.values():
        if target.fields.epoch != epoch:
            raise VerificationError(
                f"{target.path}: signed for security epoch {target.fields.epoch}, "
                f"but {efiboot.name} has epoch {epoch}"
            )
    core = device.targets["core"].fields
    signed = (
        None if core.root_hash is None else (core.root_hash, core.hash_offset, core.data_blocks)
    )
    pinned = None if root is None else (root.root_hash, root.hash_offset, root.data_blocks)
    if signed != pinned:
        raise VerificationError(
            f"{device.targets['core'].path}: signed with other verity parameters than "
            f"{efiboot.name} pins (another root hash)"
        )


def _take_slot(device: Device, slot: Slot | None, latest: Version) -> Slot:
    """The slot named for `latest`: created, or the picked one renamed."""
    new_name = slot_name(latest)
    if slot is None:
        return device.slots.create(new_name, device.config.core_size)
    if slot.name != new_name:
        return device.slots.rename(slot, new_name)
    return slot


def _mark_ready(device: Device, latest: Version) -> None:
    """The new version is installed and bootable: what follows is housekeeping,
    whose failure is logged, not fatal."""
    try:
        write_ready(device, latest)
        _clean_downloads(device, None)  # installed: the payloads are no longer needed
    except OSError as exc:
        log.error("update installed, but %s: %s", exc.filename or "cleanup", exc.strerror)
    except RampartError as exc:  # a download directory that keeps changing (remove_entry)
        log.error("update installed, but %s", exc)


def check_names(device: Device, version: Version) -> None:
    """Refuse (FormatError) an offered version that cannot name everything the
    transaction creates: the LV core_<V> (LVM: 127 characters), the boot entry
    (with its counter and `.new`) and the downloads (255 bytes each). Checked
    before anything is changed, so such an offer never costs the fallback entry."""
    try:
        check_release_length(version, "offered version")
        check_lv_name(slot_name(version))
    except UsageError as exc:
        raise FormatError(f"{exc}; not installing it") from None
    entry = esp_mod.entry_name(device.config.os_name, version, device.config.boot_tries)
    signatures = [payload_path(device, version, kind).name + ".sig" for kind in ("efiboot", "core")]
    for name in (entry + ".new", *signatures):  # the longest name of each file
        if len(os.fsencode(name)) > 255:
            raise FormatError(
                f"offered version {version.core[:40]}...: the file name {name[:60]}... is longer "
                "than 255 bytes; not installing it"
            )


def write_ready(device: Device, version: Version) -> None:
    """Write the update-ready marker whole or not at all (a temporary file renamed
    over it; /run is a tmpfs: no fsync). Raises OSError naming the marker, the
    temporary removed."""
    temporary = device.ready_file.with_name(f".{READY_FILE}.tmp")
    try:
        temporary.write_text(version.core + "\n")
        os.replace(temporary, device.ready_file)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        reason = f"cannot write the update-ready marker ({exc.strerror})"
        raise OSError(exc.errno, reason, str(device.ready_file)) from None


def check_rollback(
    device: Device, efiboot: Path, version: Version, epoch: int | None = None
) -> None:
    """Refuse (VerificationError) a UKI whose security epoch (`epoch`, else read from
    `efiboot`) is below the TPM's rollback counter (it would never boot) or below the
    running version's epoch."""
    epoch = rollback.uki_epoch(efiboot) if epoch is None else epoch
    chip = device.rollback_tpm()
    counter = None if chip is None else rollback.read_counter(chip)
    running = rollback.running_epoch(device.proc_cmdline)
    log.info(
        "%s has security epoch %d (running epoch %d, rollback counter %s)",
        version,
        epoch,
        running,
        "none: no TPM" if counter is None else counter,
    )
    rollback.check_epoch(version, epoch, counter, running)


def send_report(
    device: Device, fetcher: Fetcher, target: Version | None, outcome: str, error: str = ""
) -> None:
    """Tell the server how an attempt ended (best effort: a failure is only logged)."""
    if not device.config.report:
        return
    body = wire.InstallReport(
        device.identity.version.core, None if target is None else target.core, outcome, error
    ).render()
    url = wire.report_url(device.remote.update_url, device.config.os_name)
    try:
        status = fetcher.report(url, body, device.signed("report", body))
    except (RampartError, OSError) as exc:
        log.info("report not delivered: %s", exc)
        return
    if not 200 <= status < 300:
        log.info("report not accepted: %s answered HTTP %s", url, status)


def reboot() -> None:
    """Ask systemd to reboot; a failure is logged, not raised (the update is installed)."""
    try:
        run.run(["systemctl", "reboot"], timeout=60)
    except RampartError as exc:
        log.error("update installed, but the reboot failed: %s", exc)

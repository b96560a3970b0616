"""The update transaction (docs/client.md, "The update transaction").

The order is what makes it safe, atomic and resumable; each step that writes
the disk is durable (fsync of data and directory) before the next starts:

1. check     ask for the latest version; stop unless it is newer than the running one
2. preflight the target slot is not running, open, mounted or mapped; space for it
3. download  EFI binary and Core with signatures (unprivileged; resumed; reused if
             already verified); both verified, with the version, before the disk is touched
4. entries   remove every EFI binary but the running one: the slot about to be
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

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from rampart import run, signing
from rampart.client import esp as esp_mod
from rampart.client import payload as payload_mod
from rampart.client import rollback
from rampart.client.config import DeviceConfig, Identity, RemoteConfig
from rampart.client.fetch import Fetcher, Job, remove_entry
from rampart.client.slots import (
    Slot,
    SlotBackend,
    busy_reason,
    open_backend,
    slot_name,
)
from rampart.client.transport import Limits
from rampart.errors import (
    ConflictError,
    FormatError,
    LocalError,
    RampartError,
    UsageError,
    VerificationError,
)
from rampart.image import pe, verity
from rampart.tpm import Tpm
from rampart.version import Version, parse_version

log = logging.getLogger(__name__)

SIG_CAP = 1 << 16
READY_FILE = "update-ready"
Checkpoint = Callable[[str], None]


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

    @property
    def ready_file(self) -> Path:
        return self.run_dir / READY_FILE

    def rollback_tpm(self) -> Tpm | None:
        """The machine's TPM (None without one; LocalError if [tpm] required is unmet)."""
        if isinstance(self.tpm, str):
            self.tpm = rollback.machine_tpm(self.config)
        return self.tpm

    def headers(self) -> dict[str, str]:
        return {
            "clipos-machineid": self.identity.machine_id,
            "clipos-version": self.identity.version.core,
        }


def open_device(
    config: DeviceConfig,
    remote: RemoteConfig,
    identity: Identity,
    download_dir: Path,
    run_dir: Path,
) -> Device:
    """Bind a configuration to its slot backend and ESP."""
    return Device(
        config,
        remote,
        identity,
        open_backend(config),
        esp_mod.Esp(config.esp_directory, config.os_name),
        download_dir,
        run_dir,
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


def _verified(device: Device, payload: Path, version: Version) -> bool:
    """True if `payload` and its signature are there and verify for `version`."""
    sig = payload.with_name(payload.name + ".sig")
    if not payload.is_file() or not sig.is_file():
        return False
    try:
        check_payload(device, payload, version)
    except RampartError as exc:
        log.debug("cached %s not usable: %s", payload.name, exc)
        return False
    return True


def check_payload(device: Device, payload: Path, version: Version) -> bytes:
    """Verify `payload` with its `.sig` and the pinned key; its version must be `version`.

    Returns the BLAKE2b-512 digest of the verified bytes.
    """
    sig_path = payload.with_name(payload.name + ".sig")
    signature = signing.load_signature(sig_path)
    digest = signing.verify_file(payload, signature, device.config.public_key)
    comment = signature.trusted_text(str(sig_path))
    if comment != version.core:
        raise VerificationError(
            f"{payload.name}: signed for version {comment[:80]!r}, expected {version.core!r}"
        )
    return digest


def check_latest(device: Device, fetcher: Fetcher) -> Version:
    url = f"{device.remote.update_url}/{device.config.os_name}/version"
    text = fetcher.run([Job("version", url, 4096)])[0]
    if not isinstance(text, str):
        raise FormatError(f"{url}: unreadable version")
    try:
        return parse_version(text, f"{url}: version")
    except UsageError as exc:
        raise FormatError(str(exc)) from None


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
    """Remove every download but `keep`'s payloads and signatures (all if None)."""
    wanted = set()
    if keep is not None:
        for kind in ("efiboot", "core"):
            name = payload_path(device, keep, kind).name
            wanted |= {name, name + ".sig"}
    if not device.download_dir.is_dir():
        return
    for entry in device.download_dir.iterdir():
        if entry.is_symlink() or not entry.is_file():
            log.warning("removing %s from the download directory: not a regular file", entry)
            remove_entry(entry)
        elif entry.name not in wanted:
            log.debug("removing stale download %s", entry.name)
            entry.unlink(missing_ok=True)


def download(device: Device, fetcher: Fetcher, version: Version) -> tuple[Path, Path, bytes]:
    """Fetch (or reuse) and verify both payloads of `version`.

    Returns (efiboot, core, BLAKE2b-512 digest of the verified Core).
    """
    device.download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _clean_downloads(device, version)
    base = f"{device.remote.dist_url}/{version.core}/{device.config.os_name}"
    caps = {"efiboot": device.config.max_efiboot_size, "core": device.config.max_core_size}
    jobs = []
    for kind in ("efiboot", "core"):
        payload = payload_path(device, version, kind)
        if _verified(device, payload, version):
            log.info("reusing the verified download of %s", payload.name)
            continue
        sig = payload.with_name(payload.name + ".sig")
        sig.unlink(missing_ok=True)
        jobs.append(Job("download", f"{base}-{kind}.sig", SIG_CAP, str(sig)))
        jobs.append(Job("download", f"{base}-{kind}", caps[kind], str(payload)))
    if jobs:
        log.info("downloading %s", ", ".join(j.url.rsplit("/", 1)[-1] for j in jobs))
        fetcher.run(jobs)
    efiboot = payload_path(device, version, "efiboot")
    core = payload_path(device, version, "core")
    digests = []
    for payload in (efiboot, core):
        try:
            digests.append(check_payload(device, payload, version))
        except RampartError:
            # A bad payload is not kept for resuming: the next run fetches afresh.
            payload.unlink(missing_ok=True)
            raise
    return efiboot, core, digests[1]


def hash_prefix(path: Path, size: int, chunk: int = 4 << 20) -> bytes:
    """BLAKE2b-512 of the first `size` bytes of `path`, reading the next chunk in a
    thread while this one is hashed (both release the GIL): the read-back of a
    slot costs about one pass instead of two."""
    hasher = hashlib.blake2b()
    with path.open("rb", buffering=0) as device, ThreadPoolExecutor(1) as reader:
        left = size
        pending = reader.submit(device.read, min(chunk, left))
        while left > 0:
            data = pending.result()
            if not data:
                break
            left -= len(data)
            if left > 0:
                pending = reader.submit(device.read, min(chunk, left))
            hasher.update(data)
    return hasher.digest()


RootHash = payload_mod.RootHash  # what the new EFI binary's command line pins


def core_root_hash(efiboot: Path, slot: str) -> RootHash | None:
    """The verity root hash the EFI binary will boot with, or None if it carries none.

    Reads `rampart.verity.*` (or CLIP OS's `rd.verity.*`) from the UKI's `.cmdline`.
    Refuses (VerificationError) an EFI binary built for another LV than `slot`, and
    (FormatError) one that is not a PE image.
    """
    data = efiboot.read_bytes()
    line = pe.cmdline(data, efiboot.name)
    if line is None:
        return None
    core = payload_mod.pinned_lv(line, efiboot.name)
    if core is not None and not core.endswith("/" + slot):
        raise VerificationError(
            f"{efiboot.name}: boots {core}, not the slot {slot} it would be installed with"
        )
    return payload_mod.root_hash(line, efiboot.name)


def verity_device(device: Device) -> bool:
    """Whether this device's Cores carry verity: the running kernel or an installed EFI
    binary of this OS pins a verity root hash."""
    try:
        running = device.proc_cmdline.read_bytes()[: 1 << 16].decode("utf-8", "replace")
    except OSError:
        running = ""
    if payload_mod.root_hash(running, str(device.proc_cmdline)) is not None:
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
    """Check what the verified payloads are (client/payload.py): the UKI of this OS and
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


def check_slot_against_root_hash(slot: Slot, root: RootHash) -> None:
    """Verify the written slot (data and hash tree) against the EFI binary's root hash."""
    with slot.path.open("rb") as handle:
        handle.seek(root.hash_offset)
        superblock = handle.read(verity.SUPERBLOCK)
    fields = verity.parse_superblock(superblock, str(slot.path))
    blocks = root.data_blocks if root.data_blocks is not None else fields["data_blocks"]
    if fields["data_blocks"] != blocks or blocks * verity.BLOCK > root.hash_offset:
        raise VerificationError(
            f"{slot.path}: verity superblock does not match the EFI binary's command line"
        )
    params = verity.VerityParams(
        root_hash=root.root_hash,
        salt=fields["salt"],
        data_blocks=blocks,
        hash_offset=root.hash_offset,
        uuid=fields["uuid"],
    )
    try:
        verity.verify(slot.path, params)
    except VerificationError as exc:
        raise VerificationError(
            f"Core in {slot.name} does not match the root hash of the new EFI binary ({exc}); "
            "not installing it"
        ) from None


def write_core(
    image: Path, slot: Slot, verified: bytes, checkpoint: Checkpoint, root: RootHash | None = None
) -> None:
    """Write `image` at the start of `slot`, fsync, read it back and check it against `verified`.

    With `root` (the new EFI binary's verity root hash), the slot is verified
    against it instead: data and hash tree, which also proves that Core and the
    EFI binary were built together. Otherwise `verified` is the BLAKE2b-512
    digest of the bytes whose signature was
    checked. The slot is read back from the device after fsync (its page cache
    dropped) and must hash to it: that one check catches a payload changed
    after verification as well as a bad write.
    """
    size = image.stat().st_size
    if size > slot.size:
        raise LocalError(
            f"{slot.name}: Core image ({size} bytes) does not fit the LV ({slot.size} bytes)"
        )
    buffer = bytearray(signing.CHUNK)
    view = memoryview(buffer)
    fd = os.open(slot.path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with image.open("rb") as src:
            while n := src.readinto(buffer):
                chunk = view[:n]
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
                checkpoint("write-core-chunk")
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        raise LocalError(f"{slot.path}: cannot write Core: {exc.strerror}") from None
    finally:
        os.close(fd)
    if root is not None:
        check_slot_against_root_hash(slot, root)
        return
    readback = hash_prefix(slot.path, size)
    if readback != verified:
        raise VerificationError(f"{slot.path}: Core read back does not match the verified payload")


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
        raise LocalError(
            f"{device.run_dir}: cannot use the run directory: {exc.strerror}"
        ) from None
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

    checkpoint("download")
    efiboot, core, core_digest = download(device, fetcher, latest)
    core_size = core.stat().st_size
    target_size = slot.size if slot is not None else device.config.core_size
    if core_size > target_size:
        raise LocalError(
            f"Core {latest} ({core_size} bytes) does not fit the target LV ({target_size} bytes)"
        )

    root = check_release(device, efiboot, core, latest)
    if root is None:
        log.warning(
            "%s carries no verity root hash: Core is checked against its signature only",
            efiboot.name,
        )
    check_rollback(device, efiboot, latest)

    checkpoint("remove-entries")
    removed = device.esp.remove_all_except(running)

    checkpoint("take-slot")
    new_name = slot_name(latest)
    if slot is None:
        slot = device.slots.create(new_name, device.config.core_size)
    elif slot.name != new_name:
        slot = device.slots.rename(slot, new_name)

    checkpoint("write-core")
    log.info("writing Core %s into %s", latest, slot.path)
    write_core(core, slot, core_digest, checkpoint, root)
    log.info("Core %s written and verified", latest)

    checkpoint("install-entry")
    check_payload(device, efiboot, latest)
    entry = device.esp.install(efiboot, latest, device.config.boot_tries)

    checkpoint("ready")
    # The new version is installed and bootable: what follows is housekeeping,
    # whose failure is logged, not fatal.
    try:
        device.ready_file.write_text(latest.core + "\n")
        _clean_downloads(device, None)  # installed: the payloads are no longer needed
    except OSError as exc:
        log.error("update installed, but %s: %s", exc.filename or "cleanup", exc.strerror)
    return UpdateResult(
        Outcome.UPDATED, running, latest, slot.name, entry.name, [p.name for p in removed]
    )


def check_rollback(device: Device, efiboot: Path, version: Version) -> None:
    """Refuse (VerificationError) an EFI binary whose security epoch is below the TPM's
    rollback counter (it would never boot) or below the running version's epoch."""
    epoch = rollback.uki_epoch(efiboot)
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
    body = json.dumps(
        {
            "from": device.identity.version.core,
            "to": None if target is None else target.core,
            "outcome": outcome,
            "error": error[:2000],
        }
    ).encode()
    url = f"{device.remote.update_url}/{device.config.os_name}/report"
    try:
        status = fetcher.run([Job("report", url, 1 << 16, body=body.decode())])[0]
    except (RampartError, OSError) as exc:
        log.info("report not delivered: %s", exc)
        return
    if not (isinstance(status, int) and 200 <= status < 300):
        log.info("report not accepted: %s answered HTTP %s", url, status)


def reboot() -> None:
    """Ask systemd to reboot; a failure is logged, not raised (the update is installed)."""
    try:
        run.run(["systemctl", "reboot"], timeout=60)
    except RampartError as exc:
        log.error("update installed, but the reboot failed: %s", exc)

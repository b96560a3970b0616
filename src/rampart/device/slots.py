"""A/B slots for Core: logical volumes `core_<version>` in a volume group.

Two backends behind one interface:
- `lvm`: the real LVM tools, read through their JSON reports;
- `file`: a directory standing in for the volume group (one file per LV, a
  fixed capacity), used by the demo and the host tests.
`core_state` and `core_swap` are never slots.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rampart import run
from rampart.contracts import cmdline, hashing, layout, pe, verity
from rampart.contracts.cmdline import RootHash
from rampart.contracts.version import Version, parse_version
from rampart.device.config import Backend, DeviceConfig
from rampart.errors import FormatError, LocalError, UsageError, VerificationError
from rampart.files import fsync_dir

log = logging.getLogger(__name__)

SLOT_PREFIX = layout.SLOT_PREFIX
RESERVED = layout.RESERVED_LVS
_LV_NAME = re.compile(r"[A-Za-z0-9+_.-]{1,127}")


def slot_name(version: Version) -> str:
    return f"{SLOT_PREFIX}{version.core}"


@dataclass(frozen=True)
class Slot:
    """One Core LV. `version` is None when the name is not core_<semver>."""

    name: str
    size: int
    path: Path
    open: bool = False

    @property
    def version(self) -> Version | None:
        if not self.name.startswith(SLOT_PREFIX) or self.name in RESERVED:
            return None
        try:
            return parse_version(self.name[len(SLOT_PREFIX) :])
        except UsageError:
            return None


class SlotBackend(Protocol):
    """What the transaction needs from a volume group."""

    def slots(self) -> list[Slot]:
        """Every `core_<version>` LV (not core_state / core_swap)."""

    def free_space(self) -> int:
        """Bytes a new LV can still take."""

    def create(self, name: str, size: int) -> Slot: ...

    def rename(self, slot: Slot, new_name: str) -> Slot: ...

    def remove(self, slot: Slot) -> None: ...


def _valid_lv_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and _LV_NAME.fullmatch(name) is not None
        and not name.startswith("-")
        and name not in (".", "..")
    )


def check_lv_name(name: str) -> str:
    if not _valid_lv_name(name):
        raise UsageError(f"invalid logical volume name {name!r}")
    return name


class FileBackend:
    """A directory standing in for a volume group: one file per LV, `capacity` bytes in all."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity
        if not directory.is_dir():
            raise LocalError(f"{directory}: slot directory (file backend) not found")

    def _all(self) -> list[Slot]:
        return [
            Slot(p.name, p.stat().st_size, p)
            for p in sorted(self.directory.iterdir())
            if p.is_file() and _valid_lv_name(p.name)
        ]

    def slots(self) -> list[Slot]:
        return [s for s in self._all() if s.name.startswith(SLOT_PREFIX) and s.name not in RESERVED]

    def free_space(self) -> int:
        used = sum(s.size for s in self._all())
        disk = os.statvfs(self.directory)
        return max(0, min(self.capacity - used, disk.f_bavail * disk.f_frsize))

    def create(self, name: str, size: int) -> Slot:
        path = self.directory / check_lv_name(name)
        if size > self.free_space():
            raise LocalError(
                f"{self.directory}: not enough free space for {name} "
                f"({size} bytes needed, {self.free_space()} free)"
            )
        try:
            with path.open("xb") as handle:
                handle.truncate(size)
                os.fsync(handle.fileno())
        except FileExistsError:
            raise LocalError(f"{path}: logical volume already exists") from None
        fsync_dir(self.directory)
        log.info("created %s (%d bytes)", name, size)
        return Slot(name, size, path)

    def rename(self, slot: Slot, new_name: str) -> Slot:
        source = self.directory / check_lv_name(slot.name)
        target = self.directory / check_lv_name(new_name)
        if target.exists():
            raise LocalError(f"{target}: logical volume already exists")
        try:
            # Single writer (the update runs once at a time): check, then rename.
            os.rename(source, target)
        except OSError as exc:
            raise LocalError(f"{slot.path}: cannot rename to {new_name}: {exc.strerror}") from None
        fsync_dir(self.directory)
        log.info("renamed %s to %s", slot.name, new_name)
        return Slot(new_name, slot.size, target)

    def remove(self, slot: Slot) -> None:
        try:
            (self.directory / check_lv_name(slot.name)).unlink()
        except OSError as exc:
            raise LocalError(f"{slot.path}: cannot remove: {exc.strerror}") from None
        fsync_dir(self.directory)


def _report(stdout: bytes, key: str, command: str) -> list[dict[str, Any]]:
    """The rows of an LVM JSON report (`{"report": [{key: [rows]}]}`)."""
    try:
        doc = json.loads(stdout)
        rows = doc["report"][0][key]
    except (ValueError, KeyError, IndexError, TypeError):
        raise FormatError(f"{command}: unexpected JSON report") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FormatError(f"{command}: unexpected JSON report")
    return rows


def _int(value: object, command: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,20}", value):
        return int(value)
    raise FormatError(f"{command}: expected a byte count, got {value!r}")


class LvmBackend:
    """The volume group `vg`, driven by the LVM command-line tools."""

    def __init__(self, vg: str) -> None:
        self.vg = check_lv_name(vg)

    def _lvm(self, *argv: str) -> bytes:
        return run.run(argv, timeout=120).stdout

    def lvs(self) -> list[Slot]:
        out = self._lvm(
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_name,lv_size,lv_attr",
            self.vg,
        )
        slots = []
        for row in _report(out, "lv", "lvs"):
            name = row.get("lv_name")
            if not isinstance(name, str) or not _valid_lv_name(name):
                raise FormatError(f"lvs: invalid LV name {name!r} in the report")
            attr = row.get("lv_attr")
            if not isinstance(attr, str):
                attr = ""
            # The device path is derived, never taken from the report.
            path = f"/dev/{self.vg}/{name}"
            # lv_attr[5] is 'o' when the device is open, '-' when not; anything
            # else (LVM's 'X' for unknown) counts as open: never write on a guess.
            is_open = len(attr) < 6 or attr[5] != "-"
            slots.append(Slot(name, _int(row.get("lv_size"), "lvs"), Path(path), is_open))
        return slots

    def slots(self) -> list[Slot]:
        return [s for s in self.lvs() if s.name.startswith(SLOT_PREFIX) and s.name not in RESERVED]

    def free_space(self) -> int:
        out = self._lvm(
            "vgs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_name,vg_free",
            self.vg,
        )
        rows = _report(out, "vg", "vgs")
        if len(rows) != 1:
            raise FormatError(f"vgs: expected one volume group {self.vg}, got {len(rows)}")
        return _int(rows[0].get("vg_free"), "vgs")

    def create(self, name: str, size: int) -> Slot:
        name = check_lv_name(name)
        free = self.free_space()
        if size > free:
            raise LocalError(
                f"volume group {self.vg}: not enough free space for {name} "
                f"({size} bytes needed, {free} free)"
            )
        self._lvm(
            "lvcreate",
            "--yes",
            "--wipesignatures",
            "y",
            "-n",
            name,
            "-L",
            f"{size}b",
            self.vg,
        )
        for slot in self.lvs():
            if slot.name == name:
                return slot
        raise LocalError(f"lvcreate: {self.vg}/{name} was not created")

    def rename(self, slot: Slot, new_name: str) -> Slot:
        self._lvm("lvrename", self.vg, check_lv_name(slot.name), check_lv_name(new_name))
        return Slot(new_name, slot.size, slot.path.with_name(new_name), slot.open)

    def remove(self, slot: Slot) -> None:
        self._lvm("lvremove", "--yes", f"{self.vg}/{check_lv_name(slot.name)}")


def mounted_sources(mountinfo: Path = Path("/proc/self/mountinfo")) -> set[str]:
    """Every mount source of the running system (field after the ' - ' separator)."""
    sources: set[str] = set()
    try:
        text = mountinfo.read_text(errors="replace")
    except OSError as exc:
        # Not knowing what is mounted is not "nothing is mounted".
        raise LocalError(f"{mountinfo}: cannot read: {exc.strerror}") from None
    for line in text.splitlines():
        _, sep, tail = line.partition(" - ")
        fields = tail.split()
        if sep and len(fields) >= 2:
            # mountinfo escapes space, tab, newline and backslash as \ooo.
            sources.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1]))
    return sources


def busy_reason(
    slot: Slot,
    running: Version,
    mapper_dir: Path = Path("/dev/mapper"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
) -> str | None:
    """Why `slot` must not be written, or None: running, open, mounted, or verity-mapped."""
    if slot.version == running:
        return "it holds the running version"
    if slot.open:
        return "the logical volume is open"
    sources = mounted_sources(mountinfo)
    vg = slot.path.parent.name
    dm_name = f"{vg.replace('-', '--')}-{slot.name.replace('-', '--')}"
    candidates = {str(slot.path), f"/dev/mapper/{dm_name}", f"/dev/mapper/verity_{slot.name}"}
    if sources & candidates:
        return "it is mounted"
    if (mapper_dir / f"verity_{slot.name}").exists():
        return f"it is mapped as {mapper_dir / ('verity_' + slot.name)}"
    return None


def open_backend(config: DeviceConfig) -> SlotBackend:
    """The slot backend `config` names: LVM's volume group, or the file backend's directory."""
    if config.backend == Backend.FILE:
        return FileBackend(Path(config.core_destination), config.file_capacity)
    return LvmBackend(config.core_destination)


# --- writing and checking a slot ------------------------------------------------------

Checkpoint = Callable[[str], None]  # called at each step a crash test may stop at


def hash_prefix(path: Path, size: int) -> bytes:
    """BLAKE2b-512 of the first `size` bytes of `path`, read ahead of the hashing
    (contracts/hashing.py): the read-back of a slot costs about one pass."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hashing.blake2b_fd(fd, size)[0]
    finally:
        os.close(fd)


def core_root_hash(efiboot: Path, slot: str) -> RootHash | None:
    """The verity root hash the UKI will boot with, or None if it carries none.

    Reads `rampart.verity.*` (or CLIP OS's `rd.verity.*`) from the UKI's `.cmdline`.
    Refuses (VerificationError) a UKI built for another LV than `slot`, and
    (FormatError) one that is not a PE image.
    """
    data = efiboot.read_bytes()
    line = pe.cmdline(data, efiboot.name)
    if line is None:
        return None
    core = cmdline.pinned_lv(line, efiboot.name)
    if core is not None and not core.endswith("/" + slot):
        raise VerificationError(
            f"{efiboot.name}: boots {core}, not the slot {slot} it would be installed with"
        )
    return cmdline.root_hash(line, efiboot.name)


def check_slot_against_root_hash(slot: Slot, root: RootHash) -> None:
    """Verify the written slot (data and hash tree) against the UKI's root hash."""
    with slot.path.open("rb") as handle:
        handle.seek(root.hash_offset)
        superblock = handle.read(verity.SUPERBLOCK)
    fields = verity.parse_superblock(superblock, str(slot.path))
    params = root.verity_params(fields)
    if fields["data_blocks"] != params.data_blocks or params.data_size > root.hash_offset:
        raise VerificationError(
            f"{slot.path}: verity superblock does not match the UKI's command line"
        )
    try:
        verity.verify(slot.path, params)
    except VerificationError as exc:
        raise VerificationError(
            f"Core in {slot.name} does not match the root hash of the new EFI binary ({exc}); "
            "not installing it"
        ) from None


WRITE_BEHIND = 32 << 20  # bytes whose write-back starts at once
WRITE_LAG = 32 << 20  # the bytes last written, left alone in the page cache
CHUNK = 1 << 20  # bytes of Core written at once
ALIGN = 4096  # O_DIRECT: offsets and lengths a multiple of this (logical blocks up to 4 KiB)


def _write_behind(fd: int, written: int, started: int) -> int:
    """Start writing back the bytes of `fd` from `started` to WRITE_LAG before
    `written`, once they are WRITE_BEHIND or more; where the next range starts.

    POSIX_FADV_DONTNEED starts the write-back of a dirty range without waiting (and
    drops the pages already clean). The disk then writes while Core is still being
    copied, the final fsync has little left to wait for, and the page cache never
    holds a whole Core."""
    end = written - WRITE_LAG
    if end - started < WRITE_BEHIND:
        return started
    os.posix_fadvise(fd, started, end - started, os.POSIX_FADV_DONTNEED)
    return end


class _SlotWriter:
    """Writes Core into a slot: directly to the device (O_DIRECT: no page cache to
    fill, then to flush, then to drop; half the time of buffered writes and fsync
    here), through the page cache where the slot's file system refuses direct I/O
    (then written behind: `_write_behind`), and the unaligned tail always buffered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buffered = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self.direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(self.buffered)
                raise
            self.direct = -1
        self.started = 0  # write-behind, for buffered writes

    def write(self, view: memoryview, offset: int) -> None:
        """`view` (from a page-aligned buffer) at `offset`."""
        if self.direct >= 0 and offset % ALIGN == 0:
            try:
                while len(view) >= ALIGN:
                    written = os.pwrite(self.direct, view[: len(view) - len(view) % ALIGN], offset)
                    view, offset = view[written:], offset + written
                    if written % ALIGN:
                        break  # a short write off the alignment: the rest is buffered
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.info(
                    "%s: no direct I/O here (%s): writing through the page cache",
                    self.path,
                    exc.strerror,
                )
                self._close_direct()
        end = offset + len(view)
        while view:
            written = os.pwrite(self.buffered, view, offset)
            view, offset = view[written:], offset + written
        if self.direct < 0:
            self.started = _write_behind(self.buffered, end, self.started)

    def finish(self) -> None:
        """Make what was written durable and drop what the page cache holds of it."""
        os.fsync(self.buffered)
        os.posix_fadvise(self.buffered, 0, 0, os.POSIX_FADV_DONTNEED)

    def _close_direct(self) -> None:
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1

    def close(self) -> None:
        self._close_direct()
        os.close(self.buffered)


def _copy_into(
    image: Path, src: int, size: int, writer: _SlotWriter, checkpoint: Checkpoint
) -> None:
    """The first `size` bytes of `image` (open as `src`) into `writer`, CHUNK at a
    time, each read (into one of two page-aligned buffers) in a thread while the one
    before is written."""
    buffers = [mmap.mmap(-1, CHUNK), mmap.mmap(-1, CHUNK)]
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:

            def read(index: int, offset: int) -> Future[int]:
                want = min(CHUNK, size - offset)
                return reader.submit(os.preadv, src, [memoryview(buffers[index])[:want]], offset)

            offset, index = 0, 0
            pending = read(0, 0)
            while offset < size:
                n = pending.result()
                if n == 0:
                    raise LocalError(f"{image}: Core image shrank while being written")
                if offset + n < size:
                    pending = read(index ^ 1, offset + n)  # that buffer's write is done
                writer.write(memoryview(buffers[index])[:n], offset)
                offset += n
                index ^= 1
                checkpoint("write-core-chunk")
    finally:
        for buffer in buffers:
            buffer.close()


def write_core(
    image: Path, slot: Slot, verified: bytes, checkpoint: Checkpoint, root: RootHash | None = None
) -> None:
    """Write `image` at the start of `slot`, fsync, read it back and check it against `verified`.

    With `root` (the new UKI's verity root hash), the slot is verified
    against it instead: data and hash tree, which also proves that Core and the
    UKI were built together. Otherwise `verified` is the BLAKE2b-512
    digest of the bytes whose signature was
    checked. The slot is written with direct I/O where it can be (`_SlotWriter`),
    fsynced, its page cache dropped, then read back from the device and must hash
    to it: that one check catches a payload changed after verification as well as
    a bad write.
    """
    size = image.stat().st_size
    if size > slot.size:
        raise LocalError(
            f"{slot.name}: Core image ({size} bytes) does not fit the LV ({slot.size} bytes)"
        )
    started = time.monotonic()
    try:
        writer = _SlotWriter(slot.path)
        try:
            with image.open("rb") as src:
                _copy_into(image, src.fileno(), size, writer, checkpoint)
            writer.finish()
            direct = writer.direct >= 0
        finally:
            writer.close()
    except OSError as exc:
        raise LocalError(f"{slot.path}: cannot write Core: {exc.strerror}") from None
    log.debug(
        "%s: %d bytes written%s and fsynced in %.2f s; reading them back",
        slot.path, size, " (direct I/O)" if direct else "", time.monotonic() - started,
    )  # fmt: skip
    if root is not None:
        check_slot_against_root_hash(slot, root)
        return
    readback = hash_prefix(slot.path, size)
    if readback != verified:
        raise VerificationError(f"{slot.path}: Core read back does not match the verified payload")

"""A/B slots for Core: logical volumes `core_<version>` in a volume group.

Two backends behind one interface:
- `lvm`: the real LVM tools, read through their JSON reports;
- `file`: a directory standing in for the volume group (one file per LV, a
  fixed capacity), used by the demo and the host tests.
`core_state` and `core_swap` are never slots.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rampart import run
from rampart.contracts import layout
from rampart.contracts.version import Version, parse_version
from rampart.device.config import Backend, DeviceConfig
from rampart.errors import FormatError, LocalError, UsageError
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

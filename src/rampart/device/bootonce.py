"""`rampart boot-once`: boot another installed version at the next boot only (manual
rollback), through systemd-boot's `LoaderEntryOneShot` EFI variable.

systemd-boot reads the variable once, deletes it and boots that entry; the
default entry is unchanged, so the boot after that runs the default again.
The entry ID of a Unified Kernel Image is its file name without the boot
counter (`clipos-1.0.1+2-1.efi` -> `clipos-1.0.1.efi`), and it must be one of
the IDs systemd-boot published in `LoaderEntries` at this boot.

efivarfs format: a 4-byte little-endian attribute word (non-volatile, boot
service and runtime access: 7) followed by the value, here a NUL-terminated
UTF-16LE string. Existing efivarfs files are immutable (chattr +i) and must be
made mutable before they are removed.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from rampart.contracts import efivars
from rampart.contracts.version import Version
from rampart.device.esp import Esp
from rampart.errors import LocalError, UsageError

EFIVARS = Path("/sys/firmware/efi/efivars")
LOADER_GUID = str(efivars.LOADER_VENDOR)  # systemd-boot's vendor GUID
ATTRIBUTES = 0x7  # EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x10


def variable(name: str, efivars: Path = EFIVARS) -> Path:
    return efivars / f"{name}-{LOADER_GUID}"


def read_string_list(path: Path) -> list[str]:
    """A variable holding NUL-separated UTF-16LE strings (LoaderEntries)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LocalError(
            f"{path}: not found; the machine was not booted by systemd-boot (or efivarfs "
            "is not mounted)"
        ) from None
    text = data[4:].decode("utf-16-le", errors="replace")
    return [item for item in text.split("\0") if item]


def entry_id(name: str) -> str:
    """The systemd-boot ID of a UKI file name: without the `+left[-done]` counter."""
    stem, dot, ext = name.rpartition(".")
    return stem.split("+", 1)[0] + dot + ext


def make_mutable(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        flags = bytearray(struct.pack("i", 0))
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        value = struct.unpack("i", flags)[0] & ~_FS_IMMUTABLE_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", value))
    finally:
        os.close(fd)


def boot_once(esp: Esp, version: Version, efivars: Path = EFIVARS) -> str:
    """Set the one-shot entry to `version`'s; return the entry ID."""
    entry = esp.find(version)
    if entry is None:
        raise UsageError(f"{esp.directory}: no boot entry for version {version.core}")
    if entry.bad:
        raise UsageError(
            f"{entry.path.name}: version {version.core} already failed to boot "
            "(its counter ran out)"
        )
    wanted = entry_id(entry.path.name)
    known = read_string_list(variable("LoaderEntries", efivars))
    if wanted not in known:
        raise LocalError(
            f"systemd-boot did not list {wanted} at this boot (it lists: "
            f"{', '.join(known) or 'nothing'}); reboot once before choosing it"
        )
    path = variable("LoaderEntryOneShot", efivars)
    data = struct.pack("<I", ATTRIBUTES) + (wanted + "\0").encode("utf-16-le")
    try:
        if path.exists():
            make_mutable(path)
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)  # efivarfs takes the whole variable in one write
        finally:
            os.close(fd)
    except OSError as exc:
        raise LocalError(f"{path}: cannot set the one-shot boot entry: {exc.strerror}") from None
    return wanted

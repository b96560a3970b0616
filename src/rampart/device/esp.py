"""Boot entries on the ESP: Unified Kernel Images named per the Boot Loader Specification.

`<os>-<version>.efi`, or with boot counting `<os>-<version>+<left>[-<done>].efi`
(systemd-boot decrements `left` before each boot and `rampart mark-good`
removes the counter, as systemd-bless-boot does). systemd-boot boots the
entry with the highest version whose `left` is not 0.

Installing an entry: copy to `<name>.new` (systemd-boot only loads `*.efi`),
fsync, rename to the final name, fsync the directory. Only after the rename is
the version bootable.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rampart.contracts.version import Version, parse_version
from rampart.errors import LocalError, UsageError
from rampart.files import fsync_dir

log = logging.getLogger(__name__)

_NEW_SUFFIX = ".new"
ESP_MARGIN = 1 << 20  # keep 1 MiB free on the ESP for firmware and loader state
WAIT_POLL = 0.5  # seconds between two looks for the ESP directory


@dataclass(frozen=True)
class BootEntry:
    path: Path
    version: Version
    tries_left: int | None = None
    tries_done: int | None = None

    @property
    def counted(self) -> bool:
        return self.tries_left is not None

    @property
    def bad(self) -> bool:
        return self.tries_left == 0


def entry_name(os_name: str, version: Version, tries: int = 0) -> str:
    """The file name of a new entry: with `+tries` when boot counting is on."""
    suffix = f"+{tries}" if tries else ""
    return f"{os_name}-{version.core}{suffix}.efi"


def parse_entry(os_name: str, path: Path) -> BootEntry | None:
    """The entry a file name stands for, or None if it is not one of `os_name`'s."""
    pattern = rf"{re.escape(os_name)}-(?P<v>[^+/]+)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.efi"
    match = re.fullmatch(pattern, path.name, re.ASCII)
    if match is None:
        return None
    try:
        version = parse_version(match["v"])
    except UsageError:
        return None
    left = None if match["left"] is None else int(match["left"])
    done = None if match["done"] is None else int(match["done"])
    return BootEntry(path, version, left, done)


def wait_for_directory(
    directory: Path,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait up to `timeout` seconds for the ESP directory to exist, and return the
    seconds waited. On a slow boot the ESP is mounted late (a `nofail` mount is not
    ordered before local-fs.target, and its device may take long to appear), and
    until then the directory is missing: `mark-good` waits rather than fail the boot.

    LocalError when it is still missing at the deadline (or is not a directory).
    """
    started = clock()
    deadline = started + timeout
    while True:
        if directory.is_dir():
            return clock() - started
        now = clock()
        if now >= deadline:
            what = "is not a directory" if directory.exists() else "not found"
            raise LocalError(
                f"{directory}: ESP directory {what} after waiting {timeout:g} s "
                "(is the ESP mounted?)"
            )
        sleep(min(WAIT_POLL, deadline - now))


class Esp:
    """The directory of Unified Kernel Images on the ESP (EFI/Linux)."""

    def __init__(self, directory: Path, os_name: str) -> None:
        self.directory = directory
        self.os_name = os_name

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.is_file())
        except FileNotFoundError:
            raise LocalError(f"{self.directory}: ESP directory not found") from None
        except OSError as exc:
            raise LocalError(f"{self.directory}: cannot list the ESP: {exc.strerror}") from None

    def entries(self) -> list[BootEntry]:
        found = (parse_entry(self.os_name, p) for p in self._files())
        return sorted((e for e in found if e is not None), key=lambda e: e.version)

    def default(self) -> BootEntry | None:
        """The entry systemd-boot would pick: the highest version not marked bad."""
        good = [e for e in self.entries() if not e.bad]
        return good[-1] if good else None

    def find(self, version: Version) -> BootEntry | None:
        for entry in self.entries():
            if entry.version == version:
                return entry
        return None

    def remove_all_except(self, keep: Version) -> list[Path]:
        """Remove every entry of this OS (and leftover `.efi.new`) but `keep`'s; fsync.

        This makes every other slot unbootable before it is touched. Files of
        other operating systems sharing the directory are left alone.
        """
        removed = []
        for path in self._files():
            name = path.name.removesuffix(_NEW_SUFFIX)
            entry = parse_entry(self.os_name, path.with_name(name))
            if entry is None:  # another OS's image, or not a boot entry at all
                continue
            if entry.version == keep and name == path.name:
                continue
            log.info("removing boot entry %s", path.name)
            try:
                path.unlink()
            except OSError as exc:
                raise LocalError(f"{path}: cannot remove boot entry: {exc.strerror}") from None
            removed.append(path)
        if removed:
            fsync_dir(self.directory)
        return removed

    def free_space(self) -> int:
        stat = os.statvfs(self.directory)
        return stat.f_bavail * stat.f_frsize

    def install(self, source: Path, version: Version, tries: int) -> Path:
        """Install `source` as the entry of `version`: temporary name, fsync, rename."""
        final = self.directory / entry_name(self.os_name, version, tries)
        tmp = final.with_name(final.name + _NEW_SUFFIX)
        size = source.stat().st_size
        free = self.free_space() + (tmp.stat().st_size if tmp.exists() else 0)
        if size + ESP_MARGIN > free:
            raise LocalError(
                f"{self.directory}: not enough space on the ESP for {final.name} "
                f"({size} bytes needed plus {ESP_MARGIN} kept free, {free} free)"
            )
        try:
            with source.open("rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, final)
            fsync_dir(self.directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LocalError(f"{final}: cannot install boot entry: {exc.strerror}") from None
        log.info("installed boot entry %s", final.name)
        return final

    def bless(self, version: Version) -> Path | None:
        """Remove the boot counter of `version`'s entry (what systemd-bless-boot good does).

        Returns the new path, or None if the entry had no counter.
        """
        entry = self.find(version)
        if entry is None:
            raise LocalError(
                f"{self.directory}: no boot entry for the running version {version.core}"
            )
        if not entry.counted:
            return None
        final = entry.path.with_name(entry_name(self.os_name, version))
        try:
            os.replace(entry.path, final)
            fsync_dir(self.directory)
        except OSError as exc:
            raise LocalError(
                f"{entry.path}: cannot remove the boot counter: {exc.strerror}"
            ) from None
        return final

"""A reproducible newc ("new ASCII", magic 070701) cpio writer: what the kernel unpacks
as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).

Entries live in a path-keyed table and are written sorted by path components, so
every directory comes before what it holds and the same inputs give the same
bytes: owner 0:0, mtime 0, inode numbers counted in output order, one link
each. Missing parent directories are added (mode 0755). The archive is written
gzip-compressed with no file name and a zero timestamp (as `gzip -n`), under a
temporary name in the output directory, fsync'ed and renamed last.
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rampart.errors import LocalError, UsageError
from rampart.files import fsync_dir

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_MAX_SIZE = 0xFFFFFFFF  # newc sizes are 32-bit


@dataclass(frozen=True)
class Entry:
    """One archive member: `mode` carries the file type; `data` is the content (a
    symlink's target for links); `rdev` the device numbers of a device node."""

    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        if stat.S_ISDIR(self.mode):
            return "dir"
        if stat.S_ISLNK(self.mode):
            return "symlink"
        if stat.S_ISCHR(self.mode):
            return "chardev"
        return "file"


def _normalise(path: str) -> str:
    parts = path.removeprefix("/").split("/")
    if not path.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise UsageError(f"archive path {path!r} is not a plain absolute path")
    return "/".join(parts)


class Archive:
    """An initramfs being assembled. Paths are absolute inside the archive ("/init")."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _normalise(path) in self._entries

    def paths(self) -> list[str]:
        """Every path, "/"-rooted, in the order they are written."""
        return ["/" + p for p in self._ordered()]

    def get(self, path: str) -> Entry | None:
        return self._entries.get(_normalise(path))

    def _put(self, path: str, entry: Entry, replace: bool) -> None:
        name = _normalise(path)
        old = self._entries.get(name)
        if old is not None and not replace and old != entry:
            raise UsageError(f"archive path /{name} is already taken by a different {old.kind}")
        parent = PurePosixPath(name).parent
        while str(parent) != ".":
            existing = self._entries.get(str(parent))
            if existing is None:
                self._entries[str(parent)] = Entry(stat.S_IFDIR | 0o755)
            elif existing.kind != "dir":
                raise UsageError(f"archive path /{parent} is a {existing.kind}, not a directory")
            parent = parent.parent
        self._entries[name] = entry

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._put(path, Entry(stat.S_IFDIR | perm), replace=True)

    def add_file(self, path: str, data: bytes, perm: int = 0o644, replace: bool = False) -> None:
        if len(data) > _MAX_SIZE:
            raise UsageError(f"archive file {path}: {len(data)} bytes is too large for newc")
        self._put(path, Entry(stat.S_IFREG | perm, data), replace)

    def add_copy(self, path: str, source: Path, perm: int = 0o644, replace: bool = False) -> None:
        """The content of `source` (symlinks followed) as a regular file at `path`."""
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise LocalError(f"{source}: cannot read: {exc.strerror}") from None
        self.add_file(path, data, perm, replace)

    def add_symlink(self, path: str, target: str, replace: bool = False) -> None:
        self._put(path, Entry(stat.S_IFLNK | 0o777, target.encode()), replace)

    def add_char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._put(path, Entry(stat.S_IFCHR | perm, rdev=(major, minor)), replace=True)

    def _ordered(self) -> list[str]:
        return sorted(self._entries, key=lambda p: p.split("/"))

    def to_bytes(self) -> bytes:
        """The uncompressed newc archive, trailer included, padded to 512 bytes."""
        out = bytearray()
        for ino, name in enumerate(self._ordered(), start=1):
            _header(out, ino, name, self._entries[name])
        _header(out, 0, _TRAILER, Entry(0))
        out += b"\0" * (-len(out) % 512)
        return bytes(out)

    def write_gzip(self, out: Path) -> bytes:
        """Write the gzip'ed archive to `out` atomically; return the compressed bytes."""
        raw = self.to_bytes()
        packed = gzip.compress(raw, compresslevel=9, mtime=0)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.rampart-tmp")
        try:
            with tmp.open("wb") as handle:
                handle.write(packed)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(out)
            fsync_dir(out.parent)
        except OSError as exc:
            raise LocalError(f"{out}: cannot write: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return packed


def _header(out: bytearray, ino: int, name: str, entry: Entry) -> None:
    encoded = name.encode()
    nlink = 2 if entry.kind == "dir" else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink if name != _TRAILER else 1,
        0,  # mtime
        len(entry.data),
        0,  # dev major
        0,  # dev minor
        entry.rdev[0],
        entry.rdev[1],
        len(encoded) + 1,
        0,  # check (unused by newc)
    )
    out += _MAGIC + b"".join(b"%08X" % f for f in fields) + encoded + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += entry.data
    out += b"\0" * (-len(out) % 4)

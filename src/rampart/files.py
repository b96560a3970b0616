"""Local files: small ones read whole with a cap and a one-line error, new ones that
never overwrite, and what makes a rename or a new file survive a power cut."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rampart.errors import ConflictError, FormatError, LocalError


def read_small(path: Path, what: str, limit: int = 1 << 16) -> bytes:
    """A small file (key, signature, configuration) whole, at most `limit` bytes:
    LocalError if it cannot be read (naming it as `what`), FormatError if larger."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise LocalError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise LocalError(f"{path}: {what} is a directory") from None
    except OSError as exc:
        raise LocalError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if len(data) > limit:
        raise FormatError(f"{path}: {what} is larger than {limit} bytes")
    return data


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` (never overwriting), write, fsync; LocalError on failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise ConflictError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise LocalError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise LocalError(f"{path}: cannot write: {exc.strerror}") from None
    os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` at `fd`'s position (os.write may write less at a time)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replace_whole(path: Path, data: bytes, mode: int) -> None:
    """`path` becomes `data` whole or not at all: written under a temporary name with
    `mode`, fsynced, renamed over `path`, its directory fsynced. OSError on failure
    (the temporary file removed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Write back everything of the file system that holds `path` (syncfs(2)): data,
    metadata and the block device's buffers. On FAT (the ESP), fsync of a directory
    did not make a rename durable: a power cut after it lost the rename."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file's data, so what was written to it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`, a directory or a lock file (created if
    missing), for the `with` block: writers into one place wait for each other."""
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@functools.cache
def _fallocate() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of `length` bytes at `offset` in the file open as `fd` (they
    read as zeros after; the size is kept): fallocate(2) with FALLOC_FL_PUNCH_HOLE,
    which Python's os module does not offer. False if the file system cannot (ext4,
    XFS, Btrfs and tmpfs can); OSError for any other failure."""
    if length <= 0:
        return True
    flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate()(fd, flags, offset, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(error, os.strerror(error))


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """All of `data` at `offset` of the file open as `fd` (pwrite(2) may write less)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written

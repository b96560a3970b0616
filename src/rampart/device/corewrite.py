"""Writing Core into a slot, and reading it back from the device to check it.

`write_core` copies the verified image into the slot 1 MiB at a time, each chunk
read (into one of two page-aligned buffers) in a thread while the one before is
written. The slot is written with direct I/O (`O_DIRECT`) where its file system
allows it: no page cache fills with a whole Core, to be flushed and dropped
afterwards, and each chunk is on the device when its write returns, so a third
thread reads it back and checks it while the next ones are written. Where direct
I/O is refused, the slot is written through the page cache, its write-back
started behind the copy, and read back once fsynced and dropped from the cache.

What is read back is checked against the UKI's verity root hash (the data blocks
against level 0 of the verified image's tree, which `verity.check_tree` ties to the
root hash; the rest, superblock and tree, byte for byte against the verified
image), or, for a UKI without one, against the BLAKE2b-512 digest of the verified
image. Either check catches a payload changed after verification, a bad write
and a bad read.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from rampart import files
from rampart.contracts import cmdline, hashing, pe, verity
from rampart.contracts.cmdline import RootHash
from rampart.device.slots import Slot
from rampart.errors import LocalError, VerificationError

log = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]  # called at each step a crash test may stop at

CHUNK = 1 << 20  # bytes of Core written at once (a crash test stops after each)
ALIGN = 4096  # O_DIRECT: offsets and lengths a multiple of this (logical blocks up to 4 KiB)
WRITE_BEHIND = 32 << 20  # buffered writes: bytes whose write-back starts at once
WRITE_LAG = 32 << 20  # buffered writes: the bytes last written, left in the page cache


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


def write_core(
    image: Path, slot: Slot, verified: bytes, checkpoint: Checkpoint, root: RootHash | None = None
) -> None:
    """Write `image` at the start of `slot`, fsync, and check what the device holds.

    With `root` (the new UKI's verity root hash), the slot is checked against it:
    data and hash tree, which also proves that Core and the UKI were built together
    (VerificationError `Core in <slot> does not match the root hash ...`). Otherwise
    `verified` is the BLAKE2b-512 digest of the bytes whose signature was checked,
    and the slot's first bytes must hash to it. Bytes of the slot after the image
    are left as they were. LocalError if the slot cannot be written.
    """
    size = image.stat().st_size
    if size > slot.size:
        raise LocalError(
            f"{slot.name}: Core image ({size} bytes) does not fit the LV ({slot.size} bytes)"
        )
    started = time.monotonic()
    try:
        with image.open("rb") as src:
            image_fd = src.fileno()
            data = None if root is None else image_data_check(image, image_fd, root, slot)
            check = ReadBack(
                slot,
                size,
                data,
                lambda offset, length: os.pread(image_fd, length, offset),
                verified,
                root,
            )
            try:
                writer = SlotWriter(slot.path)
                try:
                    durable = _copy_into(image, src.fileno(), size, writer, checkpoint, check)
                    written = time.monotonic()
                    writer.finish()
                    check.through(size)  # what was not read back yet, from the device now
                    check.finish()
                finally:
                    writer.close()
            finally:
                check.close()
    except OSError as exc:
        raise LocalError(f"{slot.path}: cannot write Core: {exc.strerror}") from None
    log.debug(
        "%s: %d bytes written in %.2f s (%s), read back and checked in %.2f s more",
        slot.path, size, written - started,
        "direct I/O, read back as written" if durable == size else "through the page cache",
        time.monotonic() - written,
    )  # fmt: skip


def _copy_into(
    image: Path, src: int, size: int, writer: SlotWriter, checkpoint: Checkpoint, check: ReadBack
) -> int:
    """The first `size` bytes of `image` (open as `src`) into `writer`, CHUNK at a
    time, each read (into one of two page-aligned buffers) in a thread while the one
    before is written; each chunk written with direct I/O is handed to `check` to be
    read back at once. The bytes handed so (the first that were not, and all after
    them, are read back once the slot is fsynced)."""
    buffers = [mmap.mmap(-1, CHUNK), mmap.mmap(-1, CHUNK)]
    durable = 0
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
                direct = writer.write(memoryview(buffers[index])[:n], offset)
                offset += n
                index ^= 1
                if direct and durable == offset - n:
                    durable = offset
                    check.through(durable)
                checkpoint("write-core-chunk")
    finally:
        for buffer in buffers:
            buffer.close()
    return durable


class SlotWriter:
    """Writes Core into a slot: directly to the device (O_DIRECT) while the file
    system allows it, else through the page cache (written behind: `_write_behind`);
    an unaligned tail always through the page cache."""

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
        self.started = 0  # write-behind of buffered writes: where the next range starts

    def write(self, view: memoryview, offset: int) -> bool:
        """`view` (from a page-aligned buffer) at `offset`; True if all of it was
        written with direct I/O (it is on the device)."""
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
                    self.path, exc.strerror,
                )  # fmt: skip
                os.close(self.direct)
                self.direct = -1
            if not view:
                return True
        files.pwrite_all(self.buffered, view, offset)
        if self.direct < 0:
            self.started = _write_behind(self.buffered, offset + len(view), self.started)
        return False

    def finish(self) -> None:
        """Make what was written durable and drop what the page cache holds of it."""
        os.fsync(self.buffered)
        os.posix_fadvise(self.buffered, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1
        os.close(self.buffered)


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


def image_data_check(image: Path, image_fd: int, root: RootHash, slot: Slot) -> verity.DataCheck:
    """The check of the data blocks of `image` (open as `image_fd`): its superblock must
    agree with the UKI's command line, its tree with the root hash."""
    superblock = os.pread(image_fd, verity.SUPERBLOCK, root.hash_offset)
    fields = verity.parse_superblock(superblock, str(image))
    params = root.verity_params(fields)
    if fields["data_blocks"] != params.data_blocks or params.data_size > root.hash_offset:
        raise VerificationError(f"{image}: verity superblock does not match the UKI's command line")
    tree_size = verity.tree_size(params.data_blocks)
    tree = os.pread(image_fd, tree_size, params.hash_start)
    try:
        level0 = verity.check_tree(memoryview(tree), params, str(image))[0]
    except VerificationError as exc:
        raise mismatch(slot, root, exc) from None
    return verity.DataCheck(params, level0, str(slot.path))


def mismatch(slot: Slot, root: RootHash | None, exc: VerificationError) -> VerificationError:
    """`exc` as the refusal of a Core that is not what the new UKI's root hash pins."""
    if root is None:
        return exc
    return VerificationError(
        f"Core in {slot.name} does not match the root hash of the new EFI binary "
        f"({exc}); not installing it"
    )


class DataCheck(Protocol):
    """What the read-back checks a slot's data blocks with, in order from `done` to
    `size`: a verity.DataCheck (against the tree) or the WrittenSums of a stream."""

    size: int
    done: int

    def update(self, chunk: bytes | memoryview) -> None: ...
    def finish(self) -> None: ...


class WrittenSums:
    """The CRC-32 of each buffer written into the slot, from byte `start` on: what its
    read-back compares (docs/client.md "Streaming Core into the slot"). Each buffer
    was checked against the tree before it was written; reading it back needs to find
    only what the disk did not keep, at 4 GB/s where SHA-256 again would run at 1.7."""

    def __init__(self, size: int, start: int, source: str) -> None:
        self.size, self.done, self.source = size, start, source
        self.sums: dict[int, tuple[int, int]] = {}

    def record(self, offset: int, chunk: bytes | memoryview) -> None:
        """Note the buffer `chunk`, checked, about to be written at `offset`."""
        self.sums[offset] = (len(chunk), zlib.crc32(chunk))

    def update(self, chunk: bytes | memoryview) -> None:
        """The bytes read back at `done`: VerificationError unless they are a whole
        buffer that was written there, as it was written."""
        length, crc = self.sums.pop(self.done, (-1, 0))
        if length != len(chunk) or zlib.crc32(chunk) != crc:
            raise VerificationError(
                f"{self.source}: the {len(chunk)} bytes read back at byte {self.done} are not "
                "those written there"
            )
        self.done += len(chunk)

    def finish(self) -> None:
        if self.done < self.size:
            raise VerificationError(f"{self.source}: read back only to byte {self.done}")


class ReadBack:
    """Reads the slot back from the device, in order, in a thread, and checks it
    (see the module's docstring). `through(end)` hands it the bytes up to `end`
    once they are on the device; `finish()` waits and raises what it found.

    The data blocks go to `data` (a DataCheck from its own start on: the read-back
    starts there); the bytes after them must be what `reference(offset, length)`
    returns (the verified image's). Without `data`, the bytes from 0 to `size` must
    hash to `verified`."""

    def __init__(
        self,
        slot: Slot,
        size: int,
        data: DataCheck | None,
        reference: Callable[[int, int], bytes],
        verified: bytes,
        root: RootHash | None,
    ) -> None:
        self.slot, self.size = slot, size
        self.reference = reference
        self.verified = verified
        self.root = root
        self.data = data
        self.data_size = 0 if data is None else data.size
        self.hasher = hashing.blake2b()
        # Direct I/O where it can: read from the device, into one reused buffer (no
        # page cache filled with a whole Core).
        try:
            self.fd = os.open(slot.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            self.aligned = True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(slot.path, os.O_RDONLY | os.O_CLOEXEC)
            self.aligned = False
        self.buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="read-back")
        self.handed = 0 if data is None else data.done  # bytes handed to the thread
        self.error: Exception | None = None

    def through(self, end: int) -> None:
        if end > self.handed:
            self.pool.submit(self._check, self.handed, end)
            self.handed = end

    def _check(self, start: int, end: int) -> None:
        if self.error is not None:
            return
        try:
            for offset in range(start, end, CHUNK):
                want = min(CHUNK, end - offset)
                if self._read(offset, want) < want:
                    raise VerificationError(f"{self.slot.path}: shorter than the Core image")
                with memoryview(self.buffer) as view:
                    self._feed(offset, view[:want])
        except (OSError, VerificationError) as exc:
            # Without its traceback, whose frames hold views of the buffer.
            self.error = exc.with_traceback(None)

    def _read(self, offset: int, want: int) -> int:
        """Read `want` bytes at `offset` into the buffer; the bytes read. Direct I/O
        reads whole 4 KiB blocks: an unaligned tail is read rounded up (from the slot,
        which is larger), and a file system that refuses it is read through the
        page cache from there on."""
        if self.aligned:
            length = min(CHUNK, -(-want // ALIGN) * ALIGN)
            try:
                return os.preadv(self.fd, [memoryview(self.buffer)[:length]], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            os.close(self.fd)
            self.fd = os.open(self.slot.path, os.O_RDONLY | os.O_CLOEXEC)
            self.aligned = False
        return os.preadv(self.fd, [memoryview(self.buffer)[:want]], offset)

    def _feed(self, offset: int, view: memoryview) -> None:
        if self.data is None:
            self.hasher.update(bytes(view))  # PyNaCl takes bytes only
            return
        split = max(0, min(len(view), self.data_size - offset))
        if split:
            self.data.update(view[:split])
        if split < len(view):  # superblock, tree: the verified image's own bytes
            theirs = self.reference(offset + split, len(view) - split)
            if view[split:] != theirs:
                raise VerificationError(
                    f"{self.slot.path}: the hash area read back differs from the verified "
                    f"Core image (from byte {offset + split})"
                )

    def finish(self) -> None:
        """Wait for the thread; VerificationError (or OSError) if the slot is not
        what was verified."""
        self.pool.shutdown(wait=True)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # what reading it cached
        if self.error is not None:
            if isinstance(self.error, VerificationError):
                raise mismatch(self.slot, self.root, self.error)
            raise self.error
        if self.data is not None:
            try:
                self.data.finish()
            except VerificationError as exc:
                raise mismatch(self.slot, self.root, exc) from None
        elif self.hasher.digest() != self.verified:
            raise VerificationError(
                f"{self.slot.path}: Core read back does not match the verified payload"
            )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        self.buffer.close()

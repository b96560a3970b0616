"""Streaming Core from the server into its slot, each block verified before it is
written (docs/client.md, "Streaming Core into the slot").

A release streams when its UKI (downloaded and verified first) pins a verity root
hash and Core's signature covers a digest (a prehashed minisign signature, or a
signed TUF target). The UKI's command line gives Core's root hash and hash offset;
Core's tree follows its data there (`hash offset = data size`) and runs to the end
of the file. Then:

1. `plan`: one fetch process streams Core's tail (verity superblock and hash tree,
   from the hash offset to the end) and its first block into memory (8 MiB per GiB
   of Core). Root checks the tree against the root hash, the first block against the
   tree, and that block's squashfs superblock: a Core of another build, or no
   squashfs, is refused before the disk is touched. Nothing is written.
2. `install`, once the slot is taken: the slot is read from its start while its
   blocks match the tree (what an earlier, interrupted run wrote: the resume point,
   found by verification, not by trusting a note). A second fetch process streams the
   rest of the data through a pipe; root checks each 1 MiB against level 0 of the
   tree before writing it (direct I/O), and hashes the whole Core in order (BLAKE2b-
   512, for the signature or the signed target). The tail follows from memory; the
   digest must be the signed one; the slot is fsynced and read back.

The download directory holds no part of Core. A stream that diverges from the tree
stops at the first bad block, with nothing of it written; the slot still becomes
bootable only once its entry is installed (`update.py`), after all of this.

A Core that a delta makes (device/incremental.py) has no tree to be checked against
before it is written: `shape` fetches Core's verity superblock alone, and
`install_made` computes the tree while it writes the data, from the slot's first
byte; the tree is written after the data only once its root hash is the UKI's.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from rampart.contracts import hashing, verity
from rampart.contracts import payload as payload_mod
from rampart.contracts.cmdline import RootHash
from rampart.device.corewrite import CHUNK, Checkpoint, ReadBack, SlotWriter, WrittenSums
from rampart.device.fetch import Fetcher, Stream
from rampart.device.slots import Slot
from rampart.device.transport import Receiver
from rampart.errors import (
    LocalError,
    RampartError,
    RemoteDataError,
    TransportError,
    VerificationError,
)

log = logging.getLogger(__name__)

BUFFERS = 4  # 1 MiB buffers between the network and the slot: filled, checked, written
CheckDigest = Callable[[bytes], None]  # raises VerificationError unless the signed digest


@dataclass(frozen=True)
class Plan:
    """What `plan` verified about a Core before anything is written."""

    url: str
    size: int  # the whole image: data, then superblock and tree
    params: verity.VerityParams
    level0: bytes | memoryview  # a view of `tail`
    tail: bytearray  # the image from the hash offset to its end, verified

    @property
    def data_size(self) -> int:
        return self.params.data_size


class _Memory:
    """A receiver keeping a range in memory, refusing one longer than `cap`."""

    def __init__(self, what: str, cap: int) -> None:
        self.what = what
        self.cap = cap
        self.data = bytearray()
        self.total = -1
        self.length = 0

    def begin(self, offset: int, length: int, total: int) -> None:
        if length > self.cap:
            raise RemoteDataError(
                f"{self.what}: {length} bytes from byte {offset}, more than the {self.cap} "
                "the UKI's command line allows"
            )
        self.data = bytearray(length)
        self.total, self.length = total, 0

    def buffer(self) -> memoryview:
        return memoryview(self.data)[self.length :]

    def filled(self, count: int) -> None:
        self.length += count


def plan(fetcher: Fetcher, url: str, root: RootHash, cap: int, name: str) -> Plan | None:
    """Fetch and check Core's tail and first block (see the module's docstring); None if
    this Core does not stream (its tree does not follow its data to the end of the
    file), VerificationError or FormatError if it is not what the UKI pins."""
    offset = root.hash_offset
    if offset % verity.BLOCK or offset <= 0:
        return None
    tail_cap = 2 * verity.BLOCK + verity.tree_size(offset // verity.BLOCK)
    tail = _Memory(f"{name}: verity tree", tail_cap)
    head = _Memory(f"{name}: first block", verity.BLOCK)
    try:
        fetcher.stream(
            [(Stream(url, offset, None, cap), tail), (Stream(url, 0, verity.BLOCK, cap), head)]
        )
    except (TransportError, RemoteDataError) as exc:
        # A server without range requests, or a file shorter than the UKI says: the
        # whole download gets it, and refuses it if it is not Core.
        log.info("%s: not streamed (%s): downloading it whole", name, exc)
        return None
    if tail.total != head.total or head.length != verity.BLOCK:
        raise RemoteDataError(f"{url}: the server gave two sizes for one file")
    size = tail.total
    superblock = bytes(tail.data[: verity.SUPERBLOCK])
    fields = verity.parse_superblock(superblock, name)
    params = root.verity_params(fields)
    tree_size = verity.tree_size(params.data_blocks)
    if params.data_size != offset or size != params.hash_start + tree_size:
        log.info("%s: its tree does not follow its data to the end: not streamed", name)
        return None
    kept = tail.data  # no copy: level 0 is a view of it, and nothing changes it
    level0 = payload_mod.check_core_tree(
        memoryview(kept)[params.hash_start - offset :], params, name
    )
    first = bytes(head.data)
    verity.DataCheck(params, level0, name).update(first)
    used = payload_mod.check_core(first, size, name)
    payload_mod.check_core_verity(used, superblock, size, root, name)
    return Plan(url, size, params, level0, kept)


Feed = Callable[[Receiver, int], None]  # Core's data from a byte on, into a receiver


@dataclass(frozen=True)
class Shape:
    """What `shape` learnt of a Core from its verity superblock alone (fetched by
    itself, 4 KiB): the layout of a Core this machine makes (a delta)."""

    url: str
    size: int  # the whole image: data, then superblock and tree
    params: verity.VerityParams
    superblock: bytes  # the hash area's first block

    @property
    def data_size(self) -> int:
        return self.params.data_size


def shape(fetcher: Fetcher, url: str, root: RootHash, cap: int, name: str) -> Shape | None:
    """Fetch Core's verity superblock alone and check the layout it gives against
    the UKI's command line: the Core a delta makes (device/incremental.py), whose tree
    is computed as it is written (`install_made`). None if this Core does not stream."""
    offset = root.hash_offset
    if offset % verity.BLOCK or offset <= 0:
        return None
    head = _Memory(f"{name}: verity superblock", verity.BLOCK)
    try:
        fetcher.stream([(Stream(url, offset, offset + verity.BLOCK, cap), head)])
    except (TransportError, RemoteDataError) as exc:
        log.info("%s: not streamed (%s): downloading it whole", name, exc)
        return None
    size = head.total
    superblock = bytes(head.data)
    params = root.verity_params(verity.parse_superblock(superblock[: verity.SUPERBLOCK], name))
    tree_size = verity.tree_size(params.data_blocks)
    if (
        params.data_size != offset
        or params.hash_start != offset + verity.BLOCK
        or size != params.hash_start + tree_size
        or head.length != verity.BLOCK
    ):
        log.info("%s: its tree does not follow its data to the end: not streamed", name)
        return None
    return Shape(url, size, params, superblock)


def from_server(fetcher: Fetcher, plan: Plan) -> Feed:
    """Core's data streamed from the server, from the resume point on."""

    def feed(sink: Receiver, resume: int) -> None:
        fetcher.stream([(Stream(plan.url, resume, plan.data_size, plan.size), sink)])

    return feed


def install(
    feed: Feed,
    plan: Plan,
    slot: Slot,
    check_digest: CheckDigest,
    checkpoint: Checkpoint,
    root: RootHash,
) -> None:
    """Write the Core `plan` describes into `slot`, its data from `feed` (the server's
    stream, or chunks: device/incremental.py), each block checked before it is
    written (see the module's docstring). VerificationError if a block, the digest or
    the read-back is not what was signed; LocalError if the slot cannot be written;
    what `feed` raises if it stops (what was written and verified is kept: the next
    run resumes there)."""
    _check_room(plan.size, slot)
    hasher = hashing.blake2b()
    try:
        resume = _verified_prefix(slot, plan, hasher)
    except OSError as exc:
        raise LocalError(f"{slot.path}: cannot read Core: {exc.strerror}") from None
    if resume:
        log.info("%s: resuming at byte %d (verified in the slot)", slot.name, resume)
    check = verity.DataCheck(plan.params, plan.level0, plan.url, resume)
    read = WrittenSums(plan.data_size, resume, str(slot.path))
    checked = _Checked(check, read, lambda: plan.tail)
    _write(feed, plan, slot, checked, hasher, resume, check_digest, checkpoint, root)


def install_made(
    feed: Feed,
    shape: Shape,
    slot: Slot,
    check_digest: CheckDigest,
    checkpoint: Checkpoint,
    root: RootHash,
) -> None:
    """Write the Core a delta makes (`feed`: device/incremental.py) into `slot`, from
    its first byte, in one pass: its tree is computed as its data is written, and read
    back against it. The root hash must then be the one the UKI pins (the delta is
    signed, but what it makes is trusted only once it has that root hash) before the
    tree is written after the data; VerificationError otherwise, and the slot has
    no tree (it is not a Core: nothing boots it, and `install` rewrites it). Then the
    digest and the read-back, as `install`."""
    _check_room(shape.size, slot)
    made = _Made(shape, root, str(slot.path))
    checked = _Checked(made, WrittenSums(shape.data_size, 0, str(slot.path)), made.tail)
    _write(feed, shape, slot, checked, hashing.blake2b(), 0, check_digest, checkpoint, root)


def _check_room(size: int, slot: Slot) -> None:
    if size > slot.size:
        raise LocalError(
            f"{slot.name}: Core image ({size} bytes) does not fit the LV ({slot.size} bytes)"
        )


class _DataCheck(Protocol):
    def update(self, chunk: bytes | memoryview) -> None: ...
    def finish(self) -> None: ...


class _Target(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def data_size(self) -> int: ...


@dataclass(frozen=True)
class _Checked:
    """How `_write` checks Core: each block before it is written (`data`), each buffer
    read back (`read`: against what was written), and the verified superblock and tree
    once the data is written (`tail`: raises VerificationError if the data was not
    Core's)."""

    data: _DataCheck
    read: WrittenSums
    tail: Callable[[], bytearray]


def _write(
    feed: Feed,
    target: _Target,
    slot: Slot,
    checked: _Checked,
    hasher: hashing.Hasher,
    resume: int,
    check_digest: CheckDigest,
    checkpoint: Checkpoint,
    root: RootHash,
) -> None:
    """Core's data from `feed` into `slot` from `resume` on, checked before it is
    written, then its superblock and tree; the digest checked, the slot read back."""
    started = time.monotonic()
    tail = bytearray()

    def reference(offset: int, length: int) -> bytes:
        start = offset - target.data_size
        return bytes(tail[start : start + length])

    try:
        writer = SlotWriter(slot.path)
        try:
            readback = ReadBack(slot, target.size, checked.read, reference, b"", root)
            try:
                sink = _SlotSink(target, checked, writer, readback, hasher, checkpoint, resume)
                try:
                    if resume < target.data_size:
                        try:
                            feed(sink, resume)
                        except RampartError:
                            sink.drain()  # what verified is written: the next run resumes there
                            raise
                    sink.finish()
                finally:
                    sink.close()
                streamed = time.monotonic()
                tail += checked.tail()
                for start in range(0, len(tail), CHUNK):  # PyNaCl takes bytes only
                    hasher.update(bytes(tail[start : start + CHUNK]))
                check_digest(hasher.digest())
                _write_tail(writer, target.data_size, tail)
                writer.finish()
                readback.through(target.size)
                readback.finish()
            finally:
                readback.close()
        finally:
            writer.close()
    except OSError as exc:
        raise LocalError(f"{slot.path}: cannot write Core: {exc.strerror}") from None
    log.debug(
        "%s: %d bytes written from byte %d in %.2f s, checked and read back in %.2f s more",
        slot.path, target.size - resume, resume, streamed - started, time.monotonic() - streamed,
    )  # fmt: skip


class _Made:
    """The check of a Core that a delta makes, which has no tree to check it against
    yet: its tree is built as it comes (level 0 also serves the read-back), and its
    root hash compared with the UKI's once it all came (`tail`)."""

    def __init__(self, shape: Shape, root: RootHash, source: str) -> None:
        self.shape, self.root, self.source = shape, root, source
        self.tree = verity.TreeBuilder(bytes.fromhex(shape.params.salt), shape.data_size)
        self.first = b""

    def update(self, chunk: bytes | memoryview) -> None:
        if not self.first:
            self.first = bytes(chunk[: verity.BLOCK])
        self.tree.update(chunk)

    def finish(self) -> None:
        if self.tree.done < self.tree.size:
            raise VerificationError(f"{self.source}: data truncated at byte {self.tree.done}")

    def tail(self) -> bytearray:
        """The superblock and the tree, once the root hash is the UKI's."""
        shape = self.shape
        root_hash, levels = self.tree.finish()
        if root_hash != shape.params.root_hash:
            raise VerificationError(
                f"{shape.url}: the delta makes a Core of another root hash than the UKI's; "
                "its tree is not written"
            )
        used = payload_mod.check_core(self.first, shape.size, self.source)
        payload_mod.check_core_verity(
            used, shape.superblock[: verity.SUPERBLOCK], shape.size, self.root, self.source
        )
        tail = bytearray(shape.superblock)
        for level in reversed(levels):
            tail += level
        return tail


def _verified_prefix(slot: Slot, plan: Plan, hasher: hashing.Hasher) -> int:
    """How many of the slot's first bytes are already Core's (its blocks match the
    tree), hashed into `hasher`; where the stream resumes."""
    check = verity.DataCheck(plan.params, plan.level0, str(slot.path))
    fd = os.open(slot.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with hashing.blocks(fd, plan.data_size, 0, CHUNK) as chunks:
            for chunk in chunks:
                good = check.accept(chunk)
                hasher.update(chunk if good == len(chunk) else chunk[:good])
                if good < len(chunk):
                    break
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return check.done


def _write_tail(writer: SlotWriter, data_size: int, tail: bytearray) -> None:
    """The verified superblock and tree, after the data, 1 MiB at a time from a
    page-aligned buffer."""
    buffer = mmap.mmap(-1, CHUNK)
    try:
        with memoryview(buffer) as view:
            for start in range(0, len(tail), CHUNK):
                piece = tail[start : start + CHUNK]
                view[: len(piece)] = piece
                writer.write(view[: len(piece)], data_size + start)
    finally:
        buffer.close()


class _SlotSink:
    """The receiver of Core's data: each 1 MiB buffer, once filled, is checked against
    the tree in one thread and hashed for the signature in another, then written into
    the slot in a third, while the next buffers fill. Nothing of a buffer is written
    unless all of it, and every buffer before it, checked; a buffer is filled again
    only once it is written and hashed."""

    def __init__(
        self,
        target: _Target,
        checked: _Checked,
        writer: SlotWriter,
        readback: ReadBack,
        hasher: hashing.Hasher,
        checkpoint: Checkpoint,
        resume: int,
    ) -> None:
        self.target, self.writer, self.readback = target, writer, readback
        self.check, self.sums = checked.data, checked.read
        self.hasher, self.checkpoint = hasher, checkpoint
        self.buffers = [mmap.mmap(-1, CHUNK) for _ in range(BUFFERS)]
        self.writes: list[Future[None] | None] = [None] * BUFFERS
        self.checker = ThreadPoolExecutor(1, thread_name_prefix="check")
        self.digesting = ThreadPoolExecutor(1, thread_name_prefix="digest")  # in order
        self.writing = ThreadPoolExecutor(1, thread_name_prefix="write")
        self.index = 0
        self.held = 0
        self.offset = resume  # where the current buffer goes in the slot
        self.durable = resume  # the bytes written with direct I/O, in order
        self.failed = False  # a check or a write failed: nothing more is checked
        self.stopped = False  # a write failed, or the sink closes: nothing more is written
        self.error: Exception | None = None  # the first check or write that failed

    def begin(self, offset: int, length: int, total: int) -> None:
        if offset != self.offset or total != self.target.size:
            raise RemoteDataError(f"{self.target.url}: the stream is not the range asked for")

    def buffer(self) -> memoryview:
        self._wait(self.index)
        return memoryview(self.buffers[self.index])[self.held :]

    def filled(self, count: int) -> None:
        self.held += count
        if self.held == CHUNK or self.offset + self.held == self.target.data_size:
            self._hand_on()

    def _wait(self, index: int) -> None:
        """Wait for the write of buffer `index` (raises what its check or write raised)."""
        pending = self.writes[index]
        if pending is not None:
            self.writes[index] = None
            pending.result()
        if self.error is not None:
            raise self.error

    def _hand_on(self) -> None:
        index, offset, length = self.index, self.offset, self.held
        checked = self.checker.submit(self._check, index, offset, length)
        digested = self.digesting.submit(self._digest, index, length)
        self.writes[index] = self.writing.submit(
            self._write, index, offset, length, checked, digested
        )
        self.index = (index + 1) % BUFFERS
        self.offset += length
        self.held = 0

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.failed = True

    def _check(self, index: int, offset: int, length: int) -> bool:
        """Check the buffer (and note its sum for the read-back); False (nothing done)
        once anything failed."""
        if self.failed:
            return False
        with memoryview(self.buffers[index]) as view:
            try:
                self.check.update(view[:length])
            except VerificationError as exc:
                self._fail(
                    VerificationError(
                        f"{exc}: the streamed Core does not match the root hash of the new "
                        "EFI binary; nothing of that block written"
                    )
                )
                return False
            self.sums.record(offset, view[:length])
        return True

    def _digest(self, index: int, length: int) -> None:
        """Hash the buffer for the signature (what a failed check leaves hashed does
        not matter: the update stops there, and the next run hashes from the start)."""
        if self.failed:
            return
        with memoryview(self.buffers[index]) as view:
            self.hasher.update(bytes(view[:length]))  # PyNaCl takes bytes only

    def _write(
        self, index: int, offset: int, length: int, checked: Future[bool], digested: Future[None]
    ) -> None:
        try:
            self._write_checked(index, offset, length, checked)
        finally:
            digested.result()  # the buffer is free once hashed too

    def _write_checked(self, index: int, offset: int, length: int, checked: Future[bool]) -> None:
        # Every buffer before a failed one verified: each is still written (the next run
        # resumes after them), unless a write failed or the sink is closing.
        if not checked.result() or self.stopped:
            return
        try:
            with memoryview(self.buffers[index]) as view:
                direct = self.writer.write(view[:length], offset)
        except OSError as exc:
            self.stopped = True
            self._fail(exc.with_traceback(None))
            return
        if direct and self.durable == offset:
            self.durable = offset + length
            self.readback.through(self.durable)
        self.checkpoint("write-core-chunk")

    def drain(self) -> None:
        """Wait for the writes of what verified (the stream failed; their errors are
        the smaller news)."""
        for index in range(BUFFERS):
            with contextlib.suppress(Exception):
                self._wait(index)

    def finish(self) -> None:
        """Wait for every write; VerificationError unless all the data came and checked."""
        for index in range(BUFFERS):
            self._wait(index)
        if self.held:
            raise LocalError(f"{self.writer.path}: the stream ended inside a block")
        try:
            self.check.finish()
        except VerificationError as exc:
            raise VerificationError(f"{self.target.url}: the stream ended early ({exc})") from None

    def close(self) -> None:
        self.failed = self.stopped = True  # what is still queued is dropped
        self.checker.shutdown(wait=True, cancel_futures=True)
        self.digesting.shutdown(wait=True, cancel_futures=True)
        self.writing.shutdown(wait=True, cancel_futures=True)
        for buffer in self.buffers:
            with contextlib.suppress(BufferError):  # a view still held: left to GC
                buffer.close()

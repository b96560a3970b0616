"""Incremental updates: the new Core rebuilt from the chunks this machine already has,
and only the others fetched (docs/client.md, "Incremental updates").

A release may publish Core's chunk index (`<os>-core.caibx`, signed like a payload:
minisign, its trusted comment the version; in TUF mode a target of its own) and its
chunks in the webroot's chunk store (contracts/chunks.py: casync's formats). Once
Core streams (device/stream.py: its tree verified against the UKI's root hash),
`plan` fetches and verifies the new index and the running version's, and matches
them by chunk id: a chunk of the new Core that the running Core holds is read from
the running Core's LV, the others are fetched from the store (zstd or xz,
decompressed within their size, their id checked). The chunks, in order, feed the
same sink as a stream from the server, so each block is still checked against the
tree before it is written, the whole is still hashed for the signature, and the slot
still becomes bootable only after.

Whatever fails here (no index, a chunk missing, corrupt, too long, another chunk
than its id, a seed that changed) makes the update fall back to streaming Core from
the server (`update.py`), which resumes after the blocks that were written and
verified: never an unverified slot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rampart.contracts import chunks, wire
from rampart.contracts import delta as delta_format
from rampart.contracts.cmdline import RootHash
from rampart.contracts.version import Version
from rampart.device.documents import Trust, signed_document
from rampart.device.fetch import Fetcher, Stream
from rampart.device.slots import Slot
from rampart.device.stream import Feed, Plan
from rampart.device.transport import Receiver, feed
from rampart.errors import LocalError, RemoteDataError, VerificationError

log = logging.getLogger(__name__)

BATCH = 1024  # chunks fetched by one fetch process (fetch.MAX_JOBS)


@dataclass(frozen=True)
class Piece:
    """One chunk of the new Core: where it goes, its id, and where this machine has it
    (an offset in the seed LV), or None: fetched from the store."""

    start: int
    length: int
    chunk: bytes
    seed_offset: int | None


@dataclass(frozen=True)
class ChunkPlan:
    index: chunks.ChunkIndex
    pieces: list[Piece]
    seed: Path  # the LV the seeded chunks are read from (the running Core)
    store_url: str

    @property
    def missing(self) -> list[Piece]:
        return [p for p in self.pieces if p.seed_offset is None]


def fetch_index(
    fetcher: Fetcher,
    trust: Trust,
    dist_url: str,
    os_name: str,
    version: Version,
    max_size: int,
) -> chunks.ChunkIndex | None:
    """The chunk index of `version`, verified (VerificationError otherwise), parsed for
    an image of at most `max_size` bytes; None if the server has none."""
    name = wire.index_name(os_name)
    data = signed_document(fetcher, trust, dist_url, version, name, wire.INDEX_MAX)
    if data is None:
        return None
    return chunks.parse_index(data, name, max_size)


def plan(
    fetcher: Fetcher,
    trust: Trust,
    dist_url: str,
    os_name: str,
    version: Version,
    running: Version,
    seed: Slot,
    core: Plan,
) -> ChunkPlan | None:
    """Match the new Core's index with the running one's (see the module's docstring);
    None if there is nothing to match (no index published, or none for the running
    version), VerificationError or FormatError if an index is not what was signed."""
    new = fetch_index(fetcher, trust, dist_url, os_name, version, core.size)
    if new is None:
        log.info("no chunk index for %s: Core is streamed whole", version)
        return None
    if new.size != core.size:
        raise VerificationError(
            f"{wire.index_name(os_name)} of {version}: its chunks make {new.size} bytes, "
            f"Core has {core.size}"
        )
    old = fetch_index(fetcher, trust, dist_url, os_name, running, seed.size)
    if old is None:
        log.info("no chunk index for the running %s: Core is streamed whole", running)
        return None
    if old.flags & chunks.SHA512_256 != new.flags & chunks.SHA512_256:
        log.info("the two chunk indexes use different chunk ids: Core is streamed whole")
        return None
    have = {chunk: start for start, _, chunk in old.spans()}
    pieces = [
        Piece(start, length, chunk, have.get(chunk))
        for start, length, chunk in new.spans()
        if start < core.data_size
    ]
    result = ChunkPlan(new, pieces, seed.path, f"{dist_url}/{wire.STORE}")
    missing = result.missing
    log.info(
        "%d of %d chunks of Core %s are here; fetching %d (%d bytes before compression)",
        len(pieces) - len(missing), len(pieces), version, len(missing),
        sum(p.length for p in missing),
    )  # fmt: skip
    return result


def from_chunks(fetcher: Fetcher, chunk_plan: ChunkPlan, core: Plan) -> Feed:
    """Core's data rebuilt from its chunks, from the resume point on: the seeded ones
    read from the seed LV, the others fetched (in batches, by one fetch process each)
    and checked, each fed in order as soon as every chunk before it was."""

    def run(sink: Receiver, resume: int) -> None:
        sink.begin(resume, core.data_size - resume, core.size)
        pieces = [p for p in chunk_plan.pieces if p.start + p.length > resume]
        try:
            seed_fd = os.open(chunk_plan.seed, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalError(f"{chunk_plan.seed}: cannot read: {exc.strerror}") from None
        try:
            writer = _Ordered(sink, pieces, seed_fd, resume, core.data_size)
            writer.seeded()
            missing = [p for p in pieces if p.seed_offset is None]
            for first in range(0, len(missing), BATCH):
                batch = missing[first : first + BATCH]
                fetcher.stream(
                    [
                        (
                            Stream(
                                f"{chunk_plan.store_url}/{chunks.store_path(p.chunk)}",
                                0,
                                None,
                                _packed_cap(p.length),
                            ),
                            _ChunkFile(p, chunk_plan.index.flags, writer.fetched),
                        )
                        for p in batch
                    ]
                )
            writer.seeded()
            writer.check_done()
            os.posix_fadvise(seed_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(seed_fd)

    return run


def _packed_cap(length: int) -> int:
    """The largest chunk file accepted for a chunk of `length` bytes (zstd and xz
    never grow incompressible data by more than this)."""
    return length + length // 64 + 4096


class _Ordered:
    """Feeds the chunks into the sink in order: seeded ones as soon as every chunk
    before them was fed, fetched ones as they arrive (in order too)."""

    def __init__(
        self, sink: Receiver, pieces: list[Piece], seed_fd: int, resume: int, end: int
    ) -> None:
        self.sink, self.pieces, self.seed_fd = sink, pieces, seed_fd
        self.position = resume  # the next byte the sink expects
        self.end = end
        self.next = 0  # the index in `pieces` of the next chunk to feed

    def _feed(self, piece: Piece, data: bytes) -> None:
        skip = self.position - piece.start
        stop = min(piece.length, self.end - piece.start)
        feed(self.sink, memoryview(data)[skip:stop])
        self.position = piece.start + stop
        self.next += 1

    def seeded(self) -> None:
        """Feed the seeded chunks from the next one to the next fetched one."""
        while self.next < len(self.pieces):
            piece = self.pieces[self.next]
            if piece.seed_offset is None:
                return
            data = os.pread(self.seed_fd, piece.length, piece.seed_offset)
            if len(data) != piece.length:
                raise VerificationError(f"the running Core ends inside chunk {piece.chunk.hex()}")
            self._feed(piece, data)

    def fetched(self, piece: Piece, data: bytes) -> None:
        if self.next >= len(self.pieces) or self.pieces[self.next] is not piece:
            raise LocalError("chunks arrived out of order")
        self._feed(piece, data)
        self.seeded()

    def check_done(self) -> None:
        if self.position != self.end:
            raise LocalError(f"chunks rebuilt Core up to byte {self.position}, not {self.end}")


class _ChunkFile:
    """A receiver for one chunk file: kept in memory (at most its cap), then opened,
    checked and handed on."""

    def __init__(self, piece: Piece, flags: int, done: Callable[[Piece, bytes], None]) -> None:
        self.piece, self.flags, self.done = piece, flags, done
        self.data = bytearray()
        self.held = 0

    def begin(self, offset: int, length: int, total: int) -> None:
        cap = _packed_cap(self.piece.length)
        if length > cap:
            raise RemoteDataError(
                f"chunk {self.piece.chunk.hex()}: {length} bytes, more than {cap} for a chunk "
                f"of {self.piece.length}"
            )
        self.data = bytearray(length)
        self.held = 0
        if length == 0:
            self._complete()

    def buffer(self) -> memoryview:
        return memoryview(self.data)[self.held :]

    def filled(self, count: int) -> None:
        self.held += count
        if self.held == len(self.data):
            self._complete()

    def _complete(self) -> None:
        source = f"chunk {self.piece.chunk.hex()}"
        data = chunks.open_chunk(
            bytes(self.data), self.piece.length, self.piece.chunk, self.flags, source
        )
        self.data = bytearray()
        self.done(self.piece, data)


@dataclass(frozen=True)
class DeltaPlan:
    delta: delta_format.Delta
    seed: Path  # the LV of the running Core, the delta's base
    source: str


def delta_plan(
    fetcher: Fetcher,
    trust: Trust,
    dist_url: str,
    os_name: str,
    version: Version,
    running: Version,
    seed: Slot,
    seed_root: str,
    root: RootHash,
) -> DeltaPlan | None:
    """The delta that makes the new Core from the running one (contracts/delta.py),
    verified and signed for `version`, its base the running Core (root hash
    `seed_root`) and its target the Core the new UKI pins (`root`); None if the
    server has no delta from the running version. VerificationError or FormatError
    if it is not what was signed, or not between these two Cores."""
    name = wire.delta_name(os_name, running)
    data = signed_document(fetcher, trust, dist_url, version, name, delta_format.DELTA_MAX)
    if data is None:
        log.info("no delta from %s to %s: Core is rebuilt from chunks", running, version)
        return None
    found = delta_format.parse(data, name)
    if found.target_root.hex() != root.root_hash:
        raise VerificationError(f"{name}: it makes another Core than the UKI pins")
    if found.base_root.hex() != seed_root:
        raise VerificationError(f"{name}: its base is another Core than the running one")
    if found.data_size != root.hash_offset or found.base_size > seed.size:
        raise VerificationError(f"{name}: its sizes are not those of the two Cores")
    patched = sum(op.length for op in found.ops if op.frame is not None)
    log.info(
        "a delta of %d bytes makes Core %s from the running %s (%d bytes of it new)",
        len(data), version, running, patched,
    )  # fmt: skip
    return DeltaPlan(found, seed.path, name)


def from_delta(delta_plan: DeltaPlan, size: int) -> Feed:
    """Core's data made by the delta from the running Core, from the resume point on
    (`size`: the whole Core's, data and tree): COPY read from the seed LV into the
    sink's buffers, PATCH decompressed with its dictionary (each PATCH is decompressed
    even before the resume point: the ones after need its bytes)."""

    def run(sink: Receiver, resume: int) -> None:
        sink.begin(resume, delta_plan.delta.data_size - resume, size)
        try:
            seed_fd = os.open(delta_plan.seed, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalError(f"{delta_plan.seed}: cannot read: {exc.strerror}") from None
        try:
            _apply(delta_plan, seed_fd, sink, resume)
            os.posix_fadvise(seed_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(seed_fd)

    return run


def _apply(plan: DeltaPlan, seed_fd: int, sink: Receiver, resume: int) -> None:
    history = bytearray()
    for op in plan.delta.ops:
        end = op.start + op.length
        if op.frame is None:
            position = max(resume, op.start)
            while position < end:  # straight into the sink's buffer: no copy
                space = sink.buffer()
                count = min(len(space), end - position)
                offset = op.offset + position - op.start
                if os.preadv(seed_fd, [space[:count]], offset) != count:
                    raise VerificationError(f"the running Core ends before byte {offset + count}")
                sink.filled(count)
                position += count
            continue
        if op.history > len(history):
            raise RemoteDataError(f"{plan.source}: a PATCH asks for more history than was made")
        out = delta_format.decompress(op, _dictionary(op, history, seed_fd), plan.source)
        # The history stays within its bound as it moves on: trimmed before it grows.
        del history[: max(0, len(history) + len(out) - delta_format.HISTORY_MAX)]
        history += memoryview(out)[-delta_format.HISTORY_MAX :]
        if end > resume:
            feed(sink, memoryview(out)[max(0, resume - op.start) :])
        del out


def _dictionary(op: delta_format.Op, history: bytearray, seed_fd: int) -> bytearray:
    """A PATCH's dictionary in one buffer, read in place: the end of `history`, then
    its ranges of the running Core (a copy fewer than joining them: RSS)."""
    dictionary = bytearray(op.history + op.dictionary_size)
    with memoryview(dictionary) as view:
        view[: op.history] = memoryview(history)[len(history) - op.history :]
        position = op.history
        for offset, length in op.ranges:
            if os.preadv(seed_fd, [view[position : position + length]], offset) != length:
                raise VerificationError(f"the running Core ends before byte {offset + length}")
            position += length
    return dictionary

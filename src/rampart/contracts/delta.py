"""Core deltas: a release's Core as a patch against an earlier release's Core
(docs/formats.md, "Core delta"), written once for the vendor's publishing and the
device.

A chunk index (contracts/chunks.py) lets a device fetch only the chunks it lacks,
but each chunk is compressed alone and costs a request, and the chunks that hold a
change also hold the unchanged bytes around it. A delta is a list of operations
that make the new Core's data, in order, from the running Core's: COPY takes bytes
of the old Core as they are; PATCH is the new bytes between two copies, as one zstd
frame compressed with a dictionary made of ranges of the old Core (what lay between
the copied parts there: the old version of a changed file, when a change kept the
files' order, as squashfs writes them by path). The device reads the old bytes from
its running Core, and feeds the result to the same sink as a stream, which checks
every block against the new Core's verity tree before it is written.

    header:  magic "RPDELTA1", base root hash (32 bytes), target root hash (32 bytes),
             data size (u64: the new Core's bytes before its verity superblock),
             base size (u64: the old Core's data size), operation count (u32)
    op:      kind (u32: 1 COPY, 2 PATCH), range count (u32: 0 for COPY, at most
             RANGES_MAX), length (u64: bytes of new Core it makes),
             value (u64: COPY the offset in the old Core; PATCH the frame's length),
             history (u64: 0 for COPY; PATCH at most HISTORY_MAX)
    PATCH:   then its ranges (u64 offset, u32 length each, within the base size, at
             most DICT_MAX bytes together), then the frame: one zstd frame that
             declares `length` (at most PATCH_MAX) and decompresses to it with a
             raw-content dictionary: the last `history` bytes the PATCHes before it
             made (in order; new libraries resemble each other), then the ranges'
             bytes, in order
    integers little-endian; the operations make the data in order and end the file

The file is signed like a chunk index (minisign, its trusted comment the new
version). Everything in it comes from the network: each field is checked against
its limit before it is used, and nothing it yields is trusted before the tree says.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from rampart.errors import FormatError, VerificationError

MAGIC = b"RPDELTA1"
HEADER = struct.Struct("<8s32s32sQQI")
OP = struct.Struct("<IIQQQ")
RANGE = struct.Struct("<QI")
COPY, PATCH = 1, 2
PATCH_MAX = 8 << 20  # bytes of new Core one frame makes
# A device holds a PATCH's dictionary twice while it decompresses (its buffer, and
# zstd's copy), its output and the history: 2 x 12 + 8 + 4 MiB at most.
DICT_MAX = 8 << 20  # bytes of old Core a frame's dictionary holds
RANGES_MAX = 4096
HISTORY_MAX = 4 << 20  # bytes of earlier PATCH output a frame's dictionary holds
DELTA_MAX = 64 << 20  # the largest delta a device fetches: beyond, chunks cost less


@dataclass(frozen=True)
class Op:
    """`length` bytes of new Core at `start`: copied from the old Core at `offset`
    (`frame` None), or `frame` decompressed with the old Core's `ranges`
    (offset, length) as its dictionary."""

    start: int
    length: int
    offset: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    frame: bytes | memoryview | None = None
    history: int = 0

    @property
    def dictionary_size(self) -> int:
        return sum(length for _, length in self.ranges)


@dataclass(frozen=True)
class Delta:
    base_root: bytes
    target_root: bytes
    data_size: int
    base_size: int
    ops: tuple[Op, ...]

    def render(self) -> bytes:
        parts = [
            HEADER.pack(
                MAGIC,
                self.base_root,
                self.target_root,
                self.data_size,
                self.base_size,
                len(self.ops),
            )
        ]
        for op in self.ops:
            if op.frame is None:
                parts.append(OP.pack(COPY, 0, op.length, op.offset, 0))
                continue
            parts.append(OP.pack(PATCH, len(op.ranges), op.length, len(op.frame), op.history))
            parts += [RANGE.pack(offset, length) for offset, length in op.ranges]
            parts.append(bytes(op.frame))
        return b"".join(parts)


def parse(data: bytes | memoryview, source: str) -> Delta:
    """A delta's fields, each within its limit (FormatError otherwise); the frames are
    views of `data`."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise FormatError(f"{source}: {len(view)} bytes, too short for a Core delta")
    magic, base_root, target_root, data_size, base_size, count = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FormatError(f"{source}: not a Core delta (its magic is {bytes(magic)!r})")
    if count > (len(view) - HEADER.size) // OP.size:
        raise FormatError(f"{source}: {count} operations do not fit its {len(view)} bytes")
    offset = HEADER.size
    start = 0
    ops = []
    for number in range(count):
        where = f"{source}: operation {number}"
        if offset + OP.size > len(view):
            raise FormatError(f"{where}: the file ends in it")
        kind, ranges_count, length, value, history = OP.unpack_from(view, offset)
        offset += OP.size
        copy = kind == COPY and ranges_count == history == 0
        if copy and length > 0 and value + length <= base_size:
            ops.append(Op(start, length, value))
        elif (
            kind == PATCH
            and 0 < length <= PATCH_MAX
            and ranges_count <= RANGES_MAX
            and history <= HISTORY_MAX
        ):
            end = offset + ranges_count * RANGE.size
            if end + value > len(view):
                raise FormatError(f"{where}: the file ends in it")
            ranges = tuple(
                RANGE.unpack_from(view, offset + i * RANGE.size) for i in range(ranges_count)
            )
            _check_ranges(ranges, base_size, where)
            ops.append(Op(start, length, 0, ranges, view[end : end + value], history))
            offset = end + value
        else:
            raise FormatError(f"{where}: kind {kind}, {length} bytes: out of bounds")
        start += length
        if start > data_size:
            break
    if start != data_size:
        raise FormatError(
            f"{source}: its operations make {start} bytes, its header says {data_size}"
        )
    if offset != len(view):
        raise FormatError(f"{source}: {len(view) - offset} bytes after its last operation")
    return Delta(bytes(base_root), bytes(target_root), data_size, base_size, tuple(ops))


def _check_ranges(ranges: Sequence[tuple[int, int]], base_size: int, where: str) -> None:
    total = 0
    for offset, length in ranges:
        if length == 0 or offset + length > base_size:
            raise FormatError(f"{where}: a dictionary range outside the base Core")
        total += length
    if total > DICT_MAX:
        raise FormatError(f"{where}: a dictionary of {total} bytes, more than {DICT_MAX}")


def decompress(op: Op, dictionary: bytes | bytearray, source: str) -> bytes:
    """A PATCH's bytes: its frame, declaring its length, decompressed with
    `dictionary` (its history, then the base Core's bytes of its ranges) into no more
    than that.
    VerificationError if it does not make exactly `op.length` bytes."""
    import zstandard  # only incremental updates need it

    frame = op.frame
    if frame is None:
        raise ValueError("a COPY has no frame")
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != op.length:
            raise ValueError(f"its frame declares {declared} bytes, not {op.length}")
        raw = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        out = zstandard.ZstdDecompressor(dict_data=raw).decompress(
            frame, max_output_size=op.length, allow_extra_data=False
        )
    except (zstandard.ZstdError, ValueError) as exc:
        raise VerificationError(
            f"{source}: bytes from {op.start}: cannot decompress: {exc}"
        ) from None
    if len(out) != op.length:
        raise VerificationError(
            f"{source}: bytes from {op.start}: {len(out)} bytes, not {op.length}"
        )
    return bytes(out)

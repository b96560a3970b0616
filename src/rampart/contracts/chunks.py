"""Chunk indexes and chunk stores in casync's formats (docs/formats.md, "Chunk index
and chunk store"), written once for the vendor's publishing and the device.

A Core is cut into content-defined chunks (`release/chunker.py`: casync's buzhash
chunker, its boundaries byte for byte). Its index (`<os>-core.caibx`) lists each
chunk's end offset and id; the chunks live, compressed, in a chunk store that any
static server serves:

    index:  header (48 bytes: size 48, type INDEX, feature flags, min, avg, max chunk size)
            table header (16 bytes: size 2^64-1, type TABLE)
            N items (40 bytes: the chunk's end offset in the image, its 32-byte id)
            tail (40 bytes: 0, 0, 48, 16 + 40 N + 40, TAIL_MARKER)
            all integers unsigned 64-bit little-endian
    store:  <store>/<first 4 hex digits of the id>/<64 hex digits>.cacnk
            one complete zstd or xz stream of the chunk's bytes
    id:     SHA-512/256 of the chunk's bytes (SHA-256 if the index's flags say so)

`casync extract` rebuilds a Core from Rampart's index and store, and Rampart reads
`casync make`'s: the tests check both. Everything read here comes from the network:
each field is checked against a limit before it is used.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
from collections.abc import Callable
from dataclasses import dataclass

from rampart.errors import FormatError, LocalError, VerificationError

INDEX_TYPE = 0x96824D9C7B129FF9
TABLE_TYPE = 0xE75B9E112F17417D
TAIL_MARKER = 0x4B4F050E5549ECD1
SHA512_256 = 0x2000000000000000  # chunk ids are SHA-512/256 (else SHA-256)
# What `casync make` writes for a blob: exclude-nodump, SHA-512/256, exclude-file.
BLOB_FLAGS = 0x8000000000000000 | SHA512_256 | 0x1000000000000000
KNOWN_FLAGS = 0xF000000000000000  # the flags a blob index may carry (and no other)
HEADER = struct.Struct("<QQQQQQ")  # size, type, flags, min, avg, max
TABLE_HEADER = struct.Struct("<QQ")
ITEM = struct.Struct("<Q32s")
TAIL = struct.Struct("<QQQQQ")
HEAD_SIZE = HEADER.size + TABLE_HEADER.size  # 64
ID_SIZE = 32
SUFFIX = ".cacnk"
MAX_CHUNK = 128 << 20  # casync's bound on any chunk size
CASYNC_SIZES = (16 << 10, 64 << 10, 256 << 10)  # casync's min, avg, max
# Rampart's: smaller chunks cut fewer unchanged bytes around each change (Debian
# minbase -> + curl and less: 6.7 MB of new chunks against 8.8 MB; bench/incremental.py).
SIZES = (4 << 10, 16 << 10, 64 << 10)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class ChunkIndex:
    """A blob index: the chunker's sizes and, per chunk, its end offset and id."""

    flags: int
    min_size: int
    avg_size: int
    max_size: int
    ends: tuple[int, ...]
    ids: tuple[bytes, ...]

    @property
    def size(self) -> int:
        """The size of the image the chunks make up."""
        return self.ends[-1] if self.ends else 0

    def spans(self) -> list[tuple[int, int, bytes]]:
        """Each chunk as (start, length, id), in order."""
        found = []
        start = 0
        for end, chunk_id in zip(self.ends, self.ids, strict=True):
            found.append((start, end - start, chunk_id))
            start = end
        return found

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """The id of `data` under this index's digest."""
        return chunk_id(data, self.flags)

    def render(self) -> bytes:
        count = len(self.ends)
        parts = [
            HEADER.pack(HEADER.size, INDEX_TYPE, self.flags, *self.sizes),
            TABLE_HEADER.pack(0xFFFFFFFFFFFFFFFF, TABLE_TYPE),
        ]
        parts += [ITEM.pack(end, chunk) for end, chunk in zip(self.ends, self.ids, strict=True)]
        parts.append(
            TAIL.pack(0, 0, HEADER.size, TABLE_HEADER.size + ITEM.size * (count + 1), TAIL_MARKER)
        )
        return b"".join(parts)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.min_size, self.avg_size, self.max_size


def chunk_id(data: bytes | memoryview, flags: int = BLOB_FLAGS) -> bytes:
    """SHA-512/256 of `data` (SHA-256 if `flags` lacks SHA512_256)."""
    name = "sha512_256" if flags & SHA512_256 else "sha256"
    return hashlib.new(name, data).digest()


def check_sizes(sizes: tuple[int, int, int], source: str) -> None:
    low, avg, high = sizes
    if not 48 <= low <= avg <= high <= MAX_CHUNK:
        raise FormatError(
            f"{source}: chunk sizes {low}/{avg}/{high}: need 48 <= min <= avg <= max <= {MAX_CHUNK}"
        )


def parse_index(data: bytes, source: str, max_size: int) -> ChunkIndex:
    """A blob index, checked as casync checks it, for an image of at most `max_size`
    bytes (FormatError otherwise): a known header, items whose end offsets increase by
    at least 1 and at most the index's max chunk size, then the tail and nothing after."""
    if len(data) < HEAD_SIZE + TAIL.size or (len(data) - HEAD_SIZE) % ITEM.size:
        raise FormatError(f"{source}: not a chunk index (its size is {len(data)} bytes)")
    size, kind, flags, low, avg, high = HEADER.unpack_from(data, 0)
    table_size, table_kind = TABLE_HEADER.unpack_from(data, HEADER.size)
    if size != HEADER.size or kind != INDEX_TYPE or table_kind != TABLE_TYPE:
        raise FormatError(f"{source}: not a chunk index (no casync index header)")
    if table_size != 0xFFFFFFFFFFFFFFFF or flags & ~KNOWN_FLAGS:
        raise FormatError(f"{source}: not a blob index (feature flags {flags:#x})")
    check_sizes((low, avg, high), source)
    count = (len(data) - HEAD_SIZE) // ITEM.size - 1
    zero1, zero2, offset, tail_size, marker = TAIL.unpack_from(data, HEAD_SIZE + count * ITEM.size)
    expected_tail = (0, 0, HEADER.size, TABLE_HEADER.size + ITEM.size * (count + 1), TAIL_MARKER)
    if (zero1, zero2, offset, tail_size, marker) != expected_tail:
        raise FormatError(f"{source}: chunk index without its tail (truncated or extended)")
    ends: list[int] = []
    ids: list[bytes] = []
    previous = 0
    for number in range(count):
        end, chunk = ITEM.unpack_from(data, HEAD_SIZE + number * ITEM.size)
        if not previous < end <= previous + high or end > max_size:
            raise FormatError(
                f"{source}: chunk {number} ends at {end}, after {previous}: not within "
                f"1 to {high} bytes, or past {max_size}"
            )
        ends.append(end)
        ids.append(chunk)
        previous = end
    return ChunkIndex(flags, low, avg, high, tuple(ends), tuple(ids))


def store_path(chunk: bytes) -> str:
    """Where chunk `chunk` lives below a store (`<4 hex>/<64 hex>.cacnk`)."""
    text = chunk.hex()
    return f"{text[:4]}/{text}{SUFFIX}"


Decompressor = Callable[[bytes, int], bytes]


def _zstd(data: bytes, size: int) -> bytes:
    """One zstd frame, never more than `size + 1` bytes out: a frame that declares
    another size is refused before any is allocated, one that declares none is cut
    there."""
    import zstandard  # only incremental updates need it

    try:
        declared = zstandard.frame_content_size(data)
        if declared not in (-1, size):
            raise ValueError(f"its frame declares {declared} bytes")
        out = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=size + 1, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ValueError(str(exc)) from None
    return bytes(out)


def _xz(data: bytes, size: int) -> bytes:
    reader = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        out = reader.decompress(data, max_length=size + 1)
    except lzma.LZMAError as exc:
        raise ValueError(str(exc)) from None
    if not reader.eof or reader.unused_data:
        raise ValueError("not exactly one complete xz stream of the expected size")
    return out


def open_chunk(data: bytes, size: int, chunk: bytes, flags: int, source: str) -> bytes:
    """The bytes of a fetched chunk file: decompressed (zstd or xz, by its magic; no
    more than `size` bytes are ever produced but one) and checked: exactly `size`
    bytes whose id is `chunk` (VerificationError otherwise)."""
    if data.startswith(ZSTD_MAGIC):
        decompress: Decompressor = _zstd
    elif data.startswith(XZ_MAGIC):
        decompress = _xz
    else:
        raise VerificationError(f"{source}: not a zstd or xz chunk")
    try:
        out = decompress(data, size)
    except ValueError as exc:
        raise VerificationError(f"{source}: cannot decompress the chunk: {exc}") from None
    if len(out) != size:
        raise VerificationError(
            f"{source}: the chunk has {'more' if len(out) > size else len(out)} bytes, "
            f"its index says {size}"
        )
    if chunk_id(out, flags) != chunk:
        raise VerificationError(f"{source}: the chunk's bytes do not match its id")
    return out


def compress(data: bytes, method: str, level: int) -> bytes:
    """A chunk file's bytes: `data` as one zstd frame or xz stream (publishing)."""
    if method == "xz":
        return lzma.compress(data, lzma.FORMAT_XZ, preset=level)
    if method == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data))
    raise LocalError(f"unknown chunk compression {method!r} (zstd or xz)")

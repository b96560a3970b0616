"""Core deltas (contracts/delta.py): the layout docs/formats.md gives, byte for byte,
a round trip, and every malformed delta refused before any of it is used."""

from __future__ import annotations

import struct

import pytest
import zstandard

from rampart.contracts import delta
from rampart.errors import FormatError, VerificationError

OLD = bytes(range(256)) * 64  # 16 KiB of base Core
NEW_BYTES = b"new bytes, " * 100  # 1100 bytes no COPY holds


def frame(body: bytes, dictionary: bytes) -> bytes:
    raw = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    compressor = zstandard.ZstdCompressor(
        level=19, dict_data=raw, write_content_size=True, write_checksum=True
    )
    return compressor.compress(body)


def example() -> delta.Delta:
    """COPY 4096 bytes from 8192, PATCH 1100 new bytes with base bytes 0-4095 as its
    dictionary, then a PATCH with the first PATCH's output as history."""
    return delta.Delta(
        b"\x01" * 32,
        b"\x02" * 32,
        4096 + 1100 + 1100,
        len(OLD),
        (
            delta.Op(0, 4096, 8192),
            delta.Op(4096, 1100, 0, ((0, 4096),), frame(NEW_BYTES, OLD[:4096])),
            delta.Op(5196, 1100, 0, (), frame(NEW_BYTES, NEW_BYTES), history=1100),
        ),
    )


def test_layout_byte_for_byte() -> None:
    data = example().render()
    assert data[:8] == b"RPDELTA1"
    assert data[8:40] == b"\x01" * 32 and data[40:72] == b"\x02" * 32
    assert struct.unpack_from("<QQI", data, 72) == (6296, len(OLD), 3)
    assert delta.HEADER.size == 92 and delta.OP.size == 32 and delta.RANGE.size == 12
    assert struct.unpack_from("<IIQQQ", data, 92) == (delta.COPY, 0, 4096, 8192, 0)
    kind, ranges, length, frame_length, history = struct.unpack_from("<IIQQQ", data, 124)
    assert (kind, ranges, length, history) == (delta.PATCH, 1, 1100, 0)
    assert struct.unpack_from("<QI", data, 156) == (0, 4096)
    assert zstandard.frame_content_size(data[168 : 168 + frame_length]) == 1100


def test_round_trip_and_decompress() -> None:
    parsed = delta.parse(example().render(), "x.delta")
    assert [(op.start, op.length, op.offset, op.ranges, op.history) for op in parsed.ops] == [
        (0, 4096, 8192, (), 0),
        (4096, 1100, 0, ((0, 4096),), 0),
        (5196, 1100, 0, (), 1100),
    ]
    assert parsed.ops[1].dictionary_size == 4096
    assert delta.decompress(parsed.ops[1], OLD[:4096], "x.delta") == NEW_BYTES
    assert delta.decompress(parsed.ops[2], NEW_BYTES, "x.delta") == NEW_BYTES


def mangled(offset: int, fmt: str, *values: int) -> bytes:
    data = bytearray(example().render())
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"RPDELTA1", "too short"),
        (b"RPDELTA2" + example().render()[8:], "not a Core delta"),
        (example().render()[:-1], "ends in it"),
        (example().render() + b"\0", "1 bytes after its last operation"),
        (mangled(72, "<Q", 6297), "make 6296 bytes, its header says 6297"),
        (mangled(88, "<I", 1 << 30), "do not fit"),
        (mangled(92, "<I", 3), "kind 3"),
        (mangled(92 + 16, "<Q", len(OLD) - 4095), "out of bounds"),  # COPY past the base
        (mangled(124 + 8, "<Q", delta.PATCH_MAX + 1), "out of bounds"),
        (mangled(124 + 24, "<Q", delta.HISTORY_MAX + 1), "out of bounds"),
        (mangled(124 + 4, "<I", delta.RANGES_MAX + 1), "out of bounds"),
        (mangled(156, "<Q", len(OLD) - 4095), "outside the base Core"),
        (mangled(164, "<I", 0), "outside the base Core"),
        (mangled(92 + 24, "<Q", 1), "out of bounds"),  # a COPY with a history
    ],
    ids=[
        "short",
        "magic",
        "truncated",
        "trailing",
        "sizes",
        "op-count",
        "kind",
        "copy-past",
        "patch-too-long",
        "history-too-long",
        "too-many-ranges",
        "range-past",
        "empty-range",
        "copy-history",
    ],
)
def test_malformed_delta_refused(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        delta.parse(data, "x.delta")


def test_dictionary_larger_than_its_limit_refused() -> None:
    big = delta.Delta(
        b"\0" * 32,
        b"\0" * 32,
        10,
        delta.DICT_MAX + 2,
        (delta.Op(0, 10, 0, ((0, delta.DICT_MAX), (0, 1)), b"x"),),
    )
    with pytest.raises(FormatError, match="more than"):
        delta.parse(big.render(), "x.delta")


def test_endless_frame_refused() -> None:
    """A frame that declares another size, or none, or more: refused before anything
    past the op's length is made."""
    op = example().ops[1]
    for body, match in (
        (NEW_BYTES + b"!", "declares 1101 bytes, not 1100"),
        (bytes(256 << 20), "declares 268435456"),
    ):
        endless = delta.Op(op.start, op.length, 0, op.ranges, frame(body, OLD[:4096]))
        with pytest.raises(VerificationError, match=match):
            delta.decompress(endless, OLD[:4096], "x.delta")
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    with pytest.raises(VerificationError, match="declares -1"):
        delta.decompress(delta.Op(0, 1100, 0, (), undeclared), b"", "x.delta")


def test_a_frame_with_another_dictionary_does_not_make_the_bytes() -> None:
    """Publishing adds zstd's checksum to each frame: a dictionary other than the
    publisher's (a changed running Core) is caught at the frame, before the tree."""
    body = OLD[1000:3000] + b"changed" + OLD[3000:4000]  # mostly the dictionary's bytes
    op = delta.Op(0, len(body), 0, ((0, 4096),), frame(body, OLD[:4096]))
    assert delta.decompress(op, OLD[:4096], "x.delta") == body
    with pytest.raises(VerificationError, match="cannot decompress"):
        delta.decompress(op, bytes(4096), "x.delta")

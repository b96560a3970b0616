"""casync's blob index and chunk files (contracts/chunks.py): the worked example of
docs/formats.md byte for byte, and every malformed index or chunk refused."""

from __future__ import annotations

import lzma
import struct

import pytest
import zstandard

from rampart.contracts import chunks
from rampart.errors import FormatError, VerificationError

# 300000 zero bytes, casync's default sizes: no content cut, so one chunk of max bytes
# and the rest (ids: SHA-512/256 of the chunks).
ID0 = bytes.fromhex("1c8109946feed9f9e9fe4b5144d90f05a50fb3275e848cb72f4b9546d8c533f2")
ID1 = bytes.fromhex("3de1e31e459dace4ff9629bed181978e3477001edce4aaeaf5761c86eb5d94f9")
EXAMPLE = chunks.ChunkIndex(chunks.BLOB_FLAGS, 16384, 65536, 262144, (262144, 300000), (ID0, ID1))


def test_worked_example_renders_byte_for_byte() -> None:
    data = EXAMPLE.render()
    assert len(data) == 184
    assert data[:8] == struct.pack("<Q", 48)
    assert data[16:24] == bytes(7) + b"\xb0"  # flags 0xB000000000000000
    assert data[48:56] == b"\xff" * 8
    assert data[64:72] == struct.pack("<Q", 262144) and data[72:104] == ID0
    assert data[-40:] == struct.pack("<QQQQQ", 0, 0, 48, 136, chunks.TAIL_MARKER)
    assert chunks.chunk_id(bytes(262144)) == ID0
    assert chunks.chunk_id(bytes(300000 - 262144)) == ID1


def test_index_round_trip() -> None:
    parsed = chunks.parse_index(EXAMPLE.render(), "ex.caibx", 1 << 30)
    assert parsed == EXAMPLE
    assert parsed.size == 300000
    assert parsed.spans() == [(0, 262144, ID0), (262144, 37856, ID1)]


def mangled(offset: int, value: bytes) -> bytes:
    data = bytearray(EXAMPLE.render())
    data[offset : offset + len(value)] = value
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (EXAMPLE.render()[:-40], "without its tail"),
        (EXAMPLE.render() + bytes(40), "without its tail"),
        (EXAMPLE.render()[:-1], "not a chunk index"),
        (mangled(8, bytes(8)), "no casync index header"),
        (mangled(16, struct.pack("<Q", 1)), "not a blob index"),
        (mangled(24, struct.pack("<Q", 1 << 30)), "chunk sizes"),
        (mangled(104, struct.pack("<Q", 262144)), "chunk 1 ends at 262144"),
        (mangled(64, struct.pack("<Q", 262145)), "chunk 0 ends at 262145"),
    ],
    ids=["no-tail", "extended", "ragged", "magic", "flags", "sizes", "not-increasing", "too-long"],
)
def test_malformed_index_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        chunks.parse_index(data, "bad.caibx", 1 << 30)


def test_index_of_a_larger_image_than_allowed_is_refused() -> None:
    with pytest.raises(FormatError, match="past 299999"):
        chunks.parse_index(EXAMPLE.render(), "ex.caibx", 299999)


def test_store_path_is_casyncs() -> None:
    assert chunks.store_path(ID0) == f"1c81/{ID0.hex()}.cacnk"


DATA = bytes(range(256)) * 100


@pytest.mark.parametrize("method", ["zstd", "xz"])
def test_chunk_file_opens_to_its_bytes(method: str) -> None:
    packed = chunks.compress(DATA, method, 3)
    assert (
        chunks.open_chunk(packed, len(DATA), chunks.chunk_id(DATA), chunks.BLOB_FLAGS, "c") == DATA
    )


def test_chunk_whose_bytes_do_not_match_its_id() -> None:
    packed = chunks.compress(DATA, "zstd", 3)
    with pytest.raises(VerificationError, match="do not match its id"):
        chunks.open_chunk(packed, len(DATA), ID0, chunks.BLOB_FLAGS, "c")


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_endless_chunk_is_cut_at_its_size(declared: bool) -> None:
    """A chunk that decompresses to far more than its index says (a bomb): refused
    without producing more than one byte over its size."""
    bomb = zstandard.ZstdCompressor(write_content_size=declared).compress(bytes(64 << 20))
    with pytest.raises(VerificationError, match=r"cannot decompress|more"):
        chunks.open_chunk(bomb, 1000, ID0, chunks.BLOB_FLAGS, "c")
    xz_bomb = lzma.compress(bytes(64 << 20), lzma.FORMAT_XZ)
    with pytest.raises(VerificationError, match=r"cannot decompress|more"):
        chunks.open_chunk(xz_bomb, 1000, ID0, chunks.BLOB_FLAGS, "c")


def test_chunk_that_is_neither_zstd_nor_xz() -> None:
    with pytest.raises(VerificationError, match="not a zstd or xz chunk"):
        chunks.open_chunk(DATA, len(DATA), chunks.chunk_id(DATA), chunks.BLOB_FLAGS, "c")


def test_chunk_with_bytes_after_its_frame() -> None:
    packed = chunks.compress(DATA, "zstd", 3) + b"more"
    with pytest.raises(VerificationError, match="cannot decompress"):
        chunks.open_chunk(packed, len(DATA), chunks.chunk_id(DATA), chunks.BLOB_FLAGS, "c")

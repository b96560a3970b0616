"""The chunker and chunk store (release/chunker.py) against the real `casync`: the same
cut points, `casync extract` rebuilds an image from Rampart's index and store byte for
byte, and Rampart reads the index and store `casync make` wrote."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from rampart.contracts import chunks
from rampart.release import chunker

CASYNC = shutil.which("casync")
needs_casync = pytest.mark.skipif(CASYNC is None, reason="casync missing: run `make setup`")


def casync(*args: str) -> None:
    assert CASYNC is not None
    subprocess.run([CASYNC, *args], check=True, capture_output=True, timeout=300)


def image(path: Path, size: int, seed: int = 1) -> Path:
    rng = random.Random(seed)  # noqa: S311 - reproducible data
    path.write_bytes(rng.randbytes(size))
    return path


def cuts_of(path: Path, sizes: tuple[int, int, int] = chunks.CASYNC_SIZES) -> list[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return chunker.cut_points(fd, os.fstat(fd).st_size, sizes)
    finally:
        os.close(fd)


@needs_casync
@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        ((9 << 20) + 12345, chunks.CASYNC_SIZES),  # crosses blocks of the scan
        (3 << 20, (4096, 16384, 65536)),
        (100_000, chunks.CASYNC_SIZES),
        (16383, chunks.CASYNC_SIZES),  # shorter than min: one chunk
    ],
    ids=["9MiB", "small-chunks", "100k", "under-min"],
)
def test_cut_points_are_casyncs(tmp_path: Path, size: int, sizes: tuple[int, int, int]) -> None:
    blob = image(tmp_path / "blob", size)
    spec = ":".join(str(s) for s in sizes)
    casync(
        "make",
        f"--chunk-size={spec}",
        f"--store={tmp_path / 'st'}",
        str(tmp_path / "c.caibx"),
        str(blob),
    )
    theirs = chunks.parse_index((tmp_path / "c.caibx").read_bytes(), "c.caibx", size)
    assert cuts_of(blob, sizes) == list(theirs.ends)


def test_a_chunk_of_exactly_min_bytes_is_cut_as_casync_cuts_it(tmp_path: Path) -> None:
    """casync tests the first full window at `min` (desync, before its fix, at min + 1):
    find data whose window ending at `min` matches, and check the cut is there."""
    low, avg, high = chunks.CASYNC_SIZES
    d = chunker.discriminator(low, avg, high)
    rng = random.Random(7)  # noqa: S311 - reproducible data
    head = rng.randbytes(low - 48)
    for _ in range(200_000):
        window = rng.randbytes(48)
        data = bytes(48) + head + window
        hits = chunker._candidates(data, 0, d)
        if low in hits:
            break
    else:
        pytest.fail("no window found")
    blob = tmp_path / "blob"
    blob.write_bytes(head + window + rng.randbytes(200_000))
    assert cuts_of(blob)[0] == low
    if CASYNC is not None:
        casync("make", f"--store={tmp_path / 'st'}", str(tmp_path / "c.caibx"), str(blob))
        theirs = chunks.parse_index((tmp_path / "c.caibx").read_bytes(), "c", 1 << 30)
        assert theirs.ends[0] == low


def test_fixed_size_chunks_when_min_avg_and_max_agree(tmp_path: Path) -> None:
    blob = image(tmp_path / "blob", 10 * 4096 + 100)
    assert cuts_of(blob, (4096, 4096, 4096)) == [4096 * k for k in range(1, 11)] + [41060]


@needs_casync
@pytest.mark.parametrize("compression", ["zstd", "xz"])
def test_casync_extract_rebuilds_rampart_s_index_from_its_store(
    tmp_path: Path, compression: str
) -> None:
    blob = image(tmp_path / "blob", (2 << 20) + 777)
    store = tmp_path / "store.castr"
    index, stats = chunker.make_index(blob, store, compression=compression, level=3)
    assert stats.new == stats.chunks == len(index.ends)
    (tmp_path / "r.caibx").write_bytes(index.render())
    out = tmp_path / "out"
    casync("extract", f"--store={store}", str(tmp_path / "r.caibx"), str(out))
    assert out.read_bytes() == blob.read_bytes()
    again, stats = chunker.make_index(blob, store, compression=compression, level=3)
    assert again == index and stats.new == 0  # every chunk already there


@needs_casync
def test_rampart_reads_the_index_and_store_casync_made(tmp_path: Path) -> None:
    blob = image(tmp_path / "blob", (2 << 20) + 777)
    store = tmp_path / "st"
    casync("make", f"--store={store}", str(tmp_path / "c.caibx"), str(blob))
    index = chunks.parse_index((tmp_path / "c.caibx").read_bytes(), "c.caibx", 1 << 30)
    rebuilt = bytearray()
    for _, length, chunk in index.spans():
        packed = (store / chunks.store_path(chunk)).read_bytes()
        rebuilt += chunks.open_chunk(packed, length, chunk, index.flags, "casync chunk")
    assert bytes(rebuilt) == blob.read_bytes()
    same = chunker.make_index(blob, None, sizes=chunks.CASYNC_SIZES)[0]
    assert index == same  # and Rampart's chunker makes the same index

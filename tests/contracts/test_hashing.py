"""contracts/hashing.py: every BLAKE2b-512 gives the same digests, and the read-ahead
hands over every byte once, in order, whatever the sizes and offsets."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from rampart.contracts import hashing

SIZES = (0, 1, hashing.BLOCK - 1, hashing.BLOCK, hashing.BLOCK + 1, 3 * hashing.BLOCK + 17)


def test_libsodium_is_chosen_when_pynacl_is_installed() -> None:
    """PyNaCl is a dependency: the fast implementation is the one in use."""
    assert hashing.implementation().startswith("libsodium (PyNaCl ")
    assert list(hashing.implementations()) == [hashing.implementation(), hashing.HASHLIB]


@pytest.mark.parametrize("size", SIZES)
def test_every_implementation_gives_blake2b_512(size: int) -> None:
    data = os.urandom(size)
    expected = hashlib.blake2b(data).digest()
    for name, factory in hashing.implementations().items():
        one = factory(data)
        assert one.digest() == expected, name
        split = factory(b"")
        for start in range(0, size, 65537):
            split.update(data[start : start + 65537])
        assert split.digest() == expected, name
    assert hashing.blake2b(data).digest() == expected


@pytest.mark.parametrize("size", SIZES)
def test_blake2b_fd_hashes_the_whole_file(tmp_path: Path, size: int) -> None:
    path = tmp_path / "payload"
    data = os.urandom(size)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hashing.blake2b_fd(fd) == (hashlib.blake2b(data).digest(), size)
    finally:
        os.close(fd)


def test_blocks_reads_a_range_in_order(tmp_path: Path) -> None:
    path = tmp_path / "payload"
    data = os.urandom(5 * 4096 + 100)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with hashing.blocks(fd, 3 * 4096 + 5, offset=4096 - 3, block=4096) as chunks:
            got = list(chunks)
        assert [len(c) for c in got] == [4096, 4096, 4096, 5]
        assert b"".join(got) == data[4096 - 3 : 4096 - 3 + 3 * 4096 + 5]
        # A range that runs past the end stops at the end: the caller counts.
        with hashing.blocks(fd, len(data), offset=len(data) - 10, block=4096) as chunks:
            assert b"".join(chunks) == data[-10:]
        # The file position is not used (pread), so it is not moved either.
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(fd)


def test_a_read_error_is_raised_to_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "directory"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError), hashing.blocks(fd) as chunks:
            list(chunks)
    finally:
        os.close(fd)


def test_leaving_early_waits_for_the_read_under_way(tmp_path: Path) -> None:
    """A caller that stops (an exception, a mismatch) may close the descriptor as
    soon as it leaves the `with`: no read of it is still running."""
    path = tmp_path / "payload"
    path.write_bytes(os.urandom(4 * hashing.BLOCK))
    fd = os.open(path, os.O_RDONLY)
    try:
        with hashing.blocks(fd) as chunks:
            next(iter(chunks))
        assert not [t for t in threading.enumerate() if t.name.startswith("read-ahead")]
    finally:
        os.close(fd)


def test_feed_takes_any_hashlib_object(tmp_path: Path) -> None:
    path = tmp_path / "payload"
    data = os.urandom(hashing.BLOCK + 3)
    path.write_bytes(data)
    sha = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hashing.feed(sha, fd) == len(data)
    finally:
        os.close(fd)
    assert sha.digest() == hashlib.sha256(data).digest()

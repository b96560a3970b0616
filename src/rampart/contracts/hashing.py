"""BLAKE2b-512 over payloads, and reading a file ahead of its hashing: chosen once, here.

Every BLAKE2b-512 over a payload (signing and verifying, publishing, the client's
checks and read-back) comes from `blake2b()`, and every large file a hash reads
comes from `blocks()`:

- `blake2b()` is libsodium's BLAKE2b (through PyNaCl) when PyNaCl can be
  imported, else CPython's `hashlib.blake2b`. libsodium picks AVX2 or SSE4.1 code
  at run time, where CPython's bundled BLAKE2 is portable C: 1.2 to 1.8 times as
  fast on x86-64 (bench/sign_verify.py prints both speeds on the machine at
  hand). The digest is the same, unkeyed BLAKE2b-512; minisign hashes with
  libsodium too.
- `blocks()` reads the next block in a thread while the caller hashes this one.
  Reading (`os.pread`) and both hashes release the GIL, so hashing a file costs
  about the longer of reading it and hashing it, not their sum. Blocks are
  `bytes` (PyNaCl takes no other buffer), read straight into a new object: no
  copy.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes read at once; two are in memory (the one hashed, the one read)
DIGEST_SIZE = 64


class Hasher(Protocol):
    """What `blake2b()` returns: hashlib's interface, restricted to `bytes`."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


def _hashlib(data: bytes = b"") -> Hasher:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE)


@functools.cache
def _choose() -> tuple[str, Callable[[bytes], Hasher]]:
    """(name, factory) of the fastest BLAKE2b importable here, chosen at the first
    hash (importing PyNaCl takes about 15 ms: `--help` does not pay it)."""
    try:
        import nacl  # the fallback is hashlib
        import nacl.hashlib
    except ImportError:  # pragma: no cover - a device without PyNaCl
        log.debug("BLAKE2b from %s: PyNaCl is not installed", HASHLIB)
        return HASHLIB, _hashlib
    sodium = nacl.hashlib.blake2b

    def _libsodium(data: bytes = b"") -> Hasher:
        return sodium(data, digest_size=DIGEST_SIZE)

    name = f"libsodium (PyNaCl {nacl.__version__})"
    log.debug("BLAKE2b from %s", name)
    return name, _libsodium


HASHLIB = "hashlib (CPython's BLAKE2)"


def blake2b(data: bytes = b"") -> Hasher:
    """A new BLAKE2b-512 hasher, of the fastest implementation here (`implementation()`)."""
    return _choose()[1](data)


def implementation() -> str:
    """The name of the BLAKE2b `blake2b()` uses, e.g. "libsodium (PyNaCl 1.5.0)"."""
    return _choose()[0]


def implementations() -> dict[str, Callable[[bytes], Hasher]]:
    """Every BLAKE2b-512 importable here, by name (the chosen one first): the benches
    print their speeds, the tests check that they agree."""
    name, factory = _choose()
    return {name: factory, HASHLIB: _hashlib}


@contextmanager
def blocks(
    fd: int, size: int | None = None, offset: int = 0, block: int = BLOCK
) -> Iterator[Iterator[bytes]]:
    """The bytes of the file open as `fd` from `offset`, `size` of them (None: to its
    end), in blocks of at most `block` bytes, each read in a thread while the caller
    handles the one before. Stops early at the end of the file: a caller that needs
    `size` bytes counts them. OSError from a read is raised where the block is taken.
    Leaving the `with` waits for the read under way, so `fd` may be closed after it.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
        yield _read_ahead(reader, fd, size, offset, block)


def _read_ahead(
    reader: ThreadPoolExecutor, fd: int, size: int | None, offset: int, block: int
) -> Iterator[bytes]:
    end = None if size is None else offset + size

    def submit(at: int) -> Future[bytes] | None:
        want = block if end is None else min(block, end - at)
        return reader.submit(os.pread, fd, want, at) if want > 0 else None

    pending = submit(offset)
    while pending is not None:
        data = pending.result()
        if not data:
            return
        offset += len(data)
        pending = submit(offset)
        yield data


def feed(hasher: Hasher, fd: int, size: int | None = None, offset: int = 0) -> int:
    """Hash the file open as `fd` into `hasher` (any hashlib-like object), from
    `offset`, `size` bytes (None: to its end), read ahead of the hashing; the
    number of bytes hashed."""
    count = 0
    with blocks(fd, size, offset) as chunks:
        for chunk in chunks:
            hasher.update(chunk)
            count += len(chunk)
    return count


def blake2b_fd(fd: int, size: int | None = None, offset: int = 0) -> tuple[bytes, int]:
    """(BLAKE2b-512, bytes hashed) of the file open as `fd`, as `feed` reads it."""
    hasher = blake2b()
    count = feed(hasher, fd, size, offset)
    return hasher.digest(), count

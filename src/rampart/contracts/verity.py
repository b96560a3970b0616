"""dm-verity hash trees in pure Python, in the format `veritysetup` writes and reads
(docs/formats.md, "dm-verity"; as cryptsetup 2.6.1 writes it).

Format 1, SHA-256, 4096-byte data and hash blocks: each hash is
SHA-256(salt ‖ block); a hash block holds 128 of them, zero-padded; level 0
hashes the data, each higher level hashes the level below, up to one block;
the root hash is SHA-256(salt ‖ top block). On disk a 512-byte superblock sits
at the hash offset, the tree starts at the next hash block, top level first.

`build` reads the data once and writes the tree after it (an appended tree, as
CLIP OS bundles Core) or into a separate file; `verify` reads the image once
(the tree, then the data) and reports the first bad block. Neither needs
device-mapper. Memory: the tree of 1 GiB of data is 8 MiB; reads are 4 MiB.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rampart.contracts import hashing
from rampart.errors import FormatError, LocalError, VerificationError

BLOCK = 4096
DIGEST = 32
PER_BLOCK = BLOCK // DIGEST  # 128 hashes per hash block
SUPERBLOCK = 512
READ = 1 << 20  # bytes read at once, the next one while this one is hashed
_SB = struct.Struct("<8sII16s32sIIQH6s256s168s")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class VerityParams:
    """What activating (or verifying) the tree needs; stored in the metadata file."""

    root_hash: str
    salt: str
    data_blocks: int
    hash_offset: int  # byte offset of the superblock in the hash file
    uuid: str
    hash_algorithm: str = "sha256"
    data_block_size: int = BLOCK
    hash_block_size: int = BLOCK
    format: int = 1

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @property
    def hash_start(self) -> int:
        """Byte offset of the first hash block (after the superblock)."""
        return -(-(self.hash_offset + SUPERBLOCK) // BLOCK) * BLOCK

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def level_sizes(data_blocks: int) -> list[int]:
    """Blocks per level, level 0 (hashes of data) first."""
    sizes = []
    blocks = data_blocks
    while True:
        blocks = -(-blocks // PER_BLOCK)
        sizes.append(blocks)
        if blocks == 1:
            return sizes


def tree_size(data_blocks: int) -> int:
    """Bytes of the hash area (levels only, without the superblock)."""
    return sum(level_sizes(data_blocks)) * BLOCK


def superblock(params: VerityParams) -> bytes:
    salt = bytes.fromhex(params.salt)
    return _SB.pack(
        b"verity\0\0",
        1,
        params.format,
        uuid_mod.UUID(params.uuid).bytes,
        params.hash_algorithm.encode().ljust(32, b"\0"),
        params.data_block_size,
        params.hash_block_size,
        params.data_blocks,
        len(salt),
        bytes(6),
        salt.ljust(256, b"\0"),
        bytes(168),
    )


def parse_superblock(data: bytes, source: str) -> dict[str, Any]:
    if len(data) < SUPERBLOCK:
        raise FormatError(f"{source}: no verity superblock (file too short)")
    (magic, version, hash_type, raw_uuid, algorithm, dbs, hbs, blocks, salt_size, _, salt, _) = (
        _SB.unpack(data[:SUPERBLOCK])
    )
    if magic != b"verity\0\0" or version != 1:
        raise FormatError(f"{source}: no verity superblock at the hash offset")
    if salt_size > 256:
        raise FormatError(f"{source}: verity superblock salt size {salt_size} > 256")
    return {
        "format": hash_type,
        "uuid": str(uuid_mod.UUID(bytes=raw_uuid)),
        "hash_algorithm": algorithm.rstrip(b"\0").decode("ascii", "replace"),
        "data_block_size": dbs,
        "hash_block_size": hbs,
        "data_blocks": blocks,
        "salt": salt[:salt_size].hex(),
    }


def _hash_blocks(salted: Any, data: memoryview, out: bytearray) -> None:
    """Append SHA-256(salt ‖ block) of each 4096-byte block of `data` to `out`."""
    copy = salted.copy
    for offset in range(0, len(data), BLOCK):
        h = copy()
        h.update(data[offset : offset + BLOCK])
        out += h.digest()


def _upper_levels(salted: Any, level0: bytearray, data_blocks: int) -> list[bytes]:
    """Every level as padded bytes, level 0 first."""
    levels = []
    current = level0
    for blocks in level_sizes(data_blocks):
        padded = bytes(current) + bytes(blocks * BLOCK - len(current))
        levels.append(padded)
        if blocks == 1:
            break
        upper = bytearray()
        _hash_blocks(salted, memoryview(padded), upper)
        current = upper
    return levels


def _root(salted: Any, top: bytes | memoryview) -> str:
    h = salted.copy()
    h.update(top)
    return str(h.hexdigest())


def build(
    data_path: Path,
    hash_path: Path | None = None,
    *,
    salt: bytes | None = None,
    uuid: str | None = None,
    progress: Progress | None = None,
) -> VerityParams:
    """Compute the tree of `data_path` and write superblock + tree.

    With `hash_path` None, the tree is appended to `data_path` itself (at its
    current end, which must be a multiple of 4096); otherwise it is written to
    `hash_path` at offset 0. `salt` and `uuid` default to random values.
    """
    salt = os.urandom(32) if salt is None else salt
    if len(salt) > 256:
        raise FormatError("verity salt longer than 256 bytes")
    size = data_path.stat().st_size
    if size == 0 or size % BLOCK:
        raise FormatError(
            f"{data_path}: data size {size} is not a positive multiple of {BLOCK} bytes"
        )
    data_blocks = size // BLOCK
    tree = TreeBuilder(salt, size)
    with (
        data_path.open("rb", buffering=0) as src,
        hashing.blocks(src.fileno(), size, 0, READ) as chunks,
    ):
        for chunk in chunks:
            tree.update(chunk)
            if progress:
                progress(tree.done, size)
    if tree.done < size:
        raise LocalError(f"{data_path}: file shrank while being read")
    root_hash, levels = tree.finish()
    params = VerityParams(
        root_hash=root_hash,
        salt=salt.hex(),
        data_blocks=data_blocks,
        hash_offset=size if hash_path is None else 0,
        uuid=uuid or str(uuid_mod.uuid4()),
    )
    target = data_path if hash_path is None else hash_path
    mode = "r+b" if hash_path is None else "wb"
    with target.open(mode) as out:
        out.seek(params.hash_offset)
        out.write(superblock(params))
        out.write(bytes(params.hash_start - params.hash_offset - SUPERBLOCK))
        for level in reversed(levels):
            out.write(level)
        out.flush()
        os.fsync(out.fileno())
    return params


class TreeBuilder:
    """The tree of `size` bytes of data that arrive in order, whole blocks but the
    last: level 0 as they come; the levels above and the root hash at the end."""

    def __init__(self, salt: bytes, size: int) -> None:
        if size <= 0 or size % BLOCK:
            raise FormatError(f"data size {size} is not a positive multiple of {BLOCK} bytes")
        self.salted = hashlib.sha256(salt)
        self.size = size
        self.level0 = bytearray()
        self.done = 0

    def update(self, chunk: bytes | memoryview) -> None:
        if self.done % BLOCK or self.done + len(chunk) > self.size:
            raise LocalError(f"tree of {self.size} bytes: data past its end or not in blocks")
        _hash_blocks(self.salted, memoryview(chunk), self.level0)
        self.done += len(chunk)

    def finish(self) -> tuple[str, list[bytes]]:
        """The root hash and every level as padded bytes, level 0 first."""
        if self.done != self.size:
            raise LocalError(f"tree of {self.size} bytes: data stopped at byte {self.done}")
        levels = _upper_levels(self.salted, self.level0, self.size // BLOCK)
        return _root(self.salted, levels[-1][:BLOCK]), levels


def verify(
    image: Path,
    params: VerityParams,
    hash_path: Path | None = None,
    progress: Progress | None = None,
) -> None:
    """Check `image` (data, and the tree after it or in `hash_path`) against the root hash.

    Raises VerificationError naming the first bad block.
    """
    source = hash_path or image
    sizes = level_sizes(params.data_blocks)
    try:
        with source.open("rb", buffering=0) as tree_file:
            tree_file.seek(params.hash_start)
            tree = tree_file.read(sum(sizes) * BLOCK)
    except OSError as exc:
        raise LocalError(f"{source}: cannot read the hash tree: {exc.strerror}") from None
    check = DataCheck(params, check_tree(tree, params, str(source))[0], str(image))
    size = params.data_size
    try:
        with (
            image.open("rb", buffering=0) as data,
            hashing.blocks(data.fileno(), size, 0, READ) as chunks,
        ):
            for chunk in chunks:
                check.update(chunk)
                if progress:
                    progress(check.done, size)
    except OSError as exc:
        raise LocalError(f"{image}: cannot read: {exc.strerror}") from None
    check.finish()


class DataCheck:
    """The data blocks of a verity image checked as they come, in order, against
    level 0 of its tree (which `check_tree` has tied to the root hash; or the level 0
    a TreeBuilder computes, to read back what was written while its root hash is not
    known yet), from block
    `start // BLOCK` on. Each chunk but the last is a whole number of blocks;
    VerificationError names the first bad block, or the byte where the data stopped."""

    def __init__(
        self,
        params: VerityParams,
        level0: bytes | bytearray | memoryview,
        source: str,
        start: int = 0,
    ) -> None:
        if start % BLOCK or not 0 <= start <= params.data_size:
            raise LocalError(f"{source}: data check from byte {start}: not a block boundary")
        self.salted = hashlib.sha256(bytes.fromhex(params.salt))
        self.level0 = level0
        self.size = params.data_size
        self.source = source
        self.done = start

    def update(self, chunk: bytes | memoryview) -> None:
        if self.accept(chunk) < len(chunk):
            block = self.done // BLOCK
            raise VerificationError(
                f"{self.source}: data block {block} (byte {block * BLOCK}) is corrupted"
            )

    def accept(self, chunk: bytes | memoryview) -> int:
        """Check `chunk`; how many of its first bytes are good blocks (all of them, or
        up to the first bad block, which `done` then points at)."""
        if self.done % BLOCK:
            raise VerificationError(f"{self.source}: data truncated at byte {self.done}")
        if self.done + len(chunk) > self.size:
            raise VerificationError(
                f"{self.source}: more data than the tree covers ({self.size} bytes)"
            )
        computed = bytearray()
        _hash_blocks(self.salted, memoryview(chunk), computed)
        first = self.done // BLOCK * DIGEST
        expected = self.level0[first : first + len(computed)]
        if memoryview(computed) != expected:
            good = _first_difference(computed, expected) // DIGEST * BLOCK
            self.done += good
            return good
        self.done += len(chunk)
        return len(chunk)

    def finish(self) -> None:
        """VerificationError unless every data block was checked."""
        if self.done < self.size:
            raise VerificationError(f"{self.source}: data truncated at byte {self.done}")


def check_tree(
    tree: bytes | memoryview, params: VerityParams, source: str
) -> list[bytes | memoryview]:
    """Check the hash area `tree` (the levels, top first, as read from `hash_start`)
    against the root hash: the top block, then each level against the one above.
    Returns the levels, level 0 first (views of `tree` if it is a memoryview: no
    copy). VerificationError naming the first bad block."""
    salted = hashlib.sha256(bytes.fromhex(params.salt))
    sizes = level_sizes(params.data_blocks)
    if len(tree) != sum(sizes) * BLOCK:
        raise VerificationError(f"{source}: hash tree truncated")
    # Levels on disk: top first. Split them, level 0 first.
    levels: list[bytes | memoryview] = []
    end = len(tree)
    for blocks in sizes:
        levels.append(tree[end - blocks * BLOCK : end])
        end -= blocks * BLOCK
    if _root(salted, levels[-1][:BLOCK]) != params.root_hash.lower():
        raise VerificationError(
            f"{source}: top hash block does not match the root hash (tree or root hash wrong)"
        )
    for level in range(len(levels) - 1, 0, -1):
        computed = bytearray()
        _hash_blocks(salted, memoryview(levels[level - 1]), computed)
        expected = levels[level][: len(computed)]
        if memoryview(computed) != expected:
            bad = _first_difference(computed, expected) // DIGEST
            raise VerificationError(
                f"{source}: hash block {bad} of level {level - 1} is corrupted "
                f"(byte {params.hash_start + _level_offset(sizes, level - 1) + bad * BLOCK})"
            )
    return levels


def _level_offset(sizes: list[int], level: int) -> int:
    """Byte offset of `level` within the hash area (levels are stored top first)."""
    return sum(sizes[level + 1 :]) * BLOCK


def _first_difference(a: bytes | bytearray, b: bytes | bytearray | memoryview) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))

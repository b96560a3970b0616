"""Making Core deltas (release/delta.py) from two images and their chunk indexes: each
delta, applied as a device applies it, makes the new image byte for byte, and sends
little more than what changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rampart.contracts import delta
from rampart.release import chunker
from rampart.release import delta as make_delta

ROOTS = (b"\x01" * 32, b"\x02" * 32)


def noise(seed: str, size: int) -> bytes:
    """`size` bytes that do not compress, the same for the same seed (SHAKE-256)."""
    return hashlib.shake_256(seed.encode()).digest(size)


def apply(made: delta.Delta, old: bytes) -> bytes:
    """What a device makes: each COPY from the old bytes, each PATCH decompressed
    with its history and ranges, after a round trip through the file format."""
    parsed = delta.parse(made.render(), "test.delta")
    out = bytearray()
    history = b""
    for op in parsed.ops:
        if op.frame is None:
            out += old[op.offset : op.offset + op.length]
            continue
        dictionary = (history[-op.history :] if op.history else b"") + b"".join(
            old[offset : offset + length] for offset, length in op.ranges
        )
        piece = delta.decompress(op, dictionary, "test.delta")
        history = (history + piece)[-delta.HISTORY_MAX :]
        out += piece
    return bytes(out)


def make(tmp_path: Path, old: bytes, new: bytes) -> delta.Delta:
    paths = []
    for name, data in (("old", old), ("new", new)):
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(path)
    old_index, _ = chunker.make_index(paths[0], None)
    new_index, _ = chunker.make_index(paths[1], None)
    return make_delta.make(
        paths[0], old_index, len(old), paths[1], new_index, len(new), ROOTS, level=3
    )


def patched(made: delta.Delta) -> int:
    return sum(len(op.frame) for op in made.ops if op.frame is not None)


def test_the_same_core_is_one_copy(tmp_path: Path) -> None:
    old = noise("1", 1 << 20) + bytes(256 << 10) + noise("2", 1 << 19)
    made = make(tmp_path, old, old)
    assert [(op.start, op.length, op.offset, op.frame) for op in made.ops] == [
        (0, len(old), 0, None)
    ]  # the zero chunks too: the copy follows on, not the first zero chunk seen
    assert apply(made, old) == old
    assert (made.base_root, made.target_root) == ROOTS


def test_an_inserted_changed_file_costs_its_change(tmp_path: Path) -> None:
    """A file changed in place (its old version between two unchanged stretches): the
    PATCH's dictionary is the old version, so the delta holds about the change."""
    head, body, tail = noise("3a", 1 << 20), noise("3b", 256 << 10), noise("3c", 1 << 20)
    changed = body[:100_000] + b"a security fix" * 100 + body[100_000:]
    old, new = head + body + tail, head + changed + tail
    made = make(tmp_path, old, new)
    assert apply(made, old) == new
    assert patched(made) < 8 << 10, patched(made)  # against 258 KiB of changed file
    assert sum(op.length for op in made.ops if op.frame is None) > 2 << 20


def test_new_files_alike_compress_together(tmp_path: Path) -> None:
    """Two new, alike files in two places: the second PATCH finds the first in its
    history (what the PATCHes before it made)."""
    parts = [noise(f"4{n}", make_delta.ABSORB + (1 << 20)) for n in range(3)]
    library = noise("4l", 200 << 10)
    old = b"".join(parts)
    new = parts[0] + library + parts[1] + library[:150_000] + b"v2" + library[150_000:] + parts[2]
    made = make(tmp_path, old, new)
    assert apply(made, old) == new
    frames = [op for op in made.ops if op.frame is not None]
    assert len(frames) == 2 and frames[1].history > 0
    assert frames[1].frame is not None and len(frames[1].frame) < 4 << 10
    assert patched(made) < len(library) + (8 << 10)


def test_a_long_run_of_new_bytes_is_cut_into_patches(tmp_path: Path) -> None:
    old = noise("5", 1 << 20)
    new = old[: 1 << 19] + bytes(delta.PATCH_MAX + (1 << 20)) + old[1 << 19 :]
    made = make(tmp_path, old, new)
    assert apply(made, old) == new
    assert all(op.length <= delta.PATCH_MAX for op in made.ops if op.frame is not None)


def test_a_short_copy_between_two_patches_joins_them(tmp_path: Path) -> None:
    """One frame for both changes: one dictionary, and the copied bytes inside it cost
    a few bytes."""
    old = noise("6", 4 << 20)
    new = old[: 1 << 20] + noise("6a", 4096) + old[1 << 20 : 3 << 19] + noise("6b", 4096)
    new += old[3 << 19 :]
    made = make(tmp_path, old, new)
    assert apply(made, old) == new
    frames = [op for op in made.ops if op.frame is not None]
    assert len(frames) == 1 and len(frames[0].ranges) >= 1, made.ops
    assert patched(made) < 3 * 4096

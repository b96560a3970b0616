"""Making a Core delta (contracts/delta.py) from two Cores and their chunk indexes.

The chunk indexes say which parts of the new Core the old one holds (a chunk with
the same id) and where. Each segment of the new Core's data gets as its dictionary
the old ranges of the chunks it shares with the old Core, and for each run of new
chunks, the old bytes between the shared chunks around it (where a changed file's
old version lies, when the change kept the files' order: squashfs writes them in
path order). zstd then finds the unchanged bytes in the dictionary (a few bytes per
128 KiB) and the changed ones near their old versions.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rampart.contracts import chunks, delta
from rampart.errors import LocalError

GAP_MAX = 4 << 20  # the old bytes between two shared chunks a run of new ones may use
# Minbase -> + curl and less (zstd 19, bench/incremental.py): 4.65 MB without history,
# 4.53 with 8 MiB; then joining PATCHes around COPYs under 1 MiB, 4.44 (67 frames ->
# 20), and zstd's parameters for a source of unknown size rather than the frame's
# (larger tables: the dictionary is most of what it indexes), 4.41 (28 s to make).
# The device's memory bounds history and dictionary to 4 and 8 MiB: 4.43 (10 s).
# 1 MiB more of old bytes on each side of each gap made it worse (5.17 against 4.53).
ABSORB = 1 << 20  # a COPY shorter than this between two PATCHes joins them
LEVEL = 19


@dataclass(frozen=True)
class _Part:
    """Bytes [start, end) of the new Core: shared (at `old` in the old Core), or new
    (`old` None, `gap` the old range between the shared chunks around them)."""

    start: int
    end: int
    old: int | None
    gap: tuple[int, int] | None


def _parts(
    old: chunks.ChunkIndex, new: chunks.ChunkIndex, old_size: int, new_size: int
) -> list[_Part]:
    where: dict[bytes, int] = {}
    at: dict[int, bytes] = {}  # the old chunk at each offset
    for start, _, chunk in old.spans():
        if start < old_size:
            where.setdefault(chunk, start)
            at[start] = chunk
    parts: list[_Part] = []
    spans = [s for s in new.spans() if s[0] < new_size]
    index = 0
    while index < len(spans):
        start, length, chunk = spans[index]
        if chunk in where and where[chunk] + length <= old_size:
            old_at = where[chunk]
            if parts and parts[-1].old is not None:  # a chunk seen twice: the next one
                follows = parts[-1].old + parts[-1].end - parts[-1].start
                old_at = follows if at.get(follows) == chunk else old_at
            parts.append(_Part(start, min(start + length, new_size), old_at, None))
            index += 1
            continue
        end = index
        while end < len(spans) and not (
            spans[end][2] in where and where[spans[end][2]] + spans[end][1] <= old_size
        ):
            end += 1
        run_end = min(spans[end - 1][0] + spans[end - 1][1], new_size)
        low = (
            parts[-1].old + (parts[-1].end - parts[-1].start)
            if parts and parts[-1].old is not None
            else 0
        )
        high = where[spans[end][2]] if end < len(spans) else old_size
        if not 0 < high - low <= GAP_MAX:  # shared chunks out of order: the old bytes after
            high = min(old_size, low + min(run_end - start, GAP_MAX))
        parts.append(_Part(start, run_end, None, (low, high) if high > low else None))
        index = end
    return parts


@dataclass(frozen=True)
class _Planned:
    """An operation before its frame is made: a COPY (`old` set) or a PATCH (`old`
    None, `ranges` its dictionary's old bytes)."""

    start: int
    length: int
    old: int | None
    ranges: tuple[tuple[int, int], ...] = ()


def _ops(parts: list[_Part]) -> list[_Planned]:
    """Shared parts that follow each other in the old Core too are one COPY; a new run
    is a PATCH (cut at PATCH_MAX), its dictionary the gap; then a COPY shorter than
    ABSORB between two PATCHes joins them (one frame, one dictionary load: fewer and
    larger frames compress better and are made faster)."""
    ops: list[_Planned] = []
    for part in parts:
        length = part.end - part.start
        if part.old is not None:
            last = ops[-1] if ops else None
            if last is not None and last.old is not None and last.old + last.length == part.old:
                ops[-1] = _Planned(last.start, last.length + length, last.old)
            else:
                ops.append(_Planned(part.start, length, part.old))
            continue
        gap = () if part.gap is None else (_clip(part.gap),)
        for start in range(part.start, part.end, delta.PATCH_MAX):
            ops.append(_Planned(start, min(delta.PATCH_MAX, part.end - start), None, gap))
    return _absorb(ops)


def _clip(gap: tuple[int, int]) -> tuple[int, int]:
    """A gap as (offset, length), at most DICT_MAX: its end kept (zstd reaches the
    bytes nearest the frame more cheaply)."""
    low, high = gap
    low = max(low, high - delta.DICT_MAX)
    return low, high - low


def _absorb(ops: list[_Planned]) -> list[_Planned]:
    joined: list[_Planned] = []
    for op in ops:
        if (
            op.old is None
            and len(joined) >= 2
            and joined[-2].old is None
            and joined[-1].old is not None
            and joined[-1].length < ABSORB
            and op.start + op.length - joined[-2].start <= delta.PATCH_MAX
        ):
            copy, patch = joined.pop(), joined.pop()
            ranges = tuple(sorted({*patch.ranges, (copy.old or 0, copy.length), *op.ranges}))
            if sum(n for _, n in ranges) <= delta.DICT_MAX and len(ranges) <= delta.RANGES_MAX:
                joined.append(
                    _Planned(patch.start, op.start + op.length - patch.start, None, ranges)
                )
                continue
            joined += [patch, copy]
        joined.append(op)
    return joined


def make(
    old_image: Path,
    old_index: chunks.ChunkIndex,
    old_size: int,
    new_image: Path,
    new_index: chunks.ChunkIndex,
    new_size: int,
    roots: tuple[bytes, bytes],
    level: int = LEVEL,
    workers: int = 0,
) -> delta.Delta:
    """The delta that makes the first `new_size` bytes of `new_image` (its data) from
    the first `old_size` of `old_image`; `roots` the two verity root hashes (base,
    target) it names."""
    plan = _ops(_parts(old_index, new_index, old_size, new_size))
    histories = []
    made = 0  # bytes the PATCHes before make
    for op in plan:
        histories.append(min(made, delta.HISTORY_MAX))
        made += op.length if op.old is None else 0
    patches = [(op.start, op.length) for op in plan if op.old is None]
    numbers = {start: n for n, (start, _) in enumerate(patches)}
    try:
        old_fd = os.open(old_image, os.O_RDONLY | os.O_CLOEXEC)
        new_fd = os.open(new_image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalError(f"{exc.filename}: cannot read: {exc.strerror}") from None

    def history(number: int, size: int) -> bytes:
        """The last `size` bytes the PATCHes before the `number`th made."""
        parts: list[bytes] = []
        for start, length in reversed(patches[:number]):
            if size <= 0:
                break
            take = min(size, length)
            parts.append(os.pread(new_fd, take, start + length - take))
            size -= take
        return b"".join(reversed(parts))

    def one(number: int) -> delta.Op:
        import zstandard

        op = plan[number]
        if op.old is not None:
            return delta.Op(op.start, op.length, op.old)
        dictionary = history(numbers[op.start], histories[number]) + b"".join(
            os.pread(old_fd, n, offset) for offset, n in op.ranges
        )
        body = os.pread(new_fd, op.length, op.start)
        window = max(20, (len(dictionary) + len(body)).bit_length())
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            window_log=min(window, 27),
            write_content_size=1,
            write_checksum=1,
        )
        raw = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        frame = zstandard.ZstdCompressor(dict_data=raw, compression_params=params).compress(body)
        return delta.Op(op.start, op.length, 0, op.ranges, frame, histories[number])

    try:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            ops = tuple(pool.map(one, range(len(plan))))
    finally:
        os.close(old_fd)
        os.close(new_fd)
    return delta.Delta(roots[0], roots[1], new_size, old_size, ops)

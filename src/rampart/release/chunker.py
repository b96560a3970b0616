"""Content-defined chunking of a Core, byte for byte as casync cuts it, and its chunk
store (docs/formats.md, "Chunk index and chunk store").

casync's chunker rolls a buzhash over 48-byte windows: at each position `q`,

    H(q) = XOR over i in [q-48, q) of rol32(T[x_i], q - 1 - i)

with T the table below, and a chunk ends at the first `q` at least `min` bytes after
its start where `H(q) mod d = d - 1` (`d` from the average size), or `max` bytes after
it. H depends only on the window, so the candidate positions can be found for the whole
image at once, then chosen in one pass. Written per byte in Python that would run at
about 10 MB/s; here it is vectorised with numpy: with U_i = ror32(T[x_i], i mod 32)
and P its prefix XOR, H(q) = rol32(P[q] xor P[q-48], (q-1) mod 32), which is a few
array operations per 4 MiB block, run in threads (numpy releases the GIL).

The chunks' ids (SHA-512/256) and their compression run in threads too. A chunk
already in the store is not written again; a new one is written under a temporary
name, fsynced and renamed, so the store holds only whole chunks.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rampart.contracts import chunks
from rampart.errors import LocalError

WINDOW = 48
BLOCK = 256 << 10  # bytes scanned for candidates at once (a multiple of 32)
Progress = Callable[[int, int], None]

# casync's buzhash table (src/cachunker.c): 256 32-bit constants.
_TABLE = np.array(
    [
        0x458BE752,
        0xC10748CC,
        0xFBBCDBB8,
        0x6DED5B68,
        0xB10A82B5,
        0x20D75648,
        0xDFC5665F,
        0xA8428801,
        0x7EBF5191,
        0x841135C7,
        0x65CC53B3,
        0x280A597C,
        0x16F60255,
        0xC78CBC3E,
        0x294415F5,
        0xB938D494,
        0xEC85C4E6,
        0xB7D33EDC,
        0xE549B544,
        0xFDEDA5AA,
        0x882BF287,
        0x3116737C,
        0x05569956,
        0xE8CC1F68,
        0x0806AC5E,
        0x22A14443,
        0x15297E10,
        0x50D090E7,
        0x4BA60F6F,
        0xEFD9F1A7,
        0x5C5C885C,
        0x82482F93,
        0x9BFD7C64,
        0x0B3E7276,
        0xF2688E77,
        0x8FAD8ABC,
        0xB0509568,
        0xF1ADA29F,
        0xA53EFDFE,
        0xCB2B1D00,
        0xF2A9E986,
        0x6463432B,
        0x95094051,
        0x5A223AD2,
        0x9BE8401B,
        0x61E579CB,
        0x1A556A14,
        0x5840FDC2,
        0x9261DDF6,
        0xCDE002BB,
        0x52432BB0,
        0xBF17373E,
        0x7B7C222F,
        0x2955ED16,
        0x9F10CA59,
        0xE840C4C9,
        0xCCABD806,
        0x14543F34,
        0x1462417A,
        0x0D4A1F9C,
        0x087ED925,
        0xD7F8F24C,
        0x7338C425,
        0xCF86C8F5,
        0xB19165CD,
        0x9891C393,
        0x325384AC,
        0x0308459D,
        0x86141D7E,
        0xC922116A,
        0xE2FFA6B6,
        0x53F52AED,
        0x2CD86197,
        0xF5B9F498,
        0xBF319C8F,
        0xE0411FAE,
        0x977EB18C,
        0xD8770976,
        0x9833466A,
        0xC674DF7F,
        0x8C297D45,
        0x8CA48D26,
        0xC49ED8E2,
        0x7344F874,
        0x556F79C7,
        0x6B25EAED,
        0xA03E2B42,
        0xF68F66A4,
        0x8E8B09A2,
        0xF2E0E62A,
        0x0D3A9806,
        0x9729E493,
        0x8C72B0FC,
        0x160B94F6,
        0x450E4D3D,
        0x7A320E85,
        0xBEF8F0E1,
        0x21D73653,
        0x4E3D977A,
        0x1E7B3929,
        0x1CC6C719,
        0xBE478D53,
        0x8D752809,
        0xE6D8C2C6,
        0x275F0892,
        0xC8ACC273,
        0x4CC21580,
        0xECC4A617,
        0xF5F7BE70,
        0xE795248A,
        0x375A2FE9,
        0x425570B6,
        0x8898DCF8,
        0xDC2D97C4,
        0x0106114B,
        0x364DC22F,
        0x1E0CAD1F,
        0xBE63803C,
        0x5F69FAC2,
        0x4D5AFA6F,
        0x1BC0DFB5,
        0xFB273589,
        0x0EA47F7B,
        0x3C1C2B50,
        0x21B2A932,
        0x6B1223FD,
        0x2FE706A8,
        0xF9BD6CE2,
        0xA268E64E,
        0xE987F486,
        0x3EACF563,
        0x1CA2018C,
        0x65E18228,
        0x2207360A,
        0x57CF1715,
        0x34C37D2B,
        0x1F8F3CDE,
        0x93B657CF,
        0x31A019FD,
        0xE69EB729,
        0x8BCA7B9B,
        0x4C9D5BED,
        0x277EBEAF,
        0xE0D8F8AE,
        0xD150821C,
        0x31381871,
        0xAFC3F1B0,
        0x927DB328,
        0xE95EFFAC,
        0x305A47BD,
        0x426BA35B,
        0x1233AF3F,
        0x686A5B83,
        0x50E072E5,
        0xD9D3BB2A,
        0x8BEFC475,
        0x487F0DE6,
        0xC88DFF89,
        0xBD664D5E,
        0x971B5D18,
        0x63B14847,
        0xD7D3C1CE,
        0x7F583CF3,
        0x72CBCB09,
        0xC0D0A81C,
        0x7FA3429B,
        0xE9158A1B,
        0x225EA19A,
        0xD8CA9EA3,
        0xC763B282,
        0xBB0C6341,
        0x020B8293,
        0xD4CD299D,
        0x58CFA7F8,
        0x91B4EE53,
        0x37E4D140,
        0x95EC764C,
        0x30F76B06,
        0x5EE68D24,
        0x679C8661,
        0xA41979C2,
        0xF2B61284,
        0x4FAC1475,
        0x0ADB49F9,
        0x19727A23,
        0x15A7E374,
        0xC43A18D5,
        0x3FB1AA73,
        0x342FC615,
        0x924C0793,
        0xBEE2D7F0,
        0x8A279DE9,
        0x4AA2D70C,
        0xE24DD37F,
        0xBE862C0B,
        0x177C22C2,
        0x5388E5EE,
        0xCD8A7510,
        0xF901B4FD,
        0xDBC13DBC,
        0x6C0BAE5B,
        0x64EFE8C7,
        0x48B02079,
        0x80331A49,
        0xCA3D8AE6,
        0xF3546190,
        0xFED7108B,
        0xC49B941B,
        0x32BAF4A9,
        0xEB833A4A,
        0x88A3F1A5,
        0x3A91CE0A,
        0x3CC27DA1,
        0x7112E684,
        0x4A3096B1,
        0x3794574C,
        0xA3C8B6F3,
        0x1D213941,
        0x6E0A2E00,
        0x233479F1,
        0x0F4CD82F,
        0x6093EDD2,
        0x5D7D209E,
        0x464FE319,
        0xD4DCAC9E,
        0x0DB845CB,
        0xFB5E4BC3,
        0xE0256CE1,
        0x09FB4ED1,
        0x0914BE1E,
        0xA5BDB2C3,
        0xC6EB57BB,
        0x30320350,
        0x3F397E91,
        0xA67791BC,
        0x86BC0E2C,
        0xEFA0A7E2,
        0xE9FF7543,
        0xE733612C,
        0xD185897B,
        0x329E5388,
        0x91DD236B,
        0x2ECB0D93,
        0xF4D82A3D,
        0x35B5C03F,
        0xE4E606F0,
        0x05B21843,
        0x37B45964,
        0x5EFF22F4,
        0x6027F4CC,
        0x77178B3C,
        0xAE507131,
        0x7BF7CABC,
        0xF9C18D66,
        0x593ADE65,
        0xD95DDF11,
    ],
    dtype=np.uint32,
)


def _rotated_table() -> np.ndarray:
    """ror32(T[x], r) at index r * 256 + x, for r in 0..31."""
    rows = [_TABLE]
    for r in range(1, 32):
        rows.append((_TABLE >> np.uint32(r)) | (_TABLE << np.uint32(32 - r)))
    return np.concatenate(rows)


_ROTATED = _rotated_table()
# Per position of a block (blocks start at multiples of 32): the table row of U_i, as
# an offset into _ROTATED, and the rotation of H. The scanned bytes start 48 before
# the block, which is 16 modulo 32.
_ROWS = ((np.arange(BLOCK + WINDOW, dtype=np.int64) + 16) % 32 * 256).astype(np.uint32)
_TURNS = ((np.arange(BLOCK, dtype=np.int64)) % 32).astype(np.uint32)  # (q - 1) mod 32


def discriminator(low: int, avg: int, high: int) -> int:
    """casync's `d` for these sizes (src/cachunker.h), clamped to [min, max]."""
    d = int(avg / (-1.42888852e-7 * avg + 1.33237515))
    return min(max(d, low), high)


class _Scratch(threading.local):
    """Each thread's work arrays, allocated once: a new array per operation costs a
    page fault per 4 KiB, about as much as the arithmetic."""

    def __init__(self) -> None:
        n = BLOCK + WINDOW
        self.index = np.empty(n, dtype=np.uint32)
        self.u = np.empty(n, dtype=np.uint32)
        self.prefix = np.empty(n + 1, dtype=np.uint32)
        self.h = np.empty(n, dtype=np.uint32)
        self.t = np.empty(n, dtype=np.uint32)
        self.wide = np.empty(n, dtype=np.uint64)
        self.hit = np.empty(n, dtype=np.bool_)


_scratch = _Scratch()
_BACK = (np.uint32(32) - _TURNS) & np.uint32(31)  # 32 - turn, 0 for a turn of 0


def _candidates(window: bytes, base: int, d: int) -> np.ndarray:
    """The positions q in (base, base + len(window) - 48] where H(q) mod d = d - 1;
    `window` holds the image from `base - 48` (zeros before the image's start)."""
    x = np.frombuffer(window, dtype=np.uint8)
    n = len(x)
    m = n - WINDOW  # the positions q = base + 1 ... base + m
    w = _scratch
    index, u, prefix = w.index[:n], w.u[:n], w.prefix[: n + 1]
    np.add(_ROWS[:n], x, out=index, dtype=np.uint32)
    np.take(_ROTATED, index, out=u)
    prefix[0] = 0
    np.bitwise_xor.accumulate(u, out=prefix[1:])
    h, t = w.h[:m], w.t[:m]
    np.bitwise_xor(prefix[WINDOW + 1 :], prefix[1 : m + 1], out=h)
    # rol32(h, turn): for a turn of 0, h << 0 | h >> 0 is h
    np.left_shift(h, _TURNS[:m], out=t)
    np.right_shift(h, _BACK[:m], out=h)
    np.bitwise_or(h, t, out=h)
    # h mod d == d - 1, as (h + 1) * ceil(2^64 / d) mod 2^64 < ceil(2^64 / d) (Lemire)
    c = np.uint64(0xFFFFFFFFFFFFFFFF // d + 1)
    wide, hit = w.wide[:m], w.hit[:m]
    np.add(h, np.uint64(1), out=wide)
    np.multiply(wide, c, out=wide)
    np.less(wide, c, out=hit)
    return np.flatnonzero(hit).astype(np.int64) + (base + 1)


def cut_points(fd: int, size: int, sizes: tuple[int, int, int], workers: int = 0) -> list[int]:
    """The end offset of each chunk of the first `size` bytes of `fd`, as casync cuts
    them with chunk sizes `sizes` (min, avg, max)."""
    low, avg, high = sizes
    chunks.check_sizes(sizes, "chunker")
    if low == avg == high:  # casync: fixed-size chunks, no hashing
        return [*range(avg, size, avg), size] if size else []
    d = discriminator(low, avg, high)

    def scan(base: int) -> np.ndarray:
        start = max(0, base - WINDOW)
        data = os.pread(fd, base + BLOCK - start, start)
        if base == 0:
            data = bytes(WINDOW) + data
        return _candidates(data, base, d)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        found = list(pool.map(scan, range(0, size, BLOCK)))
    candidates = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return _choose(candidates, size, max(low, WINDOW), high)


def _choose(candidates: np.ndarray, size: int, first: int, high: int) -> list[int]:
    """The cuts: from each chunk's start, the first candidate at least `first` bytes
    on and before `high`, else `high` bytes on; the rest of the image last."""
    ends: list[int] = []
    start = 0
    while start < size:
        if size - start < first:
            ends.append(size)
            break
        at = int(np.searchsorted(candidates, start + first))
        limit = start + high
        if at < len(candidates) and candidates[at] < limit and candidates[at] <= size:
            cut = int(candidates[at])
        else:
            cut = min(limit, size)
        ends.append(cut)
        start = cut
    return ends


@dataclass
class StoreStats:
    chunks: int = 0
    new: int = 0  # chunks written into the store
    new_bytes: int = 0  # their compressed size
    seconds_cutting: float = 0.0
    seconds_storing: float = 0.0
    directories: set[Path] = field(default_factory=set)  # store directories written into


def make_index(
    image: Path,
    store: Path | None,
    *,
    sizes: tuple[int, int, int] = chunks.SIZES,
    compression: str = "xz",
    level: int = 6,
    workers: int = 0,
) -> tuple[chunks.ChunkIndex, StoreStats]:
    """Cut `image` into chunks; put those `store` lacks into it (None: no store, the
    ids only). Returns the index and what was done."""
    stats = StoreStats()
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalError(f"{image}: cannot read: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        started = time.monotonic()
        ends = cut_points(fd, size, sizes, workers)
        stats.seconds_cutting = time.monotonic() - started
        started = time.monotonic()

        def one(group: list[tuple[int, int]]) -> list[tuple[bytes, int]]:
            first = group[0][0]
            data = os.pread(fd, group[-1][0] + group[-1][1] - first, first)
            view = memoryview(data)
            done = []
            for start, length in group:
                piece = view[start - first : start - first + length]
                chunk = chunks.chunk_id(piece)
                written = 0
                if store is not None:
                    written = _put(store, chunk, bytes(piece), compression, level)
                done.append((chunk, written))
            return done

        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            results = [r for group in pool.map(one, _groups(ends)) for r in group]
        stats.seconds_storing = time.monotonic() - started
    finally:
        os.close(fd)
    stats.chunks = len(results)
    stats.new = sum(1 for _, written in results if written)
    stats.new_bytes = sum(written for _, written in results)
    if store is not None:
        stats.directories = {
            store / chunks.store_path(c).partition("/")[0] for c, written in results if written
        }
    low, avg, high = sizes
    index = chunks.ChunkIndex(
        chunks.BLOB_FLAGS, low, avg, high, tuple(ends), tuple(c for c, _ in results)
    )
    return index, stats


def _groups(ends: list[int], size: int = 1 << 20) -> Iterator[list[tuple[int, int]]]:
    """The chunks as (start, length), in runs of about `size` bytes (one read each)."""
    group: list[tuple[int, int]] = []
    start = first = 0
    for end in ends:
        group.append((start, end - start))
        start = end
        if end - first >= size:
            yield group
            group, first = [], end
    if group:
        yield group


def _put(store: Path, chunk: bytes, data: bytes, compression: str, level: int) -> int:
    """Write a chunk into `store` unless it is there; the bytes written (0 if it was)."""
    path = store / chunks.store_path(chunk)
    if path.exists():
        return 0
    packed = chunks.compress(data, compression, level)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("xb") as out:
            out.write(packed)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o444)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise LocalError(f"{path}: cannot write the chunk: {exc.strerror}") from None
    return len(packed)

"""device/corewrite.py: Core written into a slot with or without direct I/O, read
back from the device and checked, a chunk at a time."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from rampart.contracts import cmdline, verity
from rampart.device import corewrite
from rampart.device.slots import Slot
from rampart.errors import LocalError, VerificationError

MiB = 1 << 20


def _refuse_direct_io(monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """A file system without direct I/O: O_DIRECT refused at open (most), or at the
    first write (some FUSE and network file systems)."""
    real_open, real_pwrite = os.open, os.pwrite
    direct: set[int] = set()

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT and when == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct.add(fd)
        return fd

    def fake_pwrite(fd: int, data: Any, offset: int) -> int:
        if fd in direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)


@pytest.mark.parametrize("direct_io", ["yes", "refused at open", "refused at write"])
@pytest.mark.parametrize("size", [3 * MiB, 3 * MiB + 4096 + 17])  # aligned, then a tail
def test_write_core_writes_every_byte_with_or_without_direct_io(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    direct_io: str,
    size: int,
) -> None:
    caplog.set_level(logging.DEBUG, logger=corewrite.__name__)
    image = tmp_path / "core"
    data = os.urandom(size)
    image.write_bytes(data)
    lv = tmp_path / "core_2.0.0"
    lv.write_bytes(b"\xff" * (size + 8192))  # an old Core: bytes after the image stay
    if direct_io != "yes":
        _refuse_direct_io(monkeypatch, direct_io.rsplit(" ", 1)[-1])
    steps: list[str] = []
    slot = Slot("core_2.0.0", size + 8192, lv)
    corewrite.write_core(image, slot, hashlib.blake2b(data).digest(), steps.append)
    written = lv.read_bytes()
    assert written[:size] == data and written[size:] == b"\xff" * 8192
    assert steps == ["write-core-chunk"] * -(-size // MiB)  # per MiB: crash tests stop there
    assert ("read back as written" in caplog.text) == (direct_io == "yes" and size % 4096 == 0)
    assert ("no direct I/O here" in caplog.text) == (direct_io == "refused at write")


def test_write_core_refuses_an_image_that_shrank_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "core"
    image.write_bytes(os.urandom(2 * MiB))
    lv = tmp_path / "core_2.0.0"
    lv.write_bytes(bytes(4 * MiB))
    real_stat = Path.stat

    def larger(path: Path, *args: Any, **kwargs: Any) -> Any:
        found = real_stat(path, *args, **kwargs)
        if path == image:
            return os.stat_result((found.st_mode, *found[1:6], 3 * MiB, *found[7:]))
        return found

    monkeypatch.setattr(Path, "stat", larger)
    with pytest.raises(LocalError, match="Core image shrank while being written"):
        corewrite.write_core(image, Slot("core_2.0.0", 4 * MiB, lv), b"", lambda _: None)


@pytest.fixture
def verity_core(tmp_path: Path) -> tuple[Path, cmdline.RootHash]:
    """A Core image as `rampart build core` lays it out: data, then the verity
    superblock and tree; and the root hash a UKI would pin."""
    image = tmp_path / "core"
    image.write_bytes(os.urandom(3 * MiB + 5 * 4096))
    params = verity.build(image)
    return image, cmdline.RootHash(params.root_hash, params.hash_offset, params.data_blocks)


def corrupt_writes_at(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """A bad write: the byte at `at` reaches the device flipped."""
    real_pwrite = os.pwrite

    def flipping(fd: int, data: Any, offset: int) -> int:
        view = memoryview(data)
        if offset <= at < offset + len(view):
            changed = bytearray(view)
            changed[at - offset] ^= 0xFF
            return real_pwrite(fd, changed, offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", flipping)


def test_a_verity_core_is_read_back_against_the_root_hash(
    tmp_path: Path, verity_core: tuple[Path, cmdline.RootHash]
) -> None:
    image, root = verity_core
    lv = tmp_path / "core_2.0.0"
    lv.write_bytes(bytes(8 * MiB))
    corewrite.write_core(image, Slot("core_2.0.0", 8 * MiB, lv), b"", lambda _: None, root)
    assert lv.read_bytes()[: image.stat().st_size] == image.read_bytes()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (MiB + 100, "data block 256 (byte 1048576) is corrupted"),  # the second chunk
        (-100, "the hash area read back differs from the verified Core image"),  # the tree
    ],
)
def test_a_bad_write_is_caught_by_the_read_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    verity_core: tuple[Path, cmdline.RootHash],
    where: int,
    message: str,
) -> None:
    image, root = verity_core
    lv = tmp_path / "core_2.0.0"
    lv.write_bytes(bytes(8 * MiB))
    corrupt_writes_at(monkeypatch, where % image.stat().st_size)
    with pytest.raises(VerificationError) as raised:
        corewrite.write_core(image, Slot("core_2.0.0", 8 * MiB, lv), b"", lambda _: None, root)
    assert str(raised.value).startswith(
        "Core in core_2.0.0 does not match the root hash of the new EFI binary"
    )
    assert message in str(raised.value)


def test_an_image_whose_tree_is_not_the_root_hash_is_refused_before_the_slot_is_touched(
    tmp_path: Path, verity_core: tuple[Path, cmdline.RootHash]
) -> None:
    image, root = verity_core
    other = cmdline.RootHash("00" * 32, root.hash_offset, root.data_blocks)
    lv = tmp_path / "core_2.0.0"
    lv.write_bytes(b"old Core")
    with pytest.raises(VerificationError, match="top hash block does not match the root hash"):
        corewrite.write_core(image, Slot("core_2.0.0", 8 * MiB, lv), b"", lambda _: None, other)
    assert lv.read_bytes() == b"old Core"

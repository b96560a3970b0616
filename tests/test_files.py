"""rampart.files: what the base layer does to local files."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from rampart import files


def test_punch_hole_frees_blocks_and_keeps_the_size(tmp_path: Path) -> None:
    path = tmp_path / "file"
    data = os.urandom(5 * 4096)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        assert files.punch_hole(fd, 4096, 2 * 4096)
        assert files.punch_hole(fd, 0, 0)  # nothing to free
    finally:
        os.close(fd)
    assert path.stat().st_size == len(data)
    assert path.stat().st_blocks * 512 <= 3 * 4096
    assert path.read_bytes() == data[:4096] + bytes(2 * 4096) + data[3 * 4096 :]


def test_punch_hole_says_false_where_the_file_system_cannot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Refusing:
        def __call__(self, *_: object) -> int:
            ctypes.set_errno(errno.EOPNOTSUPP)
            return -1

    monkeypatch.setattr(files, "_fallocate", lambda: Refusing())
    assert files.punch_hole(0, 0, 4096) is False


def test_punch_hole_raises_other_errors(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY)  # not open for writing: EBADF
    try:
        with pytest.raises(OSError) as raised:
            files.punch_hole(fd, 0, 4096)
    finally:
        os.close(fd)
    assert raised.value.errno == errno.EBADF

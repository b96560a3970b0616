"""contracts/tuf.py: what the repository's writers and the device share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from rampart.contracts import tuf


@pytest.mark.parametrize("size", [0, 1, (3 << 20) + 17])
def test_payload_hashes_are_python_tufs(tmp_path: Path, size: int) -> None:
    """One read, BLAKE2b-512 from libsodium: the same length and hashes as python-tuf
    computes with hashlib, which every other TUF client checks against."""
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(size))
    expected = TargetFile.from_file("dist/1.0.0/clipos-core", str(payload), list(tuf.HASHES))
    fd = os.open(payload, os.O_RDONLY)
    try:
        assert tuf.payload_hashes(fd) == (expected.length, expected.hashes)
    finally:
        os.close(fd)

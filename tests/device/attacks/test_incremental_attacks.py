"""Attacks on an incremental update (device/incremental.py): a chunk store or an index
that lies. Each test is named after the attack; each ends with the new version
installed from the whole stream (the fallback), every block of it verified, the
running version's LV untouched, and the reason logged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import zstandard

from rampart.contracts import chunks, wire
from rampart.device import update
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import OS, DeviceDirs, Release, make_device
from tests.device.test_incremental import (
    OFFERED,
    RUNNING,
    assert_installed,
    chunk_requests,
    data_streamed,
    releases,
    run_update,
    running_on,
    sign_index,
)


def index_of(webroot: Path, version: str) -> chunks.ChunkIndex:
    path = webroot / f"dist/{version}/{wire.index_name(OS)}"
    return chunks.parse_index(path.read_bytes(), path.name, 1 << 30)


def missing(webroot: Path) -> list[Path]:
    """The store files of the offered Core's chunks the running Core lacks."""
    have = set(index_of(webroot, RUNNING).ids)
    store = wire.store_dir(webroot)
    return [store / chunks.store_path(c) for c in index_of(webroot, OFFERED).ids if c not in have]


def falls_back(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, old: Release, new: Release,
    caplog: pytest.LogCaptureFixture, reason: str,
) -> DeviceDirs:  # fmt: skip
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    running = (device.vg / f"core_{RUNNING}").read_bytes()
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    assert (device.vg / f"core_{RUNNING}").read_bytes() == running
    assert data_streamed(served.access_log())
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(reason in m for m in messages), messages
    return device


def test_chunk_whose_content_does_not_match_its_id(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served)
    target = missing(served.root)[0]
    target.chmod(0o644)
    target.write_bytes(chunks.compress(b"not the chunk" * 1000, "zstd", 3))
    falls_back(tmp_path, vendor, pki, served, old, new, caplog, "incremental update failed")


def test_store_that_serves_another_valid_chunk_for_an_id(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served)
    target = missing(served.root)[0]
    other = next(p for p in wire.store_dir(served.root).glob("*/*.cacnk") if p != target)
    target.chmod(0o644)
    shutil.copyfile(other, target)  # a genuine chunk, of another id
    falls_back(tmp_path, vendor, pki, served, old, new, caplog, "incremental update failed (chunk")


def test_endless_chunk(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk file that decompresses to 256 MiB (a few KiB on the wire)."""
    old, new = releases(tmp_path, vendor, served)
    target = missing(served.root)[0]
    target.chmod(0o644)
    target.write_bytes(
        zstandard.ZstdCompressor(write_content_size=False).compress(bytes(256 << 20))
    )
    falls_back(tmp_path, vendor, pki, served, old, new, caplog, "cannot decompress")


def test_missing_chunk(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served)
    missing(served.root)[0].unlink()
    falls_back(tmp_path, vendor, pki, served, old, new, caplog, "HTTP 404")


def test_index_from_another_release(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """The running release's index (validly signed, for its own version) served as the
    offered one's: refused before anything is fetched from the store."""
    old, new = releases(tmp_path, vendor, served)
    name = wire.index_name(OS)
    for suffix in ("", ".sig"):
        shutil.copyfile(
            served.root / f"dist/{RUNNING}/{name}{suffix}",
            served.root / f"dist/{OFFERED}/{name}{suffix}",
        )
    falls_back(tmp_path, vendor, pki, served, old, new, caplog, "signed for version")
    assert chunk_requests(served.access_log()) == []


@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_index_longer_or_shorter_than_the_core(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:  # fmt: skip
    """An index the vendor's key signed for the offered version, whose chunks do not
    make up its Core: refused."""
    old, new = releases(tmp_path, vendor, served)
    index = index_of(served.root, OFFERED)
    if change == "longer":
        ends, ids = (*index.ends, index.ends[-1] + 4096), (*index.ids, index.ids[0])
    else:
        ends, ids = index.ends[:-1], index.ids[:-1]
    bad = chunks.ChunkIndex(index.flags, *index.sizes, ends, ids)
    sign_index(served.root, vendor, OFFERED, bad.render())
    reason = "past" if change == "longer" else "chunks make"
    falls_back(tmp_path, vendor, pki, served, old, new, caplog, reason)


def test_seed_that_changed_under_the_device(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """The running Core's LV no longer holds what its index says (a bad disk): the
    block fails the tree, and the whole stream resumes after the verified blocks."""
    old, new = releases(tmp_path, vendor, served)
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    lv = device.vg / f"core_{RUNNING}"
    data = bytearray(lv.read_bytes())
    data[(1 << 20) + 5] ^= 0xFF
    lv.write_bytes(data)
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    assert (device.vg / f"core_{RUNNING}").read_bytes() == data  # read, never written
    messages = [r.getMessage() for r in caplog.records]
    assert any("incremental update failed" in m and "corrupted" in m for m in messages), messages
    assert any("resuming at byte" in m for m in messages)

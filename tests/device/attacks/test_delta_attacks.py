"""Attacks on a delta update (device/incremental.py, contracts/delta.py): a delta that
lies. Each test is named after the attack; each ends with the new version installed
from chunks (the delta refused before the disk is touched, or what it made refused
before its tree is written: the chunks resume after the blocks that match the real
tree), every block verified, the running version's LV untouched, and the reason
logged."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import zstandard

from rampart.contracts import delta, hashing, wire
from rampart.device import incremental, stream, update
from rampart.device.transport import Receiver
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import OS, DeviceDirs, Release, make_device
from tests.device.test_incremental import (
    DELTA,
    OFFERED,
    RUNNING,
    assert_installed,
    chunk_requests,
    data_streamed,
    releases,
    run_update,
    running_on,
    tuf_releases,
)


def published(webroot: Path) -> delta.Delta:
    path = webroot / DELTA.lstrip("/")
    return delta.parse(path.read_bytes(), path.name)


def serve(webroot: Path, vendor: KeyPair, data: bytes, version: str = OFFERED) -> None:
    """`data` as the offered release's delta, signed by the vendor for `version`."""
    path = webroot / DELTA.lstrip("/")
    path.write_bytes(data)
    signature = vendor.key.sign_message(hashing.blake2b(data).digest(), version.encode(), True)
    path.with_name(path.name + ".sig").write_bytes(signature.to_bytes())


def with_op(made: delta.Delta, number: int, **changes: object) -> bytes:
    """The delta with its `number`th PATCH changed."""
    ops = list(made.ops)
    index = [i for i, op in enumerate(ops) if op.frame is not None][number]
    ops[index] = dataclasses.replace(ops[index], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(made, ops=tuple(ops)).render()


def update_anyway(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, old: Release, new: Release,
    caplog: pytest.LogCaptureFixture, reason: str,
) -> DeviceDirs:  # fmt: skip
    """The update still installs the offered release, from chunks: the delta was
    refused before anything was written, or what it made was (its root hash is not
    the UKI's: its tree is not written); `reason` is logged as a warning."""
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    running = (device.vg / f"core_{RUNNING}").read_bytes()
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    assert (device.vg / f"core_{RUNNING}").read_bytes() == running
    log = served.access_log()
    assert not data_streamed(log)
    assert chunk_requests(log)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(reason in m for m in messages), messages
    return device


def test_delta_tampered_on_the_server(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served, deltas=True)
    path = served.root / DELTA.lstrip("/")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    update_anyway(tmp_path, vendor, pki, served, old, new, caplog, "delta refused")


def test_delta_signed_for_another_release(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served, deltas=True)
    serve(served.root, vendor, published(served.root).render(), version=RUNNING)
    update_anyway(
        tmp_path, vendor, pki, served, old, new, caplog, f"signed for version '{RUNNING}'"
    )


def test_delta_from_another_base(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """A genuine delta of the offered release, from a Core the device does not run."""
    old, new = releases(tmp_path, vendor, served, deltas=True)
    made = dataclasses.replace(published(served.root), base_root=b"\x07" * 32)
    serve(served.root, vendor, made.render())
    update_anyway(tmp_path, vendor, pki, served, old, new, caplog, "its base is another")


def test_delta_to_another_core(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served, deltas=True)
    made = dataclasses.replace(published(served.root), target_root=b"\x07" * 32)
    serve(served.root, vendor, made.render())
    update_anyway(tmp_path, vendor, pki, served, old, new, caplog, "another Core than")


def test_delta_whose_copy_reads_past_the_running_core(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served, deltas=True)
    made = dataclasses.replace(published(served.root), base_size=64 << 20)
    serve(served.root, vendor, made.render())
    update_anyway(tmp_path, vendor, pki, served, old, new, caplog, "its sizes are not")


def test_signed_delta_that_makes_other_bytes(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed delta (a publisher's bug, or its key in other hands) whose PATCH makes
    bytes of the right length but not the Core's: the tree they make has another root
    hash, found before anything is written."""
    old, new = releases(tmp_path, vendor, served, deltas=True)
    made = published(served.root)
    op = next(op for op in made.ops if op.frame is not None)
    other = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x5a" * op.length)
    serve(served.root, vendor, with_op(made, 0, frame=other, ranges=(), history=0))
    update_anyway(tmp_path, vendor, pki, served, old, new, caplog, "another root hash")


def test_endless_delta_frame(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """A PATCH whose frame makes 256 MiB (a few KiB on the wire)."""
    old, new = releases(tmp_path, vendor, served, deltas=True)
    endless = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(256 << 20))
    serve(served.root, vendor, with_op(published(served.root), 0, frame=endless))
    update_anyway(tmp_path, vendor, pki, served, old, new, caplog, "cannot decompress")


def test_delta_asking_for_history_never_made(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = releases(tmp_path, vendor, served, deltas=True)
    serve(served.root, vendor, with_op(published(served.root), 0, history=4096))
    update_anyway(tmp_path, vendor, pki, served, old, new, caplog, "more history")


def test_running_core_that_changes_under_the_delta(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delta was checked against the running Core's root hash, then the running
    Core's LV changed (a bad disk, a writer) before the delta read it: the Core it
    makes has another root hash, found once it is written and before its tree is. The
    chunks read the same LV: their block fails the tree before it is written, and the
    whole stream resumes after the blocks that match the real tree."""
    old, new = releases(tmp_path, vendor, served, deltas=True)
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    lv = device.vg / f"core_{RUNNING}"
    made = incremental.from_delta
    passes = []

    def from_delta(plan: incremental.DeltaPlan, size: int) -> stream.Feed:
        feed = made(plan, size)

        def run(sink: Receiver, resume: int) -> None:
            passes.append(resume)
            data = bytearray(lv.read_bytes())
            data[(1 << 20) + 5] ^= 0xFF
            lv.write_bytes(bytes(data))
            feed(sink, resume)

        return run

    monkeypatch.setattr(incremental, "from_delta", from_delta)
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    assert passes == [0]
    messages = [r.getMessage() for r in caplog.records]
    assert any("delta update failed" in m and "another root hash" in m for m in messages)
    assert any("incremental update failed" in m and "corrupted" in m for m in messages)
    assert any("resuming at byte 1048576" in m for m in messages), messages
    assert data_streamed(served.access_log())


def test_delta_other_than_its_tuf_target(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """TUF mode: the server serves another delta for the offered release, one the
    vendor's minisign key signed for this very version (a stolen minisign key, or an
    older build): it is not the target the release keys signed, and is refused before
    the disk is touched; Core is rebuilt from chunks."""
    device, new = tuf_releases(tmp_path, vendor, pki, served, deltas=True)
    made = published(served.root)
    serve(served.root, vendor, with_op(made, 0, frame=made.ops[-1].frame or b"", ranges=()))
    running = (device.vg / f"core_{RUNNING}").read_bytes()
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    assert (device.vg / f"core_{RUNNING}").read_bytes() == running
    log = served.access_log()
    assert chunk_requests(log) and not data_streamed(log)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("delta refused" in m and "not the file the release keys" in m for m in messages)


def test_chunk_index_other_than_its_tuf_target(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """TUF mode: the server serves the offered release's chunk index with one chunk id
    changed (its length the signed one): refused, and Core is streamed whole."""
    device, new = tuf_releases(tmp_path, vendor, pki, served, deltas=False)
    index = served.root / f"dist/{OFFERED}/{wire.index_name(OS)}"
    data = bytearray(index.read_bytes())
    data[-40] ^= 0x01  # one byte near its end: its length stays the signed one
    index.write_bytes(bytes(data))
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    log = served.access_log()
    assert chunk_requests(log) == [] and data_streamed(log)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("not the file the release keys" in m for m in messages), messages

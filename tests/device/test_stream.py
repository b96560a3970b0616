"""Streaming Core into its slot (device/stream.py), against a real nginx and, for the
faults, a server that cuts the stream: Core never lands in the download directory,
in the fetch process's sandbox too, and an interrupted stream resumes from the last
block that verified in the slot."""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from rampart.device import update
from rampart.errors import TransportError, VerificationError
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import (
    OS,
    DeviceDirs,
    Release,
    larger_slots,
    make_device,
    make_release,
    publish,
)
from tests.device.hostile import body, hostile_server, ranged, send_range
from tests.device.test_corewrite import corrupt_writes_at

OFFERED = "5.0.0-alpha.3"
CORE_PATH = f"/dist/{OFFERED}/{OS}-core"
MIB = 1 << 20
CORE_SIZE = 3 * MIB + 12345


def assert_installed(device: DeviceDirs, release: Release) -> None:
    image = release.core.read_bytes()
    assert (device.vg / f"core_{OFFERED}").read_bytes()[: len(image)] == image
    assert (device.esp / f"{OS}-{OFFERED}.efi").read_bytes() == release.efiboot.read_bytes()
    assert (device.run_dir / "update-ready").read_text() == OFFERED + "\n"


@pytest.mark.parametrize("user", ["", "rampart-fetch"])
def test_streamed_core_never_lands_in_the_download_directory(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, user: str
) -> None:
    release = make_release(tmp_path / "rel", OFFERED, core_size=CORE_SIZE)
    publish(served.root, vendor, release)
    device = larger_slots(
        make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url, fetch_user=user)
    )
    seen: list[list[str]] = []

    def look(step: str) -> None:
        if step.startswith("write-core"):
            directories = (device.download, device.download.with_name("download.verified"))
            seen.append([p.name for d in directories if d.exists() for p in d.iterdir()])

    dev = device.open()
    result = update.update(dev, update.make_fetcher(dev), look)
    assert result.outcome == update.Outcome.UPDATED
    assert_installed(device, release)
    assert len(seen) >= 5  # write-core, then one per 1 MiB of data
    assert all(f"{OS}-{OFFERED}-core" not in names for names in seen), seen
    core_requests = [line for line in served.access_log().splitlines() if CORE_PATH + " " in line]
    assert len(core_requests) == 3 and all('" 206 ' in line for line in core_requests)


@pytest.mark.parametrize("at", [MIB + 100, -100], ids=["data", "tree"])
def test_a_write_the_disk_does_not_keep_is_caught_by_the_read_back(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    monkeypatch: pytest.MonkeyPatch,
    at: int,
) -> None:
    """A disk that keeps one byte of a streamed Core flipped (in the data, whose
    buffers were checked against the tree before they were written, or in the tree):
    the read-back finds it, no boot entry is installed, the update fails (exit 11)."""
    release = make_release(tmp_path / "rel", OFFERED, core_size=CORE_SIZE)
    publish(served.root, vendor, release)
    device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url))
    corrupt_writes_at(monkeypatch, at % release.core.stat().st_size)
    dev = device.open()
    with pytest.raises(VerificationError) as raised:
        update.update(dev, update.make_fetcher(dev))
    assert "read back" in str(raised.value)
    assert not (device.esp / f"{OS}-{OFFERED}.efi").exists()
    assert not (device.run_dir / "update-ready").exists()


def test_interrupted_stream_resumes_from_the_last_verified_block(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    webroot_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = make_release(tmp_path / "rel", OFFERED, core_size=CORE_SIZE)
    publish(webroot_dir, vendor, release)
    image = release.core.read_bytes()
    asked: list[int] = []

    def cut(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
        asked.append(first)
        if last - first < 8 * 4096 or last == len(data) - 1:
            send_range(handler, first, last, data)  # the tree and the first block
            return
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        handler.send_header("Content-Length", str(last + 1 - first))
        handler.end_headers()
        handler.wfile.write(data[first : first + 2 * MIB + 777])  # then the line drops

    def record(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
        asked.append(first)
        send_range(handler, first, last, data)

    behaviours = {CORE_PATH: ranged(image, cut)}
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, behaviours) as url:
        device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, url))
        dev = device.open()
        with pytest.raises(TransportError, match="connection closed after"):
            update.update(dev, update.make_fetcher(dev))
        assert device.entries() == [f"{OS}-5.0.0-alpha.1.efi"]  # nothing boots the slot
        asked.clear()
        behaviours[CORE_PATH] = ranged(image, record)
        caplog.set_level(logging.INFO, "rampart.device.stream")
        dev = device.open()
        assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED
    assert_installed(device, release)
    resumed = [r.getMessage() for r in caplog.records if "resuming at byte" in r.getMessage()]
    assert resumed == [f"core_{OFFERED}: resuming at byte {2 * MIB} (verified in the slot)"]
    assert 2 * MIB in asked  # the data stream asked from there, not from 0
    assert asked.count(0) == 1  # only the first block


def test_server_without_range_requests_gets_a_whole_download(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path
) -> None:
    """A server that ignores Range (200 with the whole file): Core is downloaded whole,
    verified and installed as before streaming existed."""
    release = make_release(tmp_path / "rel", OFFERED, core_size=CORE_SIZE)
    publish(webroot_dir, vendor, release)
    behaviours = {CORE_PATH: body(release.core.read_bytes())}
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, behaviours) as url:
        device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, url))
        dev = device.open()
        assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED
    assert_installed(device, release)

"""Attacks on a streamed Core (device/stream.py): a server that answers range
requests, and lies in them. Each test is named after the attack and asserts the
error, that no boot entry names an unverified slot, that the running version is
untouched, and that a slot that was written holds only blocks that verified."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from rampart.device import update
from rampart.errors import RemoteDataError, VerificationError
from rampart.testbed.services import Pki
from tests.conftest import KeyPair
from tests.device.conftest import (
    OS,
    DeviceDirs,
    Release,
    larger_slots,
    make_device,
    make_release,
    publish,
    publish_unchecked,
)
from tests.device.hostile import Behaviour, hostile_server, ranged, send_range

OFFERED = "5.0.0-alpha.3"
RUNNING = "5.0.0-alpha.1"
CORE_PATH = f"/dist/{OFFERED}/{OS}-core"
MIB = 1 << 20
CORE_SIZE = 3 * MIB + 12345  # four 1 MiB chunks of data


@pytest.fixture
def release(tmp_path: Path, vendor: KeyPair, webroot_dir: Path) -> Release:
    rel = make_release(tmp_path / "rel", OFFERED, core_size=CORE_SIZE)
    publish(webroot_dir, vendor, rel)
    return rel


def new_device(tmp_path: Path, vendor: KeyPair, pki: Pki, url: str) -> DeviceDirs:
    return larger_slots(make_device(tmp_path / "device", vendor, pki.ca.cert, url))


def refused(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    webroot_dir: Path,
    behaviours: dict[str, Behaviour],
    exception: type[Exception],
    match: str,
) -> DeviceDirs:
    """One update against the hostile server: it fails with `exception`, the running
    version's LV and entry are untouched and no other entry exists."""
    with hostile_server(webroot_dir, pki.server.cert, pki.server.key, behaviours) as url:
        device = new_device(tmp_path, vendor, pki, url)
        running = (device.vg / f"core_{RUNNING}").read_bytes()
        dev = device.open()
        with pytest.raises(exception, match=match):
            update.update(dev, update.make_fetcher(dev))
    assert device.entries() == [f"{OS}-{RUNNING}.efi"]
    assert (device.vg / f"core_{RUNNING}").read_bytes() == running
    assert not (device.run_dir / "update-ready").exists()
    return device


def only_verified(device: DeviceDirs, image: bytes, most: int) -> None:
    """The new slot holds a first part of the image (whole blocks, at most `most`
    bytes: what verified before the attack was seen) and nothing after it."""
    data = (device.vg / f"core_{OFFERED}").read_bytes()[: len(image)]
    good = 0
    while good < len(image) and data[good : good + 4096] == image[good : good + 4096]:
        good += 4096
    assert good <= most
    assert data[good:] == bytes(len(data) - good)


def data_range(first: int, last: int, data: bytes) -> bool:
    """Whether a request is the data stream (not the tree's or the first block's)."""
    return last - first + 1 > 4096 and last < len(data) - 8 * 4096


def test_stream_that_diverges_after_the_first_verified_blocks(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, release: Release
) -> None:
    image = release.core.read_bytes()
    tampered = bytearray(image)
    tampered[2 * MIB + 5] ^= 0xFF  # in data block 512, after two good chunks

    def send(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
        honest = not data_range(first, last, data)
        send_range(handler, first, last, data if honest else bytes(tampered))

    device = refused(
        tmp_path, vendor, pki, webroot_dir, {CORE_PATH: ranged(image, send)},
        VerificationError, "data block 512 .*corrupted.*nothing of that block written",
    )  # fmt: skip
    only_verified(device, image, 2 * MIB)


def test_hash_tree_that_does_not_match_the_root_hash(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, release: Release
) -> None:
    """Core of another build (its own valid tree, signed by the vendor's key) under the
    UKI: refused from the tree alone, before the disk is touched."""
    other = make_release(tmp_path / "other", OFFERED, core_size=CORE_SIZE, content="other")
    publish_unchecked(webroot_dir, vendor, OFFERED, other.core, release.efiboot)
    requests: list[tuple[int, int]] = []

    def send(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
        requests.append((first, last))
        send_range(handler, first, last, data)

    device = refused(
        tmp_path, vendor, pki, webroot_dir,
        {CORE_PATH: ranged(other.core.read_bytes(), send)},
        VerificationError, "not built together",
    )  # fmt: skip
    assert device.lvs() == [f"core_{RUNNING}", "core_state"]
    size = other.core.stat().st_size
    assert len(requests) == 2  # the tree and the first block: no data streamed
    assert all(last - first < 8 * 4096 or last == size - 1 for first, last in requests)


def test_stream_resumed_elsewhere_than_asked(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, release: Release
) -> None:
    image = release.core.read_bytes()

    def send(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
        if data_range(first, last, data):
            first += 4096  # a Content-Range that does not start where asked
        send_range(handler, first, last, data)

    device = refused(
        tmp_path, vendor, pki, webroot_dir, {CORE_PATH: ranged(image, send)},
        RemoteDataError, "server sent bytes 4096-",
    )  # fmt: skip
    only_verified(device, image, 0)


def test_endless_stream(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, release: Release
) -> None:
    """A 206 with the right Content-Range and no Content-Length, whose body goes on."""
    image = release.core.read_bytes()

    def send(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
        if not data_range(first, last, data):
            send_range(handler, first, last, data)
            return
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            handler.wfile.write(data[first : last + 1])
            for _ in range(64):
                handler.wfile.write(bytes(1 << 16))
        except OSError:
            return

    device = refused(
        tmp_path, vendor, pki, webroot_dir, {CORE_PATH: ranged(image, send)},
        RemoteDataError, "exceeds the cap",
    )  # fmt: skip
    only_verified(device, image, len(image))  # what verified before the overflow


def test_file_that_changes_size_between_requests(
    tmp_path: Path, vendor: KeyPair, pki: Pki, webroot_dir: Path, release: Release
) -> None:
    image = release.core.read_bytes()

    def send(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
        longer = data + bytes(4096) if data_range(first, last, data) else data
        send_range(handler, first, last, longer)

    device = refused(
        tmp_path, vendor, pki, webroot_dir, {CORE_PATH: ranged(image, send)},
        RemoteDataError, "announced 3203072 bytes, the cap is 3198976",
    )  # fmt: skip
    only_verified(device, image, 0)

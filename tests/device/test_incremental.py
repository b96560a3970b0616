"""Incremental updates (device/incremental.py), against a real nginx: Core rebuilt
from the chunks the running Core holds and the few fetched from the store, each
block still verified before it is written; and the fallback to the whole stream."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from rampart import run
from rampart.contracts import chunks, hashing, pe, wire
from rampart.contracts.version import parse_version
from rampart.device import update
from rampart.release import chunker
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
    publish_unchecked,
)
from tests.device.test_crash import run_and_kill
from tests.device.test_trust import tuf_device
from tests.releases import build_uki
from tests.tufkit import TufRepo

RUNNING = "5.0.0-alpha.1"
OFFERED = "5.0.0-alpha.3"
CORE_SIZE = 3 << 20
STORE = f"/dist/{wire.STORE}/"
CORE_PATH = f"/dist/{OFFERED}/{OS}-core "


def releases(
    tmp_path: Path, vendor: KeyPair, served: Nginx, deltas: bool = False
) -> tuple[Release, Release]:
    """The running release and the offered one, sharing their payload (the offered
    Core differs in its os-release and its squashfs metadata), both published with
    their chunk index, and the offered one with a delta from the running one if
    `deltas`."""
    old = make_release(tmp_path / "old", RUNNING, core_size=CORE_SIZE, common=True)
    new = make_release(tmp_path / "new", OFFERED, core_size=CORE_SIZE, common=True)
    publish(served.root, vendor, old)
    publish(served.root, vendor, new, deltas=deltas)
    return old, new


def running_on(device: DeviceDirs, old: Release) -> DeviceDirs:
    """The device runs `old`: its LV holds old's Core, its boot entry old's UKI, its
    slots are large enough."""
    larger_slots(device)
    lv = device.vg / f"core_{RUNNING}"
    lv.write_bytes(old.core.read_bytes().ljust(4 << 20, b"\0"))
    shutil.copyfile(old.efiboot, device.esp / f"{OS}-{RUNNING}.efi")
    return device


def run_update(device: DeviceDirs) -> update.UpdateResult:
    dev = device.open()
    return update.update(dev, update.make_fetcher(dev))


def assert_installed(device: DeviceDirs, new: Release) -> None:
    image = new.core.read_bytes()
    assert (device.vg / f"core_{OFFERED}").read_bytes()[: len(image)] == image
    assert (device.esp / f"{OS}-{OFFERED}.efi").read_bytes() == new.efiboot.read_bytes()


def chunk_requests(log: str) -> list[str]:
    return re.findall(rf'"GET {re.escape(STORE)}(\S+) HTTP/1.1" 20[06]', log)


def data_streamed(log: str) -> bool:
    """Whether Core's data was streamed whole (a range request of more than a block)."""
    sizes = [
        int(m) for m in re.findall(rf'"GET {re.escape(CORE_PATH.strip())} HTTP/1.1" 206 (\d+)', log)
    ]
    return any(size > 64 << 10 for size in sizes[2:])  # after the tree and the first block


@pytest.mark.parametrize("user", ["", "rampart-fetch"])
def test_incremental_update_fetches_only_the_chunks_it_lacks(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, user: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    old, new = releases(tmp_path, vendor, served)
    device = running_on(
        make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url, fetch_user=user), old
    )
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    log = served.access_log()
    index = chunks.parse_index(
        (served.root / f"dist/{OFFERED}/{wire.index_name(OS)}").read_bytes(), "i", 1 << 30
    )
    fetched = chunk_requests(log)
    assert 0 < len(fetched) < len(index.ends) // 2, (len(fetched), len(index.ends))
    assert not data_streamed(log)
    assert any("from chunks" in r.getMessage() for r in caplog.records)


DELTA = f"/dist/{OFFERED}/{wire.delta_name(OS, parse_version(RUNNING))}"


def test_delta_update_makes_core_from_the_running_one(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, caplog: pytest.LogCaptureFixture
) -> None:
    """With a delta from the running release published, Core is made from the running
    Core and the delta alone: no chunk, no stream, every block still verified."""
    old, new = releases(tmp_path, vendor, served, deltas=True)
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    log = served.access_log()
    assert f'"GET {DELTA} HTTP/1.1" 200' in log
    assert chunk_requests(log) == [] and not data_streamed(log)
    # Of Core, only its verity superblock: the tree is computed from what the delta makes.
    ranges = re.findall(rf'"GET {re.escape(CORE_PATH.strip())} HTTP/1.1" 206 (\d+)', log)
    assert ranges == ["4096"], ranges
    messages = [r.getMessage() for r in caplog.records]
    assert any("made by a delta" in m for m in messages), messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("nth", [1, 2])
def test_delta_update_killed_while_writing_then_rerun_completes(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    caplog: pytest.LogCaptureFixture,
    nth: int,
) -> None:
    """SIGKILL after the delta wrote its `nth` MiB into the slot (its tree not computed
    yet, not written): no entry boots that slot, the running Core is untouched, and
    the next run makes Core by the delta again, from its first byte."""
    old, new = releases(tmp_path, vendor, served, deltas=True)
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    running = (device.vg / f"core_{RUNNING}").read_bytes()
    status = run_and_kill(device, "write-core-chunk", nth)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert device.entries() == [f"{OS}-{RUNNING}.efi"]
    assert (device.vg / f"core_{RUNNING}").read_bytes() == running
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    assert (device.vg / f"core_{RUNNING}").read_bytes() == running
    assert chunk_requests(served.access_log()) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("made by a delta" in m for m in messages), messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def tuf_releases(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, deltas: bool
) -> tuple[DeviceDirs, Release]:
    """`releases` signed as TUF targets (their chunk indexes and delta too), with no
    minisign signature left for the indexes and the delta; a TUF device running the
    first."""
    old, new = releases(tmp_path, vendor, served, deltas=deltas)
    repository = TufRepo.create(served.root, tmp_path / "keys")
    repository.release(OS, RUNNING)
    repository.release(OS, OFFERED)
    repository.head(OS, "stable", OFFERED)
    for path in served.root.glob("dist/*/*.sig"):
        if not path.name.endswith(("-core.sig", "-efiboot.sig")):
            path.unlink()
    device = tuf_device(tmp_path, vendor, pki, served, repository)
    return running_on(device, old), new


@pytest.mark.parametrize("deltas", [True, False], ids=["delta", "chunks"])
def test_tuf_device_checks_the_index_and_the_delta_against_their_targets(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    caplog: pytest.LogCaptureFixture,
    deltas: bool,
) -> None:
    """In TUF mode the chunk indexes and the delta are targets the release keys signed
    (`rampart tuf add-release` adds them): the device checks them against their
    targets, with no minisign signature, and updates by the delta or from chunks."""
    device, new = tuf_releases(tmp_path, vendor, pki, served, deltas)
    caplog.set_level(logging.INFO)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    log = served.access_log()
    assert not data_streamed(log)
    assert ".sig HTTP" not in log.replace("-core.sig HTTP", "").replace("-efiboot.sig HTTP", "")
    messages = [r.getMessage() for r in caplog.records]
    if deltas:
        assert f'"GET {DELTA} HTTP/1.1" 200' in log and chunk_requests(log) == []
        assert any("made by a delta" in m for m in messages), messages
    else:
        assert chunk_requests(log)
        assert any("rebuilt from chunks" in m for m in messages), messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_change_fetches_no_chunk(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx
) -> None:
    """The offered release's Core is the running one's (a new UKI only): every chunk is
    already here, none is fetched, and nothing of Core's data is streamed."""
    old = make_release(tmp_path / "old", RUNNING, core_size=CORE_SIZE, common=True)
    publish(served.root, vendor, old)
    line = pe.cmdline(old.efiboot.read_bytes()) or ""
    line = line.replace(f"core_{RUNNING}", f"core_{OFFERED}")  # the same root hash
    efiboot = build_uki(tmp_path / "new.efi", OS, OFFERED, line)
    publish_unchecked(served.root, vendor, OFFERED, old.core, efiboot)
    index, _ = chunker.make_index(old.core, None)
    sign_index(served.root, vendor, OFFERED, index.render())
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert (device.vg / f"core_{OFFERED}").read_bytes()[:CORE_SIZE] == old.core.read_bytes()[
        :CORE_SIZE
    ]
    log = served.access_log()
    assert chunk_requests(log) == [] and not data_streamed(log)


def sign_index(webroot: Path, vendor: KeyPair, version: str, data: bytes) -> None:
    """`data` as the chunk index of `version`, signed by the vendor for that version."""
    path = webroot / f"dist/{version}/{wire.index_name(OS)}"
    path.write_bytes(data)
    signature = vendor.key.sign_message(hashing.blake2b(data).digest(), version.encode(), True)
    path.with_name(path.name + ".sig").write_bytes(signature.to_bytes())


def test_without_the_running_version_s_index_core_is_streamed_whole(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx
) -> None:
    old, new = releases(tmp_path, vendor, served)
    (served.root / f"dist/{RUNNING}/{wire.index_name(OS)}").unlink()
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    log = served.access_log()
    assert chunk_requests(log) == [] and data_streamed(log)


def test_device_rebuilds_core_from_an_index_and_store_casync_made(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx
) -> None:
    """Both releases' indexes and the store made by `casync make` (its default chunk
    sizes and zstd chunks), signed by the vendor: the device consumes them as its own."""
    casync = shutil.which("casync")
    assert casync is not None, "casync missing: run `make setup`"
    old, new = releases(tmp_path, vendor, served)
    store = wire.store_dir(served.root)
    shutil.rmtree(store)
    for version, release in ((RUNNING, old), (OFFERED, new)):
        made = tmp_path / f"{version}.caibx"
        run.run([casync, "make", f"--store={store}", str(made), str(release.core)])
        sign_index(served.root, vendor, version, made.read_bytes())
    for directory in (store, *store.iterdir()):
        directory.chmod(0o755)  # casync writes its directories for its own user only
    device = running_on(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url), old)
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert_installed(device, new)
    log = served.access_log()
    fetched = chunk_requests(log)
    assert fetched and all(name.endswith(".cacnk") for name in fetched)
    assert not data_streamed(log)
    assert next(store.glob("*/*.cacnk")).read_bytes().startswith(chunks.ZSTD_MAGIC)

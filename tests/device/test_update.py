"""The update transaction on the file backend, against a real nginx over HTTPS.

The four scenarios of the CLIP OS updater's own test script (test/client/run.sh),
with the LV names and ESP contents it expects, then the rest of the flow.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rampart import files
from rampart.contracts import signing
from rampart.contracts.version import parse_version
from rampart.device import corewrite, trust, update
from rampart.device.slots import Slot
from rampart.errors import ConflictError, LocalError, VerificationError
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair, run_cli
from tests.device.conftest import OS, DeviceDirs, Release, make_device, make_release, publish

OFFERED = "5.0.0-alpha.3"


@pytest.fixture
def release(tmp_path: Path, vendor: KeyPair, served: Nginx) -> Release:
    rel = make_release(tmp_path / "rel", OFFERED)
    publish(served.root, vendor, rel)
    return rel


@pytest.fixture
def whole(tmp_path: Path, vendor: KeyPair, served: Nginx) -> Release:
    """A release whose Core is downloaded whole (its UKI pins no root hash: nothing to
    stream against), to a device that is no verity device."""
    rel = make_release(tmp_path / "rel", OFFERED, root_hash=False)
    publish(served.root, vendor, rel)
    return rel


@pytest.fixture
def device(tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx) -> DeviceDirs:
    return make_device(tmp_path / "device", vendor, pki.ca.cert, served.url)


def run_update(device: DeviceDirs) -> update.UpdateResult:
    dev = device.open()
    return update.update(dev, update.make_fetcher(dev))


def assert_installed(device: DeviceDirs, release: Release) -> None:
    core = (device.vg / f"core_{release.version}").read_bytes()
    image = release.core.read_bytes()
    assert core[: len(image)] == image
    assert (device.esp / f"{OS}-{release.version}.efi").read_bytes() == release.efiboot.read_bytes()


def reset_ready(device: DeviceDirs) -> None:
    (device.run_dir / "update-ready").unlink()


def test_clipos_scenarios_lv_creation_rename_user_rollback_edge_case(
    device: DeviceDirs, release: Release
) -> None:
    expected_lvs = ["core_5.0.0-alpha.1", "core_5.0.0-alpha.3", "core_state"]
    expected_esp = ["clipos-5.0.0-alpha.1.efi", "clipos-5.0.0-alpha.3.efi"]

    # 1. LV creation: the first update creates the second LV.
    result = run_update(device)
    assert result.outcome == update.Outcome.UPDATED
    assert (device.lvs(), device.entries()) == (expected_lvs, expected_esp)
    assert_installed(device, release)

    # 2. LV renaming (normal update): the unused LV is renamed and overwritten.
    for old, new in (("5.0.0-alpha.3", "5.0.0-alpha.0"),):
        (device.vg / f"core_{old}").rename(device.vg / f"core_{new}")
        (device.esp / f"{OS}-{old}.efi").rename(device.esp / f"{OS}-{new}.efi")
    reset_ready(device)
    assert run_update(device).slot == "core_5.0.0-alpha.3"
    assert (device.lvs(), device.entries()) == (expected_lvs, expected_esp)
    assert_installed(device, release)

    # 3. User rollback: booted back into alpha.1 while alpha.2 is installed; the
    #    running LV is not touched, alpha.2's is overwritten.
    running_before = (device.vg / "core_5.0.0-alpha.1").read_bytes()
    (device.vg / "core_5.0.0-alpha.3").rename(device.vg / "core_5.0.0-alpha.2")
    (device.esp / f"{OS}-5.0.0-alpha.3.efi").rename(device.esp / f"{OS}-5.0.0-alpha.2.efi")
    reset_ready(device)
    assert run_update(device).removed_entries == ["clipos-5.0.0-alpha.2.efi"]
    assert (device.lvs(), device.entries()) == (expected_lvs, expected_esp)
    assert (device.vg / "core_5.0.0-alpha.1").read_bytes() == running_before
    assert_installed(device, release)

    # 4. Edge case: the unused LV carries a *higher* version; it is still the one
    #    overwritten.
    (device.vg / "core_5.0.0-alpha.3").rename(device.vg / "core_5.0.0-alpha.4")
    (device.esp / f"{OS}-5.0.0-alpha.3.efi").rename(device.esp / f"{OS}-5.0.0-alpha.4.efi")
    reset_ready(device)
    assert run_update(device).slot == "core_5.0.0-alpha.3"
    assert (device.lvs(), device.entries()) == (expected_lvs, expected_esp)
    assert_installed(device, release)


def test_up_to_date_does_nothing(
    device: DeviceDirs, vendor: KeyPair, served: Nginx, tmp_path: Path
) -> None:
    publish(served.root, vendor, make_release(tmp_path / "rel", "5.0.0-alpha.1"))
    before = device.state()
    result = run_update(device)
    assert result.outcome == update.Outcome.UP_TO_DATE
    assert device.state() == before


def test_requests_carry_the_clipos_identification_headers(
    device: DeviceDirs, release: Release, served: Nginx, tmp_path: Path
) -> None:
    # nginx logs the headers with a custom format: check from the server side.
    conf = served.state / "nginx.conf"
    text = conf.read_text().replace(
        "access_log " + str(served.state) + "/access.log;",
        "log_format ids '$request_uri $http_clipos_machineid $http_clipos_version';\n"
        "    access_log " + str(served.state) + "/access.log ids;",
    )
    conf.write_text(text)
    subprocess.run(
        ["nginx", "-c", str(conf), "-p", str(served.state), "-s", "reload"],
        check=True,
        capture_output=True,
    )
    time.sleep(0.5)
    run_update(device)
    lines = [line for line in served.access_log().splitlines() if " " in line]
    version_lines = [line for line in lines if line.startswith("/update/v1/clipos/version ")]
    assert version_lines
    assert version_lines[-1].split()[1:] == ["0123456789abcdef0123456789abcdef", "5.0.0-alpha.1"]
    dist = [line for line in lines if line.startswith("/dist/")]
    assert dist and all(line.split()[1] == "0123456789abcdef0123456789abcdef" for line in dist)


def test_boot_counting_suffix_and_mark_good(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, release: Release
) -> None:
    device = make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url)
    cfg = device.config_dir / "config.toml"
    cfg.write_text(cfg.read_text().replace("[efiboot]\n", "[efiboot]\nboot_tries = 3\n"))
    run_update(device)
    assert device.entries() == ["clipos-5.0.0-alpha.1.efi", "clipos-5.0.0-alpha.3+3.efi"]
    # systemd-boot decrements the counter when it boots the entry...
    (device.esp / "clipos-5.0.0-alpha.3+3.efi").rename(device.esp / "clipos-5.0.0-alpha.3+2-1.efi")
    device.set_running(OFFERED)
    # ... and the health check blesses it once the system is up.
    result = run_cli("mark-good", *device.argv()[:2], *device.argv()[6:], "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["entry"] == "clipos-5.0.0-alpha.3.efi"
    assert device.entries() == ["clipos-5.0.0-alpha.1.efi", "clipos-5.0.0-alpha.3.efi"]


def test_stale_counted_entries_are_recognised_and_removed(
    device: DeviceDirs, release: Release
) -> None:
    (device.vg / "core_5.0.0-alpha.2").write_bytes(bytes(1 << 20))
    (device.esp / "clipos-5.0.0-alpha.2+0-3.efi").write_bytes(b"bad entry")
    (device.esp / "clipos-5.0.0-alpha.3.efi.new").write_bytes(b"leftover")
    result = run_update(device)
    assert sorted(result.removed_entries) == [
        "clipos-5.0.0-alpha.2+0-3.efi",
        "clipos-5.0.0-alpha.3.efi.new",
    ]
    assert result.slot == "core_5.0.0-alpha.3"
    assert device.entries() == ["clipos-5.0.0-alpha.1.efi", "clipos-5.0.0-alpha.3.efi"]


def test_update_ready_blocks_a_second_run(device: DeviceDirs, release: Release) -> None:
    assert run_update(device).outcome == update.Outcome.UPDATED
    assert (device.run_dir / "update-ready").read_text() == OFFERED + "\n"
    before = device.state()
    assert run_update(device).outcome == update.Outcome.PENDING
    assert device.state() == before


def test_complete_download_left_by_a_crash_is_not_fetched_again(
    device: DeviceDirs, whole: Release, served: Nginx
) -> None:
    """A Core fully downloaded before a crash (here: put there): its resumed request
    gets 416 with `Content-Range: bytes */<its size>`, which means it is all there.
    (It was restarted from byte 0 as a partial file that did not fit.)"""
    device.download.mkdir(mode=0o700, parents=True, exist_ok=True)
    (device.download / f"{OS}-{OFFERED}-core").write_bytes(whole.core.read_bytes())
    assert run_update(device).outcome == update.Outcome.UPDATED
    log = served.access_log()
    assert f'"GET /dist/{OFFERED}/{OS}-core HTTP/1.1" 416' in log
    assert f'"GET /dist/{OFFERED}/{OS}-core HTTP/1.1" 200' not in log
    assert_installed(device, whole)


def test_corrupt_download_left_by_a_crash_is_fetched_again_once(
    device: DeviceDirs, whole: Release, served: Nginx
) -> None:
    """A Core of the right size but with a flipped byte left by an earlier run: 416
    says it is complete, its copy does not verify, and it is fetched once more."""
    device.download.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = bytearray(whole.core.read_bytes())
    data[len(data) // 2] ^= 1
    (device.download / f"{OS}-{OFFERED}-core").write_bytes(data)
    assert run_update(device).outcome == update.Outcome.UPDATED
    log = served.access_log()
    assert log.count(f'"GET /dist/{OFFERED}/{OS}-core HTTP/1.1" 416') == 1
    assert log.count(f'"GET /dist/{OFFERED}/{OS}-core HTTP/1.1" 200') == 1
    assert_installed(device, whole)


def test_verified_download_is_reused_after_a_failed_attempt(
    device: DeviceDirs, whole: Release, served: Nginx
) -> None:
    class Interrupted(Exception):
        pass

    def fail_after_download(step: str) -> None:
        if step == "remove-entries":
            raise Interrupted

    dev = device.open()
    with pytest.raises(Interrupted):
        update.update(dev, update.make_fetcher(dev), fail_after_download)

    def payload_requests() -> int:  # not the probe for a boot loader, made each run
        return sum(1 for line in served.access_log().splitlines() if f"/{OS}-efiboot" in line
                   or f"/{OS}-core" in line)  # fmt: skip

    before = payload_requests()
    assert before == 4
    run_update(device)
    assert payload_requests() == before  # nothing fetched again
    assert_installed(device, whole)
    assert list(device.download.iterdir()) == []  # installed: downloads removed


def test_partial_download_resumes_with_a_range_request(
    device: DeviceDirs, whole: Release, served: Nginx
) -> None:
    dev = device.open()
    device.download.mkdir(parents=True, exist_ok=True)
    partial = update.payload_path(dev, parse_version(OFFERED), "core")
    partial.write_bytes(whole.core.read_bytes()[:100_000])
    run_update(device)
    assert_installed(device, whole)
    log = served.access_log()
    assert " 206 " in log  # nginx answered the range request with partial content


def test_no_boot_entry_for_running_version_is_refused(device: DeviceDirs, release: Release) -> None:
    (device.esp / f"{OS}-5.0.0-alpha.1.efi").unlink()
    before = device.state()
    with pytest.raises(ConflictError, match="no boot entry for the running version"):
        run_update(device)
    assert device.state() == before


def test_not_enough_space_for_a_new_lv(device: DeviceDirs, release: Release) -> None:
    cfg = device.config_dir / "config.toml"
    cfg.write_text(cfg.read_text().replace('capacity = "8M"', 'capacity = "2M"'))
    before = device.state()
    with pytest.raises(LocalError, match="not enough free space"):
        run_update(device)
    assert device.state() == before


def test_core_larger_than_the_lv_is_refused_before_touching_disk(
    device: DeviceDirs, vendor: KeyPair, served: Nginx, tmp_path: Path
) -> None:
    publish(served.root, vendor, make_release(tmp_path / "big", "5.0.0-alpha.5", 2 << 20))
    before = device.state()
    with pytest.raises(LocalError, match="does not fit"):
        run_update(device)
    assert device.state() == before


def test_cli_update_status_and_exit_codes(device: DeviceDirs, release: Release) -> None:
    result = run_cli("update", *device.argv(), "--json")
    assert result.code == 20, result.err
    assert json.loads(result.out)["outcome"] == "updated"
    result = run_cli("update", *device.argv())
    assert result.code == 21
    argv = [*device.argv()[:2], *device.argv()[6:]]  # status takes no remote or download dir
    result = run_cli("status", *argv, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["running"] == "5.0.0-alpha.1"
    assert report["update_ready"] == OFFERED
    assert [s["name"] for s in report["slots"]] == ["core_5.0.0-alpha.1", "core_5.0.0-alpha.3"]
    assert [e["default"] for e in report["entries"]] == [False, True]
    text = run_cli("status", *argv).out
    assert "update ready: 5.0.0-alpha.3" in text


def test_version_that_failed_to_boot_is_not_installed_again(
    device: DeviceDirs, release: Release
) -> None:
    """After its boot counter ran out and the machine fell back, 5.0.0-alpha.3 stays out."""
    (device.vg / f"core_{OFFERED}").write_bytes(bytes(1 << 20))
    (device.esp / f"{OS}-{OFFERED}+0-3.efi").write_bytes(b"failed entry")
    before = device.state()
    with pytest.raises(ConflictError, match="already failed to boot"):
        run_update(device)
    assert device.state() == before


def test_a_second_concurrent_update_is_refused(device: DeviceDirs, release: Release) -> None:
    import fcntl
    import os

    device.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(device.run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        before = device.state()
        with pytest.raises(ConflictError, match="another update is running"):
            run_update(device)
        assert device.state() == before
    finally:
        os.close(fd)
    assert run_update(device).outcome == update.Outcome.UPDATED


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("read_timeout = true", "wrong type"),
        ("read_timeout = 0", "greater than 0"),
        ("stall_window = -1", "greater than 0"),
        ("min_speed = -5", "must not be negative"),
        ('max_core_size = "lots"', "not a size"),
    ],
)
def test_invalid_download_settings_are_refused(device: DeviceDirs, line: str, message: str) -> None:
    cfg = device.config_dir / "config.toml"
    text = cfg.read_text().replace("read_timeout = 5\n", "")
    cfg.write_text(text.replace("[download]\n", f"[download]\n{line}\n"))
    result = run_cli("status", *device.argv()[:2], *device.argv()[6:])
    assert result.code == 10
    assert message in result.err and str(cfg) in result.err


def test_core_changed_after_verification_is_caught_by_the_read_back(
    tmp_path: Path,
) -> None:
    image = tmp_path / "core"
    image.write_bytes(b"verified bytes")
    verified = hashlib.blake2b(b"verified bytes").digest()
    image.write_bytes(b"swapped bytes!")  # changed between verification and write
    lv = tmp_path / "core_2.0.0"
    lv.write_bytes(bytes(1024))
    with pytest.raises(VerificationError, match="does not match the verified payload"):
        corewrite.write_core(image, Slot("core_2.0.0", 1024, lv), verified, lambda _: None)


def test_other_operating_systems_boot_entries_are_left_alone(
    device: DeviceDirs, release: Release
) -> None:
    for name in ("clipos-dev-1.0.0.efi", "debian-12.efi", "clipos-notes.txt"):
        (device.esp / name).write_bytes(b"not ours")
    result = run_update(device)
    assert result.removed_entries == []
    assert device.entries() == [
        "clipos-5.0.0-alpha.1.efi",
        "clipos-5.0.0-alpha.3.efi",
        "clipos-dev-1.0.0.efi",
        "clipos-notes.txt",
        "debian-12.efi",
    ]


def _evidence_for(data: bytes) -> Any:
    """TUF-mode evidence (a length and a BLAKE2b-512 digest) for `data`; the copy's
    checks read no more of the target."""
    target = trust.ExpectedTarget(
        path="dist/x/core",
        length=len(data),
        digest=hashlib.blake2b(data).digest(),
        fields=None,  # type: ignore[arg-type]
    )
    return update._Evidence(target=target)


def _copy_download(download: Path, copy: Path, data: bytes) -> bytes:
    """`data` downloaded into `download`, moved into `copy` as copy_verified does."""
    download.write_bytes(data)
    copy.parent.mkdir()
    src = os.open(download, os.O_RDWR)
    dir_fd = os.open(copy.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return update._copy_and_verify(
            None,  # type: ignore[arg-type] # TUF-mode evidence needs no device
            src,
            dir_fd,
            copy,
            _evidence_for(data),
        )
    finally:
        os.close(src)
        os.close(dir_fd)


@pytest.mark.parametrize("punch", [True, False])
def test_a_download_is_copied_and_hashed_in_either_direction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, punch: bool
) -> None:
    """Forward in one pass where holes can be punched, the download emptied behind
    the copy; backward (truncating the download) where they cannot. The copy and
    its digest are the same."""
    data = os.urandom(3 * signing.CHUNK + 4097)
    if not punch:
        monkeypatch.setattr(files, "punch_hole", lambda *_: False)
    download, copy = tmp_path / "download", tmp_path / "verified" / "core"
    assert _copy_download(download, copy, data) == hashlib.blake2b(data).digest()
    assert copy.read_bytes() == data
    left = download.stat()
    if punch:  # the size is kept, the blocks are gone (but the partial last one)
        assert left.st_size == len(data) and left.st_blocks * 512 <= 4096
    else:
        assert left.st_size == 0


def test_a_copy_that_fails_midway_leaves_no_holey_download_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward copy has punched the start of the download when a write fails: the
    download is emptied, so that the next run fetches it afresh instead of resuming
    a file that reads as zeros where its first blocks were."""
    data = os.urandom(3 * signing.CHUNK)
    calls = []

    def failing(fd: int, chunk: bytes | memoryview, offset: int) -> None:
        calls.append(offset)
        if offset:
            raise OSError(errno.EIO, "Input/output error")
        os.pwrite(fd, chunk, offset)

    monkeypatch.setattr(files, "pwrite_all", failing)
    download = tmp_path / "download"
    with pytest.raises(OSError, match="Input/output error"):
        _copy_download(download, tmp_path / "verified" / "core", data)
    assert calls[:2] == [0, signing.CHUNK]
    assert download.stat().st_size == 0

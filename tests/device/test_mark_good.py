"""`rampart mark-good` on a slow boot: the ESP is mounted late (its device appears late,
and a `nofail` mount is not ordered before local-fs.target). mark-good waits for the
ESP directory (`--wait-esp`, which rampart-mark-good.service passes) instead of failing
the boot into `degraded` and leaving the entry unblessed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from rampart.device import esp as esp_module
from rampart.errors import LocalError
from tests.conftest import KeyPair, fake_uki, run_cli
from tests.device.conftest import OS, DeviceDirs, make_device

RUNNING = "5.0.0-alpha.1"


def local_device(tmp_path: Path, vendor: KeyPair) -> DeviceDirs:
    """A device for mark-good (never reaches a server; no TPM)."""
    ca = tmp_path / "unused-ca.pem"
    ca.write_text("unused\n")
    return make_device(tmp_path / "device", vendor, ca, "https://localhost:1", RUNNING)


def mark_good(device: DeviceDirs, *extra: str) -> tuple[int, str, str]:
    argv = device.argv()
    result = run_cli("mark-good", *argv[:2], *argv[6:], *extra)
    return result.code, result.out, result.err


def unmount(device: DeviceDirs) -> Path:
    """Take the ESP away as an unmounted ESP looks (its mount point empty); return where
    its content waits to be "mounted" back with one rename."""
    mount_point = device.esp.parent.parent
    held = mount_point.with_name("esp-not-mounted-yet")
    mount_point.rename(held)
    mount_point.mkdir()
    return held


def test_slow_boot_loses_esp_unless_mark_good_waits_for_it(tmp_path: Path, vendor: KeyPair) -> None:
    """The ESP shows up while mark-good waits: the entry is blessed, exit 0."""
    device = local_device(tmp_path, vendor)
    (device.esp / f"{OS}-{RUNNING}.efi").unlink()
    (device.esp / f"{OS}-{RUNNING}+2-1.efi").write_bytes(fake_uki("root=x ro"))
    held = unmount(device)
    # Without waiting, the missing ESP is a failure (what failed the slow boot).
    code, _out, err = mark_good(device)
    assert code == 3 and "ESP directory not found" in err, err

    def mount_later() -> None:
        time.sleep(0.5)  # while mark-good is waiting
        mount_point = device.esp.parent.parent
        mount_point.rmdir()
        held.rename(mount_point)

    thread = threading.Thread(target=mount_later)
    thread.start()
    try:
        code, out, err = mark_good(device, "--wait-esp", "120", "--json")
    finally:
        thread.join()
    assert code == 0, err
    assert json.loads(out)["entry"] == f"{OS}-{RUNNING}.efi"
    assert device.entries() == [f"{OS}-{RUNNING}.efi"]


def test_slow_boot_loses_esp_a_missing_esp_still_fails_after_the_wait(
    tmp_path: Path, vendor: KeyPair
) -> None:
    device = local_device(tmp_path, vendor)
    unmount(device)
    code, _out, err = mark_good(device, "--wait-esp", "0.3")
    assert code == 3
    assert err.strip().endswith(
        f"{device.esp}: ESP directory not found after waiting 0.3 s (is the ESP mounted?)"
    ), err
    assert len(err.strip().splitlines()) == 1
    for bad in ("-1", "nan", "inf", "soon"):
        assert mark_good(device, "--wait-esp", bad)[0] == 2  # usage


def test_wait_for_directory_polls_until_the_deadline(tmp_path: Path) -> None:
    """Time is an input: a fake clock, no real sleeping."""
    now = [100.0]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    target = tmp_path / "EFI/Linux"
    with pytest.raises(LocalError, match="not found after waiting 2 s"):
        esp_module.wait_for_directory(target, 2, clock=lambda: now[0], sleep=sleep)
    assert sum(naps) == pytest.approx(2) and max(naps) <= esp_module.WAIT_POLL

    target.parent.mkdir()
    target.write_text("a file where the directory should be")
    with pytest.raises(LocalError, match="is not a directory after waiting 1 s"):
        esp_module.wait_for_directory(target, 1, clock=lambda: now[0], sleep=sleep)

    target.unlink()
    target.mkdir()
    naps.clear()
    assert esp_module.wait_for_directory(target, 5, clock=lambda: now[0], sleep=sleep) == 0
    assert naps == []

"""Crash safety: SIGKILL the client at every step of the transaction, including in
the middle of the download and of writing Core; after each crash, the entry the
bootloader would pick names a complete, verified LV, and a rerun completes the update."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from rampart.device import update
from rampart.device.esp import Esp
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

OFFERED = "5.0.0-alpha.3"
STEPS = [
    ("check", 1),
    ("preflight", 1),
    ("download", 1),
    ("download-chunk", 2),
    ("remove-entries", 1),
    ("take-slot", 1),
    ("write-core", 1),
    ("write-core-chunk", 1),
    ("write-core-chunk", 2),
    ("install-entry", 1),
    ("ready", 1),
]


def run_and_kill(device: DeviceDirs, step: str, nth: int) -> int:
    """Run the update in a child process that SIGKILLs itself at the nth `step`."""
    pid = os.fork()
    if pid == 0:
        seen = {"n": 0}

        def checkpoint(name: str) -> None:
            if name == step:
                seen["n"] += 1
                if seen["n"] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)

        try:
            dev = device.open()
            fetcher = update.make_fetcher(dev)
            fetcher.progress = lambda done, total: checkpoint("download-chunk")
            update.update(dev, fetcher, checkpoint)
        finally:
            os._exit(3)  # reached only if the step was never hit
    _, status = os.waitpid(pid, 0)
    return status


OLD_CORE = b"old".ljust(4 << 20, b"\0")


def assert_bootable(device: DeviceDirs, release: Release, running_core: bytes) -> None:
    """The entry systemd-boot would pick has its complete, verified LV."""
    default = Esp(device.esp, OS).default()
    assert default is not None, "no bootable entry left"
    lv = device.vg / f"core_{default.version.core}"
    assert lv.exists(), f"{default.path.name} boots a missing LV"
    if default.version.core == OFFERED:
        image = release.core.read_bytes()
        assert lv.read_bytes()[: len(image)] == image
        assert default.path.read_bytes() == release.efiboot.read_bytes()
    elif default.version.core == "5.0.0-alpha.2":  # the previous update, untouched
        assert lv.read_bytes() == OLD_CORE
    else:
        assert default.version.core == "5.0.0-alpha.1"
        assert lv.read_bytes() == running_core


@pytest.mark.parametrize(("step", "nth"), STEPS, ids=[f"{s}-{n}" for s, n in STEPS])
def test_sigkill_at_every_step_leaves_a_bootable_system_and_a_rerun_completes(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx, step: str, nth: int
) -> None:
    release = make_release(tmp_path / "rel", OFFERED, core_size=3 * (1 << 20) + 12345)
    publish(served.root, vendor, release)
    device = larger_slots(make_device(tmp_path / "device", vendor, pki.ca.cert, served.url))
    # A previous update left an unused LV and its entry: the normal A/B case.
    (device.vg / "core_5.0.0-alpha.2").write_bytes(OLD_CORE)
    (device.esp / f"{OS}-5.0.0-alpha.2.efi").write_bytes(b"old efi")
    running_core = (device.vg / "core_5.0.0-alpha.1").read_bytes()

    status = run_and_kill(device, step, nth)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert_bootable(device, release, running_core)

    dev = device.open()
    result = update.update(dev, update.make_fetcher(dev))
    if step == "ready":  # killed after the entry was installed, before the marker
        assert result.outcome == update.Outcome.UPDATED
    assert result.outcome in (update.Outcome.UPDATED, update.Outcome.PENDING)
    assert device.entries() == [f"{OS}-5.0.0-alpha.1.efi", f"{OS}-{OFFERED}.efi"]
    assert device.lvs() == ["core_5.0.0-alpha.1", f"core_{OFFERED}", "core_state"]
    assert (device.vg / "core_5.0.0-alpha.1").read_bytes() == running_core
    assert_bootable(device, release, running_core)

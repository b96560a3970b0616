"""The testbed's time factor: how much slower than an idle host this one runs a guest,
measured once per run by booting the reference guest (the Debian kernel and a busybox
initramfs, rampart.testbed.machine.REFERENCE_BOOT_SECONDS when idle). Every machine
of the VM tests gets it: their waits scale with it, so a busy host does not fail them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from rampart.testbed import build, machine
from tests.release.bootkit import MARKER, busybox_initrd, kernel

log = logging.getLogger(__name__)
CHECKOUT = Path(__file__).resolve().parents[2]


def reference_boot_seconds(work: Path) -> float:
    """Seconds from `start()` to the reference guest's /init printing its marker."""
    initrd = busybox_initrd(work / "initrd.cpio")
    vm = machine.Machine(
        work / "vm",
        firmware=machine.DirectKernel(kernel(), initrd, "console=ttyS0 panic=-1"),
        name="time-factor",
        cpus=machine.REFERENCE_CPUS,
        time_factor=machine.MAX_TIME_FACTOR,  # whatever this host is, let the boot end
    )
    with vm:
        started = time.monotonic()
        vm.start()
        vm.expect(MARKER, 60)
        return time.monotonic() - started


@pytest.fixture(scope="session")
def time_factor(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The run's time factor (1 to machine.MAX_TIME_FACTOR), measured on first use."""
    seconds = reference_boot_seconds(tmp_path_factory.mktemp("time-factor"))
    factor = machine.time_factor(seconds)
    message = (
        f"testbed time factor {factor:g}: the reference guest booted in {seconds:.1f} s "
        f"(idle host: {machine.REFERENCE_BOOT_SECONDS:g} s)"
    )
    log.warning("%s", message)
    print(f"\n{message}")
    return factor


@pytest.fixture(scope="module")
def bed(time_factor: float) -> build.Testbed:
    """The testbed of this checkout (built once per cache; test_scenarios.py has its
    own, which also times the build)."""
    return build.build(CHECKOUT, time_factor=time_factor)

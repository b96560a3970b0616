"""Testbed scenario 13 (the boot chain's lifecycle): a boot loader update on the real
firmware. OVMF with Secure Boot enforced runs systemd-boot from the ESP; `rampart
bootloader install` checks the new loader against the firmware's db and dbx (read
from efivarfs), writes its main copy, adds the boot option with efibootmgr, then
writes the fallback copy; the next boot runs it. Then a power cut at each step of an
install where one copy is missing: every time the machine boots (the firmware
starts the other, whole copy), and the boot's own rampart-bootloader.service
completes the install.

The loaders are Debian's systemd-boot with another version string, signed with the
enrolled db key (`build.renamed_loader`: Debian 12 has one build). They reach the
guest on a read-only second disk and are staged by hand where the update stages a
release's loader (the update's staging, against a real nginx, is
tests/device/test_bootloader.py); so a machine of its own, booted from the installed
disk, with no update server: `make test` runs this in its other pytest process
(scripts/test.sh). Times go to <work>/timings.json and the log."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rampart.contracts import bootloader
from rampart.contracts.layout import FALLBACK_LOADER_PATH, LOADER_PATH
from rampart.testbed import build, machine, session
from tests.testbed.kit import CORE

pytestmark = pytest.mark.vm

# Same length as Debian 12's "252.39-1~deb12u2": the strings are replaced in place.
LOADERS = {"new": "252.99-1~deb12u2", "third": "252.98-1~deb12u2"}
ALIGN = 1 << 20
STAGED = f"/var/lib/rampart/bootloader/{build.INSTALLED}.efi"
CUT_AT = ("main-removed", "fallback-removed")  # of bootloader.STEPS
log = logging.getLogger(__name__)
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("boot-chain")
    yield path
    (path / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
    log.warning("testbed boot chain timings (s): %s", json.dumps(TIMINGS))


@pytest.fixture(scope="module")
def loaders(bed: build.Testbed, work: Path) -> dict[str, tuple[int, int, str]]:
    """The loaders on a raw disk (work/loaders.raw): {name: (offset, size, sha256)}."""
    where: dict[str, tuple[int, int, str]] = {}
    with (work / "loaders.raw").open("wb") as out:
        for name, version in LOADERS.items():
            data = build.renamed_loader(work / f"{name}.efi", bed.keys, version).read_bytes()
            where[name] = (out.tell(), len(data), hashlib.sha256(data).hexdigest())
            out.write(data)
            out.write(bytes(-out.tell() % ALIGN))
    return where


@pytest.fixture(scope="module")
def guest(
    bed: build.Testbed,
    work: Path,
    time_factor: float,
    loaders: dict[str, tuple[int, int, str]],
) -> Iterator[session.Guest]:
    disk = machine.Disk(work / "loaders.raw", "raw", read_only=True)
    with session.Guest(
        bed, work / "guest", time_factor=time_factor, extra_disks=(disk,)
    ) as machine_:
        yield machine_


def _info(name: str) -> str:
    return f"systemd-boot {LOADERS[name]}"


def _stage(guest: session.Guest, loaders: dict[str, tuple[int, int, str]], name: str) -> None:
    """Put loader `name` where the update stages the running release's loader."""
    offset, size, digest = loaders[name]
    guest.sh(
        f"mkdir -p -m 0700 {Path(STAGED).parent} && dd if=/dev/vdb of={STAGED} bs=1M "
        f"iflag=skip_bytes,count_bytes skip={offset} count={size} status=none && "
        f"chmod 0600 {STAGED} && sync"
    )
    assert guest.sh(f"sha256sum {STAGED}").split()[0] == digest


def _status(guest: session.Guest) -> dict[str, Any]:
    text = guest.sh("rampart bootloader status --json")
    found: dict[str, Any] = json.loads(text[text.find("{") :])
    return found


def test_13_a_boot_loader_update_boots_after_a_power_cut_at_each_step(
    guest: session.Guest, loaders: dict[str, tuple[int, int, str]]
) -> None:
    started = time.monotonic()
    assert guest.boot().core == CORE.format(build.INSTALLED)
    assert guest.wait_system_up() == "running"
    before = _status(guest)
    assert before["copies"][LOADER_PATH] is None
    assert before["copies"][FALLBACK_LOADER_PATH].startswith("systemd-boot 252.39")
    assert before["running"].startswith("systemd-boot 252.39"), before
    # The update after the good boot, by hand: both copies, the boot option.
    _stage(guest, loaders, "new")
    text = guest.sh("rampart bootloader install --json")
    installed = json.loads(text[text.find("{") :])
    assert installed == {
        "installed": _info("new"),
        "boot_option": True,
        "copies": [LOADER_PATH, FALLBACK_LOADER_PATH],
    }
    assert guest.reboot().core == CORE.format(build.INSTALLED)
    assert guest.wait_system_up() == "running"  # its rampart-bootloader.service done
    after = _status(guest)
    assert after["running"] == _info("new"), after  # the firmware started the new loader
    assert after["boot_option"] is not None
    _timed("13 boot loader update", started)

    # A power cut at each step where one copy is missing, alternating the two loaders:
    # the firmware must fall back from the boot option to the removable-media path
    # (main-removed), or boot the main copy without a fallback (fallback-removed). The
    # ESP after a cut at each of the other steps holds two whole copies (checked for
    # every step on the host: tests/device/test_bootloader.py).
    started = time.monotonic()
    previous = "new"
    for number, step in enumerate(CUT_AT):
        staged = "third" if previous == "new" else "new"
        _stage(guest, loaders, staged)
        unit = f"loader-cut-{number}"
        guest.sh(f"systemd-run --unit={unit} rampart bootloader install --halt-at {step}")
        _wait_halted(guest, unit, step)
        guest.power_cut()
        assert guest.boot().core == CORE.format(build.INSTALLED), step
        assert guest.wait_system_up() == "running", step
        found = _status(guest)
        assert found["running"] in (_info(previous), _info(staged)), (step, found)
        # The boot's rampart-bootloader.service finished the install.
        assert found["copies"] == {
            LOADER_PATH: _info(staged),
            FALLBACK_LOADER_PATH: _info(staged),
        }, (step, found)
        assert found["staged"] == {}, (step, found)
        previous = staged
    assert guest.reboot().core == CORE.format(build.INSTALLED)
    assert _status(guest)["running"] == _info(previous)
    assert set(CUT_AT) <= set(bootloader.STEPS)
    _timed("13 power cuts in a boot loader install", started)


def _wait_halted(guest: session.Guest, unit: str, step: str) -> None:
    """Wait for the install under `unit` to stop at `step` (its log line); fail with
    its journal if it ends or does not get there."""
    waited = guest.vm.shell(  # in a subshell: `exit` leaves it, not the login shell
        f"(for i in $(seq 300); do journalctl -u {unit} -o cat | grep -q 'halted at {step}' "
        f"&& exit 0; systemctl -q is-active {unit} || exit 1; sleep 0.2; done; exit 1)",
        120,
    )
    if waited.returncode != 0:
        journal = guest.sh(f"journalctl -u {unit} -o cat --no-pager | tail -20")
        pytest.fail(f"the install did not halt at {step}: {journal}", pytrace=False)


def _timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.monotonic() - started, 1)

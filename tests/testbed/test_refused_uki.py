"""Testbed scenario 7: the firmware refuses a UKI it cannot verify. An attacker with root
in the guest puts an unsigned UKI, then one signed by a db key the firmware does not
trust, on the ESP and makes it systemd-boot's one-shot entry; OVMF (Secure Boot
enforced) refuses to start it, and the next power-on boots the default entry.

A machine of its own, booted from the installed disk: the refused UKIs reach it on a
read-only second disk (/dev/vdb, each file at a 1 MiB boundary), not from the update
server: `make test` runs this after test_scenarios.py in the same pytest process,
once that machine is off (scripts/test.sh). Times go to <work>/timings.json and the log."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampart.testbed import build, machine, rootfs, session
from tests.testbed.kit import CORE, force_one_shot

pytestmark = pytest.mark.vm

ROGUES = ("unsigned.efi", "other-signed.efi")
ALIGN = 1 << 20
log = logging.getLogger(__name__)
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("refused-uki")
    yield path
    (path / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
    log.warning("testbed refused-UKI timings (s): %s", json.dumps(TIMINGS))


@pytest.fixture(scope="module")
def rogue_disk(bed: build.Testbed, work: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A raw disk holding the refused UKIs; {name: (offset, size)} on it."""
    disk = work / "rogues.raw"
    where: dict[str, tuple[int, int]] = {}
    with disk.open("wb") as out:
        for name in ROGUES:
            data = build.rogue(bed, name).read_bytes()
            where[name] = (out.tell(), len(data))
            out.write(data)
            out.write(bytes(-out.tell() % ALIGN))
    return disk, where


@pytest.fixture(scope="module")
def guest(
    bed: build.Testbed,
    work: Path,
    time_factor: float,
    rogue_disk: tuple[Path, dict[str, tuple[int, int]]],
) -> Iterator[session.Guest]:
    disk = machine.Disk(rogue_disk[0], "raw", read_only=True)
    with session.Guest(
        bed, work / "guest", time_factor=time_factor, extra_disks=(disk,)
    ) as machine_:
        yield machine_


@pytest.mark.parametrize("name", ROGUES)
def test_7_the_firmware_refuses_a_uki_it_cannot_verify(
    guest: session.Guest, rogue_disk: tuple[Path, dict[str, tuple[int, int]]], name: str
) -> None:
    started = time.monotonic()
    done = guest.ensure_shell()
    if done:
        log.warning("scenario 7 (%s): the guest %s", name, done)
    status = guest.status()
    defaults = [e["version"] for e in status["entries"] if e["default"]]
    assert len(defaults) == 1, f"no default boot entry to come back to: {status['entries']}"
    offset, size = rogue_disk[1][name]
    entry = f"clipos-{build.ROGUE}.efi"
    target = f"{rootfs.ESP_DIRECTORY}/{entry}"
    guest.sh(
        f"python3 -c \"f = open('/dev/vdb', 'rb'); f.seek({offset}); "
        f"open('{target}', 'wb').write(f.read({size}))\""
    )
    assert guest.sh(f"stat -c %s {target}").strip() == str(size)
    force_one_shot(guest, entry)
    guest.restart()
    index, match = guest.vm.expect_any(
        [r"(?i)security violation|access denied", session.BOOTED], session.BOOT_TIMEOUT
    )
    assert index == 0, f"the firmware started {name}: {match.group(0)}"
    guest.power_cut()
    booted = guest.boot()  # the one-shot is spent: the default entry boots
    assert booted.core == CORE.format(defaults[0])
    guest.sh(f"rm {target}")
    TIMINGS[f"7 refused {name}"] = round(time.monotonic() - started, 1)

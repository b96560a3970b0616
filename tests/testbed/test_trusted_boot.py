"""Testbed scenarios 10 and 11 (trusted boot): the installed disk booted after
a change of the Secure Boot keys, and in a machine with another TPM. Each uses a
machine of its own, booted from the installed disk, and no update server; `make
test` runs them after test_scenarios.py in the same pytest process (scripts/test.sh).
Times go to <work>/timings.json and the log."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampart.testbed import build, session
from tests.testbed.kit import CORE, PROMPT, UNLOCKED_PASSPHRASE, UNLOCKED_TPM

pytestmark = pytest.mark.vm

log = logging.getLogger(__name__)
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("trusted-boot")
    yield path
    (path / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
    log.warning("testbed trusted-boot timings (s): %s", json.dumps(TIMINGS))


def _timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.monotonic() - started, 1)


def _type_passphrase(machine: session.Guest, passphrase: str) -> str:
    """Wait for the initramfs's prompt and type `passphrase`; the reason it gave."""
    reason = machine.vm.expect(PROMPT, session.BOOT_TIMEOUT).group("reason")
    machine.vm.expect(r"Enter passphrase", 60)
    machine.vm.send(passphrase + "\n")
    return reason


def test_10_new_secure_boot_keys_need_the_passphrase_until_resealed(
    bed: build.Testbed, work: Path, time_factor: float
) -> None:
    """Scenario 2: another db key enrolled (PCR 7 changes)."""
    started = time.monotonic()
    with session.Guest(bed, work / "guest-new-db", time_factor=time_factor) as machine:
        machine.enroll_db(bed.other_keys / "db.crt")
        machine.vm.start()
        reason = _type_passphrase(machine, bed.recovery_passphrase)
        assert "PCR sha256:7 differs" in reason, reason
        machine.vm.expect(UNLOCKED_PASSPHRASE, 120)
        assert machine.wait_booted().core == CORE.format("1.0.0")
        assert machine.tpm_status()["unseals"] is False
        out = machine.sh(f"printf '%s\\n' '{bed.recovery_passphrase}' | rampart tpm reseal")
        assert "resealed" in out
        assert machine.tpm_status()["unseals"] is True
        machine.restart()
        index, _ = machine.vm.expect_any([PROMPT, UNLOCKED_TPM], session.BOOT_TIMEOUT)
        assert index == 1, "the boot after resealing still asked for the passphrase"
        assert machine.wait_booted().core == CORE.format("1.0.0")
        assert machine.sh("cat /etc/machine-id").strip()
    _timed("10 new db key, reseal", started)


def test_11_the_disk_in_another_machine_needs_the_passphrase(
    bed: build.Testbed, work: Path, time_factor: float
) -> None:
    """Scenario 3: the installed disk booted with another swtpm; a wrong passphrase
    stops the boot, the right one opens the state."""
    started = time.monotonic()
    with session.Guest(
        bed, work / "guest-other-tpm", fresh_tpm=True, time_factor=time_factor
    ) as machine:
        machine.vm.start()
        reason = _type_passphrase(machine, "not-the-passphrase")
        assert "cannot load the sealed state key" in reason, reason
        machine.vm.expect(
            r"rampart: the recovery passphrase does not open the state partition "
            r"mainvg/core_state\n",
            120,
        )
        _type_passphrase(machine, bed.recovery_passphrase)  # panic=10: the next boot
        machine.vm.expect(UNLOCKED_PASSPHRASE, 120)
        assert machine.wait_booted().core == CORE.format("1.0.0")
        assert machine.tpm_status()["unseals"] is False
    _timed("11 another TPM", started)

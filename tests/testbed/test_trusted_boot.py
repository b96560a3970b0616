"""Testbed scenario 10 (trusted boot): the installed disk booted after a change of
the Secure Boot keys, on a machine of its own and with no update server; `make test`
runs it beside test_scenarios.py, in the other pytest process (scripts/test.sh).
Scenario 11 (the disk in a machine with another TPM) runs on scenario 15's second
machine, in test_scenarios.py.
Times go to <work>/timings.json and the log."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampart.testbed import build, session
from tests.testbed.kit import CORE, PROMPT, UNLOCKED_PASSPHRASE, UNLOCKED_TPM, type_passphrase

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


def test_10_new_secure_boot_keys_need_the_passphrase_until_resealed(
    bed: build.Testbed, work: Path, time_factor: float
) -> None:
    """Scenario 2: another db key enrolled (PCR 7 changes)."""
    started = time.monotonic()
    with session.Guest(bed, work / "guest-new-db", time_factor=time_factor) as machine:
        machine.enroll_db(bed.other_keys / "db.crt")
        machine.vm.start()
        reason = type_passphrase(machine, bed.recovery_passphrase)
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

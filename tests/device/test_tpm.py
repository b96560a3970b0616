"""rampart.device.tpm against the real swtpm (TPM 2.0 simulator) and tpm2-tools: seal and
unseal, a changed PCR 7 refused with a clear error, another TPM refused, the NV counter
never decreasing. No VM: swtpm speaks the TPM protocol on a local TCP port."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampart.device import tpm
from rampart.errors import LocalError, UsageError
from tests.conftest import start_swtpm


@pytest.fixture
def other_chip(tmp_path: Path) -> Iterator[tpm.Tpm]:
    yield from start_swtpm(tmp_path / "other-tpm")


def _seal(chip: tpm.Tpm, tmp_path: Path, secret: bytes) -> tuple[Path, Path]:
    pub, priv = tmp_path / "sealed.pub", tmp_path / "sealed.priv"
    chip.seal(secret, pub, priv)
    return pub, priv


def test_seal_and_unseal_round_trip(chip: tpm.Tpm, tmp_path: Path) -> None:
    secret = bytes(range(64))
    pub, priv = _seal(chip, tmp_path, secret)
    assert secret not in pub.read_bytes() and secret not in priv.read_bytes()
    assert priv.stat().st_mode & 0o777 == 0o600
    assert chip.unseal(pub, priv) == secret
    assert chip.unseal(pub, priv) == secret  # no object or session left behind
    assert tpm.PRIMARY_HANDLE in chip.persistent_handles()


def test_a_pcr7_extension_makes_unsealing_fail_clearly(chip: tpm.Tpm, tmp_path: Path) -> None:
    pub, priv = _seal(chip, tmp_path, b"state key")
    before = chip.pcr_values()[7]
    subprocess.run(
        ["tpm2_pcrextend", "7:sha256=" + "01" * 32],
        env={"TPM2TOOLS_TCTI": chip.env["TPM2TOOLS_TCTI"], "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert chip.pcr_values()[7] != before
    with pytest.raises(tpm.TpmPolicyError, match=r"PCR sha256:7 differs"):
        chip.unseal(pub, priv)


def test_an_object_sealed_by_another_tpm_does_not_load(
    chip: tpm.Tpm, other_chip: tpm.Tpm, tmp_path: Path
) -> None:
    pub, priv = _seal(chip, tmp_path, b"state key")
    other_chip.ensure_primary()
    with pytest.raises(LocalError, match="cannot load the sealed object"):
        other_chip.unseal(pub, priv)


def test_the_counter_never_decreases(chip: tpm.Tpm) -> None:
    assert chip.counter() is None
    assert chip.advance_counter(0) == 0  # epoch 0 needs no increment (the first gives 1)
    assert chip.counter() is None
    assert chip.advance_counter(2) == 2
    assert chip.advance_counter(1) == 2  # asking for less changes nothing
    assert chip.counter() == 2
    assert chip.advance_counter(3) == 3
    with pytest.raises(UsageError):
        chip.advance_counter(-1)


def test_bad_pcr_lists_are_refused() -> None:
    for bad in ([], [24], [7, 7]):
        with pytest.raises(UsageError):
            tpm.pcr_selection(bad)
    assert tpm.pcr_selection([7, 0]) == "sha256:0,7"

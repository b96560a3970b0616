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


def _extend(chip: tpm.Tpm, digest: bytes) -> None:
    subprocess.run(
        ["tpm2_pcrextend", f"7:sha256={digest.hex()}"],
        env={"TPM2TOOLS_TCTI": chip.env["TPM2TOOLS_TCTI"], "PATH": "/usr/bin:/bin"},
        check=True,
    )


def test_a_key_sealed_to_two_pcr7_values_unseals_at_either_and_at_no_other(
    chip: tpm.Tpm, tmp_path: Path
) -> None:
    """A PolicyOR of the current PCR 7 and a predicted one (the value after one more
    extension): the key unseals now and after that extension, and not after another."""
    import hashlib

    pub, priv = tmp_path / "sealed.pub", tmp_path / "sealed.priv"
    current = chip.pcr_values()[7]
    event = hashlib.sha256(b"a db append").digest()
    predicted = hashlib.sha256(current + event).digest()
    branches = chip.seal(b"state key", pub, priv, values=[current, predicted])
    assert len(branches) == 2 and all(len(b) == 32 for b in branches)
    assert chip.unseal(pub, priv, branches=branches) == b"state key"
    with pytest.raises(tpm.TpmPolicyError):
        chip.unseal(pub, priv)  # without the branches the policy is not the sealed one
    _extend(chip, event)
    assert chip.pcr_values()[7] == predicted
    assert chip.unseal(pub, priv, branches=branches) == b"state key"
    _extend(chip, event)
    with pytest.raises(tpm.TpmPolicyError):
        chip.unseal(pub, priv, branches=branches)


def test_a_key_sealed_to_one_given_value_unseals_only_there(chip: tpm.Tpm, tmp_path: Path) -> None:
    import hashlib

    pub, priv = tmp_path / "sealed.pub", tmp_path / "sealed.priv"
    event = hashlib.sha256(b"next").digest()
    predicted = hashlib.sha256(chip.pcr_values()[7] + event).digest()
    assert chip.seal(b"state key", pub, priv, values=[predicted]) == []
    with pytest.raises(tpm.TpmPolicyError):
        chip.unseal(pub, priv)
    _extend(chip, event)
    assert chip.unseal(pub, priv) == b"state key"


def test_power_cuts_after_unsealing_never_lock_the_state_key_out(tmp_path: Path) -> None:
    """Each power cut after an unseal is an unorderly shutdown, which dictionary-attack
    protection counts against DA-protected keys: with a DA-protected primary, swtpm
    (maxTries 3) refused to load the sealed key after the third, found by the testbed's
    power cuts. The primary is noda: ten cuts, and the key still unseals."""
    from rampart.testbed.services.swtpm import Swtpm

    with Swtpm(tmp_path / "swtpm") as swtpm:
        chip = swtpm.tpm
        env = {**chip.env, "PATH": "/usr/bin:/bin"}
        pub, priv = tmp_path / "sealed.pub", tmp_path / "sealed.priv"
        chip.seal(b"state key", pub, priv)
        for _ in range(10):
            assert chip.unseal(pub, priv) == b"state key"
            ctrl = f"127.0.0.1:{swtpm.ctrl_port}"
            subprocess.run(["swtpm_ioctl", "--tcp", ctrl, "-i"], env=env, check=True)
            subprocess.run(["tpm2_startup", "-c"], env=env, check=True, capture_output=True)
        assert chip.unseal(pub, priv) == b"state key"


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

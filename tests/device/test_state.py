"""rampart.device.state on the host: the LUKS2 state volume's keyslots, the sealed key on
the ESP, and resealing, with the real cryptsetup and a real swtpm.

The host has no device-mapper, so these volumes are LUKS2 without integrity
(cryptsetup formats and manages keyslots of an image file without it); the
integrity format, opening and the boot-time unlock run in the testbed guests
(tests/testbed/test_scenarios.py)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from rampart import run
from rampart.device import state, tpm
from rampart.errors import LocalError


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, bytes, str]:
    path = tmp_path / "state.img"
    with path.open("wb") as handle:
        handle.truncate(32 << 20)
    key, passphrase = state.new_key(), state.new_recovery_passphrase()
    state.format_volume(path, key, passphrase, integrity=False)
    return path, key, passphrase


def test_recovery_passphrase_is_eight_groups_of_modhex() -> None:
    phrase = state.new_recovery_passphrase()
    assert re.fullmatch(r"[cbdefghijklnrtuv]{8}(-[cbdefghijklnrtuv]{8}){7}", phrase)
    assert state.new_recovery_passphrase() != phrase


def test_key_opens_slot_0_and_passphrase_slot_1(volume: tuple[Path, bytes, str]) -> None:
    path, key, passphrase = volume
    assert state.opens(path, key, tpm.TPM_KEYSLOT)
    assert state.opens(path, passphrase.encode(), tpm.RECOVERY_KEYSLOT)
    assert not state.opens(path, passphrase.encode(), tpm.TPM_KEYSLOT)
    assert not state.opens(path, key, tpm.RECOVERY_KEYSLOT)
    dump = run.run(["cryptsetup", "luksDump", str(path)]).stdout.decode()
    assert "Version:       \t2" in dump
    assert state.CIPHER in dump


def test_secrets_never_appear_on_a_command_line(
    volume: tuple[Path, bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, key, passphrase = volume
    seen: list[tuple[str, ...]] = []
    real = run.run

    def spy(argv: list[str], **kwargs: object) -> run.Completed:
        seen.append(tuple(argv))
        return real(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(run, "run", spy)
    state.add_secret(path, key, b"another passphrase", 2, recovery=False)
    flat = " ".join(" ".join(a) for a in seen)
    assert passphrase not in flat and "another passphrase" not in flat
    assert key.hex() not in flat


def test_sealed_key_on_the_esp_unseals_to_the_key(chip: tpm.Tpm, tmp_path: Path) -> None:
    key = state.new_key()
    esp = tmp_path / "esp"
    state.seal_to_esp(chip, key, esp, (7,))
    pub, priv, pcrs = state.sealed_paths(esp)
    assert pcrs.read_text() == "sha256:7\n"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert not (pub.parent / ".new").exists()
    assert chip.unseal(pub, priv, (7,)) == key


def test_reseal_replaces_slot_0_with_a_new_sealed_key(
    chip: tpm.Tpm, tmp_path: Path, volume: tuple[Path, bytes, str]
) -> None:
    path, old_key, passphrase = volume
    esp = tmp_path / "esp"
    state.seal_to_esp(chip, old_key, esp, (7,))
    # The Secure Boot state changes: PCR 7 is extended, the old object no longer unseals.
    run.run(["tpm2_pcrextend", "7:sha256=" + "11" * 32], env=chip.env)
    pub, priv, _ = state.sealed_paths(esp)
    with pytest.raises(tpm.TpmPolicyError):
        chip.unseal(pub, priv, (7,))

    state.reseal(path, esp, chip, passphrase, (7,))

    new_key = chip.unseal(pub, priv, (7,))
    assert new_key != old_key
    assert state.opens(path, new_key, tpm.TPM_KEYSLOT)
    assert not state.opens(path, old_key, tpm.TPM_KEYSLOT)
    assert state.opens(path, passphrase.encode(), tpm.RECOVERY_KEYSLOT)


def test_reseal_with_a_wrong_passphrase_changes_nothing(
    chip: tpm.Tpm, tmp_path: Path, volume: tuple[Path, bytes, str]
) -> None:
    path, key, _ = volume
    esp = tmp_path / "esp"
    state.seal_to_esp(chip, key, esp, (7,))
    pub, priv, _ = state.sealed_paths(esp)
    before = (pub.read_bytes(), priv.read_bytes(), path.read_bytes()[: 1 << 20])
    with pytest.raises(LocalError, match="recovery passphrase does not open"):
        state.reseal(path, esp, chip, "wrong-passphrase", (7,))
    assert (pub.read_bytes(), priv.read_bytes(), path.read_bytes()[: 1 << 20]) == before
    assert chip.unseal(pub, priv, (7,)) == key


def test_secret_file_lives_in_memory_only() -> None:
    with run.secret_file(b"s3cret") as (fd, path):
        assert path == f"/proc/self/fd/{fd}"
        target = str(Path(f"/proc/self/fd/{fd}").readlink())
        assert target.startswith("/memfd:rampart-secret")
        assert Path(path).read_bytes() == b"s3cret"
    with pytest.raises(OSError):
        os.fstat(fd)


# --- the `rampart tpm` verbs --------------------------------------------------------------


def _device_files(tmp_path: Path, tcti: str) -> list[str]:
    from rampart.contracts import signing

    config = tmp_path / "config"
    config.mkdir()
    (config / "pubkey").write_bytes(signing.generate_secret_key().public_key.to_bytes())
    (config / "config.toml").write_text(
        'os_name = "clipos"\n'
        '[core]\ndestination = "mainvg"\n'
        f'[efiboot]\ndestination = "{tmp_path}/esp/EFI/Linux"\n'
        f'[tpm]\ntcti = "{tcti}"\npcrs = [7]\n'
    )
    (tmp_path / "os-release").write_text("VERSION_ID=1.0.0\n")
    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    return [
        "-c",
        str(config),
        "--os-release",
        str(tmp_path / "os-release"),
        "--machine-id",
        str(tmp_path / "machine-id"),
    ]


def _rampart(*argv: str, stdin: bytes = b"") -> run.Completed:
    import sys

    return run.run([sys.executable, "-m", "rampart", *argv], input=stdin, check=False)


def test_tpm_reseal_verb_takes_the_passphrase_on_stdin(
    chip: tpm.Tpm, tmp_path: Path, volume: tuple[Path, bytes, str]
) -> None:
    path, key, passphrase = volume
    device = _device_files(tmp_path, chip.env["TPM2TOOLS_TCTI"])
    esp = tmp_path / "esp"
    state.seal_to_esp(chip, key, esp, (7,))
    run.run(["tpm2_pcrextend", "7:sha256=" + "22" * 32], env=chip.env)

    before = json.loads(_rampart("tpm", "status", "--json", *device).stdout)
    assert before["unseals"] is False
    assert "PCR sha256:7 differs" in before["unseal_error"]
    assert before["sealed_to"] == "sha256:7"

    wrong = _rampart("tpm", "reseal", "--volume", str(path), *device, stdin=b"nope\n")
    assert wrong.returncode == 3
    assert wrong.stderr.decode().strip().splitlines() == [
        f"rampart: error: {path}: the recovery passphrase does not open the state partition"
    ]
    done = _rampart(
        "tpm", "reseal", "--volume", str(path), *device, stdin=passphrase.encode() + b"\n"
    )
    assert done.returncode == 0, done.stderr
    assert "resealed to the current PCR sha256:7" in done.stdout.decode()
    after = json.loads(_rampart("tpm", "status", "--json", *device).stdout)
    assert after["unseals"] is True
    assert passphrase not in done.stdout.decode() + done.stderr.decode()


def test_tpm_status_without_a_tpm_says_so(tmp_path: Path) -> None:
    device = _device_files(tmp_path, f"device:{tmp_path}/no-such-tpm")
    done = _rampart("tpm", "status", "--json", *device)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tpm"] is False
    assert report["rollback_counter"] is None
    assert report["sealed_object"] is None
    reseal = _rampart("tpm", "reseal", "--volume", str(tmp_path / "x"), *device, stdin=b"p\n")
    assert reseal.returncode == 3
    assert "no TPM" in reseal.stderr.decode()

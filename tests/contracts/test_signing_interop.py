"""Interoperability with the real minisign 0.11 binary (Debian package), both ways."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rampart.contracts import signing
from tests.conftest import KeyPair, run_cli, run_tool

pytestmark = pytest.mark.interop


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "clipos-core"
    path.write_bytes(os.urandom(2_000_000))
    return path


@pytest.fixture
def minisign_keys(tmp_path: Path, minisign: str) -> tuple[Path, Path]:
    """An unencrypted minisign key pair made by the minisign tool."""
    pub, key = tmp_path / "ms.pub", tmp_path / "ms.key"
    done = run_tool([minisign, "-G", "-W", "-p", pub, "-s", key])
    assert done.returncode == 0, done.stderr
    return pub, key


def test_rampart_signature_verifies_with_minisign(
    keypair: KeyPair, payload: Path, minisign: str
) -> None:
    result = run_cli("sign", payload, "--secret-key", keypair.secret, "--version", "5.0.0-beta.1")
    assert result.code == 0, result.err
    done = run_tool([minisign, "-V", "-p", keypair.public, "-m", payload, "-x", f"{payload}.sig"])
    assert done.returncode == 0, done.stderr
    assert b"Trusted comment: 5.0.0-beta.1\n" in done.stdout
    # -H makes minisign insist on a prehashed signature: ours is one.
    done = run_tool(
        [minisign, "-V", "-H", "-p", keypair.public, "-m", payload, "-x", f"{payload}.sig"]
    )
    assert done.returncode == 0, done.stderr


def test_minisign_rejects_rampart_signature_on_tampered_file(
    keypair: KeyPair, payload: Path, minisign: str
) -> None:
    assert run_cli("sign", payload, "--secret-key", keypair.secret, "--version", "1.0.0").code == 0
    with payload.open("r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 1]))
    done = run_tool([minisign, "-V", "-p", keypair.public, "-m", payload, "-x", f"{payload}.sig"])
    assert done.returncode != 0


@pytest.mark.parametrize("legacy", [False, True], ids=["prehashed", "legacy"])
def test_minisign_signature_verifies_with_rampart(
    minisign_keys: tuple[Path, Path], payload: Path, minisign: str, legacy: bool
) -> None:
    pub, key = minisign_keys
    argv: list[str | Path] = [minisign, "-S", "-s", key, "-m", payload, "-t", "1.0.1"]
    if legacy:
        argv.insert(2, "-l")
    done = run_tool(argv)
    assert done.returncode == 0, done.stderr
    sig = Path(f"{payload}.minisig")
    assert signing.load_signature(sig).prehashed is not legacy
    result = run_cli("verify", payload, "--public-key", pub, "--version", "1.0.1", "--json")
    assert result.code == 0, result.err
    assert '"version": "1.0.1"' in result.out
    assert ('"algorithm": "legacy"' in result.out) is legacy


def test_minisign_default_trusted_comment_is_printed_as_is(
    minisign_keys: tuple[Path, Path], payload: Path, minisign: str
) -> None:
    pub, key = minisign_keys
    assert run_tool([minisign, "-S", "-s", key, "-m", payload]).returncode == 0
    result = run_cli("verify", payload, "--public-key", pub)
    assert result.code == 0, result.err
    assert result.out.startswith("timestamp:")
    assert f"file:{payload.name}" in result.out
    # ... but it is not the version an update requires.
    result = run_cli("verify", payload, "--public-key", pub, "--version", "1.0.0")
    assert result.code == 11


def test_rampart_signs_with_a_minisign_encrypted_key(
    tmp_path: Path, payload: Path, minisign: str
) -> None:
    pub, key = tmp_path / "enc.pub", tmp_path / "enc.key"
    done = run_tool([minisign, "-G", "-p", pub, "-s", key], stdin=b"s3cret\ns3cret\n")
    assert done.returncode == 0, done.stderr
    result = run_cli(
        "sign",
        payload,
        "--secret-key",
        key,
        "--version",
        "2.0.0",
        env={"RAMPART_PASSWORD": "s3cret"},
    )
    assert result.code == 0, result.err
    done = run_tool([minisign, "-V", "-p", pub, "-m", payload, "-x", f"{payload}.sig"])
    assert done.returncode == 0, done.stderr
    assert b"Trusted comment: 2.0.0" in done.stdout


def test_minisign_signs_with_a_rampart_key(tmp_path: Path, payload: Path, minisign: str) -> None:
    """Our encrypted key file (minisign's own scrypt parameters) loads in minisign."""
    pub, key = tmp_path / "r.pub", tmp_path / "r.key"
    result = run_cli(
        "keygen", "--secret-key", key, "--public-key", pub, env={"RAMPART_PASSWORD": "pw"}
    )
    assert result.code == 0, result.err
    done = run_tool([minisign, "-S", "-s", key, "-m", payload, "-t", "3.0.0"], stdin=b"pw\n")
    assert done.returncode == 0, done.stderr + done.stdout
    result = run_cli("verify", payload, "--public-key", pub, "--version", "3.0.0")
    assert result.code == 0, result.err


def test_minisign_signs_with_a_rampart_unencrypted_key(
    keypair: KeyPair, payload: Path, minisign: str
) -> None:
    done = run_tool([minisign, "-S", "-s", keypair.secret, "-m", payload, "-t", "4.0.0"])
    assert done.returncode == 0, done.stderr + done.stdout
    result = run_cli("verify", payload, "--public-key", keypair.public, "--version", "4.0.0")
    assert result.code == 0, result.err


def test_minisign_public_key_loads_in_rampart(minisign_keys: tuple[Path, Path]) -> None:
    pub, _ = minisign_keys
    key = signing.load_public_key(pub)
    assert pub.read_text().splitlines()[0].endswith(key.key_id)

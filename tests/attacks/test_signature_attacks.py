"""Attacks on signed releases. Each test is named after the attack it stops and
checks both the error and that nothing was accepted."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from rampart.contracts import signing
from rampart.contracts.version import parse_version
from rampart.errors import FormatError, VerificationError
from rampart.release import webroot
from tests.conftest import KeyPair, run_cli

Payloads = dict[str, tuple[Path, Path]]


@pytest.fixture
def release(tmp_path: Path, keypair: KeyPair, payloads: Payloads) -> Path:
    root = tmp_path / "webroot"
    for version in ("1.0.0", "1.0.1"):
        core, efiboot = payloads[version]
        webroot.publish(root, "clipos", parse_version(version), core, efiboot, keypair.key)
    return root


def verify(root: Path, version: str, keypair: KeyPair, kind: str = "core") -> int:
    payload = root / "dist" / version / f"clipos-{kind}"
    return run_cli("verify", payload, "--public-key", keypair.public, "--version", version).code


def test_tampered_payload(release: Path, keypair: KeyPair) -> None:
    core = release / "dist/1.0.1/clipos-core"
    data = bytearray(core.read_bytes())
    data[len(data) // 2] ^= 0x01
    core.write_bytes(bytes(data))
    assert verify(release, "1.0.1", keypair) == 11


def test_tampered_trusted_comment(release: Path, keypair: KeyPair) -> None:
    """Rewriting the version in the trusted comment breaks the global signature."""
    sig = release / "dist/1.0.0/clipos-core.sig"
    sig.write_bytes(sig.read_bytes().replace(b"trusted comment: 1.0.0", b"trusted comment: 1.0.1"))
    with pytest.raises(VerificationError, match="trusted comment signature"):
        signing.verify_file(
            release / "dist/1.0.0/clipos-core", signing.load_signature(sig), keypair.key.public_key
        )


def test_downgrade_by_replaying_an_old_release_under_a_new_version(
    release: Path, keypair: KeyPair
) -> None:
    """An attacker serves 1.0.0's validly signed payload as 1.0.1: the version differs."""
    for name in ("clipos-core", "clipos-core.sig"):
        (release / "dist/1.0.1" / name).write_bytes((release / "dist/1.0.0" / name).read_bytes())
    assert verify(release, "1.0.1", keypair) == 11
    problems = webroot.audit(release, keypair.key.public_key)
    assert any("trusted comment is '1.0.0'" in p for p in problems)


def test_signature_by_another_key(release: Path, keypair: KeyPair, other_keypair: KeyPair) -> None:
    core = release / "dist/1.0.1/clipos-core"
    forged = signing.sign_file(core, other_keypair.key, "1.0.1")
    core.with_name("clipos-core.sig").write_bytes(forged.to_bytes())
    assert verify(release, "1.0.1", keypair) == 11


def test_forged_key_id(release: Path, keypair: KeyPair, other_keypair: KeyPair) -> None:
    """A signature by another key that claims the vendor's key id still fails."""
    core = release / "dist/1.0.1/clipos-core"
    forged = signing.sign_file(core, other_keypair.key, "1.0.1")
    relabelled = signing.Signature(
        forged.algorithm,
        keypair.key.keynum,
        forged.signature,
        forged.trusted_comment,
        forged.global_signature,
    )
    core.with_name("clipos-core.sig").write_bytes(relabelled.to_bytes())
    assert verify(release, "1.0.1", keypair) == 11


def test_signature_swapped_between_payloads(release: Path, keypair: KeyPair) -> None:
    """The efiboot signature does not cover the core, even within one release."""
    d = release / "dist/1.0.1"
    (d / "clipos-core.sig").write_bytes((d / "clipos-efiboot.sig").read_bytes())
    assert verify(release, "1.0.1", keypair) == 11


def test_algorithm_downgrade_from_prehashed_to_legacy(release: Path, keypair: KeyPair) -> None:
    """Relabelling an ED signature as Ed makes it cover the raw file: it fails."""
    sig_path = release / "dist/1.0.1/clipos-core.sig"
    lines = sig_path.read_bytes().split(b"\n")
    raw = base64.b64decode(lines[1])
    lines[1] = base64.b64encode(b"Ed" + raw[2:])
    sig_path.write_bytes(b"\n".join(lines))
    assert verify(release, "1.0.1", keypair) == 11


def test_truncated_signature(release: Path, keypair: KeyPair) -> None:
    sig_path = release / "dist/1.0.1/clipos-core.sig"
    sig_path.write_bytes(sig_path.read_bytes()[:50])
    assert verify(release, "1.0.1", keypair) == 10


def test_signature_with_a_trailing_extra_signature_line(release: Path, keypair: KeyPair) -> None:
    """Junk appended after the four lines is ignored as minisign does, not trusted."""
    sig_path = release / "dist/1.0.1/clipos-core.sig"
    sig_path.write_bytes(sig_path.read_bytes() + b"trusted comment: 9.9.9\n")
    result = run_cli("verify", release / "dist/1.0.1/clipos-core", "--public-key", keypair.public)
    assert (result.code, result.out) == (0, "1.0.1\n")


def test_oversized_signature_file(release: Path, keypair: KeyPair) -> None:
    sig_path = release / "dist/1.0.1/clipos-core.sig"
    sig_path.write_bytes(b"untrusted comment: " + b"A" * (1 << 20))
    with pytest.raises(FormatError, match="larger than"):
        signing.load_signature(sig_path)

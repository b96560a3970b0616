"""Keys and signatures: round trips, tolerance the minisign tool has, and refusals."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from rampart import files
from rampart.contracts import signing
from rampart.errors import FormatError, LocalError, VerificationError
from tests.conftest import KeyPair

FAST_OPS, FAST_MEM = 32768, 1 << 24  # cheap scrypt for unit tests (N=2^14)


def test_sign_and_verify_round_trip(keypair: KeyPair, tmp_path: Path) -> None:
    payload = tmp_path / "core"
    payload.write_bytes(b"x" * 3_000_000)
    signature = signing.sign_file(payload, keypair.key, "1.2.3")
    assert signature.prehashed
    assert signature.trusted_comment == b"1.2.3"
    parsed = signing.parse_signature(signature.to_bytes())
    assert parsed == signature
    signing.verify_file(payload, parsed, signing.load_public_key(keypair.public))


def test_encrypted_secret_key_round_trip() -> None:
    key = signing.generate_secret_key()
    data = signing.secret_key_to_bytes(key, b"correct horse", FAST_OPS, FAST_MEM)
    assert b"encrypted" in data.splitlines()[0]
    raw = base64.b64decode(data.splitlines()[1])
    assert raw[2:4] == b"Sc"
    assert key.seed not in raw
    loaded = signing.parse_secret_key(data, "k", lambda: b"correct horse")
    assert loaded == key


def test_wrong_password_is_a_local_error_naming_the_file() -> None:
    key = signing.generate_secret_key()
    data = signing.secret_key_to_bytes(key, b"right", FAST_OPS, FAST_MEM)
    with pytest.raises(LocalError, match=r"vendor\.key: wrong password"):
        signing.parse_secret_key(data, "vendor.key", lambda: b"wrong")


def test_unencrypted_key_does_not_ask_for_a_password() -> None:
    key = signing.generate_secret_key()
    data = signing.secret_key_to_bytes(key, None)

    def no_password() -> bytes:
        raise AssertionError("asked for a password")

    assert signing.parse_secret_key(data, "k", no_password) == key


def test_minisign_011_unencrypted_key_with_zero_checksum_is_accepted() -> None:
    key = signing.generate_secret_key()
    lines = signing.secret_key_to_bytes(key, None).splitlines()
    raw = bytearray(base64.b64decode(lines[1]))
    raw[-32:] = bytes(32)  # minisign 0.11 -W writes an all-zero checksum
    data = lines[0] + b"\n" + base64.b64encode(bytes(raw)) + b"\n"
    assert signing.parse_secret_key(data, "k", lambda: b"") == key


def test_corrupted_unencrypted_key_is_refused() -> None:
    key = signing.generate_secret_key()
    lines = signing.secret_key_to_bytes(key, None).splitlines()
    raw = bytearray(base64.b64decode(lines[1]))
    raw[70] ^= 1
    data = lines[0] + b"\n" + base64.b64encode(bytes(raw)) + b"\n"
    with pytest.raises(FormatError, match="k: secret key"):
        signing.parse_secret_key(data, "k", lambda: b"")


def test_public_key_comment_uses_minisign_key_id(keypair: KeyPair) -> None:
    text = keypair.public.read_text()
    key_id = format(int.from_bytes(keypair.key.keynum, "little"), "X")
    assert text.splitlines()[0] == f"untrusted comment: minisign public key {key_id}"


def test_parser_tolerates_crlf_missing_newline_and_extra_lines(
    keypair: KeyPair, tmp_path: Path
) -> None:
    payload = tmp_path / "f"
    payload.write_bytes(b"data")
    raw = signing.sign_file(payload, keypair.key, "2.0.0").to_bytes()
    public = signing.load_public_key(keypair.public)
    for variant in (
        raw.replace(b"\n", b"\r\n"),
        raw.rstrip(b"\n"),
        raw + b"extra line\n",
    ):
        signing.verify_file(payload, signing.parse_signature(variant), public)


def test_legacy_signature_verifies(keypair: KeyPair, tmp_path: Path) -> None:
    payload = tmp_path / "f"
    payload.write_bytes(b"legacy data")
    signature = keypair.key.sign_message(payload.read_bytes(), b"1.0.0", prehashed=False)
    assert signature.algorithm == b"Ed"
    signing.verify_file(payload, signature, keypair.key.public_key)


def test_key_id_mismatch_names_both_keys(
    keypair: KeyPair, other_keypair: KeyPair, tmp_path: Path
) -> None:
    payload = tmp_path / "f"
    payload.write_bytes(b"data")
    signature = signing.sign_file(payload, keypair.key, "1.0.0")
    with pytest.raises(VerificationError, match=other_keypair.key.public_key.key_id):
        signing.verify_file(payload, signature, other_keypair.key.public_key)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"", "truncated"),
        (lambda b: b.split(b"\n")[0] + b"\n", "truncated"),
        (lambda b: b.replace(b"untrusted comment: ", b"comment: ", 1), "untrusted comment"),
        (lambda b: b.replace(b"trusted comment: 1", b"trustedcomment: 1", 1), "trusted comment"),
        (lambda b: b.replace(b"\n", b"\n!", 1), "base64"),
        (lambda b: b.replace(b"\nRU", b"\nRX", 1), "algorithm|base64"),
    ],
)
def test_malformed_signatures_raise_format_error(
    keypair: KeyPair, tmp_path: Path, mutate: object, reason: str
) -> None:
    payload = tmp_path / "f"
    payload.write_bytes(b"data")
    raw = signing.sign_file(payload, keypair.key, "1.0.0").to_bytes()
    assert callable(mutate)
    with pytest.raises(FormatError, match=reason):
        signing.parse_signature(mutate(raw), "f.sig")


def test_overlong_trusted_comment_is_refused() -> None:
    sig = b"untrusted comment: x\n" + base64.b64encode(b"ED" + bytes(72)) + b"\n"
    sig += b"trusted comment: " + b"a" * 9000 + b"\n" + base64.b64encode(bytes(64)) + b"\n"
    with pytest.raises(FormatError, match="longer than"):
        signing.parse_signature(sig, "s")


def test_non_utf8_trusted_comment_is_refused_when_read_as_text() -> None:
    sig = signing.Signature(b"ED", bytes(8), bytes(64), b"\xff\xfe", bytes(64))
    parsed = signing.parse_signature(sig.to_bytes(), "s")
    with pytest.raises(FormatError, match="UTF-8"):
        parsed.trusted_text("s")


def test_write_new_file_never_overwrites_and_uses_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    files.write_new_file(path, b"a", 0o600)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(LocalError, match="already exists"):
        files.write_new_file(path, b"b", 0o600)
    assert path.read_bytes() == b"a"


def test_scrypt_parameters_match_libsodium_for_minisign_and_rsign_defaults() -> None:
    assert signing._scrypt_params(33554432, 1073741824) == (1 << 20, 8, 1)
    assert signing._scrypt_params(1 << 20, 1 << 25) == (1 << 15, 8, 1)


@pytest.mark.parametrize(("length", "ok"), [(1022, True), (1023, False)])
def test_comment_line_limit_matches_minisign(length: int, ok: bool) -> None:
    """minisign reads a comment line into 1024 bytes with fgets: 1022 bytes + newline."""
    key = signing.generate_secret_key().public_key
    line = b"untrusted comment: " + b"a" * (length - len(b"untrusted comment: "))
    data = line + b"\n" + key.to_base64().encode() + b"\n"
    if ok:
        assert signing.parse_public_key(data) == key
    else:
        with pytest.raises(FormatError, match="longer than 1022 bytes"):
            signing.parse_public_key(data)

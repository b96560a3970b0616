"""Signed requests (rampart.contracts.identity): the header format, the TPM quote
(TPMS_ATTEST) parser, and what verification refuses. Quotes here are made by a real
swtpm (tests/device/test_identity.py makes them through the device's code too)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from rampart.contracts import identity as contract
from rampart.contracts.layout import IDENTITY_HANDLE
from rampart.device import tpm
from rampart.errors import FormatError, VerificationError
from tests.conftest import start_swtpm

MID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def chips(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tpm.Tpm, tpm.Tpm]]:
    """Two machines' TPMs, each with its identity key."""
    root = tmp_path_factory.mktemp("chips")
    with_first = start_swtpm(root / "a")
    with_second = start_swtpm(root / "b")
    first, second = next(with_first), next(with_second)
    first.ensure_identity()
    second.ensure_identity()
    yield first, second
    for generator in (with_first, with_second):
        next(generator, None)


def _base(counter: int = 5, pcr7: bytes | None = None, body: bytes = b"") -> bytes:
    return contract.signature_base("version", "clipos", MID, "1.0.0", counter, "-", 2, pcr7, body)


def _signed(chip: tpm.Tpm) -> tuple[bytes, contract.Auth, bytes]:
    """(the chip's key, a quoted auth for the base, the base)."""
    pcr7 = chip.pcr_values((7,))[7]
    base = _base(pcr7=pcr7)
    quote, signature, quoted = chip.quote(hashlib.sha256(base).digest())
    key = chip.identity_key()
    assert key is not None and quoted == pcr7
    return key, contract.Auth(5, "-", 2, pcr7, quote, signature), base


def test_a_quote_verifies_and_its_fields_parse(chips: tuple[tpm.Tpm, tpm.Tpm]) -> None:
    key, auth, base = _signed(chips[0])
    verified = contract.verify(key, auth, base)
    assert verified.kind == contract.TPM_KEY and verified.pcr7 == auth.pcr7
    assert auth.quote is not None
    quote = contract.parse_quote(auth.quote)
    assert quote.extra == hashlib.sha256(base).digest()
    assert quote.selection == ((contract.TPM_ALG_SHA256, (7,)),)
    assert contract.parse_auth(auth.render()) == auth


def test_attestation_with_another_device_s_key_is_refused(chips: tuple[tpm.Tpm, tpm.Tpm]) -> None:
    """A quote from machine B presented with machine A's enrolled key."""
    key_a = chips[0].identity_key()
    _, auth_b, base = _signed(chips[1])
    assert key_a is not None
    with pytest.raises(VerificationError, match="bad quote signature"):
        contract.verify(key_a, auth_b, base)


def test_attestation_with_a_wrong_pcr7_is_refused(chips: tuple[tpm.Tpm, tpm.Tpm]) -> None:
    """A device that claims another PCR 7 value than the one its TPM quoted (a known
    good one, say): the base names the claim, and the quote's digest the truth."""
    key, auth, _ = _signed(chips[0])
    claimed = b"\x11" * 32
    lying = contract.Auth(auth.counter, auth.nonce, auth.epoch, claimed, auth.quote, auth.signature)
    with pytest.raises(VerificationError, match="made for another request"):
        contract.verify(key, lying, _base(pcr7=claimed))
    # ... and had it quoted with the lie in the base, the digest would still be the TPM's.
    chip = chips[0]
    quote, signature, _ = chip.quote(hashlib.sha256(_base(pcr7=claimed)).digest())
    forged = contract.Auth(5, "-", 2, claimed, quote, signature)
    with pytest.raises(VerificationError, match="PCR 7 is not the value the TPM quoted"):
        contract.verify(key, forged, _base(pcr7=claimed))


def test_a_replayed_quote_does_not_sign_another_request(chips: tuple[tpm.Tpm, tpm.Tpm]) -> None:
    """The same quote under a higher counter (or another nonce) is another request."""
    key, auth, _ = _signed(chips[0])
    with pytest.raises(VerificationError, match="made for another request"):
        contract.verify(key, auth, _base(counter=6, pcr7=auth.pcr7))


def test_a_quote_of_other_pcrs_is_refused(chips: tuple[tpm.Tpm, tpm.Tpm], tmp_path: Path) -> None:
    chip = chips[0]
    key = chip.identity_key()
    assert key is not None
    pcr7 = chip.pcr_values((7,))[7]
    base = _base(pcr7=pcr7)
    chip._tool(
        "tpm2_quote", "-Q", "-c", hex(IDENTITY_HANDLE), "-l", "sha256:0,7",
        "-q", hashlib.sha256(base).hexdigest(), "-g", "sha256", "-f", "plain",
        "-m", str(tmp_path / "quote"), "-s", str(tmp_path / "sig"),
    )  # fmt: skip
    quote, signature = (tmp_path / "quote").read_bytes(), (tmp_path / "sig").read_bytes()
    auth = contract.Auth(5, "-", 2, pcr7, quote, signature)
    with pytest.raises(VerificationError, match="covers other PCRs than sha256:7"):
        contract.verify(key, auth, base)


def test_a_tampered_quote_is_refused(chips: tuple[tpm.Tpm, tpm.Tpm]) -> None:
    key, auth, base = _signed(chips[0])
    assert auth.quote is not None
    bent = bytearray(auth.quote)
    bent[-1] ^= 1  # the PCR digest
    tampered = contract.Auth(5, "-", 2, auth.pcr7, bytes(bent), auth.signature)
    with pytest.raises(VerificationError, match="bad quote signature"):
        contract.verify(key, tampered, base)
    with pytest.raises(FormatError, match="not made by a TPM"):
        contract.parse_quote(b"\x00" * 60)
    with pytest.raises(FormatError, match="truncated"):
        contract.parse_quote(auth.quote[:-3])
    with pytest.raises(FormatError, match="bytes after"):
        contract.parse_quote(auth.quote + b"\x00")


def test_a_tpm_key_request_without_a_quote_is_refused(chips: tuple[tpm.Tpm, tpm.Tpm]) -> None:
    key, auth, base = _signed(chips[0])
    bare = contract.Auth(5, "-", 2, None, None, auth.signature)
    with pytest.raises(VerificationError, match="signs quotes, and none was sent"):
        contract.verify(key, bare, base)


def test_file_keys_sign_the_base_and_attest_nothing() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    base = _base()
    auth = contract.Auth(5, "-", 2, None, None, private.sign(base))
    assert contract.verify(spki, auth, base).pcr7 is None
    with pytest.raises(VerificationError, match="bad signature"):
        contract.verify(spki, auth, _base(counter=6))
    with pytest.raises(VerificationError, match="attests nothing"):
        contract.verify(spki, contract.Auth(5, "-", 2, b"\0" * 32, b"q", auth.signature), base)


def test_libsodium_and_openssl_give_the_same_verdicts() -> None:
    """The Ed25519 check a server makes (libsodium when PyNaCl is there) says what
    OpenSSL's says: a good signature holds; another message, a flipped bit, another
    key, a signature cut short or made longer do not."""
    private, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    base = _base()
    good = private.sign(base)
    flipped = bytes([good[0] ^ 1]) + good[1:]
    high_s = good[:32] + bytes([good[32]]) + good[33:63] + bytes([good[63] | 0xF0])
    cases = [
        (good, base, True),
        (good, _base(counter=6), False),
        (flipped, base, False),
        (other.sign(base), base, False),
        (good[:63], base, False),
        (good + b"\0", base, False),
        (good[:63], bytes([good[63]]) + base, False),  # the cut byte moved to the message
        (high_s, base, False),  # S >= L: not canonical
    ]
    sodium = contract._ed25519_verifier()
    assert sodium is not contract._cryptography_verify  # PyNaCl is a dependency
    for signature, message, holds in cases:
        verdicts = {
            "libsodium": sodium(raw, signature, message),
            "OpenSSL": contract._cryptography_verify(raw, signature, message),
        }
        assert verdicts == {"libsodium": holds, "OpenSSL": holds}, (signature.hex(), holds)


def test_only_p256_and_ed25519_keys_are_device_keys() -> None:
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    spki = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(FormatError, match="neither ECC P-256"):
        contract.load_key(spki)
    with pytest.raises(FormatError, match="not a DER"):
        contract.load_key(b"\x30\x03abc")
    with pytest.raises(FormatError, match="not base64"):
        contract.decode_key("@@@")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("v=2;c=1;n=-;e=-;p=-;q=-;s=AA==", "version"),
        ("v=1;c=1;n=-;e=-;p=-;s=AA==", "expected fields"),
        ("v=1;c=x;n=-;e=-;p=-;q=-;s=AA==", "counter is not a number"),
        ("v=1;c=99999999999999999999;n=-;e=-;p=-;q=-;s=AA==", "counter is not a number"),
        ("v=1;c=1;n=A B;e=-;p=-;q=-;s=AA==", "nonce"),
        ("v=1;c=1;n=-;e=-;p=ABCD;q=-;s=AA==", "PCR 7"),
        ("v=1;c=1;n=-;e=-;p=-;q=-;s=!!", "signature is not base64"),
        ("v=1;c=1;n=-;e=-;p=-;q=-;s=", "signature of 0 bytes"),
        ("v=1;c=1;n=-;e=-;p=-;q=-;s=AA==;x=1", "expected fields"),
        ("x" * 3000, "longer than"),
    ],
)
def test_a_malformed_auth_header_is_one_clear_line(header: str, reason: str) -> None:
    with pytest.raises(FormatError, match=reason):
        contract.parse_auth(header)

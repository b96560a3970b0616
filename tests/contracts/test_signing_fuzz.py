"""Fuzzing the parsers: no input raises anything but the project's own errors."""

from __future__ import annotations

import base64
import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rampart.contracts import signing
from rampart.errors import FormatError, LocalError, RampartError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _lines_around(raw: bytes, prefix: bytes) -> bytes:
    return prefix + b"\n" + base64.b64encode(raw) + b"\n"


@FUZZ
@given(st.binary(max_size=600))
def test_signature_parser_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        signing.parse_signature(data, "fuzz")


@FUZZ
@given(
    st.binary(min_size=74, max_size=74),
    st.binary(max_size=300),
    st.binary(min_size=60, max_size=70),
    st.sampled_from([b"\n", b"\r\n"]),
)
def test_signature_parser_on_near_valid_signatures(
    raw: bytes, comment: bytes, global_sig: bytes, newline: bytes
) -> None:
    data = newline.join(
        [
            b"untrusted comment: fuzz",
            base64.b64encode(raw),
            b"trusted comment: " + comment,
            base64.b64encode(global_sig),
            b"",
        ]
    )
    try:
        signature = signing.parse_signature(data, "fuzz")
    except FormatError:
        return
    key = signing.PublicKey(keynum=signature.keynum, key=bytes(32))
    try:
        signing.verify(key, signature, b"message")
        signature.trusted_text()
    except RampartError:
        pass


@FUZZ
@given(st.binary(max_size=200))
def test_public_key_parser_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        signing.parse_public_key(data, "fuzz")


@FUZZ
@given(st.binary(min_size=42, max_size=42))
def test_public_key_parser_on_arbitrary_keys(raw: bytes) -> None:
    try:
        key = signing.parse_public_key(_lines_around(b"Ed" + raw[2:], b"untrusted comment: k"))
    except FormatError:
        return
    sig = signing.Signature(b"ED", key.keynum, bytes(64), b"1.0.0", bytes(64))
    with contextlib.suppress(RampartError):
        signing.verify(key, sig, bytes(64))


@FUZZ
@given(st.binary(min_size=158, max_size=158), st.sampled_from([b"Sc", b"\x00\x00", b"XX"]))
def test_secret_key_parser_on_arbitrary_keys(raw: bytes, kdf: bytes) -> None:
    # Cap scrypt parameters so the fuzzer explores the parser, not the KDF.
    body = b"Ed" + kdf + b"B2" + raw[6:38] + (32768).to_bytes(8, "little")
    body += (1 << 20).to_bytes(8, "little") + raw[54:]
    with contextlib.suppress(FormatError, LocalError):
        signing.parse_secret_key(_lines_around(body, b"untrusted comment: k"), "fuzz", lambda: b"p")

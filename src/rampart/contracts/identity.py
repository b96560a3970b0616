"""Device identity: the key a device signs its checks and reports with, the two request
headers that carry the signature, and the TPM 2.0 quote that attests PCR 7 (written
once here; the device signs, the server verifies; docs/formats.md "Signed requests").

A device's key is either

    tpm   an ECC P-256 restricted signing key of its TPM (never leaves it), made from
          the owner hierarchy's seed at IDENTITY_HANDLE; it signs only TPM2_Quote, so a
          request's signature is a quote of PCR 7 whose qualifying data is the SHA-256
          of the request's signature base: authentication and attestation in one;
    file  an Ed25519 key in a 0600 file on the state partition, for a machine without
          a TPM: it authenticates, it attests nothing.

Every request from a Rampart device carries

    rampart-key   base64 of the key's SubjectPublicKeyInfo (DER)
    rampart-auth  v=1;c=<counter>;n=<nonce>;e=<epoch>;p=<PCR 7 hex>;q=<quote>;s=<signature>

where the signature base is the lines of `signature_base`: the request's kind and OS,
the machine's identity headers, the counter (strictly increasing per key: a replay is
refused), the server's last nonce (from the version answer: a quote made after it), the
running security epoch, the PCR 7 value quoted, and the SHA-256 of the body.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from rampart.errors import FormatError, VerificationError

KEY_HEADER = "rampart-key"
AUTH_HEADER = "rampart-auth"
KINDS = ("version", "report")  # what a signed request is
TPM_KEY, FILE_KEY = "tpm", "file"
MAX_KEY = 512  # bytes of a public key (DER); P-256: 91, Ed25519: 44
MAX_AUTH = 2048  # characters of the rampart-auth header
MAX_QUOTE = 1024  # bytes of a TPMS_ATTEST
NONCE = re.compile(r"[0-9a-z._-]{1,96}", re.ASCII)  # "-": none
NO_NONCE = "-"
PCR = 7  # what a quote covers: the Secure Boot policy
COUNTER_MAX = (1 << 63) - 1
SIGNATURE_SIZE = 64  # an Ed25519 signature

TPM_GENERATED = 0xFF544347  # TPM_GENERATED_VALUE: the TPM made this structure
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B


def encode_key(spki: bytes) -> str:
    return base64.b64encode(spki).decode()


def key_id(spki: bytes) -> str:
    """A key's fingerprint: SHA-256 of its SubjectPublicKeyInfo, hex."""
    return hashlib.sha256(spki).hexdigest()


@functools.lru_cache(maxsize=4096)  # a server verifies the same fleet's keys all day
def load_key(spki: bytes) -> tuple[str, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey]:
    """The kind (TPM_KEY or FILE_KEY) and the key of a SubjectPublicKeyInfo; FormatError
    for anything but an ECC P-256 or Ed25519 key."""
    if not spki or len(spki) > MAX_KEY:
        raise FormatError(f"device key: {len(spki)} bytes, expected 1 to {MAX_KEY}")
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, TypeError):
        raise FormatError("device key: not a DER SubjectPublicKeyInfo") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return FILE_KEY, key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return TPM_KEY, key
    raise FormatError("device key: neither ECC P-256 (TPM) nor Ed25519 (file)")


def decode_key(text: str) -> bytes:
    """The DER of a rampart-key header (strict base64)."""
    if len(text) > 4 * MAX_KEY:
        raise FormatError("device key: header too long")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError("device key: not base64") from None


def signature_base(
    kind: str,
    os_name: str,
    machine_id: str,
    version: str,
    counter: int,
    nonce: str,
    epoch: int | None,
    pcr7: bytes | None,
    body: bytes,
) -> bytes:
    """What a request's signature covers, one field per line."""
    if kind not in KINDS:
        raise ValueError(f"request kind {kind!r}")
    fields = (
        "rampart-request-v1",
        kind,
        os_name,
        machine_id,
        version,
        str(counter),
        nonce,
        "-" if epoch is None else str(epoch),
        "-" if pcr7 is None else pcr7.hex(),
        hashlib.sha256(body).hexdigest(),
    )
    return "\n".join(fields).encode() + b"\n"


@dataclass(frozen=True)
class Auth:
    """The rampart-auth header: counter, nonce, epoch, PCR 7 and quote (tpm keys), and
    the signature (tpm: the quote's, DER ECDSA; file: Ed25519)."""

    counter: int
    nonce: str
    epoch: int | None
    pcr7: bytes | None
    quote: bytes | None
    signature: bytes

    def render(self) -> str:
        parts = [
            "v=1",
            f"c={self.counter}",
            f"n={self.nonce}",
            f"e={'-' if self.epoch is None else self.epoch}",
            f"p={'-' if self.pcr7 is None else self.pcr7.hex()}",
            f"q={'-' if self.quote is None else _b64(self.quote)}",
            f"s={_b64(self.signature)}",
        ]
        return ";".join(parts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_FIELDS = ("v", "c", "n", "e", "p", "q", "s")


def parse_auth(text: str) -> Auth:
    """A rampart-auth header, strictly: every field once, in order; FormatError."""
    if len(text) > MAX_AUTH:
        raise FormatError(f"{AUTH_HEADER}: longer than {MAX_AUTH} characters")
    pairs = [part.partition("=") for part in text.split(";")]
    if [k for k, _, _ in pairs] != list(_FIELDS) or any(not sep for _, sep, _ in pairs):
        raise FormatError(f"{AUTH_HEADER}: expected fields {'; '.join(_FIELDS)}")
    values = {k: v for k, _, v in pairs}
    if values["v"] != "1":
        raise FormatError(f"{AUTH_HEADER}: version {values['v'][:8]!r}, expected 1")
    counter = _number(values["c"], "counter", COUNTER_MAX)
    nonce = values["n"]
    if nonce != NO_NONCE and not NONCE.fullmatch(nonce):
        raise FormatError(f"{AUTH_HEADER}: nonce is not [0-9a-z._-]{{1,96}}")
    epoch = None if values["e"] == "-" else _number(values["e"], "epoch", COUNTER_MAX)
    pcr7 = None
    if values["p"] != "-":
        if not re.fullmatch(r"[0-9a-f]{64}", values["p"], re.ASCII):
            raise FormatError(f"{AUTH_HEADER}: PCR 7 is not 64 lowercase hex digits")
        pcr7 = bytes.fromhex(values["p"])
    quote = None if values["q"] == "-" else _unb64(values["q"], "quote", MAX_QUOTE)
    signature = _unb64(values["s"], "signature", 256)
    return Auth(counter, nonce, epoch, pcr7, quote, signature)


def _number(text: str, what: str, high: int) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > high:
        raise FormatError(f"{AUTH_HEADER}: {what} is not a number from 0 to {high}")
    return int(text)


def _unb64(text: str, what: str, cap: int) -> bytes:
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError(f"{AUTH_HEADER}: {what} is not base64") from None
    if not data or len(data) > cap:
        raise FormatError(f"{AUTH_HEADER}: {what} of {len(data)} bytes (1 to {cap})")
    return data


# --- TPM 2.0 quotes -----------------------------------------------------------------


@dataclass(frozen=True)
class Quote:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE (TPM 2.0 Part 2, 10.12.12), the fields
    a verifier reads."""

    signer: bytes  # qualifiedSigner (TPM2B_NAME)
    extra: bytes  # extraData: the qualifying data the quote was asked for
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware: int
    selection: tuple[tuple[int, tuple[int, ...]], ...]  # (hash algorithm, PCRs) each
    digest: bytes  # pcrDigest: the hash of the selected PCRs' values, concatenated


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise FormatError("TPM quote: truncated")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def number(self, fmt: str) -> int:
        value: int = struct.unpack(">" + fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def sized(self) -> bytes:
        return self.take(self.number("H"))


def parse_quote(data: bytes) -> Quote:
    """A TPMS_ATTEST quote, strictly (nothing after it); FormatError."""
    if len(data) > MAX_QUOTE:
        raise FormatError(f"TPM quote: {len(data)} bytes, at most {MAX_QUOTE}")
    reader = _Reader(data)
    if reader.number("I") != TPM_GENERATED:
        raise FormatError("TPM quote: not made by a TPM (magic is not TPM_GENERATED_VALUE)")
    if reader.number("H") != TPM_ST_ATTEST_QUOTE:
        raise FormatError("TPM quote: not a quote (type is not TPM_ST_ATTEST_QUOTE)")
    signer, extra = reader.sized(), reader.sized()
    clock, reset_count, restart_count = reader.number("Q"), reader.number("I"), reader.number("I")
    safe = reader.number("B")
    firmware = reader.number("Q")
    count = reader.number("I")
    if count > 16:
        raise FormatError(f"TPM quote: {count} PCR selections")
    selection = []
    for _ in range(count):
        alg, size = reader.number("H"), reader.number("B")
        bitmap = reader.take(size)
        pcrs = tuple(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
        selection.append((alg, pcrs))
    digest = reader.sized()
    if reader.at != len(data):
        raise FormatError("TPM quote: bytes after the structure")
    if safe > 1:
        raise FormatError("TPM quote: clockInfo.safe is not a boolean")
    return Quote(
        signer,
        extra,
        clock,
        reset_count,
        restart_count,
        bool(safe),
        firmware,
        tuple(selection),
        digest,
    )


# --- verifying a signed request -------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """What a valid signature proves: the key (its kind and fingerprint), and for a TPM
    key the PCR 7 value the TPM quoted (None for a file key: nothing attested)."""

    kind: str
    key_id: str
    pcr7: bytes | None


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _cryptography_verify(raw: bytes, signature: bytes, message: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
    except InvalidSignature:
        return False
    return True


@functools.cache
def _ed25519_verifier() -> Callable[[bytes, bytes, bytes], bool]:
    """Ed25519 verification by libsodium (PyNaCl) when it is importable, else by
    OpenSSL (`cryptography`): the same verdict on every signature a device makes, and
    libsodium's takes half the time on the test host (a server verifies one per signed
    request: README "Benchmarks"). Chosen at the first verification."""
    try:
        from nacl.bindings import crypto_sign_open
        from nacl.exceptions import BadSignatureError
    except ImportError:  # pragma: no cover - without PyNaCl
        return _cryptography_verify

    def _libsodium_verify(raw: bytes, signature: bytes, message: bytes) -> bool:
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            crypto_sign_open(signature + message, raw)
        except BadSignatureError:
            return False
        return True

    return _libsodium_verify


def verify(spki: bytes, auth: Auth, base: bytes) -> Verified:
    """Check `auth` against the key and the request's signature base; VerificationError
    (one line: why) if it does not hold."""
    kind, key = load_key(spki)
    if isinstance(key, ed25519.Ed25519PublicKey):
        if auth.quote is not None or auth.pcr7 is not None:
            raise VerificationError("signed request: a file key attests nothing (quote sent)")
        if not _ed25519_verifier()(_raw(key), auth.signature, base):
            raise VerificationError("signed request: bad signature")
        return Verified(kind, key_id(spki), None)
    if auth.quote is None or auth.pcr7 is None:
        raise VerificationError("signed request: a TPM key signs quotes, and none was sent")
    quote = parse_quote(auth.quote)
    try:
        key.verify(auth.signature, auth.quote, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise VerificationError("signed request: bad quote signature") from None
    if quote.extra != hashlib.sha256(base).digest():
        raise VerificationError("signed request: the quote was made for another request")
    if quote.selection != ((TPM_ALG_SHA256, (PCR,)),):
        raise VerificationError("signed request: the quote covers other PCRs than sha256:7")
    if quote.digest != hashlib.sha256(auth.pcr7).digest():
        raise VerificationError("signed request: PCR 7 is not the value the TPM quoted")
    return Verified(kind, key_id(spki), auth.pcr7)

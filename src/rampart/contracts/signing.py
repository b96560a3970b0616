"""minisign keys and signatures (docs/formats.md, "minisign").

Parsing and verification are pure: bytes in, a parsed object or an exception
out. Reading files and hashing streams live in the `*_file` helpers.

The parsers accept what the minisign 0.11 tool accepts: CRLF or LF line ends,
extra lines after the last required one, any untrusted comment, legacy (`Ed`)
and prehashed (`ED`) signatures, and unencrypted secret keys whose checksum is
all zeros (minisign 0.11 `-W`). They refuse what it refuses, with a message
naming the file and the reason, and never raise anything but `FormatError`,
`VerificationError` or `LocalError`.

Why not py-minisign: it was evaluated and is stricter than the tool (exactly
four lines, printable-ASCII comments only, UTF-8 untrusted comments) and adds a
dependency to the root-run client; the format is small, and `cryptography`
(already needed) provides Ed25519 and scrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from rampart.contracts import hashing
from rampart.errors import FormatError, LocalError, VerificationError
from rampart.files import read_small

UNTRUSTED_PREFIX = b"untrusted comment: "
TRUSTED_PREFIX = b"trusted comment: "
ALG_LEGACY = b"Ed"
ALG_PREHASHED = b"ED"
KDF_SCRYPT = b"Sc"
KDF_NONE = b"\x00\x00"
CHK_BLAKE2B = b"B2"
# minisign reads lines with fgets into buffers of 1024 and 8192 bytes: a line
# it reads whole has at most 1022 (comment) or 8190 (trusted comment) bytes
# before its newline, a CR included. Longer lines make it fail; so do we.
COMMENT_LINE_MAX = 1022
TRUSTED_LINE_MAX = 8190
# Legacy (non-prehashed) signatures cover the raw file, which must be held in
# memory: we refuse them for files over 1 GiB (minisign 0.11 accepts larger
# ones; newer minisign refuses them too). The size is checked before reading.
LEGACY_MAX_BYTES = 1 << 30
# libsodium's crypto_pwhash_scryptsalsa208sha256 *_SENSITIVE limits, which
# minisign uses for new keys.
OPSLIMIT_SENSITIVE = 33554432
MEMLIMIT_SENSITIVE = 1073741824
CHUNK = 1 << 20

_PUBLIC_KEY_LEN = 2 + 8 + 32
_SECRET_KEY_LEN = 2 + 2 + 2 + 32 + 8 + 8 + 8 + 64 + 32
_SIGNATURE_LEN = 2 + 8 + 64


def _b64decode(line: bytes, length: int, source: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{source}: {what} is not valid base64") from None
    if len(raw) != length:
        raise FormatError(f"{source}: {what} decodes to {len(raw)} bytes, expected {length}")
    return raw


def _lines(
    data: bytes, needed: int, source: str, what: str, limits: tuple[int, ...] = ()
) -> list[bytes]:
    """The first `needed` lines of `data`, without their line ends.

    `limits[i]`, if given, caps line i's length as minisign does (CR included).
    """
    lines = data.split(b"\n")
    if len(lines) < needed or (len(lines) == needed and lines[-1] == b"" and needed > 0):
        raise FormatError(f"{source}: truncated {what} (expected {needed} lines)")
    for index, limit in enumerate(limits):
        if limit and len(lines[index]) > limit:
            raise FormatError(f"{source}: line {index + 1} is longer than {limit} bytes")
    return [line.rstrip(b"\r") for line in lines[:needed]]


def _keynum_hex(keynum: bytes) -> str:
    return format(int.from_bytes(keynum, "little"), "X")


@dataclass(frozen=True)
class PublicKey:
    """A minisign Ed25519 public key and its 8-byte key id."""

    keynum: bytes
    key: bytes

    @property
    def key_id(self) -> str:
        return _keynum_hex(self.keynum)

    def to_base64(self) -> str:
        return base64.b64encode(ALG_LEGACY + self.keynum + self.key).decode()

    def to_bytes(self) -> bytes:
        comment = f"untrusted comment: minisign public key {self.key_id}\n"
        return (comment + self.to_base64() + "\n").encode()


def parse_public_key_base64(text: bytes, source: str) -> PublicKey:
    raw = _b64decode(text.strip(), _PUBLIC_KEY_LEN, source, "public key")
    if raw[:2] != ALG_LEGACY:
        raise FormatError(f"{source}: unsupported public key algorithm {raw[:2]!r}")
    return PublicKey(keynum=raw[2:10], key=raw[10:])


def parse_public_key(data: bytes, source: str = "public key") -> PublicKey:
    """Parse a minisign public key file (comment line, base64 line)."""
    _comment, line = _lines(data, 2, source, "public key", (COMMENT_LINE_MAX,))
    return parse_public_key_base64(line, source)


@dataclass(frozen=True)
class Signature:
    """A parsed minisign signature file."""

    algorithm: bytes
    keynum: bytes
    signature: bytes
    trusted_comment: bytes
    global_signature: bytes
    untrusted_comment: bytes = b"signature from rampart secret key"

    @property
    def prehashed(self) -> bool:
        return self.algorithm == ALG_PREHASHED

    @property
    def key_id(self) -> str:
        return _keynum_hex(self.keynum)

    def trusted_text(self, source: str = "signature") -> str:
        """The trusted comment as text; FormatError if it is not UTF-8."""
        try:
            return self.trusted_comment.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{source}: trusted comment is not valid UTF-8") from None

    def to_bytes(self) -> bytes:
        return b"".join(
            [
                UNTRUSTED_PREFIX + self.untrusted_comment + b"\n",
                base64.b64encode(self.algorithm + self.keynum + self.signature) + b"\n",
                TRUSTED_PREFIX + self.trusted_comment + b"\n",
                base64.b64encode(self.global_signature) + b"\n",
            ]
        )


def parse_signature(data: bytes, source: str = "signature") -> Signature:
    """Parse a minisign signature file (4 lines); FormatError if malformed."""
    untrusted, sig_line, trusted, global_line = _lines(
        data, 4, source, "signature", (COMMENT_LINE_MAX, 0, TRUSTED_LINE_MAX)
    )
    if not untrusted.startswith(UNTRUSTED_PREFIX):
        raise FormatError(f"{source}: first line does not start with 'untrusted comment: '")
    raw = _b64decode(sig_line, _SIGNATURE_LEN, source, "signature line")
    algorithm = raw[:2]
    if algorithm not in (ALG_LEGACY, ALG_PREHASHED):
        raise FormatError(f"{source}: unsupported signature algorithm {algorithm!r}")
    if not trusted.startswith(TRUSTED_PREFIX):
        raise FormatError(f"{source}: third line does not start with 'trusted comment: '")
    comment = trusted[len(TRUSTED_PREFIX) :]
    if b"\x00" in comment:
        raise FormatError(f"{source}: trusted comment contains a NUL byte")
    global_signature = _b64decode(global_line, 64, source, "global signature")
    return Signature(
        algorithm=algorithm,
        keynum=raw[2:10],
        signature=raw[10:],
        trusted_comment=comment,
        global_signature=global_signature,
        untrusted_comment=untrusted[len(UNTRUSTED_PREFIX) :],
    )


def verify(public_key: PublicKey, signature: Signature, message: bytes) -> None:
    """Verify `signature` over `message` (the BLAKE2b-512 digest for `ED`).

    Raises VerificationError naming the first check that failed.
    """
    if not hmac.compare_digest(signature.keynum, public_key.keynum):
        raise VerificationError(
            f"signed by key {signature.key_id}, but the public key is {public_key.key_id}"
        )
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key.key)
    except ValueError:
        raise FormatError(f"public key {public_key.key_id} is not a valid Ed25519 key") from None
    try:
        key.verify(signature.signature, message)
    except InvalidSignature:
        raise VerificationError("signature does not match the file") from None
    try:
        key.verify(signature.global_signature, signature.signature + signature.trusted_comment)
    except InvalidSignature:
        raise VerificationError("trusted comment signature does not verify") from None


# --- secret keys -----------------------------------------------------------------


@dataclass(frozen=True)
class SecretKey:
    """A decrypted minisign secret key. Never printed, never logged."""

    keynum: bytes
    seed: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"SecretKey(key_id={_keynum_hex(self.keynum)})"

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(keynum=self.keynum, key=self.public)

    def sign_message(self, message: bytes, trusted_comment: bytes, prehashed: bool) -> Signature:
        """Sign `message` (the BLAKE2b-512 digest when `prehashed`)."""
        private = Ed25519PrivateKey.from_private_bytes(self.seed)
        sig = private.sign(message)
        return Signature(
            algorithm=ALG_PREHASHED if prehashed else ALG_LEGACY,
            keynum=self.keynum,
            signature=sig,
            trusted_comment=trusted_comment,
            global_signature=private.sign(sig + trusted_comment),
        )


def generate_secret_key() -> SecretKey:
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SecretKey(keynum=secrets.token_bytes(8), seed=seed, public=public)


def _checksum(keynum: bytes, seed: bytes, public: bytes) -> bytes:
    return hashlib.blake2b(ALG_LEGACY + keynum + seed + public, digest_size=32).digest()


def _scrypt_params(opslimit: int, memlimit: int) -> tuple[int, int, int]:
    """libsodium's pickparams: (N, r, p) from opslimit and memlimit."""
    opslimit = max(opslimit, 32768)
    r = 8
    if opslimit < memlimit // 32:
        p = 1
        max_n = opslimit // (4 * r)
    else:
        max_n = memlimit // (128 * r)
    n_log2 = 1
    while n_log2 < 63 and (1 << n_log2) <= max_n // 2:
        n_log2 += 1
    if opslimit >= memlimit // 32:
        p = min(0x3FFFFFFF, (opslimit // 4) // (1 << n_log2)) // r
    return 1 << n_log2, r, max(p, 1)


def _checked_scrypt_params(opslimit: int, memlimit: int, source: str) -> tuple[int, int, int]:
    n, r, p = _scrypt_params(opslimit, memlimit)
    if n > 1 << 22 or p > 16:
        raise FormatError(f"{source}: key derivation parameters are out of range (N={n}, p={p})")
    return n, r, p


def _keystream(password: bytes, salt: bytes, opslimit: int, memlimit: int, source: str) -> bytes:
    n, r, p = _checked_scrypt_params(opslimit, memlimit, source)
    need = 128 * r * n * p + 128 * r * 256 + (1 << 20)
    try:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=need, dklen=104)
    except (ValueError, MemoryError) as exc:
        raise LocalError(f"{source}: cannot derive the key from the password: {exc}") from None


def parse_secret_key(data: bytes, source: str, password: Callable[[], bytes]) -> SecretKey:
    """Parse (and decrypt, asking `password` only if needed) a minisign secret key."""
    _comment, line = _lines(data, 2, source, "secret key", (COMMENT_LINE_MAX,))
    raw = _b64decode(line.strip(), _SECRET_KEY_LEN, source, "secret key")
    sig_alg, kdf_alg, chk_alg = raw[0:2], raw[2:4], raw[4:6]
    if sig_alg != ALG_LEGACY:
        raise FormatError(f"{source}: unsupported signature algorithm {sig_alg!r}")
    if chk_alg != CHK_BLAKE2B:
        raise FormatError(f"{source}: unsupported checksum function {chk_alg!r}")
    salt = raw[6:38]
    opslimit = int.from_bytes(raw[38:46], "little")
    memlimit = int.from_bytes(raw[46:54], "little")
    sealed = raw[54:]
    if kdf_alg == KDF_SCRYPT:
        _checked_scrypt_params(opslimit, memlimit, source)  # before asking for a password
        stream = _keystream(password(), salt, opslimit, memlimit, source)
        opened = bytes(a ^ b for a, b in zip(sealed, stream, strict=True))
    elif kdf_alg == KDF_NONE:
        opened = sealed
    else:
        raise FormatError(f"{source}: unsupported key derivation function {kdf_alg!r}")
    keynum, seed, public, chk = opened[:8], opened[8:40], opened[40:72], opened[72:104]
    expected = _checksum(keynum, seed, public)
    unchecked = kdf_alg == KDF_NONE and chk == bytes(32)  # minisign 0.11 -W writes zeros
    if not unchecked and not hmac.compare_digest(chk, expected):
        if kdf_alg == KDF_SCRYPT:
            raise LocalError(f"{source}: wrong password for this secret key")
        raise FormatError(f"{source}: secret key checksum does not match (corrupted file)")
    derived = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    if not hmac.compare_digest(derived, public):
        raise FormatError(f"{source}: secret key is inconsistent (public half does not match)")
    return SecretKey(keynum=keynum, seed=seed, public=public)


def secret_key_to_bytes(
    key: SecretKey,
    password: bytes | None,
    opslimit: int = OPSLIMIT_SENSITIVE,
    memlimit: int = MEMLIMIT_SENSITIVE,
) -> bytes:
    """Serialize `key`, encrypted with `password` as minisign does, or unencrypted if None."""
    chk = _checksum(key.keynum, key.seed, key.public)
    body = key.keynum + key.seed + key.public + chk
    if password is None:
        header = ALG_LEGACY + KDF_NONE + CHK_BLAKE2B + bytes(32 + 8 + 8)
        comment = b"untrusted comment: minisign secret key (unencrypted)\n"
    else:
        salt = secrets.token_bytes(32)
        stream = _keystream(password, salt, opslimit, memlimit, "new secret key")
        body = bytes(a ^ b for a, b in zip(body, stream, strict=True))
        header = (
            ALG_LEGACY
            + KDF_SCRYPT
            + CHK_BLAKE2B
            + salt
            + opslimit.to_bytes(8, "little")
            + memlimit.to_bytes(8, "little")
        )
        comment = b"untrusted comment: minisign encrypted secret key\n"
    return comment + base64.b64encode(header + body) + b"\n"


# --- files -------------------------------------------------------------------------


def load_public_key(path: Path) -> PublicKey:
    return parse_public_key(read_small(path, "public key"), str(path))


def load_signature(path: Path) -> Signature:
    return parse_signature(read_small(path, "signature"), str(path))


def load_secret_key(path: Path, password: Callable[[], bytes]) -> SecretKey:
    return parse_secret_key(read_small(path, "secret key"), str(path), password)


def message_for(handle: BinaryIO, prehashed: bool, source: str) -> bytes:
    """What the Ed25519 signature covers: BLAKE2b-512 of the stream, or its raw bytes."""
    if prehashed:
        return hashing.blake2b_fd(handle.fileno(), offset=handle.tell())[0]
    if os.fstat(handle.fileno()).st_size > LEGACY_MAX_BYTES:
        raise VerificationError(
            f"{source}: legacy (non-prehashed) signatures are limited to 1 GiB files"
        )
    data = handle.read(LEGACY_MAX_BYTES + 1)
    if len(data) > LEGACY_MAX_BYTES:
        raise VerificationError(
            f"{source}: legacy (non-prehashed) signatures are limited to 1 GiB files"
        )
    return data


def sign_file(path: Path, key: SecretKey, trusted_comment: str) -> Signature:
    """Sign `path` (prehashed, streamed) with `trusted_comment`."""
    try:
        with path.open("rb") as handle:
            digest = message_for(handle, True, str(path))
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    return key.sign_message(digest, trusted_comment.encode(), prehashed=True)


def verify_file(path: Path, signature: Signature, public_key: PublicKey) -> bytes:
    """Verify `signature` over the file at `path`; VerificationError naming `path` if not.

    Returns the BLAKE2b-512 digest of the bytes verified (whatever the signature's
    algorithm), so a caller can check that a later copy is the same file.
    """
    try:
        with path.open("rb") as handle:
            message = message_for(handle, signature.prehashed, str(path))
    except FileNotFoundError:
        raise LocalError(f"{path}: file not found") from None
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        verify(public_key, signature, message)
    except VerificationError as exc:
        raise VerificationError(f"{path}: {exc}") from None
    return message if signature.prehashed else hashing.blake2b(message).digest()


def verify_data(public_key: PublicKey, signature: Signature, data: bytes, source: str) -> None:
    """Verify `signature` over `data` held in memory, prehashed or legacy;
    VerificationError naming `source` if not."""
    message = hashing.blake2b(data).digest() if signature.prehashed else data
    try:
        verify(public_key, signature, message)
    except VerificationError as exc:
        raise VerificationError(f"{source}: {exc}") from None

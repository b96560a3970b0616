"""This device's identity (contracts/identity.py): its key, the counter and nonce of its
signed requests, and the two headers that sign a check or a report.

The key is the TPM's identity key where the machine has a TPM (created once, never
exportable; each signature is a quote of PCR 7), else an Ed25519 key in a 0600 file on
the state partition. The directory (`/var/lib/rampart/identity`, root only) holds

    key.pem   the Ed25519 key (PKCS#8 PEM, mode 0600), without a TPM only
    counter   the last request counter used (decimal)
    nonce     the server's last nonce (from a version answer)

Requests are signed by root before the fetch process starts: the unprivileged fetcher
only carries the headers, it never holds the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from rampart import files
from rampart.contracts import identity as contract
from rampart.device.tpm import Tpm
from rampart.errors import LocalError

DEFAULT_DIR = Path("/var/lib/rampart/identity")
KEY_FILE, COUNTER_FILE, NONCE_FILE = "key.pem", "counter", "nonce"


@dataclass(frozen=True)
class DeviceKey:
    """The key this device signs with: its kind, public part (DER), and what signs."""

    kind: str
    spki: bytes
    tpm: Tpm | None = None
    private: ed25519.Ed25519PrivateKey | None = None

    @property
    def key_id(self) -> str:
        return contract.key_id(self.spki)

    def pem(self) -> str:
        key = serialization.load_der_public_key(self.spki)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()


def _read(path: Path, what: str, limit: int) -> bytes | None:
    """A small file of the identity directory, None if it is not there."""
    if not path.exists():
        return None
    return files.read_small(path, what, limit)


def _private_file(directory: Path) -> Path:
    return directory / KEY_FILE


def load(directory: Path, tpm: Tpm | None) -> DeviceKey | None:
    """The device's key if it has one (the TPM's, else the file's)."""
    if tpm is not None:
        spki = tpm.identity_key()
        if spki is not None:
            return DeviceKey(contract.TPM_KEY, spki, tpm=tpm)
    path = _private_file(directory)
    data = _read(path, "device key", 4096)
    if data is None:
        return None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise LocalError(f"{path}: not a PEM private key; remove it to make a new one") from None
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise LocalError(f"{path}: not an Ed25519 key; remove it to make a new one")
    return _file_key(private)


def _file_key(private: ed25519.Ed25519PrivateKey) -> DeviceKey:
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DeviceKey(contract.FILE_KEY, spki, private=private)


def ensure(directory: Path, tpm: Tpm | None) -> DeviceKey:
    """The device's key, made now if it has none: in the TPM if there is one, else a
    new Ed25519 key written mode 0600."""
    found = load(directory, tpm)
    if found is not None:
        return found
    if tpm is not None:
        return DeviceKey(contract.TPM_KEY, tpm.ensure_identity(), tpm=tpm)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        files.write_new_file(_private_file(directory), pem, 0o600)
    except OSError as exc:
        raise LocalError(
            f"{_private_file(directory)}: cannot write the device key: {exc}"
        ) from None
    files.fsync_dir(directory)
    return _file_key(private)


def next_counter(directory: Path, now: float | None = None) -> int:
    """The counter of the next request: more than every one before it (the last one is
    kept in `counter`), and at least the time in milliseconds, so a device whose state
    was reset still counts past what the server saw."""
    path = directory / COUNTER_FILE
    try:
        last = int((_read(path, "request counter", 64) or b"0").decode().strip())
    except (ValueError, UnicodeDecodeError):
        last = 0  # unreadable: the clock still counts past what the server saw
    clock = int((time.time() if now is None else now) * 1000)
    counter = max(last + 1, clock)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        files.replace_whole(path, f"{counter}\n".encode(), 0o600)
    except OSError as exc:
        raise LocalError(f"{path}: cannot keep the request counter: {exc.strerror}") from None
    return counter


def read_nonce(directory: Path) -> str:
    """The server's last nonce, or NO_NONCE."""
    try:
        text = (_read(directory / NONCE_FILE, "nonce", 256) or b"").decode().strip()
    except UnicodeDecodeError:
        return contract.NO_NONCE
    return text if contract.NONCE.fullmatch(text) else contract.NO_NONCE


def save_nonce(directory: Path, nonce: str | None) -> None:
    """Keep the nonce of a version answer for the next requests (a bad one is dropped)."""
    if nonce is None or not contract.NONCE.fullmatch(nonce):
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # If it cannot be kept, the next request goes without: it authenticates, it does
    # not attest.
    with contextlib.suppress(OSError):
        files.replace_whole(directory / NONCE_FILE, f"{nonce}\n".encode(), 0o600)


@dataclass(frozen=True)
class Request:
    """What a signed request is: its kind, OS, identity headers, epoch and body."""

    kind: str
    os_name: str
    machine_id: str
    version: str
    epoch: int | None
    body: bytes = b""


def signed_headers(key: DeviceKey, directory: Path, request: Request) -> dict[str, str]:
    """The rampart-key and rampart-auth headers of `request`, signed now."""
    counter = next_counter(directory)
    nonce = read_nonce(directory)

    def base(pcr7: bytes | None) -> bytes:
        return contract.signature_base(
            request.kind,
            request.os_name,
            request.machine_id,
            request.version,
            counter,
            nonce,
            request.epoch,
            pcr7,
            request.body,
        )

    if key.tpm is not None:
        # The base names the PCR 7 value, which the quote reports: read it first, quote,
        # and start over in the rare case it changed in between.
        for _ in range(3):
            pcr7 = key.tpm.pcr_values((contract.PCR,))[contract.PCR]
            qualifying = hashlib.sha256(base(pcr7)).digest()
            quote, signature, quoted = key.tpm.quote(qualifying, contract.PCR)
            if quoted == pcr7:
                auth = contract.Auth(counter, nonce, request.epoch, pcr7, quote, signature)
                break
        else:
            raise LocalError("TPM: PCR 7 kept changing while the request was quoted")
    elif key.private is not None:
        signature = key.private.sign(base(None))
        auth = contract.Auth(counter, nonce, request.epoch, None, None, signature)
    else:
        raise LocalError("device key: neither a TPM nor a private key to sign with")
    return {contract.KEY_HEADER: contract.encode_key(key.spki), contract.AUTH_HEADER: auth.render()}


def describe(key: DeviceKey) -> dict[str, str]:
    """What `rampart identity` prints: kind, fingerprint, public key (PEM)."""
    return {"kind": key.kind, "key_id": key.key_id, "public_key": key.pem()}

"""UEFI Secure Boot variables: signature databases, efivarfs files and authenticated writes.

The vendor side ships db and dbx appends signed with KEK (`sbvarsign --include-attrs`);
the device reads the current db and dbx from efivarfs, checks an update before it writes
it (a dbx entry must not revoke an installed EFI binary), and predicts what the firmware
will make of it (PCR 7 measures the variables). Both sides read the formats here:

- EFI_SIGNATURE_LIST, the content of PK, KEK, db and dbx: a run of lists, each a
  SignatureType GUID, u32 ListSize, u32 HeaderSize, u32 SignatureSize, HeaderSize bytes,
  then entries of SignatureSize bytes (an owner GUID and the data: a DER certificate, a
  SHA-256 hash, ...);
- an efivarfs file, `<efivars>/<Name>-<VendorGuid>`: u32 attributes, then the data;
- an authenticated write as efivarfs takes it: u32 attributes, then
  EFI_VARIABLE_AUTHENTICATION_2 (an EFI_TIME and a WIN_CERTIFICATE_UEFI_GUID holding a
  bare PKCS#7 SignedData), then the new signature lists.

Integers are little-endian, and so are the first three fields of a GUID
(`uuid.UUID(bytes_le=...)`). Everything from outside is bounds-checked: a malformed
input raises FormatError naming its source and the byte where it goes wrong.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from rampart.contracts.pe import der_header
from rampart.errors import FormatError, LocalError, UsageError

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")  # PK, KEK, SecureBoot
IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")  # db, dbx
# systemd's Boot Loader Interface: LoaderInfo, LoaderEntries, LoaderEntryOneShot, ...
LOADER_VENDOR = uuid.UUID("4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")
CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")  # data: a DER certificate
CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")  # data: a SHA-256 hash
CERT_X509_SHA256 = uuid.UUID("3bd2a492-96c0-4079-b420-fcf98ef103ed")  # TBS hash + EFI_TIME
CERT_TYPE_PKCS7 = uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7")  # WIN_CERTIFICATE_UEFI_GUID

# Variable attributes (UEFI 2.10 §8.2): the u32 in front of every efivarfs file.
NON_VOLATILE = 0x01
BOOTSERVICE_ACCESS = 0x02
RUNTIME_ACCESS = 0x04
TIME_BASED_AUTHENTICATED_WRITE_ACCESS = 0x20
APPEND_WRITE = 0x40
KNOWN_ATTRIBUTES = (
    NON_VOLATILE
    | BOOTSERVICE_ACCESS
    | RUNTIME_ACCESS
    | TIME_BASED_AUTHENTICATED_WRITE_ACCESS
    | APPEND_WRITE
)

LIST_HEADER = 28  # SignatureType GUID, ListSize, HeaderSize, SignatureSize
OWNER = 16  # the SignatureOwner GUID that starts each entry
# Entry sizes fixed by the type (edk2's mSupportSigItem): owner + hash (+ EFI_TIME).
FIXED_SIGNATURE_SIZES = {CERT_SHA256: OWNER + 32, CERT_X509_SHA256: OWNER + 48}
EFI_TIME = 16
WIN_CERTIFICATE_UEFI_GUID = 24  # dwLength, wRevision, wCertificateType, CertType GUID
WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_EFI_GUID = 0x0EF1
# Far above what any firmware stores in one variable: a bigger efivarfs file is refused
# before it is read whole.
MAX_VARIABLE = 1 << 20
SIGNED_DATA_OID = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2


@dataclass(frozen=True)
class Signature:
    """One EFI_SIGNATURE_DATA with the SignatureType of the list that holds it."""

    type: uuid.UUID
    owner: uuid.UUID
    data: bytes


@dataclass(frozen=True)
class AuthenticatedWrite:
    """What `sbvarsign --include-attrs` writes and efivarfs takes in one write(2).

    `attributes` goes to SetVariable; `timestamp` is the raw EFI_TIME the signature
    covers; `pkcs7` is the bare SignedData (no ContentInfo), signed by a KEK for db and
    dbx; `payload` is the signature lists to write or append.
    """

    attributes: int
    timestamp: bytes
    pkcs7: bytes
    payload: bytes


def parse_signature_lists(data: bytes, source: str) -> list[Signature]:
    """Every entry of a run of EFI_SIGNATURE_LISTs, in order; [] for empty data.

    Each list must hold a whole number of entries and end inside `data`; an entry is at
    least an owner GUID, and a SHA-256 (or X.509-SHA-256) entry has exactly its size.
    The list headers' own bytes (HeaderSize) are skipped: no type in use defines them.
    Raises FormatError naming `source` and the byte offset of the list at fault.
    """
    signatures: list[Signature] = []
    offset = 0
    while offset < len(data):
        where = f"{source}: signature list at byte {offset}"
        if offset + LIST_HEADER > len(data):
            raise FormatError(
                f"{where}: {len(data) - offset} bytes left, a list header needs {LIST_HEADER}"
            )
        raw_type, list_size, header_size, signature_size = struct.unpack_from(
            "<16sIII", data, offset
        )
        kind = uuid.UUID(bytes_le=raw_type)
        if list_size < LIST_HEADER:
            raise FormatError(f"{where}: ListSize {list_size} is below {LIST_HEADER}")
        if offset + list_size > len(data):
            raise FormatError(
                f"{where}: ListSize {list_size} runs past the end ({len(data)} bytes)"
            )
        if signature_size < OWNER:
            raise FormatError(f"{where}: SignatureSize {signature_size} is below {OWNER}")
        expected = FIXED_SIGNATURE_SIZES.get(kind)
        if expected is not None and signature_size != expected:
            raise FormatError(
                f"{where}: SignatureSize {signature_size} for type {kind}, which needs {expected}"
            )
        if header_size > list_size - LIST_HEADER:
            raise FormatError(
                f"{where}: HeaderSize {header_size} does not fit in ListSize {list_size}"
            )
        body = list_size - LIST_HEADER - header_size
        if body % signature_size:
            raise FormatError(
                f"{where}: {body} bytes of entries are not a multiple of "
                f"SignatureSize {signature_size}"
            )
        entry = offset + LIST_HEADER + header_size
        for _ in range(body // signature_size):
            owner = uuid.UUID(bytes_le=data[entry : entry + OWNER])
            signatures.append(Signature(kind, owner, data[entry + OWNER : entry + signature_size]))
            entry += signature_size
        offset += list_size
    return signatures


def render_signature_list(type: uuid.UUID, owner: uuid.UUID, datas: Sequence[bytes]) -> bytes:
    """One EFI_SIGNATURE_LIST of `type` holding `datas`, all owned by `owner`.

    The inverse of parse_signature_lists (what `sbsiglist` writes): the entries of one
    list share one size, so `datas` must not be empty and all have the same length.
    Raises UsageError otherwise.
    """
    if not datas:
        raise UsageError(f"signature list of type {type}: no entries")
    size = len(datas[0])
    if any(len(data) != size for data in datas):
        raise UsageError(f"signature list of type {type}: entries differ in size")
    expected = FIXED_SIGNATURE_SIZES.get(type)
    if expected is not None and OWNER + size != expected:
        raise UsageError(
            f"signature list of type {type}: entries of {size} bytes, it needs {expected - OWNER}"
        )
    list_size = LIST_HEADER + len(datas) * (OWNER + size)
    if list_size >= 1 << 32:
        raise UsageError(f"signature list of type {type}: {list_size} bytes is too large")
    header = struct.pack("<16sIII", type.bytes_le, list_size, 0, OWNER + size)
    return header + b"".join(owner.bytes_le + data for data in datas)


def appended(old: Sequence[Signature], new: Sequence[Signature]) -> list[Signature]:
    """The entries of a signature database after an APPEND_WRITE of `new` to `old`.

    This is edk2's FilterSignatureList (SecurityPkg AuthVariableLib), which the UEFI
    specification asks for: each new EFI_SIGNATURE_DATA already in the old value is
    dropped, the rest follow the old entries in order. An entry is the same when its
    type and its whole EFI_SIGNATURE_DATA match, and that includes the owner GUID (edk2
    compares SignatureSize bytes from the owner on): the same certificate under another
    owner is appended a second time. New entries are compared with the old value only,
    so a duplicate inside `new` is kept twice, as the firmware keeps it.
    """
    present = set(old)
    return [*old, *(signature for signature in new if signature not in present)]


def appended_bytes(old: bytes, payload: bytes, source: str) -> bytes:
    """The bytes of a signature database after an APPEND_WRITE of `payload` (signature
    lists) to `old`, as the firmware stores them and PCR 7 measures them: `old`, then
    each list of `payload` with the entries `old` holds already left out (`appended`),
    its ListSize made smaller; a list left with no entries is left out whole.
    FormatError if `payload` is not signature lists."""
    present = set(parse_signature_lists(old, f"{source}: the current value"))
    out = bytearray(old)
    offset = 0
    parse_signature_lists(payload, source)
    while offset < len(payload):
        raw_type, list_size, header_size, signature_size = struct.unpack_from(
            "<16sIII", payload, offset
        )
        kind = uuid.UUID(bytes_le=raw_type)
        first = offset + LIST_HEADER + header_size
        kept = []
        for entry in range(first, offset + list_size, signature_size):
            raw = payload[entry : entry + signature_size]
            signature = Signature(kind, uuid.UUID(bytes_le=raw[:OWNER]), raw[OWNER:])
            if signature not in present:
                kept.append(raw)
        if kept:
            size = LIST_HEADER + header_size + len(kept) * signature_size
            out += struct.pack("<16sIII", raw_type, size, header_size, signature_size)
            out += payload[offset + LIST_HEADER : first]
            out += b"".join(kept)
        offset += list_size
    return bytes(out)


def x509_certificates(signatures: Iterable[Signature]) -> list[bytes]:
    """The DER certificates among `signatures` (the EFI_CERT_X509 entries), in order."""
    return [signature.data for signature in signatures if signature.type == CERT_X509]


def variable_path(efivars: Path, name: str, guid: uuid.UUID) -> Path:
    """The efivarfs file of variable `name` under vendor `guid`: `<efivars>/<name>-<guid>`."""
    if not name or "/" in name or "\0" in name:
        raise UsageError(f"EFI variable name {name!r} cannot name an efivarfs file")
    return efivars / f"{name}-{guid}"


def read_variable(efivars: Path, name: str, guid: uuid.UUID) -> tuple[int, bytes] | None:
    """The attributes and data of an EFI variable read through efivarfs, or None if the
    variable does not exist.

    Raises LocalError if the file cannot be read (permission, no efivarfs), FormatError
    if it is shorter than its 4-byte attributes or larger than MAX_VARIABLE.
    """
    path = variable_path(efivars, name, guid)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_VARIABLE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalError(f"EFI variable {path}: cannot read it: {exc.strerror or exc}") from None
    if len(raw) < 4:
        raise FormatError(f"EFI variable {path}: {len(raw)} bytes, shorter than its attributes")
    if len(raw) > MAX_VARIABLE:
        raise FormatError(f"EFI variable {path}: larger than {MAX_VARIABLE} bytes")
    (attributes,) = struct.unpack_from("<I", raw)
    return attributes, raw[4:]


def parse_authenticated_write(data: bytes, source: str) -> AuthenticatedWrite:
    """An authenticated variable write as efivarfs takes it (`sbvarsign --include-attrs`).

    Checked: the attributes name a time-based authenticated write and no bit Rampart
    does not know; the EFI_TIME's Pad1, Nanosecond, TimeZone, Daylight and Pad2 are zero
    (the firmware refuses anything else); the WIN_CERTIFICATE is revision 2.0, type
    EFI_GUID, CertType PKCS7, and its PKCS#7 is exactly one DER SEQUENCE inside it; the
    payload is well-formed signature lists (it may be empty). The signature itself is
    the firmware's to check. Raises FormatError naming `source` and the byte.
    """
    head = 4 + EFI_TIME + WIN_CERTIFICATE_UEFI_GUID
    if len(data) < head:
        raise FormatError(f"{source}: {len(data)} bytes, an authenticated write needs {head}")
    (attributes,) = struct.unpack_from("<I", data)
    if not attributes & TIME_BASED_AUTHENTICATED_WRITE_ACCESS:
        raise FormatError(
            f"{source}: attributes {attributes:#x} at byte 0 lack "
            f"TIME_BASED_AUTHENTICATED_WRITE_ACCESS"
        )
    if attributes & ~KNOWN_ATTRIBUTES:
        raise FormatError(f"{source}: attributes {attributes:#x} at byte 0 set unknown bits")
    timestamp = data[4 : 4 + EFI_TIME]
    pad1, nanosecond, timezone, daylight, pad2 = struct.unpack_from("<7xBIhBB", timestamp)
    if pad1 or nanosecond or timezone or daylight or pad2:
        raise FormatError(
            f"{source}: EFI_TIME at byte 4 sets Pad1, Nanosecond, TimeZone, Daylight "
            f"or Pad2, which must be zero"
        )
    at = 4 + EFI_TIME
    length, revision, kind, raw_cert_type = struct.unpack_from("<IHH16s", data, at)
    if not WIN_CERTIFICATE_UEFI_GUID < length <= len(data) - at:
        raise FormatError(
            f"{source}: WIN_CERTIFICATE at byte {at} claims {length} bytes, "
            f"{len(data) - at} are left"
        )
    if revision != WIN_CERT_REVISION_2_0 or kind != WIN_CERT_TYPE_EFI_GUID:
        raise FormatError(
            f"{source}: WIN_CERTIFICATE at byte {at} is revision {revision:#06x} type "
            f"{kind:#06x}, not revision 0x0200 type 0x0ef1"
        )
    cert_type = uuid.UUID(bytes_le=raw_cert_type)
    if cert_type != CERT_TYPE_PKCS7:
        raise FormatError(
            f"{source}: WIN_CERTIFICATE at byte {at} has CertType {cert_type}, not PKCS7"
        )
    pkcs7_der = data[at + WIN_CERTIFICATE_UEFI_GUID : at + length]
    header_size, content_size = der_header(pkcs7_der, 0, f"{source}: PKCS#7")
    if header_size + content_size != len(pkcs7_der):
        raise FormatError(
            f"{source}: PKCS#7 at byte {at + WIN_CERTIFICATE_UEFI_GUID} is "
            f"{header_size + content_size} bytes of DER in {len(pkcs7_der)}"
        )
    payload = data[at + length :]
    parse_signature_lists(payload, f"{source}: payload at byte {at + length}")
    return AuthenticatedWrite(attributes, timestamp, pkcs7_der, payload)


def signer_certificates(pkcs7_der: bytes) -> list[bytes]:
    """The DER of every certificate a PKCS#7 SignedData carries, in its order.

    Takes both forms Secure Boot uses: a ContentInfo (a PE binary's Authenticode
    signature, `pe.certificate_table`) and the bare SignedData of an authenticated
    variable (`AuthenticatedWrite.pkcs7`), which is wrapped in a ContentInfo first.
    The certificates are not verified here. Raises FormatError if it does not parse.
    """
    header_size, content_size = der_header(pkcs7_der, 0, "PKCS#7")
    if header_size + content_size != len(pkcs7_der):
        raise FormatError(f"PKCS#7: {len(pkcs7_der)} bytes hold {header_size + content_size}")
    if pkcs7_der[header_size : header_size + 1] == b"\x02":  # SignedData opens with version
        pkcs7_der = _sequence(SIGNED_DATA_OID + _der(0xA0, pkcs7_der))
    try:
        certificates: list[x509.Certificate] = pkcs7.load_der_pkcs7_certificates(pkcs7_der)
    except ValueError as exc:
        raise FormatError(f"PKCS#7: not a SignedData with certificates: {exc}") from None
    return [certificate.public_bytes(Encoding.DER) for certificate in certificates]


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    width = (size.bit_length() + 7) // 8
    return bytes([tag, 0x80 | width]) + size.to_bytes(width, "big") + content


def _sequence(content: bytes) -> bytes:
    return _der(0x30, content)

"""Reading sections of a PE/COFF file (a Unified Kernel Image), standard library only.

The device-side client uses this to read `.cmdline` and `.osrel` from the EFI
binary it is about to install, so it needs no PE library. Every offset is
bounds-checked: the input comes from the network (after its signature was
verified, but still).

It also computes the Authenticode hash and finds the signature of an EFI binary,
which the client needs before a dbx update to know whether it would revoke a
binary on the ESP.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from rampart.errors import FormatError

MAX_SECTIONS = 96


@dataclass(frozen=True)
class Section:
    name: str
    virtual_address: int
    virtual_size: int
    raw_offset: int
    raw_size: int


def sections(data: bytes, source: str = "UKI") -> list[Section]:
    """The section table of a PE file."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise FormatError(f"{source}: not a PE file (no MZ header)")
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    if pe_offset + 24 > len(data) or data[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise FormatError(f"{source}: not a PE file (no PE signature)")
    count, optional_size = struct.unpack_from("<H12xH", data, pe_offset + 6)
    if count > MAX_SECTIONS:
        raise FormatError(f"{source}: {count} sections, more than {MAX_SECTIONS}")
    table = pe_offset + 24 + optional_size
    if table + 40 * count > len(data):
        raise FormatError(f"{source}: section table runs past the end of the file")
    result = []
    for index in range(count):
        raw_name, vsize, vaddr, rsize, roffset = struct.unpack_from(
            "<8sIIII", data, table + 40 * index
        )
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        result.append(Section(name, vaddr, vsize, roffset, rsize))
    return result


def section_data(data: bytes, name: str, source: str = "UKI") -> bytes | None:
    """The content of section `name` (its virtual size, NULs trimmed), or None if absent."""
    for section in sections(data, source):
        if section.name == name:
            size = min(section.virtual_size or section.raw_size, section.raw_size)
            end = section.raw_offset + size
            if end > len(data):
                raise FormatError(f"{source}: section {name} runs past the end of the file")
            return data[section.raw_offset : end].rstrip(b"\0")
    return None


def cmdline(data: bytes, source: str = "UKI") -> str | None:
    """The kernel command line of a UKI (`.cmdline`), or None if it has none."""
    raw = section_data(data, ".cmdline", source)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FormatError(f"{source}: .cmdline is not UTF-8") from None


# --- Authenticode -----------------------------------------------------------------------
#
# What the firmware hashes to check an EFI binary against db and dbx, and where the
# binary carries its signature. The device uses both before it applies a dbx update: a
# SHA-256 entry revokes the binary whose Authenticode hash it holds, a certificate entry
# the binaries its certificate signed.

PE32_MAGIC = 0x10B
PE32_PLUS_MAGIC = 0x20B
SECURITY_DIRECTORY = 4  # the Certificate Table's index among the data directories
WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002


@dataclass(frozen=True)
class _Headers:
    """Where the Authenticode hash skips: the CheckSum field, the Certificate Table's
    data-directory entry (None if there is none), the end of the headers, and the
    Certificate Table itself (offset and size; size 0 if the binary is unsigned)."""

    checksum: int
    security_entry: int | None
    size_of_headers: int
    table_offset: int
    table_size: int


def _headers(data: bytes, source: str) -> _Headers:
    """The fields Authenticode needs, from a PE32 or PE32+ optional header, each checked
    to lie inside the file (the two layouts differ only in where the directories start)."""
    sections(data, source)  # checks MZ, the PE signature and the section table's bounds
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    (optional_size,) = struct.unpack_from("<H", data, pe_offset + 20)
    optional = pe_offset + 24
    if optional_size < 2:
        raise FormatError(f"{source}: no optional header")
    (magic,) = struct.unpack_from("<H", data, optional)
    if magic == PE32_PLUS_MAGIC:
        count_at, directories = 108, 112
    elif magic == PE32_MAGIC:
        count_at, directories = 92, 96
    else:
        raise FormatError(f"{source}: optional header magic {magic:#x} is neither PE32 nor PE32+")
    if optional_size < directories:
        raise FormatError(f"{source}: optional header of {optional_size} bytes is truncated")
    (size_of_headers,) = struct.unpack_from("<I", data, optional + 60)
    (count,) = struct.unpack_from("<I", data, optional + count_at)
    if directories + 8 * count > optional_size:
        raise FormatError(
            f"{source}: {count} data directories do not fit its optional header "
            f"of {optional_size} bytes"
        )
    checksum = optional + 64
    security_entry = None
    table_offset = table_size = 0
    if count > SECURITY_DIRECTORY:
        security_entry = optional + directories + 8 * SECURITY_DIRECTORY
        table_offset, table_size = struct.unpack_from("<II", data, security_entry)
    last_field = security_entry + 8 if security_entry is not None else checksum + 4
    if not last_field <= size_of_headers <= len(data):
        raise FormatError(
            f"{source}: SizeOfHeaders {size_of_headers} is outside bytes {last_field} "
            f"(the end of the fields it must hold) to {len(data)} (the end of the file)"
        )
    if table_size and table_offset + table_size > len(data):
        raise FormatError(
            f"{source}: certificate table at byte {table_offset} ({table_size} bytes) "
            f"runs past the end of the file"
        )
    return _Headers(checksum, security_entry, size_of_headers, table_offset, table_size)


def authenticode_sha256(data: bytes, source: str = "EFI binary") -> bytes:
    """The Authenticode SHA-256 of a PE image: what a dbx or db SHA-256 entry holds.

    Hashed: the headers without the CheckSum field and the Certificate Table's
    data-directory entry, each section's raw data in file order, then whatever follows
    the last section up to the Certificate Table (the end of the file if unsigned),
    zero-padded to a multiple of 8 bytes. sbsign and pesign pad a binary to 8 bytes
    before they append the table and hash that padding, so with it the unsigned binary
    hashes like its signed copy, which is what the firmware computes (so do efitools'
    hash-to-efi-sig-list and virt-firmware). A Certificate Table that does not end the
    file is refused: what lies after it is hashed by some tools and not by others.
    Raises FormatError (naming `source`) for anything out of bounds.
    """
    headers = _headers(data, source)
    end = len(data)
    if headers.table_size:
        if headers.table_offset + headers.table_size != len(data):
            raise FormatError(
                f"{source}: certificate table at byte {headers.table_offset} "
                f"({headers.table_size} bytes) does not end the file ({len(data)} bytes)"
            )
        end = headers.table_offset
    digest = hashlib.sha256(data[: headers.checksum])
    if headers.security_entry is None:
        digest.update(data[headers.checksum + 4 : headers.size_of_headers])
    else:
        digest.update(data[headers.checksum + 4 : headers.security_entry])
        digest.update(data[headers.security_entry + 8 : headers.size_of_headers])
    offset = headers.size_of_headers
    with_data = [section for section in sections(data, source) if section.raw_size]
    for section in sorted(with_data, key=lambda section: section.raw_offset):
        section_end = section.raw_offset + section.raw_size
        if section_end > end:
            raise FormatError(
                f"{source}: section {section.name} (bytes {section.raw_offset} to "
                f"{section_end}) runs past the image's end at byte {end}"
            )
        digest.update(data[section.raw_offset : section_end])
        offset = section_end
    if offset < end:
        digest.update(data[offset:end])
    digest.update(bytes(-end % 8))
    return digest.digest()


def certificate_table(data: bytes, source: str = "EFI binary") -> bytes:
    """The PKCS#7 signature of a signed PE image, or b"" if it is unsigned.

    That is the first WIN_CERTIFICATE of the Certificate Table, which must be revision
    2.0 and of type PKCS_SIGNED_DATA: a DER ContentInfo holding Authenticode's
    SignedData, cut to its DER length (pesign counts its padding in dwLength). A second
    signature, if any, is ignored: sbsign writes one. Raises FormatError (naming
    `source`) for a table out of bounds or of another kind.
    """
    headers = _headers(data, source)
    if not headers.table_size:
        return b""
    at = headers.table_offset
    if headers.table_size < 8:
        raise FormatError(f"{source}: certificate table at byte {at} is shorter than 8 bytes")
    length, revision, kind = struct.unpack_from("<IHH", data, at)
    if not 8 < length <= headers.table_size:
        raise FormatError(
            f"{source}: WIN_CERTIFICATE at byte {at} claims {length} bytes, "
            f"its table has {headers.table_size}"
        )
    if revision != WIN_CERT_REVISION_2_0 or kind != WIN_CERT_TYPE_PKCS_SIGNED_DATA:
        raise FormatError(
            f"{source}: WIN_CERTIFICATE at byte {at} is revision {revision:#06x} type "
            f"{kind:#06x}, not a PKCS#7 signature (revision 0x0200 type 0x0002)"
        )
    body = data[at + 8 : at + length]
    header_size, content_size = der_header(body, 0, f"{source}: signature at byte {at + 8}")
    return body[: header_size + content_size]


def der_header(data: bytes, offset: int, source: str) -> tuple[int, int]:
    """The sizes of the header and the content of the DER object at `offset`, checked
    to lie inside `data`: enough to cut a PKCS#7 blob out of a padded container.

    Only a constructed SEQUENCE is accepted (what every PKCS#7 blob is), with a
    definite length of at most 4 bytes. Raises FormatError naming `source` and the byte.
    """
    if offset + 2 > len(data) or data[offset] != 0x30:
        raise FormatError(f"{source}: no DER SEQUENCE at byte {offset}")
    first = data[offset + 1]
    if first < 0x80:
        header, size = 2, first
    else:
        width = first & 0x7F
        if not 1 <= width <= 4 or offset + 2 + width > len(data):
            raise FormatError(f"{source}: DER length at byte {offset + 1} is not readable")
        header, size = 2 + width, int.from_bytes(data[offset + 2 : offset + 2 + width], "big")
    if offset + header + size > len(data):
        raise FormatError(
            f"{source}: DER SEQUENCE at byte {offset} ({header + size} bytes) "
            f"runs past the end ({len(data)} bytes)"
        )
    return header, size

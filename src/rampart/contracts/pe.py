"""Reading sections of a PE/COFF file (a Unified Kernel Image), standard library only.

The device-side client uses this to read `.cmdline` and `.osrel` from the EFI
binary it is about to install, so it needs no PE library. Every offset is
bounds-checked: the input comes from the network (after its signature was
verified, but still).
"""

from __future__ import annotations

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

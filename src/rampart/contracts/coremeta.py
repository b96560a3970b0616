"""Core metadata (`core-<V>.json`, written by `rampart build core`): one reader
for every use, typed.

`load` reads the whole document (the verity superblock's fields and the bundle's
size and digest), as `rampart verity verify` needs; `read_pins` reads only what a
UKI's command line pins (root hash, salt, offsets, FEC), also from a minimal or
foreign document (`roothash` for `root_hash`, the keys possibly under `"verity"`),
as `rampart build efiboot --core-meta` accepts. Both cap the file at 1 MiB and say
what is wrong in one line (LocalError: unreadable; FormatError: not Core metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rampart.contracts import verity
from rampart.errors import FormatError
from rampart.files import read_small

LIMIT = 1 << 20


@dataclass(frozen=True)
class CorePins:
    """What a UKI's command line pins of its Core."""

    root_hash: str
    hash_offset: int
    data_blocks: int
    salt: str | None = None
    version: str | None = None
    fec_offset: int | None = None
    fec_roots: int | None = None


@dataclass(frozen=True)
class CoreMeta:
    """A Core as `rampart build core` describes it (core-<V>.json)."""

    version: str
    verity: verity.VerityParams
    data_size: int  # the squashfs, padded to 4096
    fec_offset: int | None
    fec_roots: int | None
    bundle_size: int
    bundle_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "root_hash": self.verity.root_hash,
            "salt": self.verity.salt,
            "uuid": self.verity.uuid,
            "hash_algorithm": self.verity.hash_algorithm,
            "data_block_size": self.verity.data_block_size,
            "hash_block_size": self.verity.hash_block_size,
            "data_blocks": self.verity.data_blocks,
            "data_size": self.data_size,
            "hash_offset": self.verity.hash_offset,
            "fec_offset": self.fec_offset,
            "fec_roots": self.fec_roots,
            "bundle_size": self.bundle_size,
            "bundle_sha256": self.bundle_sha256,
        }


def _document(path: Path) -> dict[str, Any]:
    raw = read_small(path, "Core metadata file", LIMIT)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"{path}: not a Core metadata file (not JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: Core metadata is not a JSON object")
    return doc


def load(path: Path) -> CoreMeta:
    """Read a metadata file written by `build_core`, whole; FormatError if it is not one."""
    doc = _document(path)
    try:
        params = verity.VerityParams(
            root_hash=str(doc["root_hash"]),
            salt=str(doc["salt"]),
            data_blocks=int(doc["data_blocks"]),
            hash_offset=int(doc["hash_offset"]),
            uuid=str(doc["uuid"]),
            hash_algorithm=str(doc["hash_algorithm"]),
            data_block_size=int(doc["data_block_size"]),
            hash_block_size=int(doc["hash_block_size"]),
        )
        meta = CoreMeta(
            version=str(doc["version"]),
            verity=params,
            data_size=int(doc["data_size"]),
            fec_offset=None if doc.get("fec_offset") is None else int(doc["fec_offset"]),
            fec_roots=None if doc.get("fec_roots") is None else int(doc["fec_roots"]),
            bundle_size=int(doc["bundle_size"]),
            bundle_sha256=str(doc["bundle_sha256"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path}: not a Core metadata file ({exc})") from None
    if (
        params.hash_algorithm != "sha256"
        or params.data_block_size != verity.BLOCK
        or params.hash_block_size != verity.BLOCK
    ):
        raise FormatError(f"{path}: only sha256 with 4096-byte blocks is supported")
    return meta


def _int_field(doc: dict[str, Any], key: str, path: Path, required: bool) -> int | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise FormatError(f"{path}: Core metadata lacks {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{path}: Core metadata {key!r} is not an integer")
    return value


def read_pins(path: Path) -> CorePins:
    """What a UKI's command line pins of the Core a metadata file describes.

    Needs roothash (or root_hash), hash_offset and data_blocks; salt, version,
    fec_offset and fec_roots are optional. The keys may also sit under a
    "verity" object. FormatError if they are missing or of the wrong type.
    """
    doc = _document(path)
    nested = doc.get("verity")
    if isinstance(nested, dict):
        doc = {**doc, **nested}
    roothash = doc.get("roothash", doc.get("root_hash"))
    if not isinstance(roothash, str):
        raise FormatError(f"{path}: Core metadata lacks the verity root hash ('roothash')")
    salt = doc.get("salt")
    if salt is not None and not isinstance(salt, str):
        raise FormatError(f"{path}: Core metadata 'salt' is not a string")
    version = doc.get("version")
    if version is not None and not isinstance(version, str):
        raise FormatError(f"{path}: Core metadata 'version' is not a string")
    hash_offset = _int_field(doc, "hash_offset", path, True)
    data_blocks = _int_field(doc, "data_blocks", path, True)
    if hash_offset is None or data_blocks is None:  # required: _int_field raised
        raise FormatError(f"{path}: Core metadata lacks the verity offsets")
    return CorePins(
        root_hash=roothash,
        hash_offset=hash_offset,
        data_blocks=data_blocks,
        salt=salt,
        version=version,
        fec_offset=_int_field(doc, "fec_offset", path, False),
        fec_roots=_int_field(doc, "fec_roots", path, False),
    )

"""The webroot's chunk indexes and chunk store, audited and collected
(docs/formats.md, "Chunk index and chunk store"; docs/server.md, "Incremental
updates").

`rampart webroot check` runs `audit_index` on each release's index (signed for its
version, its chunks making up its Core exactly, each chunk in the store: with
`--verify-chunks`, each also decompressed and its id checked) and `audit_store` on the
store (only chunk files where they belong). `rampart webroot gc` removes the chunks no
index of the webroot references, under the webroot's lock, so that it never races a
publish (which writes a release's chunks before its index).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rampart import files
from rampart.contracts import chunks, cmdline, delta, signing, wire
from rampart.contracts.version import Version
from rampart.errors import FormatError, LocalError, RampartError

_CHUNK_FILE = re.compile(r"[0-9a-f]{64}\.cacnk")
_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.cacnk\.[0-9a-f]{8}\.tmp")


def read_index(path: Path, max_size: int) -> chunks.ChunkIndex:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    return chunks.parse_index(data, str(path), max_size)


def audit_index(
    release: Path,
    os_name: str,
    version: Version,
    public_key: signing.PublicKey,
    store: Path,
    verify_chunks: bool,
    problems: list[str],
) -> None:
    """The problems of one release's chunk index, if it has one (it need not)."""
    index_path = release / wire.index_name(os_name)
    sig_path = index_path.with_name(index_path.name + wire.SIGNATURE_SUFFIX)
    if not index_path.exists() and not sig_path.exists():
        return
    core = release / wire.payload_name(os_name, "core")
    data = signed(index_path, version, public_key, problems)
    if data is None:
        return
    size = core.stat().st_size if core.is_file() else 0
    try:
        index = chunks.parse_index(data, str(index_path), size)
    except RampartError as exc:
        problems.append(str(exc))
        return
    if index.size != size:
        problems.append(f"{index_path}: its chunks make {index.size} bytes, {core.name} has {size}")
        return
    _audit_chunks(index, store, index_path, verify_chunks, problems)


def signed(
    path: Path, version: Version, public_key: signing.PublicKey, problems: list[str]
) -> bytes | None:
    """The bytes of `path` if its signature beside it verifies and names `version`;
    None (and the problem noted) otherwise: how `webroot check` reads a release's
    signed documents (index, deltas, boot loader)."""
    sig_path = path.with_name(path.name + wire.SIGNATURE_SUFFIX)
    for needed in (path, sig_path):
        if not needed.is_file():
            problems.append(f"{needed}: missing")
            return None
    try:
        data = path.read_bytes()
        signature = signing.load_signature(sig_path)
        signing.verify_data(public_key, signature, data, str(path))
        comment = signature.trusted_text(str(sig_path))
    except OSError as exc:
        problems.append(f"{exc.filename}: cannot read: {exc.strerror}")
        return None
    except RampartError as exc:
        problems.append(str(exc))
        return None
    if comment != version.core:
        problems.append(f"{sig_path}: signed for {comment[:80]!r}, not {version.core!r}")
        return None
    return data


def audit_deltas(
    release: Path,
    os_name: str,
    version: Version,
    public_key: signing.PublicKey,
    problems: list[str],
) -> None:
    """The problems of one release's deltas (contracts/delta.py), if it has any: each
    signed for its version, well formed, and making the Core the release's UKI pins
    (read only for a release with deltas)."""
    core = wire.payload_name(os_name, "core")
    names = {p.name.removesuffix(wire.SIGNATURE_SUFFIX) for p in release.glob(f"{core}.from-*")}
    if not names:
        return
    try:
        target = cmdline.efi_root_hash(release / wire.payload_name(os_name, "efiboot"))
    except RampartError:
        target = None  # the UKI's own problems are reported with the payloads
    for name in sorted(names):
        path = release / name
        data = signed(path, version, public_key, problems)
        if data is None:
            continue
        try:
            found = delta.parse(data, str(path))
        except RampartError as exc:
            problems.append(str(exc))
            continue
        if target is None or found.target_root.hex() != target.root_hash:
            problems.append(f"{path}: it makes another Core than {version}'s UKI pins")
        elif found.data_size != target.hash_offset:
            problems.append(f"{path}: it makes {found.data_size} bytes of Core data, not "
                            f"{target.hash_offset}")  # fmt: skip


def _audit_chunks(
    index: chunks.ChunkIndex,
    store: Path,
    index_path: Path,
    verify_chunks: bool,
    problems: list[str],
) -> None:
    for _, length, chunk in index.spans():
        path = store / chunks.store_path(chunk)
        if not path.is_file():
            problems.append(f"{path}: missing (a chunk of {index_path})")
            continue
        if verify_chunks:
            try:
                chunks.open_chunk(path.read_bytes(), length, chunk, index.flags, str(path))
            except (OSError, RampartError) as exc:
                problems.append(str(exc) if isinstance(exc, RampartError) else f"{path}: {exc}")


def audit_store(store: Path, problems: list[str]) -> None:
    """Anything in the store but chunk files `<4 hex>/<64 hex>.cacnk` whose directory is
    the id's first 4 hex digits (a publish's leftover temporary is reported too)."""
    if not store.exists():
        return
    if store.is_symlink() or not store.is_dir():
        problems.append(f"{store}: must be a directory")
        return
    for entry in sorted(store.iterdir()):
        if not entry.is_dir() or not re.fullmatch(r"[0-9a-f]{4}", entry.name):
            problems.append(f"{entry}: unexpected entry in the chunk store")
            continue
        for item in sorted(entry.iterdir()):
            if _TEMPORARY.fullmatch(item.name):
                problems.append(f"{item}: a temporary left by an interrupted publish")
            elif not _CHUNK_FILE.fullmatch(item.name) or not item.name.startswith(entry.name):
                problems.append(f"{item}: unexpected entry in the chunk store")
            elif item.is_symlink() or not item.is_file():
                problems.append(f"{item}: a chunk must be a regular file")


@dataclass(frozen=True)
class Collected:
    indexes: int  # the indexes read
    kept: int  # chunks some index references
    removed: int  # chunks (and temporaries) removed, or that would be
    removed_bytes: int


def collect_garbage(webroot: Path, dry_run: bool = False) -> Collected:
    """Remove the store's chunks that no index of the webroot references, and the
    temporaries of interrupted publishes, holding the webroot's lock. FormatError,
    removing nothing, if an index cannot be read: its chunks would be unknown."""
    store = wire.store_dir(webroot)
    if not webroot.is_dir():
        raise LocalError(f"{webroot}: webroot not found or not a directory")
    with files.locked(webroot):
        referenced: set[str] = set()
        indexes = sorted((webroot / "dist").glob(f"*/*{wire.INDEX_SUFFIX}"))
        for path in indexes:
            try:
                index = read_index(path, 1 << 62)
            except FormatError as exc:
                raise FormatError(f"{exc}; nothing collected") from None
            referenced.update(chunks.store_path(c) for c in index.ids)
        removed = removed_bytes = kept = 0
        for entry in sorted(store.glob("*/*")) if store.is_dir() else []:
            name = f"{entry.parent.name}/{entry.name}"
            if name in referenced:
                kept += 1
                continue
            if not (_CHUNK_FILE.fullmatch(entry.name) or _TEMPORARY.fullmatch(entry.name)):
                continue  # not ours to remove: `webroot check` reports it
            removed += 1
            removed_bytes += entry.stat().st_size
            if not dry_run:
                try:
                    entry.unlink()
                except OSError as exc:
                    raise LocalError(f"{entry}: cannot remove: {exc.strerror}") from None
        if not dry_run and store.is_dir():
            for directory in store.iterdir():
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
            files.fsync_dir(store)
    return Collected(len(indexes), kept, removed, removed_bytes)

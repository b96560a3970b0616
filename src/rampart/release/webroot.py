"""The static update webroot (wire protocol v1, docs/formats.md "Webroot").

    webroot/
      dist/<version>/<os>-core, <os>-core.sig, <os>-efiboot, <os>-efiboot.sig
      update/v1/<os>/version                         default channel
      channels/<channel>/update/v1/<os>/version      other channels

Crash safety of `publish` rests on this order, each step durable before the next:
1. each payload is copied to a hidden temporary file inside `dist/<version>/`
   while being hashed, and signed from that one read; payload and signature are
   fsynced, renamed to their final names, and the directory is fsynced;
2. only then is the channel's version file written to a temporary file, fsynced,
   renamed over the old one, and its directory fsynced.
A crash leaves either the old version file (and perhaps a complete, unnamed
release, or hidden temporaries that the next publish of that release removes,
and that `webroot check` reports) or the new one naming a complete release.
No version file ever names an incomplete release. Concurrent publishes into one
webroot are serialised by an exclusive flock on the webroot directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from rampart import files
from rampart.contracts import bootloader, chunks, cmdline, efivars, hashing, pe, signing
from rampart.contracts.version import Version, check_release_length, parse_version
from rampart.contracts.wire import (
    LOADER_MAX,
    NAME,
    PAYLOADS,
    SBVAR_MAX,
    SBVARS,
    SIGNATURE_SUFFIX,
    check_name,
    delta_name,
    index_name,
    list_channels,
    loader_name,
    payload_name,
    read_version_file,
    release_dir,
    render_version_document,
    sbvar_name,
    store_dir,
    version_file,
)
from rampart.errors import (
    AuditError,
    ConflictError,
    FormatError,
    LocalError,
    RampartError,
    UsageError,
    VerificationError,
)
from rampart.files import fsync_dir

_TMP_PREFIX = ".rampart-tmp-"


def _makedirs(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry list changed."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir()
        fsync_dir(directory.parent)


@contextmanager
def _temporary(directory: Path, name: str) -> Iterator[Path]:
    """A hidden temporary path in `directory`, removed if still there on exit."""
    tmp = directory / f"{_TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _write_durably(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically: temporary file, fsync, rename, fsync dir."""
    with _temporary(path.parent, path.name) as tmp:
        with tmp.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    fsync_dir(path.parent)


def _copy_hashing(source: Path, target: Path) -> bytes:
    """Copy `source` to new file `target`, fsynced; return its BLAKE2b-512 (one read)."""
    blake = hashing.blake2b()
    with source.open("rb") as src, target.open("xb") as dst:
        with hashing.blocks(src.fileno()) as chunks:
            for chunk in chunks:
                blake.update(chunk)
                dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    target.chmod(0o644)
    return blake.digest()


def _sha256(path: Path) -> bytes:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        hashing.feed(sha, handle.fileno())
    return sha.digest()


def _clean_temporaries(directory: Path) -> None:
    for leftover in directory.glob(f"{_TMP_PREFIX}*"):
        leftover.unlink(missing_ok=True)


@dataclass(frozen=True)
class PublishResult:
    version: Version
    os_name: str
    channel: str | None
    release: Path
    version_file: Path
    reused: bool
    previous: Version | None
    epoch: int = 0  # the security epoch of the UKI (rampart.epoch on its command line)
    chunks: int = 0  # chunks in Core's index (0: no index published)
    new_chunks: int = 0  # of them, those the store did not hold yet
    new_chunk_bytes: int = 0  # their compressed size
    delta_bytes: int = 0  # the delta from `previous` (0: none published)


@dataclass(frozen=True)
class Chunking:
    """How `publish` cuts Core into chunks for incremental updates (contracts/chunks.py)."""

    # xz -6 makes chunks 10% smaller than zstd -19 at the same speed (Debian binaries
    # in 64 KiB chunks: 0.223 against 0.248 of their size; bench/incremental.py).
    compression: str = "xz"  # or "zstd"
    level: int = 6
    sizes: tuple[int, int, int] = chunks.SIZES
    deltas: bool = True  # also a delta from the channel's previous release (its Core kept)


def publish(
    webroot: Path,
    os_name: str,
    version: Version,
    core: Path,
    efiboot: Path,
    secret_key: signing.SecretKey,
    channel: str | None = None,
    force: bool = False,
    epoch: int | None = None,
    chunking: Chunking | None = Chunking(),
    loader: Path | None = None,
    sbvars: Mapping[str, Path] | None = None,
) -> PublishResult:
    """Publish a release into `webroot` and point `channel` at it (see module docstring).

    The UKI's security epoch (`rampart.epoch` on its command line, 0 without
    one) must be `epoch` when that is given.

    Raises UsageError (bad name or version, an epoch other than `epoch`), LocalError
    (missing payload, unwritable webroot), FormatError (a malformed rampart.epoch),
    ConflictError (a different release with this version exists, or the channel names
    a higher version, or one whose UKI has a higher epoch, and `force` is not set).

    With `chunking` (the default), Core's chunk index is signed beside it and its
    chunks go into the webroot's chunk store, before the version file names the
    release (None: no index; devices then stream Core whole).

    With `loader` (systemd-boot, already signed for Secure Boot: `check_loader`), the
    release carries it (`<os>-bootloader.efi`, signed like the index): devices install
    it once this release has booted and been marked good (device/bootloader.py).
    With `sbvars` ({"db" or "dbx": a signed append, `check_sbvar`}), the release
    carries those Secure Boot variable updates (`<os>-db.auth`, `<os>-dbx.auth`).
    """
    payloads = {"core": core, "efiboot": efiboot}
    _check_arguments(webroot, os_name, version, channel, payloads)
    check_payloads(os_name, version, core, efiboot)
    loader_data = None if loader is None else check_loader(loader)
    sbvar_data = {name: check_sbvar(path, name) for name, path in (sbvars or {}).items()}
    release_epoch = cmdline.efi_epoch(efiboot)
    if epoch is not None and epoch != release_epoch:
        raise UsageError(
            f"{efiboot}: the UKI has security epoch {release_epoch}, not the "
            f"{epoch} asserted with --epoch"
        )

    target = version_file(webroot, os_name, channel)
    release = release_dir(webroot, version)
    try:
        _makedirs(webroot)
        with files.locked(webroot):
            previous = read_version_file(target)
            if previous is not None and version < previous and not force:
                raise ConflictError(
                    f"{target}: channel names {previous}, refusing to go back to {version} "
                    "(use --force to roll the channel back)"
                )
            if previous is not None and not force:
                _check_epoch_order(webroot, os_name, target, previous, version, release_epoch)
            _makedirs(release)
            _clean_temporaries(release)
            reused = _write_release(release, os_name, payloads, secret_key, version)
            if loader_data is not None:
                _write_document(release / loader_name(os_name), loader_data, secret_key, version)
            for name, data in sbvar_data.items():
                _write_document(release / sbvar_name(os_name, name), data, secret_key, version)
            stats = None
            delta_bytes = None
            if chunking is not None:
                index, stats = _write_index(
                    webroot, release, os_name, secret_key, version, chunking
                )
                if chunking.deltas and previous is not None and previous < version:
                    delta_bytes = _write_delta(
                        webroot, release, os_name, secret_key, version, previous, index
                    )
            _makedirs(target.parent)
            _clean_temporaries(target.parent)
            _write_durably(target, render_version_document(version))
    except PermissionError as exc:
        raise LocalError(f"{exc.filename or webroot}: permission denied") from None
    except OSError as exc:
        where = exc.filename or webroot
        raise LocalError(f"{where}: cannot write the webroot: {exc.strerror}") from None
    result = PublishResult(
        version, os_name, channel, release, target, reused, previous, release_epoch
    )
    if stats is not None:
        result = replace(result, chunks=stats[0], new_chunks=stats[1], new_chunk_bytes=stats[2])
    if delta_bytes is not None:
        result = replace(result, delta_bytes=delta_bytes)
    return result


def _write_index(
    webroot: Path,
    release: Path,
    os_name: str,
    secret_key: signing.SecretKey,
    version: Version,
    chunking: Chunking,
) -> tuple[chunks.ChunkIndex, tuple[int, int, int]]:
    """Cut the published Core into chunks, put the new ones into the store, then write
    and sign its index (the signature lands first, as for a payload); the index and
    (chunks, new chunks, their compressed bytes). An index already there is kept: a
    release never changes, and the chunker cuts the same Core the same way."""
    from rampart.release import chunker  # numpy: only when publishing chunks

    index_path = release / index_name(os_name)
    signature_path = index_path.with_name(index_path.name + SIGNATURE_SUFFIX)
    store = store_dir(webroot)
    _makedirs(store)
    index, stats = chunker.make_index(
        release / f"{os_name}-core",
        store,
        sizes=chunking.sizes,
        compression=chunking.compression,
        level=chunking.level,
    )
    for directory in stats.directories:
        fsync_dir(directory)
    fsync_dir(store)
    if not (signature_path.exists() and index_path.exists()):
        _write_signed(index_path, index.render(), secret_key, version)
    return index, (stats.chunks, stats.new, stats.new_bytes)


def check_loader(path: Path) -> bytes:
    """The boot loader `path` a release is to carry: a systemd-boot image with an
    Authenticode signature (which db certificate verifies it is the device's check,
    against its firmware's db), at most `wire.LOADER_MAX` bytes. FormatError or
    LocalError otherwise."""
    data = files.read_small(path, "boot loader", LOADER_MAX)
    bootloader.loader_info(data, str(path))
    if not pe.certificate_table(data, str(path)):
        raise FormatError(
            f"{path}: not signed for Secure Boot; sign it with the db key first "
            "(`rampart release --loader` signs it)"
        )
    return data


def check_sbvar(path: Path, variable: str) -> bytes:
    """The signed append to `variable` (db or dbx) at `path` a release is to carry
    (`rampart keys db-append|dbx-append`): a time-based authenticated append whose
    payload is signature lists. Whether the firmware's KEK signed it is the firmware's
    check. FormatError or UsageError otherwise."""
    if variable not in SBVARS:
        raise UsageError(f"{variable}: a release updates only {' and '.join(SBVARS)}")
    data = files.read_small(path, f"{variable} update", SBVAR_MAX)
    write = efivars.parse_authenticated_write(data, str(path))
    if not write.attributes & efivars.APPEND_WRITE:
        raise FormatError(f"{path}: not an append (a release never replaces {variable})")
    return data


def _write_document(
    path: Path, data: bytes, secret_key: signing.SecretKey, version: Version
) -> None:
    """A document the release carries (its boot loader, a variable update), signed;
    one already there must be the same (a release never changes)."""
    if path.exists():
        if path.read_bytes() != data:
            raise ConflictError(
                f"{path}: release {version.core} already carries another {path.name}; "
                "a release never changes"
            )
        return
    _write_signed(path, data, secret_key, version)


def _write_signed(path: Path, data: bytes, secret_key: signing.SecretKey, version: Version) -> None:
    """`data` into `path` and its signature (prehashed, trusted comment the version)
    beside it; the signature lands first, as for a payload."""
    signature_path = path.with_name(path.name + SIGNATURE_SUFFIX)
    signature = secret_key.sign_message(
        hashing.blake2b(data).digest(), version.core.encode(), prehashed=True
    )
    with (
        _temporary(path.parent, path.name) as tmp_data,
        _temporary(path.parent, signature_path.name) as tmp_sig,
    ):
        for tmp, content in ((tmp_data, data), (tmp_sig, signature.to_bytes())):
            with tmp.open("xb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.chmod(0o644)
        tmp_sig.replace(signature_path)
        tmp_data.replace(path)
    fsync_dir(path.parent)


def _write_delta(
    webroot: Path,
    release: Path,
    os_name: str,
    secret_key: signing.SecretKey,
    version: Version,
    base: Version,
    index: chunks.ChunkIndex,
) -> int | None:
    """Sign a delta of the published Core from `base`'s (contracts/delta.py) into the
    release, when the webroot still holds `base`'s Core and index and both UKIs pin a
    root hash; its size, or None (none made: devices use the chunks). One already
    there is kept; one larger than a device fetches is not written."""
    from rampart.contracts import delta as delta_format
    from rampart.release import delta  # zstandard: only when publishing deltas

    path = release / delta_name(os_name, base)
    if path.exists() and path.with_name(path.name + SIGNATURE_SUFFIX).exists():
        return path.stat().st_size
    base_dir = release_dir(webroot, base)
    core = payload_name(os_name, "core")
    base_index = base_dir / index_name(os_name)
    if not (base_dir / core).is_file() or not base_index.is_file():
        return None  # the previous release is gone from the webroot, or has no index
    roots = [_root_hash(d / payload_name(os_name, "efiboot")) for d in (base_dir, release)]
    if roots[0] is None or roots[1] is None:
        return None
    old_index = chunks.parse_index(
        base_index.read_bytes(), str(base_index), (base_dir / core).stat().st_size
    )
    made = delta.make(
        base_dir / core,
        old_index,
        roots[0].hash_offset,
        release / core,
        index,
        roots[1].hash_offset,
        (bytes.fromhex(roots[0].root_hash), bytes.fromhex(roots[1].root_hash)),
    )
    data = made.render()
    if len(data) > delta_format.DELTA_MAX:
        return None
    _write_signed(path, data, secret_key, version)
    return len(data)


def _root_hash(efiboot: Path) -> cmdline.RootHash | None:
    """The verity root hash a published UKI pins (None: none, or no UKI there)."""
    try:
        return cmdline.efi_root_hash(efiboot)
    except RampartError:
        return None


def _check_arguments(
    webroot: Path, os_name: str, version: Version, channel: str | None, payloads: dict[str, Path]
) -> None:
    """UsageError for a bad name or version, LocalError for a missing payload or webroot."""
    check_name(os_name, "OS name")
    if channel is not None:
        check_name(channel, "channel name")
    if version.build:
        raise UsageError(f"version {version}: build metadata is not allowed in a release version")
    check_release_length(version)
    for kind, path in payloads.items():
        if not path.is_file():
            raise LocalError(f"{path}: {kind} payload not found or not a regular file")
        if not os.access(path, os.R_OK):
            raise LocalError(f"{path}: {kind} payload is not readable")
    if webroot.exists() and not webroot.is_dir():
        raise LocalError(f"{webroot}: webroot is not a directory")


def check_payloads(os_name: str, version: Version, core: Path, efiboot: Path) -> None:
    """Refuse payloads a device would refuse (contracts/payload.py): a UKI that is
    not a UKI of `os_name` `version` booting `core_<version>`, a Core that is not a
    squashfs carrying the verity tree the UKI's root hash pins (checked
    block by block here, once: the vendor's machine can afford it). FormatError for
    a payload of the wrong kind (swapped), VerificationError for another OS, version
    or Core."""
    from rampart.contracts import payload, verity

    checked = payload.check_release(efiboot, core, os_name=os_name, version=version, vg=None)
    root = checked.efiboot.root
    if root is None:
        return
    superblock = verity.parse_superblock(
        payload.read_at(core, root.hash_offset, verity.SUPERBLOCK, "verity superblock"),
        str(core),
    )
    params = verity.VerityParams(
        root_hash=root.root_hash,
        salt=superblock["salt"],
        data_blocks=superblock["data_blocks"],
        hash_offset=root.hash_offset,
        uuid=superblock["uuid"],
    )
    try:
        verity.verify(core, params)
    except VerificationError as exc:
        raise VerificationError(
            f"{core}: Core does not match the root hash of the UKI {efiboot.name} ({exc})"
        ) from None


def _check_epoch_order(
    webroot: Path, os_name: str, target: Path, previous: Version, version: Version, epoch: int
) -> None:
    """ConflictError if the channel's current release has a higher security epoch:
    devices that ran it refuse to install a lower one (and their TPM would not boot it)."""
    published = release_dir(webroot, previous) / f"{os_name}-efiboot"
    if not published.is_file():
        return  # not published (completely): nothing to compare with
    current = cmdline.efi_epoch(published)
    if current > epoch:
        raise ConflictError(
            f"{target}: channel names {previous} with security epoch {current}, refusing to "
            f"publish {version} with the lower epoch {epoch} (devices would refuse it; "
            "use --force to publish it anyway)"
        )


def _write_release(
    release: Path,
    os_name: str,
    payloads: dict[str, Path],
    secret_key: signing.SecretKey,
    version: Version,
) -> bool:
    """Write and sign each payload not yet in `release`; return True if all were there.

    A payload already published must be byte-identical and validly signed for
    this version, else ConflictError: a release, once published, never changes.
    A release left incomplete by a crash is completed.
    """
    comment = version.core.encode()
    reused = True
    for kind in PAYLOADS:
        final = release / f"{os_name}-{kind}"
        final_sig = final.with_name(final.name + ".sig")
        if final.exists():
            _check_same_payload(final, payloads[kind], secret_key, version)
            continue
        reused = False
        with (
            _temporary(release, final.name) as tmp_payload,
            _temporary(release, final_sig.name) as tmp_sig,
        ):
            digest = _copy_hashing(payloads[kind], tmp_payload)
            signature = secret_key.sign_message(digest, comment, prehashed=True)
            with tmp_sig.open("xb") as handle:
                handle.write(signature.to_bytes())
                handle.flush()
                os.fsync(handle.fileno())
            tmp_sig.chmod(0o644)
            # The signature lands before its payload: a payload never sits
            # under its final name without its signature beside it.
            tmp_sig.replace(final_sig)
            tmp_payload.replace(final)
        fsync_dir(release)
    return reused


def _check_same_payload(
    published: Path, candidate: Path, secret_key: signing.SecretKey, version: Version
) -> None:
    if _sha256(published) != _sha256(candidate):
        raise ConflictError(
            f"{published}: release {version.core} already exists with different content; "
            "publish under a new version"
        )
    sig_path = published.with_name(published.name + ".sig")
    signature = signing.load_signature(sig_path)
    signing.verify_file(published, signature, secret_key.public_key)
    if signature.trusted_text(str(sig_path)) != version.core:
        raise ConflictError(f"{sig_path}: signed for another version than {version.core}")


# --- audit -------------------------------------------------------------------------


def audit(webroot: Path, public_key: signing.PublicKey, verify_chunks: bool = False) -> list[str]:
    """Everything wrong with `webroot`, one line each; an empty list if it is sound.
    `verify_chunks`: also decompress every chunk an index names and check its id."""
    if not webroot.is_dir():
        raise LocalError(f"{webroot}: webroot not found or not a directory")
    problems: list[str] = []
    for name in ("dist", "update", "channels"):
        entry = webroot / name
        if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
            problems.append(f"{entry}: must be a directory")
    if problems:
        return problems
    try:
        _audit_tree(webroot, public_key, problems, verify_chunks)
    except OSError as exc:
        problems.append(f"{exc.filename or webroot}: cannot read: {exc.strerror}")
    return problems


def _audit_tree(
    webroot: Path, public_key: signing.PublicKey, problems: list[str], verify_chunks: bool
) -> None:
    expected_top = {"dist", "update", "channels"}
    for entry in sorted(webroot.iterdir()):
        if entry.name not in expected_top:
            problems.append(f"{entry}: unexpected entry at the top of the webroot")
    _audit_version_tree(webroot, problems)
    channels_dir = webroot / "channels"
    if channels_dir.exists():
        for entry in sorted(channels_dir.iterdir()):
            if not entry.is_dir() or not NAME.fullmatch(entry.name):
                problems.append(f"{entry}: not a valid channel directory")
                continue
            for sub in sorted(entry.iterdir()):
                if sub.name != "update":
                    problems.append(f"{sub}: unexpected entry in a channel directory")
            _audit_version_tree(entry, problems)
    releases = _audit_dist(webroot, public_key, problems, verify_chunks)
    for channel in list_channels(webroot, problems):
        label = "default channel" if channel.name is None else f"channel {channel.name}"
        path = version_file(webroot, channel.os_name, channel.name)
        if channel.version.build:
            problems.append(f"{path}: names {channel.version}, which carries build metadata")
        if (channel.version.core, channel.os_name) not in releases:
            problems.append(
                f"{path}: {label} names {channel.version} for {channel.os_name}, "
                "which is not published (or not completely)"
            )


def _audit_version_tree(root: Path, problems: list[str]) -> None:
    update = root / "update"
    if not update.exists():
        return
    for entry in sorted(update.iterdir()):
        if entry.name != "v1" or not entry.is_dir():
            problems.append(f"{entry}: unexpected entry (only update/v1/ is defined)")
    v1 = update / "v1"
    if not v1.is_dir():
        return
    for os_dir in sorted(v1.iterdir()):
        if not os_dir.is_dir() or not NAME.fullmatch(os_dir.name):
            problems.append(f"{os_dir}: not a valid OS directory")
            continue
        for entry in sorted(os_dir.iterdir()):
            if entry.name != "version":
                problems.append(f"{entry}: unexpected file beside the version file")
            elif entry.is_symlink() or not entry.is_file():
                problems.append(f"{entry}: the version file must be a regular file")


def _audit_dist(
    webroot: Path, public_key: signing.PublicKey, problems: list[str], verify_chunks: bool
) -> set[tuple[str, str]]:
    """Check every release and the chunk store; return the complete (version, os) pairs."""
    from rampart.release import chunkstore

    complete: set[tuple[str, str]] = set()
    dist = webroot / "dist"
    if not dist.exists():
        return complete
    store = store_dir(webroot)
    chunkstore.audit_store(store, problems)
    for release in sorted(dist.iterdir()):
        if release == store:
            continue
        version = _release_version(release, problems)
        if version is None:
            continue
        for os_name, present in sorted(_release_files(release, problems).items()):
            if _audit_release(release, os_name, present, version, public_key, problems):
                complete.add((release.name, os_name))
            chunkstore.audit_index(
                release, os_name, version, public_key, store, verify_chunks, problems
            )
            chunkstore.audit_deltas(release, os_name, version, public_key, problems)
            _audit_loader(release / loader_name(os_name), version, public_key, problems)
            for name in SBVARS:
                _audit_sbvar(
                    release / sbvar_name(os_name, name), name, version, public_key, problems
                )
    return complete


def _audit_loader(
    path: Path, version: Version, public_key: signing.PublicKey, problems: list[str]
) -> None:
    """The problems of a release's boot loader, if it carries one: signed for its
    version, a signed systemd-boot image (`check_loader`)."""
    from rampart.release import chunkstore

    if not (path.exists() or path.with_name(path.name + SIGNATURE_SUFFIX).exists()):
        return
    if chunkstore.signed(path, version, public_key, problems) is None:
        return
    try:
        check_loader(path)
    except RampartError as exc:
        problems.append(str(exc))


def _audit_sbvar(
    path: Path, variable: str, version: Version, public_key: signing.PublicKey, problems: list[str]
) -> None:
    """The problems of a release's update of `variable`, if it carries one: signed for
    its version, a signed append (`check_sbvar`)."""
    from rampart.release import chunkstore

    if not (path.exists() or path.with_name(path.name + SIGNATURE_SUFFIX).exists()):
        return
    if chunkstore.signed(path, version, public_key, problems) is None:
        return
    try:
        check_sbvar(path, variable)
    except RampartError as exc:
        problems.append(str(exc))


def _release_version(release: Path, problems: list[str]) -> Version | None:
    """The version a dist/ entry is the release of; None (a problem) if it is none."""
    if not release.is_dir():
        problems.append(f"{release}: unexpected file in dist/")
        return None
    try:
        version = parse_version(release.name, "release directory")
    except UsageError:
        problems.append(f"{release}: directory name is not a semantic version")
        return None
    if version.build:
        problems.append(f"{release}: release directory carries build metadata")
    return version


def _release_files(release: Path, problems: list[str]) -> dict[str, set[str]]:
    """The payload and signature file names of a release directory, by OS."""
    oses: dict[str, set[str]] = {}
    for entry in sorted(release.iterdir()):
        match = re.fullmatch(
            r"(?P<os>.+)-(?P<kind>core|efiboot|core\.caibx|core\.from-[^/]+\.delta|bootloader\.efi"
            r"|dbx?\.auth)"
            r"(?P<sig>\.sig)?",
            entry.name,
        )
        if match is None or not entry.is_file() or not NAME.fullmatch(match["os"]):
            problems.append(f"{entry}: unexpected entry in a release directory")
            continue
        oses.setdefault(match["os"], set()).add(entry.name)
    return oses


def _audit_release(
    release: Path,
    os_name: str,
    present: set[str],
    version: Version,
    public_key: signing.PublicKey,
    problems: list[str],
) -> bool:
    """Whether one OS's release is complete and each payload's signature verifies."""
    ok = True
    for kind in PAYLOADS:
        payload = release / payload_name(os_name, kind)
        signature = payload.name + SIGNATURE_SUFFIX
        for needed in (payload.name, signature):
            if needed not in present:
                problems.append(f"{release / needed}: missing")
                ok = False
        if payload.name in present and signature in present:
            ok = _audit_payload(payload, version, public_key, problems) and ok
    return ok


def _audit_payload(
    payload: Path, version: Version, public_key: signing.PublicKey, problems: list[str]
) -> bool:
    sig_path = payload.with_name(payload.name + ".sig")
    try:
        signature = signing.load_signature(sig_path)
        signing.verify_file(payload, signature, public_key)
        comment = signature.trusted_text(str(sig_path))
    except RampartError as exc:
        problems.append(str(exc))
        return False
    if comment != version.core:
        problems.append(
            f"{sig_path}: trusted comment is {comment[:80]!r}, expected the release version "
            f"{version.core!r}"
        )
        return False
    return True


def check(webroot: Path, public_key: signing.PublicKey) -> None:
    """Raise AuditError listing every problem of `webroot`."""
    problems = audit(webroot, public_key)
    if problems:
        raise AuditError(f"{webroot}: {len(problems)} problem(s) found", problems)

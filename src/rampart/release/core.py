"""The Core image: a reproducible squashfs of a root tree (uncompressed by default)
with its dm-verity hash tree appended (optionally followed by forward error
correction), in the layout CLIP OS bundles and `veritysetup` reads (docs/formats.md,
"Core").

    core-<V>.img   squashfs ‖ verity superblock + hash tree [‖ FEC parity]
    core-<V>.json  the metadata: version, root hash, salt, sizes, offsets, SHA-256

Reproducible: mksquashfs with fixed timestamps and sorted entries, uncompressed
unless a compression is asked for (`COMPRESSIONS`: a smaller Core to move and
write, for some CPU at every read on the device); the verity salt and UUID are
derived from the squashfs bytes, so the same tree gives the same bundle, byte for
byte. Outputs are written under temporary names and renamed last: a failure leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid as uuid_mod
from pathlib import Path

from rampart import run
from rampart.contracts import hashing, verity
from rampart.contracts.coremeta import CoreMeta
from rampart.contracts.version import Version
from rampart.errors import LocalError, UsageError

FEC_ROOTS = 2
# squashfs compressions a Core may use, with mksquashfs's options for each: every one
# is readable by the kernels Rampart boots (CONFIG_SQUASHFS_<NAME>=y in Debian's).
COMPRESSIONS: dict[str, tuple[str, ...]] = {
    "zstd": ("-comp", "zstd", "-Xcompression-level", "6"),
    "lz4": ("-comp", "lz4"),
    "xz": ("-comp", "xz"),
    "gzip": ("-comp", "gzip"),
}
_UNCOMPRESSED = ("-noI", "-noD", "-noF", "-noX")
_TMP = ".rampart-build-"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex, read in large unbuffered chunks."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        hashing.feed(digest, handle.fileno())
    return digest.hexdigest()


def build_core(
    rootfs: Path,
    version: Version,
    out_dir: Path,
    fec: bool = False,
    compression: str | None = None,
) -> CoreMeta:
    """Build `core-<V>.img` and `core-<V>.json` in `out_dir` from the tree `rootfs`,
    uncompressed or with one of `COMPRESSIONS`."""
    if compression is not None and compression not in COMPRESSIONS:
        raise UsageError(
            f"compression {compression!r}: not one of {', '.join(sorted(COMPRESSIONS))}"
        )
    squash = _UNCOMPRESSED if compression is None else COMPRESSIONS[compression]
    if not rootfs.is_dir():
        raise UsageError(f"{rootfs}: root tree is not a directory")
    if version.build:
        raise UsageError(f"version {version}: build metadata is not allowed in a release")
    if shutil.which("mksquashfs") is None:
        raise LocalError("mksquashfs: command not found (run `make setup`)")
    if fec and shutil.which("veritysetup") is None:
        raise LocalError("veritysetup: command not found (run `make setup`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"core-{version.core}"
    image = out_dir / f"{name}.img"
    meta_path = out_dir / f"{name}.json"
    tmp_image = out_dir / f"{_TMP}{name}.img"
    tmp_meta = out_dir / f"{_TMP}{name}.json"
    try:
        tmp_image.unlink(missing_ok=True)
        run.run(
            [
                "mksquashfs",
                str(rootfs),
                str(tmp_image),
                "-noappend",
                "-no-progress",
                "-quiet",
                *squash,
                "-all-time",
                "0",
                "-mkfs-time",
                "0",
                "-reproducible",
                "-processors",
                "2",
            ],
            timeout=3600,
        )
        size = tmp_image.stat().st_size
        data_size = -(-size // verity.BLOCK) * verity.BLOCK
        if data_size != size:
            with tmp_image.open("r+b") as handle:
                handle.truncate(data_size)
        # Salt and UUID derived from the content: the same tree, the same bundle.
        content = file_sha256(tmp_image)
        salt = hashlib.sha256(b"rampart verity salt\0" + bytes.fromhex(content)).digest()
        volume = str(
            uuid_mod.UUID(
                bytes=hashlib.sha256(b"rampart verity uuid\0" + salt).digest()[:16], version=4
            )
        )
        fec_offset: int | None = None
        if fec:
            params, fec_offset = _format_with_fec(tmp_image, data_size, salt, volume)
        else:
            params = verity.build(tmp_image, salt=salt, uuid=volume)
        meta = CoreMeta(
            version=version.core,
            verity=params,
            data_size=data_size,
            fec_offset=fec_offset,
            fec_roots=FEC_ROOTS if fec else None,
            bundle_size=tmp_image.stat().st_size,
            bundle_sha256=file_sha256(tmp_image),
        )
        tmp_meta.write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
        for tmp in (tmp_image, tmp_meta):
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        tmp_image.replace(image)
        tmp_meta.replace(meta_path)
    finally:
        tmp_image.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return meta


def _format_with_fec(
    image: Path, data_size: int, salt: bytes, volume: str
) -> tuple[verity.VerityParams, int]:
    """Hash tree and FEC by `veritysetup format` (Reed-Solomon is not redone in Python)."""
    blocks = data_size // verity.BLOCK
    fec_offset = data_size + verity.BLOCK + verity.tree_size(blocks)
    out = run.run(
        [
            "veritysetup",
            "format",
            "--data-blocks",
            str(blocks),
            "--hash-offset",
            str(data_size),
            "--fec-device",
            str(image),
            "--fec-offset",
            str(fec_offset),
            "--fec-roots",
            str(FEC_ROOTS),
            "--salt",
            salt.hex(),
            "--uuid",
            volume,
            str(image),
            str(image),
        ],
        timeout=3600,
    ).stdout.decode(errors="replace")
    root = next(
        (
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.lower().startswith("root hash")
        ),
        None,
    )
    if root is None:
        raise LocalError("veritysetup format: no root hash in its output")
    params = verity.VerityParams(
        root_hash=root, salt=salt.hex(), data_blocks=blocks, hash_offset=data_size, uuid=volume
    )
    return params, fec_offset


def verify_core(image: Path, meta: CoreMeta) -> None:
    """Check the bundle's data and hash tree against the metadata's root hash."""
    verity.verify(image, meta.verity)

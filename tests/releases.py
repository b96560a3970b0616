"""Real, small release payloads for the tests: a Core built by `rampart build core`'s
`core.build_core` (an uncompressed squashfs with its dm-verity tree appended) and an
unsigned UKI assembled by `uki.build` on systemd's stub, with the command line
`rampart build efiboot` writes (`kernel_cmdline`).

The UKI's kernel is a tiny stand-in bzImage (the x86 setup header `uki.build`
checks, and no code): the tests never boot these UKIs, and the real 8 MiB kernel
would make every release 8 MiB. The boot tests (tests/image, the testbed) use
the real kernel.

Each distinct release is built once per test session and cached; callers get
fresh copies, so a test may modify or delete them.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import struct
import tempfile
import threading
from pathlib import Path

from rampart.contracts.cmdline import kernel_cmdline
from rampart.contracts.version import parse_version
from rampart.release import core, uki

OS = "clipos"
VG = "mainvg"
DEFAULT_CORE_SIZE = 300_000
UNAME = "6.1.0-rampart-test"

_lock = threading.Lock()
_cache: dict[tuple[object, ...], tuple[Path, Path]] = {}
_root: Path | None = None


def _cache_dir() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="rampart-releases-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def fake_kernel(path: Path) -> Path:
    """A 4 KiB x86 bzImage header with no kernel behind it (never booted): MZ, "HdrS",
    boot protocol 2.15, loaded high, and a kernel version string for `.uname`."""
    head = bytearray(4096)
    head[:2] = b"MZ"
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<H", head, 0x20E, 0x200)  # version string at 0x200 + 0x200
    head[0x211] = 0x01
    text = f"{UNAME} (rampart test kernel)\0".encode()
    head[0x400 : 0x400 + len(text)] = text
    path.write_bytes(bytes(head))
    return path


def _initrd(path: Path) -> Path:
    from tests.release import bootkit

    return bootkit.tiny_initrd(path)


def _build(
    os_name: str,
    version: str,
    vg: str,
    epoch: int | None,
    core_size: int,
    root_hash: bool,
    content: str,
    common: bool = False,
) -> tuple[Path, Path]:
    work = Path(tempfile.mkdtemp(prefix="build-", dir=_cache_dir()))
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text(f"ID={os_name}\nVERSION_ID={version}\n{content}")
    # Content decided by the release: each release's Core differs, and a rebuild is equal.
    # `common`: the same payload in every version (Cores that share most chunks).
    seed = f"{os_name} {'' if common else version} {core_size} {content}".encode()
    (tree / "payload").write_bytes(hashlib.shake_256(seed).digest(core_size))
    meta = core.build_core(tree, parse_version(version), work)
    if root_hash:
        cmdline = kernel_cmdline(
            vg,
            version,
            roothash=meta.verity.root_hash,
            salt=meta.verity.salt,
            hash_offset=meta.verity.hash_offset,
            data_blocks=meta.verity.data_blocks,
            epoch=epoch,
        )
    else:
        # What a hand-made EFI binary without verity would carry.
        name = f"core_{version}"
        cmdline = f"root=/dev/{vg}/{name} rootfstype=squashfs ro rampart.core={vg}/{name}"
        if epoch is not None:
            cmdline += f" rampart.epoch={epoch}"
    efiboot = build_uki(work / f"{os_name}-{version}.efi", os_name, version, cmdline)
    return work / f"core-{version}.img", efiboot


def build_uki(out: Path, os_name: str, version: str, cmdline: str) -> Path:
    """An unsigned UKI (`uki.build`, the stand-in kernel) with any command line: for
    EFI binaries whose .osrel and command line disagree."""
    work = Path(tempfile.mkdtemp(prefix="uki-", dir=_cache_dir()))
    uki.build(
        out,
        kernel=fake_kernel(work / "vmlinuz"),
        initrd=_initrd(work / "initrd.cpio"),
        os_name=os_name,
        version=version,
        cmdline=cmdline,
    )
    return out


def build_payloads(
    directory: Path,
    version: str,
    *,
    os_name: str = OS,
    vg: str = VG,
    epoch: int | None = None,
    core_size: int = DEFAULT_CORE_SIZE,
    root_hash: bool = True,
    content: str = "",
    common: bool = False,
) -> tuple[Path, Path]:
    """Copies of a real release's payloads in `directory`: (core-<V>, efiboot-<V>).

    `root_hash=False`: the UKI's command line pins no verity root hash (a Core
    without verity is what it boots). `content` changes Core's tree (another build
    of the same version)."""
    key = (os_name, version, vg, epoch, core_size, root_hash, content, common)
    with _lock:
        if key not in _cache:
            _cache[key] = _build(os_name, version, vg, epoch, core_size, root_hash, content, common)
        built_core, built_efiboot = _cache[key]
    directory.mkdir(parents=True, exist_ok=True)
    core_out = directory / f"core-{version}"
    efiboot_out = directory / f"efiboot-{version}"
    shutil.copyfile(built_core, core_out)
    shutil.copyfile(built_efiboot, efiboot_out)
    return core_out, efiboot_out

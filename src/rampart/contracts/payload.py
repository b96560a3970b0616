"""What a release's payloads must be before the device installs them.

The signatures bind each payload to a version only, not to a name or a kind:
another OS's release signed with the same key, or a release whose Core and EFI
binary are swapped, verifies. Until signed metadata binds names and kinds, the
device checks what it installs, after the signatures verified and before the
disk is touched:

- the UKI is a PE image with the UKI sections `.linux`, `.initrd`,
  `.cmdline` and `.osrel`; its `.osrel` has `ID=<os_name>` and the version
  systemd-boot sorts by (IMAGE_VERSION, else VERSION, VERSION_ID, BUILD_ID) is
  the one being installed; its command line pins `core_<V>` on this device's
  volume group (`rampart.core=<vg>/core_<V>`, or CLIP OS's
  `rd.verity.device=…/<vg>/core_<V>`), each pinning parameter once;
- with a verity root hash on that command line, its offsets are sane;
  without one, the device must not be a verity device (one whose installed
  UKIs or running kernel pin a root hash);
- Core is a squashfs (`hsqs`, version 4) whose `bytes_used` fits the image;
  with a root hash, the squashfs fits the verity data area, a verity
  superblock sits at the hash offset with the command line's data block
  count, the hash tree lies inside the image and matches the root hash (read
  whole: 8 MiB for a 1 GiB Core). The data blocks are checked against that tree
  once written into the slot (`device/corewrite.py`).

The checks are pure: bytes in, the verified facts or an exception out
(FormatError for what is not a UKI or not a squashfs, VerificationError for a
payload of another OS, version or kind). `rampart publish` runs the same checks
(`check_uki` with no volume group, `check_core`) before signing anything.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from rampart.contracts import cmdline, osrel, pe, verity
from rampart.contracts.version import Version
from rampart.errors import FormatError, LocalError, VerificationError

UKI_SECTIONS = (".linux", ".initrd", ".cmdline", ".osrel")
SQUASHFS_MAGIC = b"hsqs"
SQUASHFS_SUPERBLOCK = 96
_SQUASHFS_MAJOR = 4


@dataclass(frozen=True)
class CheckedUki:
    """The verified facts of a UKI about to be installed or published."""

    os_id: str
    version: str
    core: str  # the LV its command line boots, as written there
    root: cmdline.RootHash | None
    epoch: int


def device_vg(backend: str, destination: str) -> str:
    """The volume group a device's UKIs name: the LVM backend's volume group
    (`[core] destination`), or the file backend's directory name (`.../mainvg` stands
    in for `mainvg`)."""
    return Path(destination).name if backend == "file" else destination


def check_uki(
    data: bytes,
    source: str,
    *,
    os_name: str,
    version: Version,
    vg: str | None,
    require_root_hash: bool = False,
) -> CheckedUki:
    """Check that `data` is the UKI of `os_name` `version` booting `core_<version>`.

    `vg` is this device's volume group (None: any, as `publish` does not know it).
    `require_root_hash`: refuse a command line without a verity root hash.
    FormatError: not a PE image with the UKI sections, or unreadable sections;
    VerificationError: a UKI of another OS, version or LV, or without a root hash
    where one is required.
    """
    try:
        names = {section.name for section in pe.sections(data, source)}
    except FormatError as exc:
        raise FormatError(f"{exc}; refusing it as the EFI binary") from None
    missing = [name for name in UKI_SECTIONS if name not in names]
    if missing:
        raise FormatError(
            f"{source}: not a Unified Kernel Image (no {', '.join(missing)} section); "
            "refusing to install it as the UKI"
        )
    osrel_raw = pe.section_data(data, ".osrel", source) or b""
    try:
        release = osrel.parse_os_release(osrel_raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FormatError(f"{source}: .osrel is not UTF-8") from None
    line = pe.cmdline(data, source) or ""
    os_id = release.get("ID", "")
    shown_version = osrel.sort_version(release)
    if os_id != os_name:
        raise VerificationError(
            f"{source}: its .osrel names the OS {os_id[:64]!r}, not {os_name!r}; "
            "refusing another OS's release"
        )
    if shown_version != version.core:
        shown = (shown_version or "")[:80]
        raise VerificationError(
            f"{source}: its .osrel names version {shown!r}, not {version.core!r}"
        )
    slot = f"core_{version.core}"
    words = line.split()
    ours = cmdline.param(words, "rampart.core", source)  # <vg>/<lv>, exactly
    clip = cmdline.param(words, "rd.verity.device", source)  # a device path ending in /<vg>/<lv>
    lv = ours or clip
    wanted = slot if vg is None else f"{vg}/{slot}"
    if ours is not None:
        pinned = ours == wanted if vg is not None else ours.partition("/")[2] == slot
    else:
        pinned = clip is not None and clip.endswith("/" + wanted)
    if lv is None or not pinned:
        raise VerificationError(
            f"{source}: its command line boots {(lv or 'no Core LV')[:140]}, not {wanted}"
        )
    root = cmdline.root_hash(line, source)
    if root is None and require_root_hash:
        raise VerificationError(
            f"{source}: its command line pins no verity root hash, and this device's Cores "
            "carry verity; refusing a UKI that would boot an unverified Core"
        )
    return CheckedUki(os_id, version.core, lv, root, cmdline.cmdline_epoch(line, source))


def check_core(head: bytes, size: int, source: str) -> int:
    """Check that a Core image of `size` bytes starting with `head` is a squashfs.

    Returns the squashfs' `bytes_used`. FormatError otherwise (a UKI in
    Core's place, random bytes, another file system).
    """
    if len(head) < SQUASHFS_SUPERBLOCK or head[:4] != SQUASHFS_MAGIC:
        raise FormatError(
            f"{source}: not a squashfs image (no 'hsqs' magic); refusing to install it as Core"
        )
    (major,) = struct.unpack_from("<H", head, 28)
    (used,) = struct.unpack_from("<Q", head, 40)
    if major != _SQUASHFS_MAJOR or not 0 < used <= size:
        raise FormatError(f"{source}: malformed squashfs superblock (version or size)")
    return int(used)


def check_core_verity(
    bytes_used: int, superblock: bytes, size: int, root: cmdline.RootHash, source: str
) -> verity.VerityParams:
    """Check that Core carries the verity tree `root` describes: the squashfs fits the
    data area, a verity superblock is at the hash offset with the command line's data
    block count, and the tree lies inside the image. Returns the verity parameters
    (`verity.check_tree` then checks the tree against the root hash).

    FormatError without a verity superblock there (a Core without verity);
    VerificationError if it does not match the command line.
    """
    if root.hash_offset + verity.SUPERBLOCK > size:
        raise FormatError(
            f"{source}: no verity superblock at the hash offset {root.hash_offset} "
            f"(the image has {size} bytes); refusing a Core without verity"
        )
    fields = verity.parse_superblock(superblock, source)
    params = root.verity_params(fields)
    blocks = params.data_blocks
    if (
        fields["data_blocks"] != blocks
        or fields["hash_algorithm"] != "sha256"
        or fields["data_block_size"] != verity.BLOCK
        or fields["hash_block_size"] != verity.BLOCK
        or params.data_size > root.hash_offset
        or bytes_used > params.data_size
        or params.hash_start + verity.tree_size(blocks) > size
    ):
        raise VerificationError(
            f"{source}: its verity superblock and squashfs do not match the EFI binary's "
            "command line (data blocks, hash offset or sizes)"
        )
    return params


def check_core_tree(
    tree: bytes | memoryview, params: verity.VerityParams, source: str
) -> bytes | memoryview:
    """Check Core's hash tree (read at `params.hash_start`) against the UKI's root
    hash: a Core of another build is refused before anything is written. (Its data
    blocks are checked against the tree once written into the slot.) Returns level 0
    of the tree, which the data blocks are checked against."""
    try:
        return verity.check_tree(tree, params, source)[0]
    except VerificationError as exc:
        raise VerificationError(
            f"{source}: Core's verity tree does not match the root hash of the EFI binary "
            f"({exc}); Core and EFI binary were not built together"
        ) from None


@dataclass(frozen=True)
class Checked:
    """Both payloads of a release, checked together."""

    efiboot: CheckedUki
    core_size: int


def read_at(path: Path, offset: int, length: int, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(length)
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def check_release(
    efiboot: Path,
    core: Path,
    *,
    os_name: str,
    version: Version,
    vg: str | None,
    require_root_hash: bool = False,
) -> Checked:
    """Run `check_uki` and `check_core` (and `check_core_verity` when the UKI
    pins a root hash) on the files `efiboot` and `core`: the only I/O here is reading
    the UKI, Core's first 96 bytes and the 512 at its hash offset."""
    try:
        data = efiboot.read_bytes()
        size = core.stat().st_size
    except OSError as exc:
        raise LocalError(f"{exc.filename}: cannot read the payload: {exc.strerror}") from None
    facts = check_uki(
        data,
        str(efiboot),
        os_name=os_name,
        version=version,
        vg=vg,
        require_root_hash=require_root_hash,
    )
    head = read_at(core, 0, SQUASHFS_SUPERBLOCK, "squashfs superblock")
    used = check_core(head, size, str(core))
    if facts.root is not None:
        superblock = read_at(core, facts.root.hash_offset, verity.SUPERBLOCK, "verity superblock")
        params = check_core_verity(used, superblock, size, facts.root, str(core))
        tree_size = verity.tree_size(params.data_blocks)
        tree = read_at(core, params.hash_start, tree_size, "verity hash tree")
        check_core_tree(tree, params, str(core))
    return Checked(facts, size)


def pins_root_hash(data: bytes, source: str) -> bool:
    """Whether an installed UKI's command line pins a verity root hash (False
    for a file that is not a PE image: it says nothing about the device)."""
    try:
        line = pe.cmdline(data, source)
    except FormatError:
        return False
    return bool(line) and cmdline.pinned_root_hash(line or "") is not None

"""The kernel command line of a Rampart UKI: one writer (`kernel_cmdline`) and the
parsers every reader uses (the device's update and rollback checks, `publish`,
`inspect`); the initramfs's `/init` is generated with the same parameter names.

    root=/dev/mapper/verity_core_<V> rootfstype=squashfs ro rd.lvm.vg=<VG>
    rampart.core=<VG>/core_<V> rampart.verity.roothash=<hex>
    [rampart.verity.salt=<hex>] rampart.verity.hashoffset=<bytes>
    rampart.verity.datablocks=<n> [rampart.verity.fecoffset=<bytes>
    rampart.verity.fecroots=<n>] [rampart.epoch=<n>]
    <hardening> [lockdown=<level>] [extra...]

CLIP OS's own names (`rd.verity.roothash`, `rd.verity.hashoffset`,
`rd.verity.device=…/<VG>/core_<V>`) are read too, never written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rampart.contracts import layout, pe, verity
from rampart.contracts.version import parse_version
from rampart.errors import FormatError, LocalError, UsageError, VerificationError

# x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) is 2048, NUL included.
MAX_CMDLINE = 2047
MAX_EPOCH = (1 << 63) - 1  # the TPM NV counter is 64 bits

# The parameter names: Rampart's own, which the initramfs's /init reads too (it is
# generated with these, rampart.release.initramfs), and CLIP OS's, read, never written.
PARAM_PREFIX = "rampart."
CORE_PARAM = f"{PARAM_PREFIX}core"  # <VG>/core_<V>
VERITY_PREFIX = f"{PARAM_PREFIX}verity."
ROOTHASH_PARAM = f"{VERITY_PREFIX}roothash"
SALT_PARAM = f"{VERITY_PREFIX}salt"
HASHOFFSET_PARAM = f"{VERITY_PREFIX}hashoffset"
DATABLOCKS_PARAM = f"{VERITY_PREFIX}datablocks"
FECOFFSET_PARAM = f"{VERITY_PREFIX}fecoffset"
FECROOTS_PARAM = f"{VERITY_PREFIX}fecroots"
EPOCH_PARAM = f"{PARAM_PREFIX}epoch"
# The installer's own (an installer UKI's command line is the device's plus these).
INSTALLER_PREFIX = f"{PARAM_PREFIX}install."
INSTALL_TARGET_PARAM = f"{INSTALLER_PREFIX}target"  # /dev/<disk>
INSTALL_PAYLOAD_PARAM = f"{INSTALLER_PREFIX}payload"  # /dev/<disk>
INSTALL_WIPE_PARAM = f"{INSTALLER_PREFIX}wipe"  # =1
# The state partition's size (`rampart install --state-size`: digits and one of K M G T).
INSTALL_STATE_SIZE_PARAM = f"{INSTALLER_PREFIX}state_size"
CLIP_PREFIX = "rd.verity."
CLIP_DEVICE_PARAM = f"{CLIP_PREFIX}device"  # .../<VG>/core_<V>
CLIP_ROOTHASH_PARAM = f"{CLIP_PREFIX}roothash"
CLIP_HASHOFFSET_PARAM = f"{CLIP_PREFIX}hashoffset"

# Kernel hardening parameters; `kernel_cmdline`'s docstring says why each is there.
HARDENING = (
    "slab_nomerge",
    "slub_debug=FZ",
    "page_alloc.shuffle=1",
    "init_on_alloc=1",
    "init_on_free=1",
    "pti=on",
    "mitigations=auto,nosmt",
    "iommu=force",
    "iommu.strict=1",
    "intel_iommu=on",
    "amd_iommu=force_isolation",
    "efi=disable_early_pci_dma",
    "vsyscall=none",
    "debugfs=off",
    "oops=panic",
)
LOCKDOWN_LEVELS = ("integrity", "confidentiality")

_VG = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}", re.ASCII)
_HEX = re.compile(r"(?:[0-9a-f]{2})+", re.ASCII)
_PARAM = re.compile(r"[\x21-\x7e]+", re.ASCII)  # printable, no space, no quote games
# Keys the command line sets itself; an extra parameter may not redefine them.
_OWN_KEYS = (
    "root",
    "rootfstype",
    "rootflags",
    "ro",
    "rw",
    "rd.lvm.vg",
    "lockdown",
    "init",
    "rdinit",
)
_OWN_PREFIXES = (PARAM_PREFIX, CLIP_PREFIX)


# The parameters that say what the UKI boots: each may appear once (the kernel
# and the initramfs may read another occurrence than the one checked here).
_PINNING = (
    CORE_PARAM,
    CLIP_DEVICE_PARAM,
    ROOTHASH_PARAM,
    CLIP_ROOTHASH_PARAM,
    HASHOFFSET_PARAM,
    CLIP_HASHOFFSET_PARAM,
    DATABLOCKS_PARAM,
)
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)


def kernel_cmdline(
    vg: str,
    version: str,
    *,
    roothash: str,
    hash_offset: int,
    data_blocks: int,
    salt: str | None = None,
    fec_offset: int | None = None,
    fec_roots: int | None = None,
    extra: Sequence[str] = (),
    lockdown: str | None = "confidentiality",
    epoch: int | None = None,
) -> str:
    """The command line that boots Core `core_<version>` of volume group `vg`.

    As CLIP OS's (docs/build.md, "The kernel command line"), with Rampart's own
    parameter names for its initramfs (CLIP OS's `rd.verity.*` were its own dracut
    module's, too):

        root=/dev/mapper/verity_core_<V> rootfstype=squashfs ro rd.lvm.vg=<VG>
        rampart.core=<VG>/core_<V> rampart.verity.roothash=<hex>
        [rampart.verity.salt=<hex>] rampart.verity.hashoffset=<bytes>
        rampart.verity.datablocks=<n> [rampart.verity.fecoffset=<bytes>
        rampart.verity.fecroots=<n>] [rampart.epoch=<n>]

    `rampart.epoch` is the release's security epoch (offline rollback
    protection: a version whose epoch is below the TPM's counter must not boot).
    Then HARDENING, `lockdown=<lockdown>` unless None, and `extra` last. An
    extra parameter may not redefine root, the verity parameters, ro/rw, init
    or lockdown: the UKI's signature must pin what it boots. UsageError on any
    invalid value or a line longer than the kernel accepts (2047 bytes).

    HARDENING is in the spirit of CLIP OS's hardened kernel. What is known of
    CLIP OS's command line is its verity parameters, not its hardening line,
    so this set follows the kernel's and the KSPP's documented recommendations,
    keeping what Debian 12's 6.1 kernel understands and what still boots (the
    Secure Boot smoke test boots with all of it):

        slab_nomerge            no slab cache merging: an overflow in one cache
                                cannot reach objects of another type
        slub_debug=FZ           sanity checks (F) and red zones (Z) on slab
                                objects; no poisoning (P): init_on_free does that
        page_alloc.shuffle=1    randomise the page allocator's free lists
        init_on_alloc=1         zero pages and slab objects on allocation...
        init_on_free=1          ...and on free: no stale data survives
        pti=on                  page-table isolation even on CPUs claiming
                                immunity to Meltdown
        mitigations=auto,nosmt  every CPU-vulnerability mitigation, and SMT off
                                where a vulnerability needs it
        iommu=force intel_iommu=on amd_iommu=force_isolation
                                DMA isolation: devices see only what is mapped
        iommu.strict=1          ...and unmapped at once, not in lazy batches
        efi=disable_early_pci_dma
                                no PCI bus mastering between the firmware's
                                exit and the IOMMU's set-up
        vsyscall=none           no legacy vsyscall page (a fixed-address gadget)
        debugfs=off             no debugfs: a large, unaudited kernel interface
        oops=panic              an oops (possible memory corruption) stops the
                                machine rather than running a damaged kernel;
                                that boot is never blessed, so once a watchdog
                                or panic=N restarts it, boot counting falls back

    `lockdown=confidentiality` is the default: under Secure Boot, Debian's
    kernel already enforces "integrity" (no unsigned code into the kernel);
    "confidentiality" also keeps root from reading kernel memory (/dev/mem,
    kprobes, BPF reads, hibernation). Nothing the boot chain needs (dm-verity,
    LUKS2, the TPM) is affected. Developer images may pass lockdown=None or
    "integrity". Not included: `module.sig_enforce=1` (lockdown already
    requires signed modules) and `panic=N` (a fleet decision: reboot or stay).
    """
    if not _VG.fullmatch(vg) or vg in (".", ".."):
        raise UsageError(f"volume group {vg!r} is invalid: use letters, digits, '+_.-'")
    parsed = parse_version(version)
    if parsed.build or str(parsed) != version:
        raise UsageError(f"version {version!r}: build metadata is not allowed in a boot entry")
    roothash, salt = _check_hashes(roothash, salt)
    _check_offsets(hash_offset, data_blocks, fec_offset, fec_roots)
    if epoch is not None and not 0 <= epoch <= MAX_EPOCH:
        raise UsageError(f"epoch {epoch} is outside 0..{MAX_EPOCH}")
    if lockdown is not None and lockdown not in LOCKDOWN_LEVELS:
        raise UsageError(f"lockdown {lockdown!r} is not one of {', '.join(LOCKDOWN_LEVELS)}")
    name = f"{layout.SLOT_PREFIX}{version}"
    params = [
        f"root=/dev/mapper/{layout.VERITY_MAPPER_PREFIX}{name}",
        "rootfstype=squashfs",
        "ro",
        f"rd.lvm.vg={vg}",
        f"{CORE_PARAM}={vg}/{name}",
        f"{ROOTHASH_PARAM}={roothash}",
    ]
    if salt:
        params.append(f"{SALT_PARAM}={salt}")
    params += [
        f"{HASHOFFSET_PARAM}={hash_offset}",
        f"{DATABLOCKS_PARAM}={data_blocks}",
    ]
    if fec_offset is not None:
        params += [f"{FECOFFSET_PARAM}={fec_offset}", f"{FECROOTS_PARAM}={fec_roots}"]
    if epoch is not None:
        params.append(f"{EPOCH_PARAM}={epoch}")
    params += HARDENING
    if lockdown is not None:
        params.append(f"lockdown={lockdown}")
    for item in extra:
        for param in item.split():
            check_extra_param(param)
            params.append(param)
    line = " ".join(params)
    if len(line) > MAX_CMDLINE:
        raise UsageError(f"kernel command line is {len(line)} bytes; the kernel takes 2047")
    return line


def _check_hashes(roothash: str, salt: str | None) -> tuple[str, str | None]:
    """The root hash and salt, lowercased; UsageError unless hexadecimal of the right size."""
    roothash = roothash.lower()
    if len(roothash) != 64 or not _HEX.fullmatch(roothash):
        raise UsageError(f"root hash {roothash[:80]!r} is not 64 hexadecimal digits (SHA-256)")
    if salt is not None and salt != "":
        salt = salt.lower()
        if not _HEX.fullmatch(salt) or len(salt) > 512:
            raise UsageError(f"verity salt {salt[:80]!r} is not at most 256 bytes of hex")
    return roothash, salt


def _check_offsets(
    hash_offset: int, data_blocks: int, fec_offset: int | None, fec_roots: int | None
) -> None:
    """UsageError unless the verity and FEC offsets are sector-aligned and in range."""
    if hash_offset < 0 or hash_offset % 512:
        raise UsageError(f"hash offset {hash_offset} is not a non-negative multiple of 512")
    if data_blocks <= 0:
        raise UsageError(f"data blocks {data_blocks} must be positive")
    if (fec_offset is None) != (fec_roots is None):
        raise UsageError("the FEC offset and the FEC roots go together")
    if fec_offset is not None and (fec_offset < 0 or fec_offset % 512):
        raise UsageError(f"FEC offset {fec_offset} is not a non-negative multiple of 512")
    if fec_roots is not None and not 2 <= fec_roots <= 24:
        raise UsageError(f"FEC roots {fec_roots} is outside 2..24")


def check_extra_param(param: str) -> None:
    """UsageError if `param` is not printable or redefines what the command line pins."""
    if not _PARAM.fullmatch(param) or '"' in param:
        raise UsageError(f"kernel parameter {param[:80]!r}: printable ASCII without quotes only")
    key = param.split("=", 1)[0]
    # The installer's own parameters (an installer UKI: the device's command line plus
    # where to install): only the installer initramfs reads them.
    installer = key.startswith(INSTALLER_PREFIX)
    if not installer and (key in _OWN_KEYS or key.startswith(_OWN_PREFIXES)):
        raise UsageError(f"kernel parameter {param[:80]!r} would redefine {key!r}; refused")
    # A later parameter overrides an earlier one: none may undo the hardening set.
    hardened = {item.split("=", 1)[0] for item in HARDENING}
    if key in hardened:
        raise UsageError(
            f"kernel parameter {param[:80]!r} would override the hardening "
            f"parameter {key!r}; refused"
        )


def cmdline_params(cmdline: str) -> dict[str, str]:
    """`key=value` parameters of a command line (a bare flag maps to "")."""
    out: dict[str, str] = {}
    for token in cmdline.split():
        key, _, value = token.partition("=")
        out[key] = value
    return out


def cmdline_epoch(cmdline: str | None, source: str) -> int:
    """The security epoch a command line carries (`rampart.epoch=N`; the last one, as
    the kernel reads it), 0 without one. FormatError if N is not 0 to 2^63-1."""
    value = cmdline_params(cmdline or "").get(EPOCH_PARAM)
    if value is None:
        return 0
    if not _DIGITS.fullmatch(value) or int(value) > MAX_EPOCH:
        raise FormatError(
            f"{source}: {EPOCH_PARAM}={value[:24]!r} is not a security epoch (0..{MAX_EPOCH})"
        )
    return int(value)


def efi_epoch(path: Path) -> int:
    """The security epoch of a UKI: `rampart.epoch` on its `.cmdline`, read
    with the standard library (`pe.cmdline`, as the device does). 0 without one, and
    for a file that is not a PE image with a readable `.cmdline` (a UKI
    Rampart did not build): the lowest epoch, the one every check refuses first."""
    line = _efi_cmdline(path)
    return 0 if line is None else cmdline_epoch(line, path.name)


def _efi_cmdline(path: Path) -> str | None:
    """The `.cmdline` of the UKI file `path`; None if it is not a PE image with a
    readable one. LocalError if the file cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the UKI: {exc.strerror}") from None
    try:
        return pe.cmdline(data, path.name)
    except FormatError:
        return None


def efi_root_hash(path: Path) -> RootHash | None:
    """The verity parameters a UKI file pins (`root_hash` of its `.cmdline`), read as
    `efi_epoch` reads it; None without a root hash or a readable `.cmdline`.
    LocalError if the file cannot be read; FormatError or VerificationError if its
    verity parameters are malformed or repeated."""
    line = _efi_cmdline(path)
    return None if line is None else root_hash(line, path.name)


@dataclass(frozen=True)
class RootHash:
    """What the new UKI's command line says about the Core it boots."""

    root_hash: str
    hash_offset: int
    data_blocks: int | None

    def verity_params(self, superblock: dict[str, Any]) -> verity.VerityParams:
        """The verity parameters of the Core this pins: the root hash and offset from
        the command line, the rest from its superblock (`verity.parse_superblock`); the
        data block count from the command line when it gives one."""
        blocks = self.data_blocks
        return verity.VerityParams(
            root_hash=self.root_hash,
            salt=superblock["salt"],
            data_blocks=int(superblock["data_blocks"]) if blocks is None else blocks,
            hash_offset=self.hash_offset,
            uuid=superblock["uuid"],
        )


def param(words: list[str], key: str, source: str) -> str | None:
    values = [w.partition("=")[2] for w in words if w.partition("=")[0] == key]
    if len(values) > 1:
        raise VerificationError(f"{source}: its command line sets {key}= {len(values)} times")
    return values[0] if values else None


def root_hash(cmdline: str, source: str) -> RootHash | None:
    """The verity parameters of a command line, None without a root hash.

    FormatError if they are malformed, VerificationError if one is repeated."""
    words = cmdline.split()
    for key in _PINNING:
        param(words, key, source)
    root = (
        param(words, ROOTHASH_PARAM, source) or param(words, CLIP_ROOTHASH_PARAM, source) or ""
    ).lower()
    if not root:
        return None
    offset = (
        param(words, HASHOFFSET_PARAM, source) or param(words, CLIP_HASHOFFSET_PARAM, source) or ""
    )
    blocks = param(words, DATABLOCKS_PARAM, source)
    if (
        not _HEX64.fullmatch(root)
        or not _DIGITS.fullmatch(offset)
        or int(offset) % 512
        or (blocks is not None and (not _DIGITS.fullmatch(blocks) or int(blocks) == 0))
    ):
        raise FormatError(f"{source}: malformed verity parameters on its command line")
    return RootHash(root, int(offset), None if blocks is None else int(blocks))


def pinned_lv(cmdline: str, source: str) -> str | None:
    """The LV the command line boots (`rampart.core=`, or `rd.verity.device=`)."""
    words = cmdline.split()
    return param(words, CORE_PARAM, source) or param(words, CLIP_DEVICE_PARAM, source)


def pinned_root_hash(cmdline: str) -> str | None:
    """The verity root hash a command line pins (ours, or CLIP OS's `rd.verity`), as
    the kernel reads a repeated key (the last one); not checked."""
    params = cmdline_params(cmdline)
    return params.get(ROOTHASH_PARAM) or params.get(CLIP_ROOTHASH_PARAM)


def declared_epoch(cmdline: str) -> int | None:
    """The security epoch a command line carries, if any, without checking it."""
    value = cmdline_params(cmdline).get(EPOCH_PARAM)
    return int(value) if value is not None and value.isdigit() else None

"""Unified Kernel Images on systemd's EFI stub (FORMATS.md §4; UAPI "Unified Kernel Image").

A UKI is the stub (`linuxx64.efi.stub`, systemd-boot-efi 252 on Debian 12)
with these sections appended, in this layout order:

    .osrel    os-release text; IMAGE_VERSION is what systemd-boot sorts entries by
    .cmdline  the kernel command line (`kernel_cmdline`): it names the Core LV and
              carries its verity root hash, so each UKI boots only its own Core
    .uname    the kernel release (`uname -r`), from the bzImage header
    .sbat     the stub's SBAT lines plus one naming Rampart (the stub's own
              `.sbat` is removed and re-added merged, so there is exactly one)
    .initrd   the initramfs
    .linux    the x86 bzImage, last (as ukify does) so nothing follows the kernel

Each section's VMA is the end of the previous one rounded up to the stub's
SectionAlignment (read with pefile); `objcopy` places the file data at the PE's
FileAlignment and recomputes SizeOfImage. The result is read back (objdump -h
and pefile) and every section compared with its input before the file gets its
final name: the output is written under a temporary name in the output
directory and given its final name last (a hard link, which never replaces an
existing file), so a failure leaves nothing behind.

Secure Boot signing is `sbsign` (Authenticode, the PE certificate table);
`verify_signature` is `sbverify`. A stub that is already signed is refused:
adding sections would invalidate its signature.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rampart import __version__, run
from rampart.contracts.version import parse_version
from rampart.durable import fsync_dir
from rampart.errors import ConflictError, FormatError, LocalError, UsageError, VerificationError

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
SBAT_HEADER = "sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md"
# Our SBAT component: component, generation, vendor, package, version, URL. The
# generation (1) is what a revocation (an SbatLevel raising it) would target if
# UKIs assembled by Rampart had to be revoked as a class. The project has no
# public URL; a URN stands in (shim does not interpret the field).
SBAT_COMPONENT = "rampart,1,Rampart,rampart,{version},urn:rampart:uki"

# x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) is 2048, NUL included.
MAX_CMDLINE = 2047
MAX_EPOCH = (1 << 63) - 1  # the TPM NV counter is 64 bits

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
    "intel_iommu=on",
    "amd_iommu=force_isolation",
    "vsyscall=none",
    "debugfs=off",
    "oops=panic",
)
LOCKDOWN_LEVELS = ("integrity", "confidentiality")

_VG = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}", re.ASCII)
_HEX = re.compile(r"(?:[0-9a-f]{2})+", re.ASCII)
_PARAM = re.compile(r"[\x21-\x7e]+", re.ASCII)  # printable, no space, no quote games
_UNAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+~-]{0,63}", re.ASCII)
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
_OWN_PREFIXES = ("rampart.", "rd.verity.")
INSTALLER_PREFIX = "rampart.install."

# The setup header of the x86 boot protocol (Documentation/arch/x86/boot.rst).
_HDRS_OFFSET = 0x202
_PROTOCOL_OFFSET = 0x206
_KERNEL_VERSION_OFFSET = 0x20E
_LOADFLAGS_OFFSET = 0x211
_LOADED_HIGH = 0x01
_IMAGE_DIRECTORY_ENTRY_SECURITY = 4
_WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002


@dataclass(frozen=True)
class Section:
    """One PE section as laid out in the file."""

    name: str
    vma: int
    size: int  # VirtualSize: the content's length
    file_offset: int
    raw_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vma": self.vma,
            "size": self.size,
            "file_offset": self.file_offset,
            "raw_size": self.raw_size,
        }


@dataclass(frozen=True)
class Uki:
    """What a UKI says about itself (`inspect`)."""

    path: Path
    os_release: dict[str, str]
    cmdline: str
    uname: str | None
    signers: tuple[str, ...]  # subjects of the signing certificates, RFC 4514
    sections: tuple[Section, ...] = field(default=())

    @property
    def version(self) -> str | None:
        """The version systemd-boot sorts by: IMAGE_VERSION, then VERSION, VERSION_ID."""
        for key in ("IMAGE_VERSION", "VERSION", "VERSION_ID", "BUILD_ID"):
            if self.os_release.get(key):
                return self.os_release[key]
        return None

    @property
    def root_hash(self) -> str | None:
        """The verity root hash the command line pins (ours, or CLIP OS's rd.verity)."""
        params = cmdline_params(self.cmdline)
        return params.get("rampart.verity.roothash") or params.get("rd.verity.roothash")

    @property
    def epoch(self) -> int | None:
        """The security epoch the command line carries (rampart.epoch), if any."""
        value = cmdline_params(self.cmdline).get("rampart.epoch")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def signed(self) -> bool:
        return bool(self.signers)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "version": self.version,
            "os_release": self.os_release,
            "cmdline": self.cmdline,
            "uname": self.uname,
            "root_hash": self.root_hash,
            "epoch": self.epoch,
            "signed": self.signed,
            "signers": list(self.signers),
            "sections": [s.to_json() for s in self.sections],
        }


# --- the command line ----------------------------------------------------------------


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

    As CLIP OS's (FORMATS.md §7), with Rampart's own parameter names for its
    initramfs (CLIP OS's `rd.verity.*` were its own dracut module's, too):

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

    HARDENING is in the spirit of CLIP OS's hardened kernel. FORMATS.md and
    DESIGN.md record only CLIP OS's verity parameters, not its hardening line,
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
    roothash = roothash.lower()
    if len(roothash) != 64 or not _HEX.fullmatch(roothash):
        raise UsageError(f"root hash {roothash[:80]!r} is not 64 hexadecimal digits (SHA-256)")
    if salt is not None and salt != "":
        salt = salt.lower()
        if not _HEX.fullmatch(salt) or len(salt) > 512:
            raise UsageError(f"verity salt {salt[:80]!r} is not at most 256 bytes of hex")
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
    if epoch is not None and not 0 <= epoch <= MAX_EPOCH:
        raise UsageError(f"epoch {epoch} is outside 0..{MAX_EPOCH}")
    if lockdown is not None and lockdown not in LOCKDOWN_LEVELS:
        raise UsageError(f"lockdown {lockdown!r} is not one of {', '.join(LOCKDOWN_LEVELS)}")
    name = f"core_{version}"
    params = [
        f"root=/dev/mapper/verity_{name}",
        "rootfstype=squashfs",
        "ro",
        f"rd.lvm.vg={vg}",
        f"rampart.core={vg}/{name}",
        f"rampart.verity.roothash={roothash}",
    ]
    if salt:
        params.append(f"rampart.verity.salt={salt}")
    params += [
        f"rampart.verity.hashoffset={hash_offset}",
        f"rampart.verity.datablocks={data_blocks}",
    ]
    if fec_offset is not None:
        params += [f"rampart.verity.fecoffset={fec_offset}", f"rampart.verity.fecroots={fec_roots}"]
    if epoch is not None:
        params.append(f"rampart.epoch={epoch}")
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


EPOCH_PARAM = "rampart.epoch"
_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)


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
    """The security epoch of an EFI binary: `rampart.epoch` on its `.cmdline`, read
    with the standard library (`pe.cmdline`, as the device does). 0 without one, and
    for a file that is not a PE image with a readable `.cmdline` (an EFI binary
    Rampart did not build): the lowest epoch, the one every check refuses first."""
    from rampart.contracts import pe

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the EFI binary: {exc.strerror}") from None
    try:
        line = pe.cmdline(data, path.name)
    except FormatError:
        return 0
    return cmdline_epoch(line, path.name)


# --- os-release, SBAT, the kernel -----------------------------------------------------


def os_release(os_name: str, version: str) -> str:
    """The `.osrel` text: ID is the OS name; IMAGE_VERSION is what systemd-boot sorts by."""
    from rampart.contracts.wire import check_name

    check_name(os_name, "OS name")
    parsed = parse_version(version)
    if parsed.build or str(parsed) != version:
        raise UsageError(f"version {version!r}: build metadata is not allowed in a boot entry")
    return (
        f'NAME="{os_name}"\n'
        f"ID={os_name}\n"
        f"VERSION_ID={version}\n"
        f'PRETTY_NAME="{os_name} {version}"\n'
        f"IMAGE_VERSION={version}\n"
    )


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines of an os-release file; values unquoted, bad lines skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[key] = value
    return out


def sbat(stub_sbat: bytes) -> str:
    """The `.sbat` CSV: the stub's entries (header first), then Rampart's."""
    lines = [SBAT_HEADER]
    text = stub_sbat.rstrip(b"\0").decode("ascii", errors="strict")
    for line in text.splitlines():
        line = line.strip()
        if line and line.split(",", 1)[0] != "sbat":
            lines.append(line)
    lines.append(SBAT_COMPONENT.format(version=__version__))
    return "\n".join(lines) + "\n"


def bzimage_release(kernel: Path) -> str | None:
    """Check `kernel` is an x86 bzImage (MZ, "HdrS", loaded high); its release or None.

    The release is the first word of the header's kernel_version string, which
    is what `uname -r` prints. FormatError if the file is not a bzImage.
    """
    try:
        with kernel.open("rb") as handle:
            head = handle.read(0x8000)
    except FileNotFoundError:
        raise LocalError(f"{kernel}: kernel not found") from None
    except OSError as exc:
        raise LocalError(f"{kernel}: cannot read: {exc.strerror}") from None
    if (
        len(head) < 0x260
        or head[:2] != b"MZ"
        or head[_HDRS_OFFSET : _HDRS_OFFSET + 4] != b"HdrS"
        or not head[_LOADFLAGS_OFFSET] & _LOADED_HIGH
    ):
        raise FormatError(f"{kernel}: not an x86 bzImage with an EFI stub (no MZ and HdrS header)")
    (protocol,) = struct.unpack_from("<H", head, _PROTOCOL_OFFSET)
    (pointer,) = struct.unpack_from("<H", head, _KERNEL_VERSION_OFFSET)
    if protocol < 0x20B:
        raise FormatError(f"{kernel}: boot protocol {protocol:#x} is older than 2.11 (no EFI)")
    if not pointer:
        return None
    start = pointer + 0x200
    end = head.find(b"\0", start, start + 256)
    if end < 0:
        return None
    words = head[start:end].split()
    release = words[0].decode("ascii", errors="replace") if words else ""
    return release if _UNAME.fullmatch(release) else None


# --- PE helpers -----------------------------------------------------------------------


def _load_pe(path: Path) -> Any:
    import pefile

    try:
        return pefile.PE(str(path), fast_load=True)
    except FileNotFoundError:
        raise LocalError(f"{path}: file not found") from None
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    except pefile.PEFormatError as exc:
        raise FormatError(f"{path}: not a PE/COFF file ({exc.value})") from None


def _section_name(section: Any) -> str:
    raw: bytes = section.Name
    return raw.rstrip(b"\0").decode("ascii", errors="replace")


def _sections(pe: Any) -> tuple[Section, ...]:
    return tuple(
        Section(
            _section_name(s),
            int(s.VirtualAddress),
            int(s.Misc_VirtualSize),
            int(s.PointerToRawData),
            int(s.SizeOfRawData),
        )
        for s in pe.sections
    )


def _section_data(pe: Any, name: str) -> bytes | None:
    for s in pe.sections:
        if _section_name(s) == name:
            data: bytes = s.get_data()
            return data[: int(s.Misc_VirtualSize)]
    return None


def _certificate_table(pe: Any) -> tuple[int, int]:
    """(file offset, size) of the Authenticode certificate table; (0, 0) when unsigned."""
    entries = pe.OPTIONAL_HEADER.DATA_DIRECTORY
    if len(entries) <= _IMAGE_DIRECTORY_ENTRY_SECURITY:
        return 0, 0
    entry = entries[_IMAGE_DIRECTORY_ENTRY_SECURITY]
    return int(entry.VirtualAddress), int(entry.Size)


def signers(path: Path) -> tuple[str, ...]:
    """Subjects (RFC 4514) of the certificates that signed `path`; () when unsigned.

    Reads the PE certificate table: WIN_CERTIFICATE entries (8-byte aligned),
    each a PKCS#7 SignedData whose certificates `cryptography` lists; the
    signer is the certificate that issued no other one in the same entry.
    """
    from cryptography.hazmat.primitives.serialization import pkcs7

    pe = _load_pe(path)
    offset, size = _certificate_table(pe)
    pe.close()
    if not size:
        return ()
    with path.open("rb") as handle:
        handle.seek(offset)
        table = handle.read(size)
    if len(table) != size:
        raise FormatError(f"{path}: certificate table runs past the end of the file")
    found: list[str] = []
    pos = 0
    while pos + 8 <= len(table):
        length, _revision, kind = struct.unpack_from("<IHH", table, pos)
        if length < 8 or pos + length > len(table):
            raise FormatError(f"{path}: malformed certificate table entry at {offset + pos}")
        if kind == _WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            try:
                certs = pkcs7.load_der_pkcs7_certificates(table[pos + 8 : pos + length])
            except ValueError as exc:
                raise FormatError(f"{path}: unreadable Authenticode signature ({exc})") from None
            issuers = {c.issuer for c in certs if c.issuer != c.subject}
            leaves = [c for c in certs if c.subject not in issuers] or certs
            found.extend(c.subject.rfc4514_string() for c in leaves[:1])
        pos += (length + 7) & ~7
    return tuple(found)


# --- build, sign, verify, inspect -------------------------------------------------------


def _tmp_name(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}")


def publish_new(tmp: Path, out: Path) -> None:
    """Give the complete file `tmp` the name `out`, never replacing an existing `out`.

    A hard link is atomic and fails if `out` exists, where a rename would
    silently replace it; then the temporary name goes and the directory is synced.
    """
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ConflictError(f"{out}: appeared while building; refusing to overwrite") from None
    except OSError as exc:
        raise LocalError(f"{out}: cannot create: {exc.strerror}") from None
    tmp.unlink()
    fsync_dir(out.parent)


def _read_input(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LocalError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise LocalError(f"{path}: {what} is a directory, not a file") from None
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def _objdump_sections(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (size, vma, file offset) as `objdump -h` reads the file."""
    out = run.run(["objdump", "-h", str(path)], timeout=120).stdout.decode(errors="replace")
    found: dict[str, tuple[int, int, int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0].isdigit():
            found[parts[1]] = (int(parts[2], 16), int(parts[3], 16), int(parts[5], 16))
    return found


def build(
    out: Path,
    *,
    kernel: Path,
    initrd: Path,
    os_name: str,
    version: str,
    cmdline: str,
    uname: str | None = None,
    stub: Path = STUB,
    sign_key: Path | None = None,
    sign_cert: Path | None = None,
) -> Uki:
    """Assemble the UKI `out` (never overwriting), signed when a key and cert are given.

    Raises UsageError (bad name, version, command line), FormatError (the
    kernel is not a bzImage, the stub is not an unsigned PE), LocalError
    (missing input, objcopy or sbsign failed), ConflictError (`out` exists).
    """
    if (sign_key is None) != (sign_cert is None):
        raise UsageError("the signing key and certificate go together")
    if out.exists() or out.is_symlink():
        raise ConflictError(f"{out}: already exists; refusing to overwrite")
    if not out.parent.is_dir():
        raise LocalError(f"{out.parent}: output directory not found")
    if sign_key is not None and sign_cert is not None:
        check_signing_pair(sign_key, sign_cert)
    if "\n" in cmdline.strip("\n") or len(cmdline) > MAX_CMDLINE:
        raise UsageError("kernel command line: one line of at most 2047 bytes")
    osrel = os_release(os_name, version)
    release = bzimage_release(kernel) or uname
    if release is None:
        raise UsageError(f"{kernel}: no kernel release in the bzImage header; give it (--uname)")
    if not _UNAME.fullmatch(release):
        raise UsageError(f"kernel release {release!r} is invalid")
    pe = _load_pe(stub)
    try:
        if _certificate_table(pe)[1]:
            raise FormatError(
                f"{stub}: the stub is already signed; sections cannot be added to a signed "
                "image (use the unsigned linuxx64.efi.stub)"
            )
        if not pe.sections:
            raise FormatError(f"{stub}: a PE image without sections is not systemd's stub")
        if int(pe.OPTIONAL_HEADER.Subsystem) != 10:
            raise FormatError(f"{stub}: not an EFI application (PE subsystem is not 10)")
        alignment = int(pe.OPTIONAL_HEADER.SectionAlignment)
        file_alignment = int(pe.OPTIONAL_HEADER.FileAlignment)
        image_base = int(pe.OPTIONAL_HEADER.ImageBase)
        stub_end = max(int(s.VirtualAddress) + int(s.Misc_VirtualSize) for s in pe.sections)
        stub_sbat = _section_data(pe, ".sbat") or b""
    finally:
        pe.close()
    try:
        sbat_text = sbat(stub_sbat)
    except UnicodeDecodeError:
        raise FormatError(f"{stub}: the stub's .sbat section is not ASCII") from None

    contents: list[tuple[str, Path | bytes]] = [
        (".osrel", osrel.encode()),
        (".cmdline", cmdline.strip("\n").encode()),
        (".uname", release.encode()),
        (".sbat", sbat_text.encode()),
        (".initrd", initrd),
        (".linux", kernel),
    ]
    tmp = _tmp_name(out, "tmp")
    signed_tmp = _tmp_name(out, "signed")
    try:
        with tempfile.TemporaryDirectory(prefix="rampart-uki-") as work:
            argv = ["objcopy", "--remove-section", ".sbat"]
            expected: dict[str, tuple[int, int, str]] = {}  # name -> (vma, size, sha256)
            vma = stub_end
            for name, source in contents:
                if isinstance(source, Path):
                    data = _read_input(source, "kernel" if name == ".linux" else "initrd")
                    if not data:
                        raise LocalError(f"{source}: empty file")
                    path = source
                else:
                    data = source
                    path = Path(work) / name.lstrip(".")
                    path.write_bytes(data)
                vma = -(-vma // alignment) * alignment
                expected[name] = (vma, len(data), hashlib.sha256(data).hexdigest())
                argv += ["--add-section", f"{name}={path}"]
                argv += ["--change-section-vma", f"{name}={image_base + vma:#x}"]
                vma += len(data)
            argv += ["--set-section-flags", ".linux=contents,alloc,load,readonly,code"]
            argv += [str(stub), str(tmp)]
            run.run(argv, timeout=300)
        _check_layout(tmp, expected, image_base, alignment, file_alignment)
        final = tmp
        if sign_key is not None and sign_cert is not None:
            _sbsign(tmp, signed_tmp, sign_key, sign_cert)
            final = signed_tmp
        with final.open("rb") as handle:
            os.fsync(handle.fileno())
        publish_new(final, out)
    finally:
        tmp.unlink(missing_ok=True)
        signed_tmp.unlink(missing_ok=True)
    return inspect(out)


def _check_layout(
    path: Path,
    expected: dict[str, tuple[int, int, str]],
    image_base: int,
    alignment: int,
    file_alignment: int,
) -> None:
    """Read the new image back: each added section where planned, aligned, not
    overlapping, with exactly its input's bytes; LocalError otherwise."""
    dumped = _objdump_sections(path)
    pe = _load_pe(path)
    try:
        spans: list[tuple[int, int, str]] = []
        for s in pe.sections:
            name = _section_name(s)
            start, size = int(s.VirtualAddress), int(s.Misc_VirtualSize)
            spans.append((start, start + max(size, 1), name))
            if name not in expected:
                continue
            vma, length, digest = expected[name]
            data: bytes = s.get_data()[:size]
            problem = None
            seen_by_objdump = dumped.get(name, (0, -1, 0))[1]
            if (start, size) != (vma, length) or seen_by_objdump != image_base + vma:
                problem = f"is at {start:#x}+{size:#x}, not {vma:#x}+{length:#x}"
            elif start % alignment or int(s.PointerToRawData) % file_alignment:
                problem = "is not aligned"
            elif hashlib.sha256(data).hexdigest() != digest:
                problem = "does not hold its input"
            if problem:
                raise LocalError(f"{path}: objcopy produced a bad UKI: section {name} {problem}")
        missing = set(expected) - {name for _, _, name in spans}
        if missing:
            raise LocalError(f"{path}: objcopy dropped sections {', '.join(sorted(missing))}")
        spans.sort()
        for (_, end, name), (start, _, after) in itertools.pairwise(spans):
            if start < end:
                raise LocalError(f"{path}: sections {name} and {after} overlap")
        if int(pe.OPTIONAL_HEADER.SizeOfImage) < spans[-1][1]:
            raise LocalError(f"{path}: SizeOfImage does not cover the last section")
    finally:
        pe.close()


def check_signing_pair(key: Path, cert: Path) -> None:
    """LocalError/FormatError unless `key` is a PEM private key matching PEM `cert`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    blobs = []
    for path, what in ((key, "signing key"), (cert, "signing certificate")):
        try:
            blobs.append(path.read_bytes())
        except FileNotFoundError:
            raise LocalError(f"{path}: {what} not found") from None
        except OSError as exc:
            raise LocalError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    try:
        secret = serialization.load_pem_private_key(blobs[0], password=None)
    except (ValueError, TypeError):
        raise FormatError(f"{key}: not an unencrypted PEM private key") from None
    try:
        public = x509.load_pem_x509_certificate(blobs[1]).public_key()
    except ValueError:
        raise FormatError(f"{cert}: not a PEM X.509 certificate") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if secret.public_key().public_bytes(der, raw) != public.public_bytes(der, raw):
        raise LocalError(f"{key}: this key does not match the certificate {cert}")


def _sbsign(src: Path, dst: Path, key: Path, cert: Path) -> None:
    check_signing_pair(key, cert)
    run.run(
        ["sbsign", "--key", str(key), "--cert", str(cert), "--output", str(dst), str(src)],
        timeout=300,
    )


def is_signed(path: Path) -> bool:
    """Whether `path` (a PE image) has an Authenticode certificate table."""
    pe = _load_pe(path)
    try:
        return bool(_certificate_table(pe)[1])
    finally:
        pe.close()


def sign(path: Path, key: Path, cert: Path) -> None:
    """Sign the EFI image `path` in place for Secure Boot (`sbsign`, then a rename).

    ConflictError if it is already signed; LocalError if sbsign fails.
    """
    if is_signed(path):
        raise ConflictError(f"{path}: already signed; refusing to sign it twice")
    tmp = _tmp_name(path, "signed")
    try:
        _sbsign(path, tmp, key, cert)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def verify_signature(path: Path, cert: Path) -> None:
    """VerificationError unless `sbverify` accepts `path`'s signature with `cert`."""
    if not path.is_file():
        raise LocalError(f"{path}: EFI image not found")
    if not cert.is_file():
        raise LocalError(f"{cert}: certificate not found")
    done = run.run(["sbverify", "--cert", str(cert), str(path)], check=False, timeout=300)
    text = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0 or "Signature verification OK" not in text:
        lines = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.startswith("warning: data remaining")
        ]
        why = lines[-1] if lines else f"sbverify exit code {done.returncode}"
        raise VerificationError(f"{path}: Secure Boot signature does not verify with {cert}: {why}")


def inspect(path: Path) -> Uki:
    """Read a UKI's os-release, command line, kernel release, signers and sections.

    FormatError if `path` is not a PE image with a `.linux` section.
    """
    pe = _load_pe(path)
    try:
        if _section_data(pe, ".linux") is None:
            raise FormatError(f"{path}: not a Unified Kernel Image (no .linux section)")
        osrel = (_section_data(pe, ".osrel") or b"").decode("utf-8", errors="replace")
        cmdline = (_section_data(pe, ".cmdline") or b"").decode("utf-8", errors="replace")
        uname_raw = _section_data(pe, ".uname")
        sections = _sections(pe)
    finally:
        pe.close()
    return Uki(
        path=path,
        os_release=parse_os_release(osrel),
        cmdline=cmdline.rstrip("\n\0"),
        uname=None if uname_raw is None else uname_raw.decode("ascii", errors="replace"),
        signers=signers(path),
        sections=sections,
    )

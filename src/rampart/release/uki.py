"""Unified Kernel Images on systemd's EFI stub (docs/build.md; the UAPI group's
"Unified Kernel Image" specification).

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
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rampart import __version__, run
from rampart.contracts.cmdline import MAX_CMDLINE, declared_epoch, kernel_cmdline, pinned_root_hash
from rampart.contracts.coremeta import CorePins
from rampart.contracts.osrel import os_release, parse_os_release, sort_version
from rampart.errors import ConflictError, FormatError, LocalError, UsageError, VerificationError
from rampart.files import fsync_dir

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
SBAT_HEADER = "sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md"
# Our SBAT component: component, generation, vendor, package, version, URL. The
# generation (1) is what a revocation (an SbatLevel raising it) would target if
# UKIs assembled by Rampart had to be revoked as a class. The project has no
# public URL; a URN stands in (shim does not interpret the field).
SBAT_COMPONENT = "rampart,1,Rampart,rampart,{version},urn:rampart:uki"

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
        """The version systemd-boot sorts by (`osrel.sort_version`)."""
        return sort_version(self.os_release)

    @property
    def root_hash(self) -> str | None:
        """The verity root hash the command line pins (ours, or CLIP OS's rd.verity)."""
        return pinned_root_hash(self.cmdline)

    @property
    def epoch(self) -> int | None:
        """The security epoch the command line carries (rampart.epoch), if any."""
        return declared_epoch(self.cmdline)

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


# --- os-release, SBAT, the kernel -----------------------------------------------------


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


_UNAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+~-]{0,63}", re.ASCII)


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


@dataclass(frozen=True)
class _StubLayout:
    """What adding sections to the stub needs to know of it."""

    alignment: int  # SectionAlignment
    file_alignment: int
    image_base: int
    end: int  # where its last section ends (RVA)
    sbat: bytes  # its own .sbat


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
    layout = _stub_layout(stub)
    try:
        sbat_text = sbat(layout.sbat)
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
        _objcopy(stub, layout, contents, tmp)
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


def _stub_layout(stub: Path) -> _StubLayout:
    """The unsigned EFI stub's layout; FormatError for a signed or a non-EFI PE."""
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
        return _StubLayout(
            alignment=int(pe.OPTIONAL_HEADER.SectionAlignment),
            file_alignment=int(pe.OPTIONAL_HEADER.FileAlignment),
            image_base=int(pe.OPTIONAL_HEADER.ImageBase),
            end=max(int(s.VirtualAddress) + int(s.Misc_VirtualSize) for s in pe.sections),
            sbat=_section_data(pe, ".sbat") or b"",
        )
    finally:
        pe.close()


def _objcopy(
    stub: Path, layout: _StubLayout, contents: list[tuple[str, Path | bytes]], tmp: Path
) -> None:
    """Write the stub with `contents` appended as sections into `tmp`, and check the
    result's layout against what was asked."""
    with tempfile.TemporaryDirectory(prefix="rampart-uki-") as work:
        argv = ["objcopy", "--remove-section", ".sbat"]
        expected: dict[str, tuple[int, int, str]] = {}  # name -> (vma, size, sha256)
        vma = layout.end
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
            vma = -(-vma // layout.alignment) * layout.alignment
            expected[name] = (vma, len(data), hashlib.sha256(data).hexdigest())
            argv += ["--add-section", f"{name}={path}"]
            argv += ["--change-section-vma", f"{name}={layout.image_base + vma:#x}"]
            vma += len(data)
        argv += ["--set-section-flags", ".linux=contents,alloc,load,readonly,code"]
        argv += [str(stub), str(tmp)]
        run.run(argv, timeout=300)
    _check_layout(tmp, expected, layout.image_base, layout.alignment, layout.file_alignment)


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


def sign_copy(source: Path, path: Path, key: Path, cert: Path) -> None:
    """A copy of the unsigned EFI image `source` at `path`, signed for Secure Boot and
    verified with `cert` (a boot loader: `build_esp`, `rampart release --loader`).
    FormatError if `source` is already signed; the copy lands whole or not at all."""
    tmp = _tmp_name(path, "copy")
    try:
        shutil.copyfile(source, tmp)
        if is_signed(tmp):
            raise FormatError(f"{source}: already signed; give the unsigned image")
        sign(tmp, key, cert)
        verify_signature(tmp, cert)
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise LocalError(f"{exc.filename or path}: cannot copy: {exc.strerror}") from None
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


def build_efiboot(
    out: Path,
    pins: CorePins,
    *,
    vg: str,
    version: str,
    os_name: str,
    kernel: Path,
    initrd: Path,
    extra: list[str],
    lockdown: str | None = "confidentiality",
    epoch: int | None = None,
    uname: str | None = None,
    stub: Path = STUB,
    sign_key: Path | None = None,
    sign_cert: Path | None = None,
) -> Uki:
    """The UKI booting the Core whose metadata `pins` is (`coremeta.read_pins`)."""
    cmdline = kernel_cmdline(
        vg,
        version,
        roothash=pins.root_hash,
        salt=pins.salt,
        hash_offset=pins.hash_offset,
        data_blocks=pins.data_blocks,
        fec_offset=pins.fec_offset,
        fec_roots=pins.fec_roots,
        extra=extra,
        lockdown=lockdown,
        epoch=epoch,
    )
    return build(
        out,
        kernel=kernel,
        initrd=initrd,
        os_name=os_name,
        version=version,
        cmdline=cmdline,
        uname=uname,
        stub=stub,
        sign_key=sign_key,
        sign_cert=sign_cert,
    )

"""Secure Boot variables and Authenticode: Rampart's readers against the real sbsigntool
(sbsiglist, sbvarsign, sbsign) and virt-firmware, and every malformed length refused."""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pefile
import pytest
from virt.peutils.pesign import pe_authenticode_hash  # type: ignore[import-untyped]

from rampart.contracts import efivars, pe
from rampart.contracts.efivars import Signature
from rampart.errors import FormatError, LocalError, UsageError
from rampart.release.secureboot import SYSTEMD_BOOT

OWNER = uuid.UUID("11111111-2222-3333-4444-555555555555")
OTHER_OWNER = uuid.UUID("66666666-7777-8888-9999-aaaaaaaaaaaa")
HASH_A, HASH_B = bytes(range(32)), bytes(range(32, 64))
APPEND_ATTRIBUTES = (
    efivars.NON_VOLATILE
    | efivars.BOOTSERVICE_ACCESS
    | efivars.RUNTIME_ACCESS
    | efivars.TIME_BASED_AUTHENTICATED_WRITE_ACCESS
    | efivars.APPEND_WRITE
)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: run `make setup`"
    return path


def run(*argv: str | Path) -> bytes:
    done = subprocess.run([str(a) for a in argv], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@dataclass(frozen=True)
class Throwaway:
    """A self-signed RSA key and certificate made by openssl, never enrolled anywhere."""

    key: Path
    crt: Path
    der: bytes


def throwaway(directory: Path, name: str) -> Throwaway:
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    run(tool("openssl"), *request, "-subj", f"/CN=test {name}", "-keyout", key, "-out", crt)
    return Throwaway(key, crt, run(tool("openssl"), "x509", "-in", crt, "-outform", "DER"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("efivars")


@pytest.fixture(scope="module")
def kek(work: Path) -> Throwaway:
    return throwaway(work, "KEK")


@pytest.fixture(scope="module")
def db(work: Path) -> Throwaway:
    return throwaway(work, "db")


@pytest.fixture(scope="module")
def db_esl(work: Path, db: Throwaway) -> Path:
    """`sbsiglist --type x509` of the db certificate: what a db append carries."""
    der, esl = work / "db.der", work / "db.esl"
    der.write_bytes(db.der)
    run(tool("sbsiglist"), "--owner", str(OWNER), "--type", "x509", "--output", esl, der)
    return esl


@pytest.fixture(scope="module")
def db_append(work: Path, kek: Throwaway, db_esl: Path) -> bytes:
    """A db APPEND_WRITE signed with KEK by `sbvarsign --include-attrs`, as efivarfs takes it."""
    auth = work / "db-append.auth"
    attributes = "NON_VOLATILE,BOOTSERVICE_ACCESS,RUNTIME_ACCESS,APPEND_WRITE"
    signer: list[str | Path] = ["--key", kek.key, "--cert", kek.crt]
    run(
        tool("sbvarsign"),
        *signer,
        "--attr",
        attributes,
        "--include-attrs",
        "--output",
        auth,
        "db",
        db_esl,
    )
    return auth.read_bytes()


@pytest.fixture(scope="module")
def signed_boot(work: Path, db: Throwaway) -> Path:
    """The system's systemd-boot signed with the throwaway db key by sbsign."""
    signed = work / "systemd-bootx64.signed.efi"
    run(tool("sbsign"), "--key", db.key, "--cert", db.crt, "--output", signed, SYSTEMD_BOOT)
    return signed


# --- signature lists -----------------------------------------------------------------------


def test_signature_lists_round_trip() -> None:
    certs = [b"\x30\x03\x02\x01\x01", b"\x30\x03\x02\x01\x02"]
    data = (
        efivars.render_signature_list(efivars.CERT_X509, OWNER, certs)
        + efivars.render_signature_list(efivars.CERT_SHA256, OTHER_OWNER, [HASH_A, HASH_B])
        + efivars.render_signature_list(efivars.CERT_X509, OWNER, [b"\x30\x00"])
    )
    assert efivars.parse_signature_lists(data, "db") == [
        Signature(efivars.CERT_X509, OWNER, certs[0]),
        Signature(efivars.CERT_X509, OWNER, certs[1]),
        Signature(efivars.CERT_SHA256, OTHER_OWNER, HASH_A),
        Signature(efivars.CERT_SHA256, OTHER_OWNER, HASH_B),
        Signature(efivars.CERT_X509, OWNER, b"\x30\x00"),
    ]
    assert efivars.parse_signature_lists(b"", "dbx") == []
    assert efivars.x509_certificates(efivars.parse_signature_lists(data, "db")) == [
        *certs,
        b"\x30\x00",
    ]


def test_signature_list_layout_and_header_bytes() -> None:
    """The GUIDs are little-endian on disk; a list's header bytes are skipped."""
    data = efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [HASH_A])
    assert data[:16] == bytes.fromhex("2616c4c14c509240aca941f936934328")
    assert struct.unpack_from("<III", data, 16) == (76, 0, 48)
    with_header = (
        struct.pack("<16sIII", efivars.CERT_SHA256.bytes_le, 76 + 4, 4, 48) + b"HEAD" + data[28:]
    )
    assert efivars.parse_signature_lists(with_header, "dbx") == [
        Signature(efivars.CERT_SHA256, OWNER, HASH_A)
    ]


@pytest.mark.parametrize(
    ("kind", "datas", "match"),
    [
        (efivars.CERT_X509, [], "no entries"),
        (efivars.CERT_X509, [b"ab", b"abc"], "differ in size"),
        (efivars.CERT_SHA256, [b"short"], "entries of 5 bytes, it needs 32"),
    ],
    ids=["empty", "sizes-differ", "sha256-not-32-bytes"],
)
def test_render_refuses_lists_that_cannot_be_one_list(
    kind: uuid.UUID, datas: list[bytes], match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        efivars.render_signature_list(kind, OWNER, datas)


X509_LIST = efivars.render_signature_list(efivars.CERT_X509, OWNER, [b"\x30\x01\x00"])  # 47 B
SHA_LIST = efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [HASH_A, HASH_B])
SECOND = len(X509_LIST)  # where the second list starts


def with_field(data: bytes, offset: int, value: int) -> bytes:
    """`data` with the u32 at `offset` replaced."""
    out = bytearray(data)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (X509_LIST + SHA_LIST[:27], f"byte {SECOND}: 27 bytes left, a list header needs 28"),
        (with_field(X509_LIST, 16, 27), "byte 0: ListSize 27 is below 28"),
        (X509_LIST + SHA_LIST[:-1], f"byte {SECOND}: ListSize 124 runs past the end"),
        (with_field(X509_LIST, 16, 1 << 31), "byte 0: ListSize 2147483648 runs past the end"),
        (with_field(X509_LIST, 24, 15), "byte 0: SignatureSize 15 is below 16"),
        (with_field(X509_LIST, 24, 0), "byte 0: SignatureSize 0 is below 16"),
        (X509_LIST + with_field(SHA_LIST, 24, 32), f"byte {SECOND}: SignatureSize 32 .* needs 48"),
        (with_field(X509_LIST, 20, 20), "byte 0: HeaderSize 20 does not fit in ListSize 47"),
        (with_field(X509_LIST, 20, 0xFFFFFFFF), "byte 0: HeaderSize 4294967295 does not fit"),
        (with_field(X509_LIST, 24, 20), "byte 0: 19 bytes of entries are not a multiple of Sig"),
        (with_field(SHA_LIST, 16, len(SHA_LIST) - 1), "byte 0: 95 bytes of entries are not a"),
    ],
    ids=[
        "truncated-header",
        "list-size-below-header",
        "list-past-end",
        "list-size-huge",
        "signature-size-below-owner",
        "signature-size-zero",
        "sha256-entry-not-48-bytes",
        "header-size-past-list",
        "header-size-huge",
        "entries-not-whole",
        "sha256-entries-not-whole",
    ],
)
def test_malformed_signature_lists_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=f"^dbx: signature list at {match}"):
        efivars.parse_signature_lists(data, "dbx")


def test_append_keeps_old_entries_then_adds_only_new_ones() -> None:
    """edk2's FilterSignatureList: an entry already present (same type, owner and data)
    is dropped; the same data under another owner is a different EFI_SIGNATURE_DATA and
    is appended; duplicates inside the new value are not compared with each other."""
    cert = Signature(efivars.CERT_X509, OWNER, b"\x30\x00")
    old = [cert, Signature(efivars.CERT_SHA256, OWNER, HASH_A)]
    new = [
        Signature(efivars.CERT_SHA256, OWNER, HASH_A),  # present: dropped
        Signature(efivars.CERT_SHA256, OWNER, HASH_B),  # new
        Signature(efivars.CERT_X509, OTHER_OWNER, cert.data),  # another owner: new
        Signature(efivars.CERT_SHA256, OWNER, HASH_B),  # twice in new: kept twice
    ]
    assert efivars.appended(old, new) == [*old, new[1], new[2], new[3]]
    assert efivars.appended(old, old) == old
    assert efivars.appended([], new[:2]) == new[:2]


def test_appended_bytes_are_the_old_value_then_each_list_without_what_it_holds() -> None:
    """The bytes the firmware stores (and PCR 7 measures) after an append: the old
    value unchanged, then each new list with the entries already present left out and
    its ListSize made smaller, and a list left empty left out whole."""
    old = efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [HASH_A])
    partly = efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [HASH_A, HASH_B])
    present = efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [HASH_A])
    other = efivars.render_signature_list(efivars.CERT_X509, OTHER_OWNER, [b"\x30\x00"])
    result = efivars.appended_bytes(old, partly + present + other, "db")
    only_b = efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [HASH_B])
    assert result == old + only_b + other
    assert efivars.parse_signature_lists(result, "db") == efivars.appended(
        efivars.parse_signature_lists(old, "db"),
        efivars.parse_signature_lists(partly + present + other, "db"),
    )
    assert efivars.appended_bytes(old, present, "db") == old
    assert efivars.appended_bytes(b"", old, "dbx") == old
    with pytest.raises(FormatError, match=r"^db: signature list at byte 0"):
        efivars.appended_bytes(old, b"\x00" * 10, "db")


# --- the real sbsigntool -------------------------------------------------------------------


def test_sbsiglist_x509_list_parses_to_the_certificate(db_esl: Path, db: Throwaway) -> None:
    data = db_esl.read_bytes()
    assert efivars.parse_signature_lists(data, str(db_esl)) == [
        Signature(efivars.CERT_X509, OWNER, db.der)
    ]
    assert efivars.render_signature_list(efivars.CERT_X509, OWNER, [db.der]) == data


def test_sbsiglist_sha256_list_parses_to_the_hash(work: Path) -> None:
    digest = pe.authenticode_sha256(SYSTEMD_BOOT.read_bytes())
    raw, esl = work / "boot.hash", work / "boot-hash.esl"
    raw.write_bytes(digest)
    run(tool("sbsiglist"), "--owner", str(OWNER), "--type", "sha256", "--output", esl, raw)
    data = esl.read_bytes()
    assert len(data) == 76
    assert efivars.parse_signature_lists(data, str(esl)) == [
        Signature(efivars.CERT_SHA256, OWNER, digest)
    ]
    assert efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [digest]) == data


def test_sbvarsign_append_write_parses(
    db_append: bytes, db_esl: Path, kek: Throwaway, db: Throwaway
) -> None:
    write = efivars.parse_authenticated_write(db_append, "db-append.auth")
    assert write.attributes == APPEND_ATTRIBUTES == 0x67
    assert len(write.timestamp) == 16
    assert write.payload == db_esl.read_bytes()
    assert efivars.parse_signature_lists(write.payload, "payload") == [
        Signature(efivars.CERT_X509, OWNER, db.der)
    ]
    assert 4 + 16 + 24 + len(write.pkcs7) + len(write.payload) == len(db_append)
    assert efivars.signer_certificates(write.pkcs7) == [kek.der]


def mutate(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        return data[:offset] + value + data[offset + len(value) :]

    return change


def length_plus(extra: int) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        (length,) = struct.unpack_from("<I", data, 20)
        return with_field(data, 20, length + extra)

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda data: data[:43], "43 bytes, an authenticated write needs 44"),
        (mutate(0, struct.pack("<I", 0x47)), "lack TIME_BASED_AUTHENTICATED_WRITE_ACCESS"),
        (mutate(0, struct.pack("<I", 0x67 | 0x80)), r"attributes 0xe7 at byte 0 set unknown"),
        (mutate(11, b"\x01"), "EFI_TIME at byte 4 .* must be zero"),
        (mutate(12, struct.pack("<I", 1)), "EFI_TIME at byte 4 .* must be zero"),
        (mutate(16, b"\x3c\x00"), "EFI_TIME at byte 4 .* must be zero"),
        (mutate(20, struct.pack("<I", 24)), "WIN_CERTIFICATE at byte 20 claims 24 bytes"),
        (length_plus(1 << 20), "WIN_CERTIFICATE at byte 20 claims"),
        (mutate(24, b"\x00\x01"), "revision 0x0100 type 0x0ef1, not revision 0x0200"),
        (mutate(26, b"\x02\x00"), "revision 0x0200 type 0x0002, not revision 0x0200"),
        (mutate(28, efivars.CERT_X509.bytes_le), "CertType a5c059a1-.*, not PKCS7"),
        (mutate(44, b"\x31"), "no DER SEQUENCE at byte 0"),
        (length_plus(1), r"PKCS#7 at byte 44 is \d+ bytes of DER in"),
        (length_plus(-1), "runs past the end"),
        (lambda data: data + bytes(27), r"payload at byte \d+: .* at byte \d+: 27 bytes left"),
    ],
    ids=[
        "truncated",
        "not-time-based",
        "unknown-attribute",
        "nonzero-pad1",
        "nonzero-nanosecond",
        "nonzero-timezone",
        "certificate-length-empty",
        "certificate-length-past-end",
        "certificate-revision",
        "certificate-type",
        "certificate-guid-not-pkcs7",
        "pkcs7-not-der",
        "pkcs7-followed-by-a-stray-byte",
        "pkcs7-cut-short",
        "payload-not-signature-lists",
    ],
)
def test_malformed_authenticated_writes_are_refused(
    db_append: bytes, change: Callable[[bytes], bytes], match: str
) -> None:
    with pytest.raises(FormatError, match=f"^db-append.auth: .*{match}"):
        efivars.parse_authenticated_write(change(db_append), "db-append.auth")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x30\x05\x02\x01", b"\x30\x03\x02\x01\x01", b"\x30\x00\x00"],
    ids=["empty", "no-length", "cut-short", "bare-signed-data-of-nothing", "stray-byte"],
)
def test_signer_certificates_of_garbage(data: bytes) -> None:
    with pytest.raises(FormatError, match=r"^PKCS#7: "):
        efivars.signer_certificates(data)


# --- efivarfs files ------------------------------------------------------------------------


def test_variable_files(tmp_path: Path) -> None:
    path = efivars.variable_path(tmp_path, "db", efivars.IMAGE_SECURITY_DATABASE)
    assert path == tmp_path / "db-d719b2cb-3d3a-4596-a3bc-dad00e67656f"
    assert efivars.read_variable(tmp_path, "db", efivars.IMAGE_SECURITY_DATABASE) is None
    path.write_bytes(struct.pack("<I", 0x27) + SHA_LIST)
    assert efivars.read_variable(tmp_path, "db", efivars.IMAGE_SECURITY_DATABASE) == (
        0x27,
        SHA_LIST,
    )
    secure_boot = efivars.variable_path(tmp_path, "SecureBoot", efivars.EFI_GLOBAL_VARIABLE)
    assert secure_boot.name == "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
    secure_boot.write_bytes(b"\x06\x00\x00")
    with pytest.raises(FormatError, match="3 bytes, shorter than its attributes"):
        efivars.read_variable(tmp_path, "SecureBoot", efivars.EFI_GLOBAL_VARIABLE)
    path.unlink()
    path.mkdir()
    with pytest.raises(LocalError, match=r"db-d719b2cb-.*: cannot read it"):
        efivars.read_variable(tmp_path, "db", efivars.IMAGE_SECURITY_DATABASE)
    with pytest.raises(UsageError, match="cannot name an efivarfs file"):
        efivars.variable_path(tmp_path, "../db", efivars.IMAGE_SECURITY_DATABASE)


def test_oversized_variable_is_refused_unread(tmp_path: Path) -> None:
    path = efivars.variable_path(tmp_path, "dbx", efivars.IMAGE_SECURITY_DATABASE)
    path.write_bytes(bytes(efivars.MAX_VARIABLE + 1))
    with pytest.raises(FormatError, match="larger than"):
        efivars.read_variable(tmp_path, "dbx", efivars.IMAGE_SECURITY_DATABASE)


# --- Authenticode --------------------------------------------------------------------------


def test_authenticode_hash_of_systemd_boot_signed_and_unsigned(signed_boot: Path) -> None:
    """The same hash for the binary and its signed copy, and the one virt-firmware
    computes: what a dbx entry for this loader must hold."""
    unsigned = pe.authenticode_sha256(SYSTEMD_BOOT.read_bytes(), str(SYSTEMD_BOOT))
    signed = pe.authenticode_sha256(signed_boot.read_bytes(), str(signed_boot))
    assert signed == unsigned
    assert unsigned == pe_authenticode_hash(pefile.PE(str(SYSTEMD_BOOT)))
    assert signed == pe_authenticode_hash(pefile.PE(str(signed_boot)))


def test_certificate_table_of_systemd_boot(signed_boot: Path, db: Throwaway) -> None:
    signature = pe.certificate_table(signed_boot.read_bytes(), str(signed_boot))
    assert db.der in efivars.signer_certificates(signature)
    assert pe.certificate_table(SYSTEMD_BOOT.read_bytes(), str(SYSTEMD_BOOT)) == b""


PE_OFFSET = 0x40
OPTIONAL = PE_OFFSET + 24


def synthetic_pe(magic: int, trailing: bytes = b"", table: bytes = b"") -> bytes:
    """A small PE image (PE32 or PE32+): two sections out of file order, data after
    them, and a certificate table (appended at an 8-byte boundary) if `table` is given."""
    directories = 112 if magic == pe.PE32_PLUS_MAGIC else 96
    optional_size = directories + 16 * 8
    section_table = OPTIONAL + optional_size
    size_of_headers = 0x200
    text, data = bytes(range(256)) * 2, b"\x5a" * 0x200
    header = bytearray(size_of_headers)
    header[:2] = b"MZ"
    struct.pack_into("<I", header, 0x3C, PE_OFFSET)
    header[PE_OFFSET:OPTIONAL] = b"PE\0\0" + struct.pack(
        "<HHIIIHH",
        0x8664 if magic == pe.PE32_PLUS_MAGIC else 0x14C,
        2,
        0,
        0,
        0,
        optional_size,
        0x2022,
    )
    struct.pack_into("<H", header, OPTIONAL, magic)
    struct.pack_into("<II", header, OPTIONAL + 32, 0x1000, 0x200)  # section/file alignment
    struct.pack_into("<III", header, OPTIONAL + 56, 0x4000, size_of_headers, 0xDEADBEEF)
    struct.pack_into("<HH", header, OPTIONAL + 68, 10, 0)  # EFI application
    struct.pack_into("<I", header, OPTIONAL + directories - 4, 16)
    # .data is first in the table but second in the file: hashing goes by file offset.
    for index, (name, vaddr, size, offset) in enumerate(
        [(b".data", 0x2000, len(data), 0x400), (b".text", 0x1000, len(text), 0x200)]
    ):
        struct.pack_into(
            "<8sIIII12xI",
            header,
            section_table + 40 * index,
            name,
            size,
            vaddr,
            size,
            offset,
            0x60000020,
        )
    image = bytes(header) + text + data + trailing
    if not table:
        return image
    image += bytes(-len(image) % 8)
    out = bytearray(image + table)
    struct.pack_into("<II", out, OPTIONAL + directories + 32, len(image), len(table))
    return bytes(out)


def win_certificate(der: bytes, revision: int = 0x0200, kind: int = 0x0002) -> bytes:
    body = struct.pack("<IHH", 8 + len(der), revision, kind) + der
    return body + bytes(-len(body) % 8)


@pytest.mark.parametrize("magic", [pe.PE32_PLUS_MAGIC, pe.PE32_MAGIC], ids=["pe32+", "pe32"])
@pytest.mark.parametrize(
    "trailing", [b"", b"tail", b"8 bytes!"], ids=["none", "unaligned", "aligned"]
)
def test_authenticode_hash_of_synthetic_images(magic: int, trailing: bytes) -> None:
    """Both optional-header layouts, with and without data after the sections, against
    virt-firmware; signing (a certificate table and its data-directory entry) does not
    change the hash."""
    unsigned = synthetic_pe(magic, trailing)
    signed = synthetic_pe(magic, trailing, win_certificate(b"\x30\x03\x02\x01\x01"))
    ours = pe.authenticode_sha256(unsigned, "unsigned")
    assert ours == pe_authenticode_hash(pefile.PE(data=unsigned))
    assert pe.authenticode_sha256(signed, "signed") == ours
    assert pe_authenticode_hash(pefile.PE(data=signed)) == ours
    assert pe.certificate_table(signed, "signed") == b"\x30\x03\x02\x01\x01"
    assert pe.certificate_table(unsigned, "unsigned") == b""


def test_certificate_table_cuts_padding_counted_in_its_length() -> None:
    der = b"\x30\x03\x02\x01\x01"
    padded = struct.pack("<IHH", 16, 0x0200, 0x0002) + der + bytes(3)
    assert pe.certificate_table(synthetic_pe(pe.PE32_PLUS_MAGIC, table=padded), "x") == der


PLUS_DIRECTORIES = OPTIONAL + 112
PLUS_SECTIONS = PLUS_DIRECTORIES + 16 * 8  # the section table; .data first, then .text
SIGNED = synthetic_pe(pe.PE32_PLUS_MAGIC, b"tail", win_certificate(b"\x30\x03\x02\x01\x01"))


def patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"MZ" + bytes(10), "not a PE file"),
        (patched(SIGNED, OPTIONAL, "<H", 0x107), "magic 0x107 is neither PE32 nor PE32\\+"),
        (patched(SIGNED, PE_OFFSET + 20, "<H", 100), "optional header of 100 bytes"),
        (patched(SIGNED, PLUS_DIRECTORIES - 4, "<I", 17), "17 data directories do not fit"),
        (patched(SIGNED, OPTIONAL + 60, "<I", len(SIGNED) + 1), "SizeOfHeaders .* outside"),
        (patched(SIGNED, OPTIONAL + 60, "<I", 0xE0), "SizeOfHeaders 224 is outside bytes 240"),
        (patched(SIGNED, PLUS_DIRECTORIES + 36, "<I", 1 << 20), "runs past the end of the file"),
        (SIGNED + b"hidden", "does not end the file"),
        (patched(SIGNED, PLUS_SECTIONS + 40 + 16, "<I", 0x600), "section .text .* runs past"),
        (patched(SIGNED, PLUS_SECTIONS + 16, "<I", 1 << 20), "section .data .* runs past"),
    ],
    ids=[
        "not-pe",
        "optional-header-magic",
        "optional-header-truncated",
        "too-many-data-directories",
        "headers-past-end",
        "headers-before-security-entry",
        "certificate-table-past-end",
        "certificate-table-not-at-end",
        "section-into-certificate-table",
        "section-past-end",
    ],
)
def test_malformed_images_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=f"^boot.efi: .*{match}"):
        pe.authenticode_sha256(data, "boot.efi")


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (win_certificate(b"\x30\x00", revision=0x0100), "revision 0x0100 type 0x0002, not a"),
        (win_certificate(b"\x30\x00", kind=0x0EF1), "revision 0x0200 type 0x0ef1, not a"),
        (struct.pack("<IHH", 64, 0x0200, 2) + b"\x30\x00" + bytes(6), "claims 64 bytes"),
        (struct.pack("<IHH", 8, 0x0200, 2) + bytes(8), "claims 8 bytes"),
        (win_certificate(b"\x30\x09\x02\x01\x01"), "signature at byte 1544: DER .* runs past"),
        (win_certificate(b"\x04\x00"), "signature at byte 1544: no DER SEQUENCE"),
    ],
    ids=[
        "revision",
        "type",
        "length-past-table",
        "length-empty",
        "der-past-length",
        "not-a-sequence",
    ],
)
def test_malformed_certificate_tables_are_refused(table: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=f"^boot.efi: .*{match}"):
        pe.certificate_table(synthetic_pe(pe.PE32_PLUS_MAGIC, table=table), "boot.efi")

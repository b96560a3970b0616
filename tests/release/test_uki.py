"""Unified Kernel Images: sections read back with objdump/objcopy/pefile equal their
inputs, the layout is aligned and does not overlap, signatures verify with sbverify
only for the right certificate, bad inputs are refused without leaving anything."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pefile
import pytest

from rampart import run as run_module
from rampart.contracts import osrel
from rampart.contracts.cmdline import HARDENING, cmdline_params, kernel_cmdline
from rampart.errors import ConflictError, FormatError, LocalError, UsageError, VerificationError
from rampart.release import secureboot, uki
from tests.release import bootkit

ROOTHASH = "5e1f" * 16
SALT = "9a" * 32
VERSION = "5.0.0-alpha.3"


def cmdline(**kw: object) -> str:
    args: dict[str, object] = {
        "roothash": ROOTHASH,
        "hash_offset": 40960,
        "data_blocks": 10,
        "salt": SALT,
    }
    args.update(kw)
    return kernel_cmdline("mainvg", VERSION, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    return secureboot.generate_keys(tmp_path_factory.mktemp("sbkeys") / "keys")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    return secureboot.generate_keys(tmp_path_factory.mktemp("other") / "keys", "Intruder")


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bootkit.tiny_initrd(tmp_path_factory.mktemp("initrd") / "initrd.cpio")


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory, keys: secureboot.KeySet, initrd: Path
) -> uki.Uki:
    out = tmp_path_factory.mktemp("uki") / f"clipos-{VERSION}.efi"
    return uki.build(
        out,
        kernel=bootkit.kernel(),
        initrd=initrd,
        os_name="clipos",
        version=VERSION,
        cmdline=cmdline(),
        sign_key=keys.key("db"),
        sign_cert=keys.cert("db"),
    )


def build_unsigned(directory: Path, initrd: Path, **kw: object) -> Path:
    out = directory / "unsigned.efi"
    args: dict[str, object] = {
        "kernel": bootkit.kernel(),
        "initrd": initrd,
        "os_name": "clipos",
        "version": VERSION,
        "cmdline": cmdline(),
    }
    args.update(kw)
    uki.build(out, **args)  # type: ignore[arg-type]
    return out


# --- contents and layout ---------------------------------------------------------------


def test_sections_hold_exactly_their_inputs(signed: uki.Uki, initrd: Path, tmp_path: Path) -> None:
    sections = bootkit.pe_sections(signed.path)
    kernel = bootkit.kernel().read_bytes()
    assert sections[".osrel"][4] == osrel.os_release("clipos", VERSION).encode()
    assert sections[".cmdline"][4] == cmdline().encode()
    assert sections[".initrd"][4] == initrd.read_bytes()
    assert sections[".linux"][4] == kernel
    release = sections[".uname"][4].decode()
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", release)
    # The release is the first word of the header's version string.
    assert f"{release} (".encode() in kernel
    # objcopy reads the same bytes back.
    assert bootkit.dump_section(signed.path, ".cmdline", tmp_path) == cmdline().encode()
    assert bootkit.dump_section(signed.path, ".linux", tmp_path) == kernel
    assert bootkit.dump_section(signed.path, ".initrd", tmp_path) == initrd.read_bytes()


def test_osrel_carries_the_version_systemd_boot_sorts_by(signed: uki.Uki) -> None:
    assert signed.os_release == {
        "NAME": "clipos",
        "ID": "clipos",
        "VERSION_ID": VERSION,
        "PRETTY_NAME": f"clipos {VERSION}",
        "IMAGE_VERSION": VERSION,
    }
    assert signed.version == VERSION


def test_one_sbat_section_with_the_stub_entries_and_ours(signed: uki.Uki) -> None:
    names = [s.name for s in signed.sections]
    assert names.count(".sbat") == 1
    text = bootkit.pe_sections(signed.path)[".sbat"][4].decode()
    lines = text.splitlines()
    assert lines[0] == uki.SBAT_HEADER
    assert any(line.startswith("systemd,1,") for line in lines)
    assert lines[-1].startswith("rampart,1,Rampart,rampart,")
    assert all(len(line.split(",")) == 6 for line in lines)
    stub_sbat = bootkit.pe_sections(uki.STUB)[".sbat"][4].rstrip(b"\0").decode()
    for line in stub_sbat.splitlines():
        assert line in lines


def test_sections_are_aligned_after_the_stub_and_do_not_overlap(signed: uki.Uki) -> None:
    stub = pefile.PE(str(uki.STUB), fast_load=True)
    alignment = stub.OPTIONAL_HEADER.SectionAlignment
    stub_end = max(s.VirtualAddress + s.Misc_VirtualSize for s in stub.sections)
    stub.close()
    pe = pefile.PE(str(signed.path), fast_load=True)
    file_alignment = pe.OPTIONAL_HEADER.FileAlignment
    size_of_image = pe.OPTIONAL_HEADER.SizeOfImage
    pe.close()
    added = [".osrel", ".cmdline", ".uname", ".sbat", ".initrd", ".linux"]
    by_name = {s.name: s for s in signed.sections}
    assert [s.name for s in signed.sections][-len(added) :] == added
    for name in added:
        section = by_name[name]
        assert section.vma >= stub_end
        assert section.vma % alignment == 0, name
        assert section.file_offset % file_alignment == 0, name
    spans = sorted((s.vma, s.vma + s.size, s.name) for s in signed.sections)
    for (_, end, name), (start, _, after) in itertools.pairwise(spans):
        assert start >= end, f"{name} overlaps {after}"
    files = sorted((s.file_offset, s.file_offset + s.raw_size) for s in signed.sections)
    for (_, end), (start, _) in itertools.pairwise(files):
        assert start >= end
    assert size_of_image >= spans[-1][1]
    assert size_of_image % alignment == 0
    # objdump sees the same layout.
    dumped = bootkit.objdump_sections(signed.path)
    for name in added:
        size, vma, offset = dumped[name]
        assert (vma, offset) == (by_name[name].vma, by_name[name].file_offset)
        assert size in (by_name[name].size, by_name[name].raw_size)


def test_linux_section_is_code(signed: uki.Uki) -> None:
    pe = pefile.PE(str(signed.path), fast_load=True)
    flags = {s.Name.rstrip(b"\0"): s.Characteristics for s in pe.sections}
    pe.close()
    assert flags[b".linux"] & pefile.SECTION_CHARACTERISTICS["IMAGE_SCN_CNT_CODE"]
    assert not flags[b".cmdline"] & pefile.SECTION_CHARACTERISTICS["IMAGE_SCN_MEM_WRITE"]


# --- signatures ------------------------------------------------------------------------


def test_signed_uki_verifies_with_db_only(
    signed: uki.Uki, keys: secureboot.KeySet, other_keys: secureboot.KeySet
) -> None:
    ok = bootkit.sbverify(signed.path, keys.cert("db"))
    assert ok.returncode == 0 and "Signature verification OK" in ok.stdout
    for wrong in (keys.cert("KEK"), keys.cert("PK"), other_keys.cert("db")):
        assert bootkit.sbverify(signed.path, wrong).returncode != 0
    uki.verify_signature(signed.path, keys.cert("db"))
    with pytest.raises(VerificationError, match="does not verify"):
        uki.verify_signature(signed.path, other_keys.cert("db"))


def test_inspect_names_the_signer_as_sbverify_does(signed: uki.Uki) -> None:
    assert signed.signers == ("O=Rampart,CN=Rampart db",)
    listing = subprocess.run(
        ["sbverify", "--list", str(signed.path)], capture_output=True, text=True, check=True
    ).stdout
    assert "subject: /CN=Rampart db/O=Rampart" in listing
    again = uki.inspect(signed.path)
    assert again.root_hash == ROOTHASH
    assert again.cmdline == cmdline()
    assert again.signed


def test_unsigned_uki_does_not_verify(
    tmp_path: Path, initrd: Path, keys: secureboot.KeySet
) -> None:
    path = build_unsigned(tmp_path, initrd)
    assert uki.inspect(path).signers == ()
    assert bootkit.sbverify(path, keys.cert("db")).returncode != 0
    with pytest.raises(VerificationError):
        uki.verify_signature(path, keys.cert("db"))


def test_sign_in_place_then_refuse_to_sign_twice(
    tmp_path: Path, initrd: Path, keys: secureboot.KeySet
) -> None:
    path = build_unsigned(tmp_path, initrd)
    uki.sign(path, keys.key("db"), keys.cert("db"))
    uki.verify_signature(path, keys.cert("db"))
    before = path.read_bytes()
    with pytest.raises(ConflictError, match="already signed"):
        uki.sign(path, keys.key("db"), keys.cert("db"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsigned.efi"]


def test_a_key_that_does_not_match_its_certificate_is_refused(
    tmp_path: Path, initrd: Path, keys: secureboot.KeySet
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LocalError, match="does not match the certificate"):
        uki.build(
            out / "x.efi",
            kernel=bootkit.kernel(),
            initrd=initrd,
            os_name="clipos",
            version=VERSION,
            cmdline=cmdline(),
            sign_key=keys.key("KEK"),
            sign_cert=keys.cert("db"),
        )
    assert list(out.iterdir()) == []


# --- refusals, and nothing left behind ----------------------------------------------------


def _build(out: Path, initrd: Path, **kw: object) -> uki.Uki:
    args: dict[str, object] = {
        "kernel": bootkit.kernel(),
        "initrd": initrd,
        "os_name": "clipos",
        "version": VERSION,
        "cmdline": cmdline(),
    }
    args.update(kw)
    return uki.build(out, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["elf", "random", "pe-not-linux", "truncated", "empty"])
def test_a_kernel_that_is_not_a_bzimage_is_refused(tmp_path: Path, initrd: Path, kind: str) -> None:
    bad = tmp_path / "vmlinuz"
    real = bootkit.kernel().read_bytes()
    bad.write_bytes(
        {
            "elf": bootkit.BUSYBOX.read_bytes()[:65536],
            "random": bytes(range(256)) * 64,
            "pe-not-linux": uki.STUB.read_bytes(),
            "truncated": real[:0x100],
            "empty": b"",
        }[kind]
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FormatError, match="not an x86 bzImage") as info:
        _build(out / "x.efi", initrd, kernel=bad)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


def test_an_already_signed_stub_is_refused(
    tmp_path: Path, initrd: Path, keys: secureboot.KeySet
) -> None:
    stub = tmp_path / "stub.efi"
    shutil.copyfile(uki.STUB, stub)
    uki.sign(stub, keys.key("db"), keys.cert("db"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FormatError, match="already signed") as info:
        _build(out / "x.efi", initrd, stub=stub)
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


def test_a_stub_that_is_not_pe_is_refused(tmp_path: Path, initrd: Path) -> None:
    stub = tmp_path / "stub.efi"
    stub.write_bytes(b"\x7fELF" + b"\0" * 4096)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FormatError, match="not a PE"):
        _build(out / "x.efi", initrd, stub=stub)
    assert list(out.iterdir()) == []


def test_nothing_is_left_when_signing_fails_after_objcopy(
    tmp_path: Path, initrd: Path, keys: secureboot.KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def failing_sbsign(src: Path, dst: Path, key: Path, cert: Path) -> None:
        calls.append(src)
        assert src.is_file()  # objcopy's output exists at this point
        dst.write_bytes(b"partial")
        raise LocalError("sbsign failed with exit code 1: injected")

    monkeypatch.setattr(uki, "_sbsign", failing_sbsign)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LocalError, match="injected"):
        _build(out / "x.efi", initrd, sign_key=keys.key("db"), sign_cert=keys.cert("db"))
    assert calls
    assert list(out.iterdir()) == []


def test_nothing_is_left_when_objcopy_fails(
    tmp_path: Path, initrd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = run_module.run

    def failing(argv: list[str], **kw: object) -> object:
        if argv[0] == "objcopy":
            Path(argv[-1]).write_bytes(b"half an image")
            raise LocalError("objcopy failed with exit code 1: injected")
        return real_run(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(run_module, "run", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LocalError, match="injected"):
        _build(out / "x.efi", initrd)
    assert list(out.iterdir()) == []


def test_missing_initrd_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LocalError, match="initrd not found"):
        _build(out / "x.efi", tmp_path / "nope.cpio")
    assert list(out.iterdir()) == []


def test_existing_output_is_never_overwritten(tmp_path: Path, initrd: Path) -> None:
    target = tmp_path / "x.efi"
    target.write_bytes(b"precious")
    with pytest.raises(ConflictError, match="already exists"):
        _build(target, initrd)
    assert target.read_bytes() == b"precious"


def test_kernel_release_from_header_or_given(tmp_path: Path, initrd: Path) -> None:
    kernel = bytearray(bootkit.kernel().read_bytes())
    kernel[0x20E:0x210] = b"\0\0"  # no kernel_version pointer
    headless = tmp_path / "vmlinuz"
    headless.write_bytes(bytes(kernel))
    with pytest.raises(UsageError, match="no kernel release"):
        _build(tmp_path / "a.efi", initrd, kernel=headless)
    built = _build(tmp_path / "b.efi", initrd, kernel=headless, uname="6.1.0-99-amd64")
    assert built.uname == "6.1.0-99-amd64"


def test_inspect_refuses_what_is_not_a_uki(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"no \.linux section"):
        uki.inspect(uki.STUB)
    junk = tmp_path / "junk.efi"
    junk.write_bytes(b"MZ" + b"\xff" * 100)
    with pytest.raises(FormatError, match="not a PE"):
        uki.inspect(junk)
    with pytest.raises(LocalError, match="not found"):
        uki.inspect(tmp_path / "missing.efi")


# --- the command line --------------------------------------------------------------------


def test_cmdline_names_the_core_and_pins_its_root_hash() -> None:
    line = kernel_cmdline(
        "mainvg", VERSION, roothash=ROOTHASH.upper(), hash_offset=8192, data_blocks=2
    )
    assert line.split()[:8] == [
        f"root=/dev/mapper/verity_core_{VERSION}",
        "rootfstype=squashfs",
        "ro",
        "rd.lvm.vg=mainvg",
        f"rampart.core=mainvg/core_{VERSION}",
        f"rampart.verity.roothash={ROOTHASH}",
        "rampart.verity.hashoffset=8192",
        "rampart.verity.datablocks=2",
    ]
    params = cmdline_params(line)
    for flag in HARDENING:
        assert flag in line.split()
    assert params["lockdown"] == "confidentiality"
    assert "rampart.verity.salt" not in params
    assert "rampart.verity.fecoffset" not in params


def test_cmdline_with_salt_fec_and_extras_in_order() -> None:
    line = kernel_cmdline(
        "vg0",
        "1.2.3",
        roothash=ROOTHASH,
        salt=SALT,
        hash_offset=4096,
        data_blocks=1,
        fec_offset=8192,
        fec_roots=2,
        extra=["console=ttyS0 quiet", "loglevel=3"],
        lockdown=None,
    )
    params = cmdline_params(line)
    assert params["rampart.verity.salt"] == SALT
    assert params["rampart.verity.fecoffset"] == "8192"
    assert params["rampart.verity.fecroots"] == "2"
    assert "lockdown" not in params
    assert line.endswith(" console=ttyS0 quiet loglevel=3")


@pytest.mark.parametrize(
    "extra",
    [
        "root=/dev/sda2",
        "rw",
        "init=/bin/sh",
        "rampart.verity.roothash=00",
        "rd.verity.roothash=00",
        "lockdown=none",
        'quote="x"',
        "caf\u00e9=1",
        "bell\x07",
    ],
)
def test_extra_parameters_cannot_redefine_what_the_signature_pins(extra: str) -> None:
    with pytest.raises(UsageError):
        cmdline(extra=[extra])


def test_an_installer_uki_carries_the_installers_parameters() -> None:
    line = cmdline(extra=["rampart.install.target=/dev/vda", "rampart.install.payload=/dev/vdb"])
    assert "rampart.install.target=/dev/vda rampart.install.payload=/dev/vdb" in line
    with pytest.raises(UsageError):
        cmdline(extra=["rampart.device.installer=1"])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"roothash": "ab" * 31}, "64 hexadecimal"),
        ({"roothash": "zz" * 32}, "64 hexadecimal"),
        ({"salt": "xyz"}, "salt"),
        ({"hash_offset": 100}, "multiple of 512"),
        ({"data_blocks": 0}, "positive"),
        ({"fec_offset": 4096}, "go together"),
        ({"fec_offset": 4096, "fec_roots": 30}, "2..24"),
        ({"lockdown": "loose"}, "lockdown"),
        ({"extra": ["a" * 2048]}, "2047"),
    ],
)
def test_invalid_cmdline_values_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cmdline(**kw)


@pytest.mark.parametrize(
    ("vg", "version"),
    [("bad/vg", "1.0.0"), ("-x", "1.0.0"), ("mainvg", "1.0.0+build"), ("mainvg", "v1")],
)
def test_invalid_names_are_refused(vg: str, version: str) -> None:
    with pytest.raises(UsageError):
        kernel_cmdline(vg, version, roothash=ROOTHASH, hash_offset=0, data_blocks=1)


# --- the CLI ----------------------------------------------------------------------------


def _core_meta(path: Path, **kw: object) -> Path:
    doc: dict[str, object] = {
        "version": VERSION,
        "root_hash": ROOTHASH,
        "salt": SALT,
        "data_blocks": 10,
        "hash_offset": 40960,
        "fec_offset": None,
        "fec_roots": None,
    }
    doc.update(kw)
    path.write_text(json.dumps(doc))
    return path


def test_cli_build_then_inspect_efiboot(
    tmp_path: Path, initrd: Path, keys: secureboot.KeySet
) -> None:
    meta = _core_meta(tmp_path / "core.json")
    out = tmp_path / f"clipos-{VERSION}.efi"
    code, stdout, stderr = bootkit.image_cli(
        "build", "efiboot", "--kernel", bootkit.kernel(), "--initrd", initrd,
        "--os", "clipos", "--version", VERSION, "--core-meta", meta,
        "--extra-cmdline", "console=ttyS0", "--sign-key", keys.key("db"),
        "--sign-cert", keys.cert("db"), "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, stderr
    built = json.loads(stdout)
    assert built["version"] == VERSION
    assert built["root_hash"] == ROOTHASH
    assert built["signers"] == ["O=Rampart,CN=Rampart db"]
    assert built["cmdline"] == cmdline(extra=["console=ttyS0"])
    uki.verify_signature(out, keys.cert("db"))

    code, stdout, _ = bootkit.image_cli("inspect", "efiboot", out, "--json")
    assert code == 0
    assert json.loads(stdout) == built
    code, stdout, _ = bootkit.image_cli("inspect", "efiboot", out)
    assert code == 0
    assert f"root hash: {ROOTHASH}" in stdout
    assert "signed by: O=Rampart,CN=Rampart db" in stdout


def test_cli_accepts_a_minimal_meta_with_roothash(tmp_path: Path, initrd: Path) -> None:
    meta = tmp_path / "core.json"
    meta.write_text(json.dumps({"roothash": ROOTHASH, "hash_offset": 4096, "data_blocks": 1}))
    out = tmp_path / "x.efi"
    code, stdout, stderr = bootkit.image_cli(
        "build", "efiboot", "--kernel", bootkit.kernel(), "--initrd", initrd, "--os", "clipos",
        "--version", "1.0.0", "--core-meta", meta, "--vg", "vg1", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    assert "unsigned" in stdout
    assert "rampart.core=vg1/core_1.0.0" in uki.inspect(out).cmdline


@pytest.mark.parametrize(
    ("meta", "code", "message"),
    [
        ({"version": "9.9.9"}, 2, "must boot its own Core"),
        ({"root_hash": None}, 10, "root hash"),
        ({"data_blocks": "10"}, 10, "not an integer"),
        ({"hash_offset": None}, 10, "lacks 'hash_offset'"),
    ],
)
def test_cli_refuses_bad_core_metadata(
    tmp_path: Path, initrd: Path, meta: dict[str, object], code: int, message: str
) -> None:
    path = _core_meta(tmp_path / "core.json", **meta)
    out = tmp_path / "x.efi"
    got, _, stderr = bootkit.image_cli(
        "build", "efiboot", "--kernel", bootkit.kernel(), "--initrd", initrd, "--os", "clipos",
        "--version", VERSION, "--core-meta", path, "--out", out,
    )  # fmt: skip
    assert got == code, stderr
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_a_non_bzimage_with_one_line(tmp_path: Path, initrd: Path) -> None:
    meta = _core_meta(tmp_path / "core.json")
    code, _, stderr = bootkit.image_cli(
        "build", "efiboot", "--kernel", initrd, "--initrd", initrd, "--os", "clipos",
        "--version", VERSION, "--core-meta", meta, "--out", tmp_path / "x.efi",
    )  # fmt: skip
    assert code == 10
    assert stderr.strip().count("\n") == 0
    assert "not an x86 bzImage" in stderr


def test_the_security_epoch_is_pinned_on_the_command_line() -> None:
    line = cmdline(epoch=2)
    params = cmdline_params(line)
    assert params["rampart.epoch"] == "2"
    assert line.index("rampart.epoch=2") < line.index("slab_nomerge")  # before the extras
    assert "rampart.epoch" not in cmdline_params(cmdline())


@pytest.mark.parametrize("epoch", [-1, 1 << 63])
def test_an_epoch_out_of_range_is_refused(epoch: int) -> None:
    with pytest.raises(UsageError, match="epoch"):
        cmdline(epoch=epoch)


def test_an_extra_parameter_cannot_set_the_epoch() -> None:
    with pytest.raises(UsageError):
        cmdline(extra=["rampart.epoch=99"])

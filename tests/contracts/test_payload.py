"""The pure payload checks (contracts/payload.py): bytes of real UKIs and Cores built by
`uki.build` and `core.build_core` in, facts or one-line errors out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rampart.contracts import cmdline, payload, verity
from rampart.contracts.version import parse_version
from rampart.errors import FormatError, VerificationError
from rampart.release import uki
from tests.conftest import fake_uki
from tests.releases import build_payloads, build_uki

V = parse_version("2.0.0")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    core, efiboot = build_payloads(tmp_path_factory.mktemp("rel"), V.core, epoch=4)
    return core.read_bytes(), efiboot.read_bytes()


def check(data: bytes, **kw: object) -> payload.CheckedUki:
    args: dict[str, object] = {"os_name": "clipos", "version": V, "vg": "mainvg"}
    args.update(kw)
    return payload.check_uki(data, "x.efi", **args)  # type: ignore[arg-type]


def test_a_real_uki_yields_its_facts(release: tuple[bytes, bytes]) -> None:
    facts = check(release[1], require_root_hash=True)
    assert (facts.os_id, facts.version, facts.core, facts.epoch) == (
        "clipos",
        "2.0.0",
        "mainvg/core_2.0.0",
        4,
    )
    assert facts.root is not None and facts.root.data_blocks is not None
    core = release[0]
    used = payload.check_core(core[:96], len(core), "core")
    superblock = core[facts.root.hash_offset : facts.root.hash_offset + verity.SUPERBLOCK]
    params = payload.check_core_verity(used, superblock, len(core), facts.root, "core")
    assert params.data_blocks == facts.root.data_blocks
    tree = core[params.hash_start : params.hash_start + verity.tree_size(params.data_blocks)]
    payload.check_core_tree(tree, params, "core")
    other = dataclasses.replace(params, root_hash="00" * 32)
    with pytest.raises(VerificationError, match="were not built together"):
        payload.check_core_tree(tree, other, "core")


@pytest.mark.parametrize(
    ("kw", "error", "text"),
    [
        ({"os_name": "otheros"}, VerificationError, "names the OS 'clipos', not 'otheros'"),
        ({"version": parse_version("2.0.1")}, VerificationError, "names version '2.0.0'"),
        ({"vg": "othervg"}, VerificationError, "boots mainvg/core_2.0.0, not othervg/core_2.0.0"),
    ],
)
def test_a_uki_for_another_os_version_or_vg_is_refused(
    release: tuple[bytes, bytes], kw: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        check(release[1], **kw)


def test_publish_checks_the_lv_without_a_volume_group(release: tuple[bytes, bytes]) -> None:
    assert check(release[1], vg=None).core == "mainvg/core_2.0.0"


def test_core_bytes_are_not_an_efi_binary(release: tuple[bytes, bytes]) -> None:
    with pytest.raises(FormatError, match=r"not a PE file .*refusing it as the EFI binary"):
        check(release[0])


def test_a_pe_without_the_uki_sections_is_refused() -> None:
    with pytest.raises(FormatError, match=r"no \.linux, \.initrd, \.osrel section"):
        check(fake_uki("rampart.core=mainvg/core_2.0.0"))


def test_an_efi_binary_is_not_a_core(release: tuple[bytes, bytes]) -> None:
    with pytest.raises(FormatError, match="not a squashfs image"):
        payload.check_core(release[1][:96], len(release[1]), "core")


def test_a_squashfs_claiming_more_bytes_than_the_image_is_refused(
    release: tuple[bytes, bytes],
) -> None:
    with pytest.raises(FormatError, match="malformed squashfs superblock"):
        payload.check_core(release[0][:96], 4096, "core")


def test_a_core_without_its_tree_is_refused(release: tuple[bytes, bytes]) -> None:
    facts = check(release[1])
    assert facts.root is not None
    bare = release[0][: facts.root.hash_offset]
    used = payload.check_core(bare[:96], len(bare), "core")
    with pytest.raises(FormatError, match="refusing a Core without verity"):
        payload.check_core_verity(used, b"", len(bare), facts.root, "core")


def test_a_superblock_for_another_data_size_is_refused(release: tuple[bytes, bytes]) -> None:
    facts = check(release[1])
    assert facts.root is not None and facts.root.data_blocks is not None
    other = cmdline.RootHash(facts.root.root_hash, facts.root.hash_offset, 1)
    core = release[0]
    superblock = core[facts.root.hash_offset : facts.root.hash_offset + verity.SUPERBLOCK]
    with pytest.raises(VerificationError, match="do not match the EFI binary's command line"):
        payload.check_core_verity(96, superblock, len(core), other, "core")


def test_a_repeated_pinning_parameter_is_refused(tmp_path: Path) -> None:
    line = "rampart.core=mainvg/core_2.0.0 rampart.core=mainvg/core_1.0.0 ro"
    efi = build_uki(tmp_path / "twice.efi", "clipos", "2.0.0", line).read_bytes()
    with pytest.raises(VerificationError, match=r"sets rampart\.core= 2 times"):
        check(efi)


def test_no_root_hash_is_refused_only_where_required(tmp_path: Path) -> None:
    _, efiboot = build_payloads(tmp_path, V.core, root_hash=False)
    data = efiboot.read_bytes()
    assert check(data).root is None
    with pytest.raises(VerificationError, match="pins no verity root hash"):
        check(data, require_root_hash=True)


def test_malformed_verity_parameters_are_refused() -> None:
    with pytest.raises(FormatError, match="malformed verity parameters"):
        cmdline.root_hash("rampart.verity.roothash=xyz rampart.verity.hashoffset=1", "c")


def test_an_installed_entry_tells_whether_the_device_has_verity(
    release: tuple[bytes, bytes], tmp_path: Path
) -> None:
    assert payload.pins_root_hash(release[1], "a.efi")
    assert not payload.pins_root_hash(b"running efi", "b.efi")
    line = uki.inspect(build_payloads(tmp_path, V.core, root_hash=False)[1]).cmdline
    assert not payload.pins_root_hash(fake_uki(line), "c.efi")


@pytest.mark.parametrize(
    ("pin", "accepted"),
    [
        ("rampart.core=mainvg/core_2.0.0", True),
        ("rampart.core=x/mainvg/core_2.0.0", False),
        ("rampart.core=mainvg/core_2.0.0x", False),
        ("rd.verity.device=/dev/mainvg/core_2.0.0", True),
        ("rd.verity.device=/dev/othervg/core_2.0.0", False),
        ("root=/dev/mainvg/core_2.0.0", False),
    ],
)
def test_only_this_devices_lv_is_pinned(tmp_path: Path, pin: str, accepted: bool) -> None:
    efi = build_uki(tmp_path / "pin.efi", "clipos", "2.0.0", f"{pin} ro").read_bytes()
    if accepted:
        check(efi)
    else:
        with pytest.raises(VerificationError, match="its command line boots"):
            check(efi)

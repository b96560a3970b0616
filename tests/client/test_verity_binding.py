"""The client checks the written Core against the verity root hash on the new EFI
binary's command line: a Core and an EFI binary not built together never become bootable."""

from __future__ import annotations

from pathlib import Path

import pytest

from rampart.client import update
from rampart.errors import VerificationError
from rampart.image import core, pe
from rampart.version import parse_version
from tests.client.conftest import (
    OS,
    DeviceDirs,
    Nginx,
    Pki,
    Release,
    make_device,
    publish,
)
from tests.conftest import KeyPair, fake_uki

OFFERED = "5.0.0-alpha.3"


def cmdline_for(meta: core.CoreMeta, version: str, vg: str = "mainvg") -> str:
    return (
        f"root=/dev/mapper/verity_core_{version} rampart.core={vg}/core_{version} "
        f"rampart.verity.roothash={meta.verity.root_hash} "
        f"rampart.verity.hashoffset={meta.verity.hash_offset} "
        f"rampart.verity.datablocks={meta.verity.data_blocks} quiet"
    )


def built_release(
    tmp_path: Path, name: str, content: bytes, version: str = OFFERED
) -> tuple[Release, core.CoreMeta]:
    tree = tmp_path / name / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_bytes(content)
    meta = core.build_core(tree, parse_version(version), tmp_path / name)
    efiboot = tmp_path / name / "efiboot"
    efiboot.write_bytes(fake_uki(cmdline_for(meta, version)))
    return Release(version, tmp_path / name / f"core-{version}.img", efiboot), meta


@pytest.fixture
def device(tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx) -> DeviceDirs:
    return make_device(tmp_path / "device", vendor, pki.ca.cert, served.url)


def run(device: DeviceDirs) -> update.UpdateResult:
    dev = device.open()
    return update.update(dev, update.make_fetcher(dev))


def test_pe_cmdline_reads_back() -> None:
    assert pe.cmdline(fake_uki("root=x quiet")) == "root=x quiet"


def test_core_built_with_its_efi_binary_installs_and_is_verified_by_root_hash(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    release, _meta = built_release(tmp_path, "rel", b"NAME=one\n")
    publish(served.root, vendor, release)
    assert run(device).outcome == update.Outcome.UPDATED
    assert f"{OS}-{OFFERED}.efi" in device.entries()


def test_core_and_efi_binary_from_different_builds_never_become_bootable(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """Both validly signed for the same version, but built from different trees."""
    release_a, _ = built_release(tmp_path, "a", b"NAME=one\n")
    release_b, _ = built_release(tmp_path, "b", b"NAME=two\n")
    mixed = Release(OFFERED, release_a.core, release_b.efiboot)
    publish(served.root, vendor, mixed)
    running_entry = (device.esp / f"{OS}-5.0.0-alpha.1.efi").read_bytes()
    with pytest.raises(VerificationError, match="does not match the root hash of the new EFI"):
        run(device)
    assert device.entries() == [f"{OS}-5.0.0-alpha.1.efi"]
    assert (device.esp / f"{OS}-5.0.0-alpha.1.efi").read_bytes() == running_entry
    assert not (device.run_dir / "update-ready").exists()


def test_efi_binary_built_for_another_lv_is_refused_before_touching_disk(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    release, meta = built_release(tmp_path, "rel", b"NAME=one\n")
    release.efiboot.write_bytes(fake_uki(cmdline_for(meta, "9.9.9")))
    publish(served.root, vendor, release)
    before = device.state()
    with pytest.raises(VerificationError, match=r"not the slot core_5\.0\.0-alpha\.3"):
        run(device)
    assert device.state() == before

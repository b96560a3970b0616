"""The client checks the written Core against the verity root hash on the new EFI
binary's command line: a Core and an EFI binary not built together never become bootable."""

from __future__ import annotations

from pathlib import Path

import pytest

from rampart.contracts import pe
from rampart.device import update
from rampart.errors import VerificationError
from rampart.release import uki
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair, fake_uki
from tests.device.conftest import (
    OS,
    DeviceDirs,
    make_device,
    make_release,
    publish,
    publish_unchecked,
)
from tests.releases import build_uki

OFFERED = "5.0.0-alpha.3"


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
    release = make_release(tmp_path / "rel", OFFERED)
    publish(served.root, vendor, release)
    assert run(device).outcome == update.Outcome.UPDATED
    assert f"{OS}-{OFFERED}.efi" in device.entries()


def test_core_and_efi_binary_from_different_builds_never_become_bootable(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """Both validly signed for the same version, but built from different trees (of the
    same size: the verity superblock matches, only the root hash differs)."""
    release_a = make_release(tmp_path / "a", OFFERED, content="NAME=one\n")
    release_b = make_release(tmp_path / "b", OFFERED, content="NAME=two\n")
    publish_unchecked(served.root, vendor, OFFERED, release_a.core, release_b.efiboot)
    before = device.state()
    with pytest.raises(VerificationError, match="does not match the root hash of the EFI"):
        run(device)
    assert device.state() == before  # refused from the tree, before the disk is touched
    assert not (device.run_dir / "update-ready").exists()


def test_core_whose_data_changed_under_its_own_tree_is_caught_in_the_slot(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """Tree and superblock of the right build, one data block changed (signed all the
    same): only the read-back of the slot against the tree can see it."""
    release = make_release(tmp_path / "rel", OFFERED)
    core = bytearray(release.core.read_bytes())
    core[8192] ^= 0x01
    changed = tmp_path / "changed-core"
    changed.write_bytes(bytes(core))
    publish_unchecked(served.root, vendor, OFFERED, changed, release.efiboot)
    running_entry = (device.esp / f"{OS}-5.0.0-alpha.1.efi").read_bytes()
    with pytest.raises(VerificationError, match="does not match the root hash of the new EFI"):
        run(device)
    assert device.entries() == [f"{OS}-5.0.0-alpha.1.efi"]
    assert (device.esp / f"{OS}-5.0.0-alpha.1.efi").read_bytes() == running_entry
    assert not (device.run_dir / "update-ready").exists()


def test_efi_binary_built_for_another_lv_is_refused_before_touching_disk(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    release = make_release(tmp_path / "rel", OFFERED)
    line = uki.inspect(release.efiboot).cmdline.replace(f"core_{OFFERED}", "core_9.9.9")
    other = build_uki(tmp_path / "other.efi", OS, OFFERED, line)
    publish_unchecked(served.root, vendor, OFFERED, release.core, other)
    before = device.state()
    with pytest.raises(VerificationError, match=r"not mainvg/core_5\.0\.0-alpha\.3"):
        run(device)
    assert device.state() == before

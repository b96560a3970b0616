"""Attacks that swap what a validly signed payload is.

The signatures bind only the version: files signed by the vendor's key for another
OS, or for the other kind of payload, verify. Each test serves such a release with
the vendor's key, runs the real client against nginx, and asserts the refusal,
its exit code through the CLI where it matters, and that neither the slots nor
the ESP changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rampart.contracts import cmdline
from rampart.device import update
from rampart.errors import FormatError, RampartError, VerificationError
from rampart.release import uki
from rampart.testbed.services import Nginx, Pki, world_readable_tmp
from tests.conftest import KeyPair, fake_uki, run_cli
from tests.device.conftest import (
    OS,
    DeviceDirs,
    make_device,
    make_release,
    publish,
    publish_unchecked,
)
from tests.device.hostile import hostile_server
from tests.releases import build_payloads

OFFERED = "5.0.0-alpha.3"
RUNNING = "5.0.0-alpha.1"


@pytest.fixture
def device(tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx) -> DeviceDirs:
    return make_device(tmp_path / "device", vendor, pki.ca.cert, served.url, RUNNING)


def verity_device(tmp_path: Path, device: DeviceDirs) -> DeviceDirs:
    """Make `device` one whose Cores carry verity: its running entry is a real UKI
    whose command line pins a root hash (as every entry Rampart installs does)."""
    _, running_efi = build_payloads(tmp_path / "running", RUNNING)
    (device.esp / f"{OS}-{RUNNING}.efi").write_bytes(running_efi.read_bytes())
    return device


def refused(device: DeviceDirs, exception: type[RampartError], match: str) -> None:
    """One update run: refused with `exception`, and nothing on the disk changed."""
    before = device.state()
    dev = device.open()
    with pytest.raises(exception, match=match):
        update.update(dev, update.make_fetcher(dev))
    assert device.state() == before
    assert not (device.run_dir / "update-ready").exists()


def test_another_os_release_signed_with_the_same_key_served_under_this_os_names(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """The vendor also builds `otheros` (same key, same volume group name, same version):
    its release served as clipos's verifies, and was installed."""
    other = make_release(tmp_path / "other", OFFERED, os_name="otheros")
    publish_unchecked(served.root, vendor, OFFERED, other.core, other.efiboot)
    refused(device, VerificationError, "names the OS 'otheros', not 'clipos'")
    result = run_cli("update", *device.argv())
    assert result.code == 11
    assert result.err.count("\n") == 1
    assert "refusing another OS's release" in result.err


def test_release_with_core_and_efi_binary_swapped(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """Core served as the EFI binary and the EFI binary as Core: the boot entry would
    have held Core's bytes."""
    release = make_release(tmp_path / "rel", OFFERED)
    publish_unchecked(served.root, vendor, OFFERED, release.efiboot, release.core)
    running_entry = (device.esp / f"{OS}-{RUNNING}.efi").read_bytes()
    refused(device, FormatError, "not a PE file .*refusing it as the EFI binary")
    assert device.entries() == [f"{OS}-{RUNNING}.efi"]
    assert (device.esp / f"{OS}-{RUNNING}.efi").read_bytes() == running_entry
    result = run_cli("update", *device.argv())
    assert result.code == 10, result.err
    assert result.err.count("\n") == 1


def test_efi_binary_swapped_for_a_valid_core_alone(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """Only the EFI binary replaced, by the release's own Core."""
    release = make_release(tmp_path / "rel", OFFERED)
    publish_unchecked(served.root, vendor, OFFERED, release.core, release.core)
    refused(device, FormatError, "refusing it as the EFI binary")


def test_core_swapped_for_the_efi_binary_alone(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    release = make_release(tmp_path / "rel", OFFERED)
    publish_unchecked(served.root, vendor, OFFERED, release.efiboot, release.efiboot)
    refused(device, FormatError, "not a squashfs image .*refusing to install it as Core")


@pytest.mark.parametrize("kind", ["random", "mz-only", "pe-without-uki-sections"])
def test_non_pe_efi_binary_is_refused_not_treated_as_epoch_0(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs, kind: str
) -> None:
    """A file that is not a UKI was taken as security epoch 0 with no root-hash check."""
    release = make_release(tmp_path / "rel", OFFERED)
    bogus = tmp_path / "bogus.efi"
    if kind == "random":
        bogus.write_bytes(os.urandom(20_000))
    elif kind == "mz-only":
        bogus.write_bytes(b"MZ" + os.urandom(20_000))
    else:
        line = uki.inspect(release.efiboot).cmdline
        bogus.write_bytes(fake_uki(line))  # a PE with only .cmdline
    publish_unchecked(served.root, vendor, OFFERED, release.core, bogus)
    refused(device, FormatError, "not a (PE file|Unified Kernel Image)")


def test_efi_binary_without_root_hash_on_a_verity_device(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """A validly signed EFI binary that pins no root hash would boot whatever the LV holds."""
    verity_device(tmp_path, device)
    release = make_release(tmp_path / "rel", OFFERED, root_hash=False)
    publish(served.root, vendor, release)  # publish accepts it: some devices have no verity
    refused(device, VerificationError, "pins no verity root hash")
    result = run_cli("update", *device.argv())
    assert result.code == 11
    assert result.err.count("\n") == 1


def test_efi_binary_without_root_hash_on_a_device_booted_with_verity(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """The running kernel's command line pins a root hash: a verity device too."""
    release = make_release(tmp_path / "rel", OFFERED, root_hash=False)
    publish(served.root, vendor, release)
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(f"ro rampart.verity.roothash={'ab' * 32} rampart.verity.hashoffset=0\n")
    before = device.state()
    dev = device.open()
    dev.proc_cmdline = proc_cmdline
    with pytest.raises(VerificationError, match="pins no verity root hash"):
        update.update(dev, update.make_fetcher(dev))
    assert device.state() == before


def test_core_without_verity_under_an_efi_binary_pinning_a_root_hash(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    """The bare squashfs (its tree cut off) of the right build: the initramfs would find no
    tree; the client wrote it and removed the fallback entry before noticing."""
    release = make_release(tmp_path / "rel", OFFERED)
    root = uki.inspect(release.efiboot)
    offset = int(cmdline.cmdline_params(root.cmdline)["rampart.verity.hashoffset"])
    bare = tmp_path / "bare-core"
    bare.write_bytes(release.core.read_bytes()[:offset])
    publish_unchecked(served.root, vendor, OFFERED, bare, release.efiboot)
    refused(device, FormatError, "no verity superblock at the hash offset")


def test_efi_binary_of_another_volume_group(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    release = make_release(tmp_path / "rel", OFFERED, vg="othervg")
    publish(served.root, vendor, release)
    refused(device, VerificationError, r"boots othervg/core_5\.0\.0-alpha\.3, not mainvg/")


def test_a_verity_device_still_installs_a_real_release(
    tmp_path: Path, vendor: KeyPair, served: Nginx, device: DeviceDirs
) -> None:
    verity_device(tmp_path, device)
    release = make_release(tmp_path / "rel", OFFERED)
    publish(served.root, vendor, release)
    dev = device.open()
    assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED
    installed = device.esp / f"{OS}-{OFFERED}.efi"
    assert installed.read_bytes() == release.efiboot.read_bytes()


def test_swapped_release_is_reported_to_the_server_as_a_failure(
    tmp_path: Path, vendor: KeyPair, pki: Pki
) -> None:
    root = world_readable_tmp() / "webroot"
    try:
        release = make_release(tmp_path / "rel", OFFERED)
        publish_unchecked(root, vendor, OFFERED, release.efiboot, release.core)
        posts: list[tuple[str, dict[str, str], bytes]] = []
        with hostile_server(root, pki.server.cert, pki.server.key, {}, posts) as url:
            device = make_device(tmp_path / "device", vendor, pki.ca.cert, url, RUNNING)
            before = device.state()
            result = run_cli("update", *device.argv())
            assert result.code == 10, result.err
            assert device.state() == before
        report = json.loads(posts[-1][2])
        assert (report["outcome"], report["to"]) == ("failure", OFFERED)
        assert "refusing it as the EFI binary" in report["error"]
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)

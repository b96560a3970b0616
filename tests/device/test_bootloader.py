"""Boot loader updates (device/bootloader.py): a release's systemd-boot staged by the
update, installed after the good boot, its two copies on the ESP one after the
other; refused when the firmware would refuse it; a crash at every step leaves a
whole, verified copy that the firmware starts.

The firmware's variables are files in a directory standing in for efivarfs (db and
dbx as efivarfs shows them: four bytes of attributes, then the signature lists), and
`efibootmgr` is a stand-in script that keeps the boot options in a file: neither
efivarfs nor a firmware exists on this host. The testbed runs the real ones (OVMF,
efibootmgr in Core)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rampart.contracts import bootloader as loader_contract
from rampart.contracts import efivars, pe, wire
from rampart.contracts.layout import FALLBACK_LOADER_PATH, LOADER_PATH
from rampart.contracts.version import parse_version
from rampart.device import bootloader, update
from rampart.device.esp import Esp
from rampart.errors import ConflictError, VerificationError
from rampart.release import secureboot, webroot
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import (
    OS,
    DeviceDirs,
    larger_slots,
    make_device,
    make_release,
    publish,
)
from tests.device.sbkit import (
    OFFERED,
    OWNER,
    Firmware,
    der,
    esp_root,
)


def staging(device: DeviceDirs) -> Path:
    return device.root / "bootloader"


def install(
    device: DeviceDirs, firmware: Firmware, checkpoint: bootloader.Checkpoint | None = None
) -> bootloader.Installed | None:
    esp = Esp(device.esp, OS)
    version = parse_version(OFFERED)
    return bootloader.install(esp, staging(device), version, firmware.efivars, checkpoint)


def bless(device: DeviceDirs) -> None:
    assert Esp(device.esp, OS).bless(parse_version(OFFERED)) is not None


def copies(device: DeviceDirs) -> dict[str, bytes | None]:
    root = esp_root(device)
    return {
        relative: (root / relative).read_bytes() if (root / relative).exists() else None
        for relative in (LOADER_PATH, FALLBACK_LOADER_PATH)
    }


def test_a_release_s_boot_loader_is_staged_then_installed_after_its_good_boot(
    updated: tuple[DeviceDirs, Firmware],
    loaders: dict[str, Path],
) -> None:
    device, firmware = updated
    new = loaders["new"].read_bytes()
    assert (staging(device) / f"{OFFERED}.efi").read_bytes() == new
    assert (staging(device) / f"{OFFERED}.efi").stat().st_mode & 0o777 == 0o600
    before = copies(device)
    assert before == {LOADER_PATH: None, FALLBACK_LOADER_PATH: loaders["old"].read_bytes()}
    with pytest.raises(ConflictError, match="not marked good yet"):
        install(device, firmware)
    assert copies(device) == before
    bless(device)
    done = install(device, firmware)
    assert done is not None and done.version == "systemd-boot 252.99-1~deb12u2"
    assert done.boot_option and done.copies == [LOADER_PATH, FALLBACK_LOADER_PATH]
    assert copies(device) == {LOADER_PATH: new, FALLBACK_LOADER_PATH: new}
    assert "File(\\EFI\\systemd\\systemd-bootx64.efi)" in firmware.options()
    assert not (staging(device) / f"{OFFERED}.efi").exists()
    assert install(device, firmware) is None  # nothing staged any more
    found = bootloader.status(Esp(device.esp, OS), staging(device), firmware.efivars)
    assert found["copies"] == {
        LOADER_PATH: "systemd-boot 252.99-1~deb12u2",
        FALLBACK_LOADER_PATH: "systemd-boot 252.99-1~deb12u2",
    }
    assert found["boot_option"] == "Boot0007"


def test_boot_loader_signed_by_a_key_db_does_not_hold_is_not_written(
    tmp_path: Path,
    updated: tuple[DeviceDirs, Firmware],
    keys: secureboot.KeySet,
) -> None:
    """The release's loader is signed by a db key this machine's firmware does not
    hold (a release signed after a db rotation this machine never got): the firmware
    would refuse it, so it is not written, and stays staged."""
    device, firmware = updated
    other = secureboot.generate_keys(tmp_path / "other-keys")
    firmware.db(der(other, "db"))
    bless(device)
    before = copies(device)
    with pytest.raises(VerificationError, match="verifies with none of the 1 certificates"):
        install(device, firmware)
    assert copies(device) == before
    assert (staging(device) / f"{OFFERED}.efi").exists()
    assert firmware.options() == ""


@pytest.mark.parametrize("entry", ["image hash", "signing certificate"])
def test_boot_loader_that_dbx_revokes_is_not_written(
    updated: tuple[DeviceDirs, Firmware],
    keys: secureboot.KeySet,
    loaders: dict[str, Path],
    entry: str,
) -> None:
    device, firmware = updated
    if entry == "image hash":
        digest = pe.authenticode_sha256(loaders["new"].read_bytes())
        firmware.dbx(efivars.render_signature_list(efivars.CERT_SHA256, OWNER, [digest]))
    else:
        firmware.dbx(efivars.render_signature_list(efivars.CERT_X509, OWNER, [der(keys, "db")]))
    bless(device)
    before = copies(device)
    with pytest.raises(VerificationError, match="dbx revokes"):
        install(device, firmware)
    assert copies(device) == before


class PowerCut(BaseException):
    """The power goes at a step: nothing after it runs."""


@pytest.mark.parametrize("step", loader_contract.STEPS)
def test_power_cut_at_each_step_of_the_boot_loader_install_leaves_a_copy_that_boots(
    updated: tuple[DeviceDirs, Firmware],
    loaders: dict[str, Path],
    step: str,
) -> None:
    """After a cut at `step`, the firmware finds a whole, db-signed loader: the main
    copy if the boot option names it and it is whole, else the fallback copy. The
    next install completes."""
    device, firmware = updated
    bless(device)
    whole = {loaders["old"].read_bytes(), loaders["new"].read_bytes()}

    def cut(name: str) -> None:
        if name == step:
            raise PowerCut

    with pytest.raises(PowerCut):
        install(device, firmware, cut)
    found = copies(device)
    main_boots = "systemd-bootx64.efi" in firmware.options() and found[LOADER_PATH] in whole
    assert main_boots or found[FALLBACK_LOADER_PATH] in whole, step
    done = install(device, firmware)
    new = loaders["new"].read_bytes()
    assert (done is None) == (step == loader_contract.STEPS[-1])  # else: done already
    assert copies(device) == {LOADER_PATH: new, FALLBACK_LOADER_PATH: new}
    assert not (staging(device) / f"{OFFERED}.efi").exists()


def test_without_a_boot_option_the_fallback_copy_is_left_alone(
    updated: tuple[DeviceDirs, Firmware],
    loaders: dict[str, Path],
    bindir: Path,
) -> None:
    """No efibootmgr (or no efivarfs): the fallback copy would be the only one, so it
    is not rewritten; the main copy is, and the log says so."""
    device, firmware = updated
    (bindir / "efibootmgr").unlink()
    bless(device)
    done = install(device, firmware)
    assert done is not None and not done.boot_option and done.copies == [LOADER_PATH]
    assert copies(device) == {
        LOADER_PATH: loaders["new"].read_bytes(),
        FALLBACK_LOADER_PATH: loaders["old"].read_bytes(),
    }


def test_a_release_without_a_boot_loader_stages_nothing(
    tmp_path: Path, vendor: KeyPair, pki: Pki, served: Nginx
) -> None:
    publish(served.root, vendor, make_release(tmp_path / "rel", OFFERED))
    device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url))
    dev = device.open()
    assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED
    assert not staging(device).exists()


def test_a_boot_loader_tampered_on_the_server_fails_the_update_before_anything_changes(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    loaders: dict[str, Path],
) -> None:
    release = make_release(tmp_path / "rel", OFFERED)
    webroot.publish(
        served.root, OS, parse_version(OFFERED), release.core, release.efiboot, vendor.key,
        loader=loaders["new"],
    )  # fmt: skip
    path = served.root / "dist" / OFFERED / wire.loader_name(OS)
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url))
    before = device.state()
    dev = device.open()
    with pytest.raises(VerificationError):
        update.update(dev, update.make_fetcher(dev))
    assert device.state() == before
    assert not (staging(device) / f"{OFFERED}.efi").exists()

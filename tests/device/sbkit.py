"""What the Secure Boot tests of the device share: a key set and signed loaders, the
firmware's variables as files in a directory standing in for efivarfs, `efibootmgr`
as a stand-in script, and a device updated to a release carrying a boot loader.
Neither efivarfs nor a firmware exists on this host; the testbed runs the real ones
(OVMF, efivarfs, efibootmgr in Core)."""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from rampart.contracts import efivars
from rampart.contracts.layout import FALLBACK_LOADER_PATH
from rampart.contracts.version import parse_version
from rampart.device import bootloader, update
from rampart.release import secureboot, webroot
from rampart.testbed import build
from rampart.testbed.services import Nginx, Pki
from tests.conftest import KeyPair
from tests.device.conftest import OS, DeviceDirs, larger_slots, make_device, make_release

OFFERED = "5.0.0-alpha.3"
OWNER = uuid.UUID("11111111-2222-3333-4444-555555555555")
ATTRIBUTES = struct.pack("<I", 0x27)  # NV, BS, RT, time-based authenticated


def signed_loader(directory: Path, keys: secureboot.KeySet, version: str) -> Path:
    return build.renamed_loader(directory / f"systemd-boot-{version}.efi", keys.directory, version)


def der(keys: secureboot.KeySet, name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(keys.cert(name).read_bytes())
    return cert.public_bytes(Encoding.DER)


def write_variable(directory: Path, name: str, lists: bytes) -> None:
    path = efivars.variable_path(directory, name, efivars.IMAGE_SECURITY_DATABASE)
    path.write_bytes(ATTRIBUTES + lists)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    return secureboot.generate_keys(tmp_path_factory.mktemp("sb") / "keys")


@pytest.fixture(scope="module")
def loaders(tmp_path_factory: pytest.TempPathFactory, keys: secureboot.KeySet) -> dict[str, Path]:
    """The installed loader ("old") and the one a release carries ("new")."""
    directory = tmp_path_factory.mktemp("loaders")
    return {
        "old": signed_loader(directory, keys, "252.38-1~deb12u2"),
        "new": signed_loader(directory, keys, "252.99-1~deb12u2"),
    }


class Firmware:
    """efivarfs as a directory (db and dbx) and efibootmgr as a script keeping the
    boot options in `<efivars>/boot-options`, one line each as `efibootmgr -v` shows."""

    def __init__(self, device: DeviceDirs, keys: secureboot.KeySet, path_dir: Path) -> None:
        self.efivars = device.root / "efivars"
        self.efivars.mkdir(exist_ok=True)
        self.db(der(keys, "db"))
        script = path_dir / "efibootmgr"
        script.write_text(
            "#!/bin/sh\n"
            f'options="{self.efivars}/boot-options"\n'
            'if [ "$1" = "--create" ]; then\n'
            '  echo "$*" >> "$options.calls"\n'
            '  shift 7; echo "Boot0007* Rampart\\tHD(1,GPT,x)/File($2)" >> "$options"\n'
            "fi\n"
            'cat "$options" 2>/dev/null\n'
        )
        script.chmod(0o755)

    def db(self, *certificates: bytes) -> None:
        lists = b"".join(
            efivars.render_signature_list(efivars.CERT_X509, OWNER, [c]) for c in certificates
        )
        write_variable(self.efivars, "db", lists)

    def secure_boot_on(self) -> None:
        """The SecureBoot variable, set to 1 as the firmware sets it in user mode."""
        path = efivars.variable_path(self.efivars, "SecureBoot", efivars.EFI_GLOBAL_VARIABLE)
        path.write_bytes(struct.pack("<I", 0x06) + b"\x01")

    def dbx(self, lists: bytes) -> None:
        write_variable(self.efivars, "dbx", lists)

    def options(self) -> str:
        path = self.efivars / "boot-options"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first in PATH (for the stand-in efibootmgr); the ESP taken as the
    first partition of a disk, which the host's findmnt cannot say of a directory."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", f"{path}:{os.environ['PATH']}")
    monkeypatch.setattr(bootloader, "esp_partition", lambda root: ("/dev/fake", 1))
    return path


def sign_entries(device: DeviceDirs, keys: secureboot.KeySet, name: str = "db") -> None:
    """Sign every UKI on the device's ESP with the key set's `name` key (sbsign), as
    `rampart build` signs them. The device's first entry is a stand-in file, not a PE
    image: it becomes a copy of the newest UKI first."""
    from rampart.release import uki

    paths = sorted(device.esp.glob("*.efi"))
    images = [p for p in paths if p.read_bytes()[:2] == b"MZ"]
    for path in paths:
        if path not in images:
            shutil.copyfile(images[-1], path)
        uki.sign(path, keys.key(name), keys.cert(name))


def esp_root(device: DeviceDirs) -> Path:
    return device.esp.parent.parent


def updated_device(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    loaders: dict[str, Path],
    sbvars: dict[str, Path] | None = None,
) -> DeviceDirs:
    """A device updated to OFFERED, a release carrying the new loader (and `sbvars`),
    now running it (not marked good yet); its ESP holds the old loader at the
    fallback path."""
    release = make_release(tmp_path / "rel", OFFERED)
    webroot.publish(
        served.root, OS, parse_version(OFFERED), release.core, release.efiboot, vendor.key,
        loader=loaders["new"], sbvars=sbvars,
    )  # fmt: skip
    device = larger_slots(make_device(tmp_path / "dev", vendor, pki.ca.cert, served.url))
    config = device.config_dir / "config.toml"
    config.write_text(config.read_text().replace("[efiboot]\n", "[efiboot]\nboot_tries = 3\n"))
    fallback = esp_root(device) / FALLBACK_LOADER_PATH
    fallback.parent.mkdir(parents=True)
    shutil.copyfile(loaders["old"], fallback)
    dev = device.open()
    assert update.update(dev, update.make_fetcher(dev)).outcome == update.Outcome.UPDATED
    device.set_running(OFFERED)
    return device


@pytest.fixture
def updated(
    tmp_path: Path,
    vendor: KeyPair,
    pki: Pki,
    served: Nginx,
    keys: secureboot.KeySet,
    loaders: dict[str, Path],
    bindir: Path,
) -> tuple[DeviceDirs, Firmware]:
    """`updated_device` and its firmware (db holding `keys`' db certificate)."""
    device = updated_device(tmp_path, vendor, pki, served, loaders)
    return device, Firmware(device, keys, bindir)

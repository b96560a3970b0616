"""Client test harness: a real nginx serving a webroot over HTTPS on loopback, a real
swtpm (both rampart.testbed.services; the test PKI is tests/conftest.py's `pki`), and
devices on the file backend."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rampart.contracts import wire
from rampart.contracts.version import parse_version
from rampart.device import config as device_config
from rampart.device import tpm, update
from rampart.release import webroot
from rampart.testbed import services
from tests.conftest import KeyPair, make_keypair, start_swtpm
from tests.releases import build_payloads

OS = "clipos"


# --- nginx (rampart.testbed.services) ----------------------------------------------------

# What the transport tests ask of the server besides its files: redirects to plain
# HTTP and to HTTPS ({port}: nginx's own).
REDIRECTS = """\
        location = /to-http/update/v1/clipos/version {
            return 302 http://127.0.0.1:{port}/update/v1/clipos/version;
        }
        location /to-https/ {
            rewrite ^/to-https/(.*)$ https://localhost:{port}/$1 redirect;
        }
"""


def start_nginx(
    state: Path,
    root: Path,
    cert: services.Cert,
    protocols: str = "TLSv1.2 TLSv1.3",
    ciphers: str = "HIGH:!aNULL",
) -> services.Nginx:
    """nginx serving `root` over HTTPS with `cert` on loopback, and the test redirects."""
    return services.Nginx.static(
        state, root, cert, protocols=protocols, ciphers=ciphers, locations=REDIRECTS
    )


# --- devices ---------------------------------------------------------------------------


@dataclass
class DeviceDirs:
    root: Path
    config_dir: Path
    remote_dir: Path
    vg: Path
    esp: Path
    download: Path
    run_dir: Path
    os_release: Path
    machine_id: Path

    def set_running(self, version: str) -> None:
        self.os_release.write_text(f'NAME="CLIP OS"\nID=clipos\nVERSION_ID={version}\n')

    def lvs(self) -> list[str]:
        return sorted(p.name for p in self.vg.iterdir())

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.esp.iterdir())

    def state(self) -> dict[str, bytes]:
        """Every LV and ESP file with its content: to assert nothing changed."""
        files = {f"vg/{p.name}": p.read_bytes() for p in self.vg.iterdir()}
        files.update({f"esp/{p.name}": p.read_bytes() for p in self.esp.iterdir()})
        return files

    def open(self) -> update.Device:
        config = device_config.load_device_config(self.config_dir)
        remote = device_config.load_remote_config(self.remote_dir)
        identity = device_config.load_identity(self.os_release, self.machine_id)
        pinned = (self.remote_dir / "root.json", self.config_dir / "root.json")
        return update.open_device(config, remote, identity, self.download, self.run_dir, pinned)

    def argv(self) -> list[str]:
        return [
            "-c",
            str(self.config_dir),
            "-r",
            str(self.remote_dir),
            "-t",
            str(self.download),
            "--os-release",
            str(self.os_release),
            "--machine-id",
            str(self.machine_id),
            "--run-dir",
            str(self.run_dir),
        ]


def make_device(
    root: Path,
    keypair: KeyPair,
    ca: Path,
    server_url: str,
    running: str = "5.0.0-alpha.1",
    extra_config: str = "",
    fetch_user: str = "",
) -> DeviceDirs:
    dev = DeviceDirs(
        root=root,
        config_dir=root / "config",
        remote_dir=root / "remote",
        vg=root / "mainvg",
        esp=root / "esp" / "EFI" / "Linux",
        download=root / "download",
        run_dir=root / "run",
        os_release=root / "os-release",
        machine_id=root / "machine-id",
    )
    for d in (dev.config_dir, dev.remote_dir, dev.vg, dev.esp):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy(keypair.public, dev.config_dir / "pubkey")
    (dev.config_dir / "config.toml").write_text(
        f'os_name = "{OS}"\n\n[core]\nbackend = "file"\ndestination = "{dev.vg}"\n'
        f'size = "1M"\ncapacity = "8M"\n\n[efiboot]\ndestination = "{dev.esp}"\n\n'
        f'[download]\nfetch_user = "{fetch_user}"\nread_timeout = 5\nconnect_timeout = 5\n'
        f"{extra_config}"
    )
    if "[trust]" not in extra_config:
        # TUF metadata under the test's directory: never the host's /var/lib/rampart.
        with (dev.config_dir / "config.toml").open("a") as config:
            config.write(f'\n[trust]\nmetadata_dir = "{root}/tuf"\n')
    if "[bootloader]" not in extra_config:
        # Never the host's /var/lib/rampart or its firmware's variables.
        with (dev.config_dir / "config.toml").open("a") as config:
            config.write(
                f'\n[bootloader]\nstaging_dir = "{root}/bootloader"\nefivars = "{root}/efivars"\n'
            )
    if "[identity]" not in extra_config:
        # The device key, counter and nonce: never the host's /var/lib/rampart.
        with (dev.config_dir / "config.toml").open("a") as config:
            config.write(f'\n[identity]\ndir = "{root}/identity"\n')
    if "[tpm]" not in extra_config:
        # No TPM unless a test gives one: never the host's own (a device node that
        # does not exist means "no TPM").
        with (dev.config_dir / "config.toml").open("a") as config:
            config.write(f'\n[tpm]\ntcti = "device:{root}/no-tpm"\n')
    (dev.remote_dir / "remote.toml").write_text(
        f'update_url = "{server_url}/update/v1"\ndist_url = "{server_url}/dist"\n'
    )
    shutil.copy(ca, dev.remote_dir / "rootca.pem")
    dev.machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    dev.set_running(running)
    # The running system: its LV and its boot entry.
    (dev.vg / f"core_{running}").write_bytes(b"running core".ljust(1 << 20, b"\0"))
    (dev.vg / "core_state").write_bytes(bytes(1 << 20))
    (dev.esp / f"{OS}-{running}.efi").write_bytes(b"running efi")
    return dev


def larger_slots(device: DeviceDirs) -> DeviceDirs:
    """`device` with 4 MiB slots in a 16 MiB volume group (Cores of a few MiB)."""
    config = device.config_dir / "config.toml"
    config.write_text(
        config.read_text()
        .replace('size = "1M"', 'size = "4M"')
        .replace('capacity = "8M"', 'capacity = "16M"')
    )
    return device


@dataclass
class Release:
    version: str
    core: Path
    efiboot: Path


def make_release(directory: Path, version: str, core_size: int = 300_000, **kw: Any) -> Release:
    """A real release (squashfs Core with verity, a UKI booting it; tests/releases.py);
    `kw` goes to `build_payloads` (epoch, os_name, root_hash, content)."""
    core, efiboot = build_payloads(directory, version, core_size=core_size, **kw)
    return Release(version, core, efiboot)


def publish(
    root: Path, keypair: KeyPair, release: Release, force: bool = False, deltas: bool = False
) -> None:
    """`rampart publish` of `release`, with its chunk index, and with a delta from the
    release before it only if `deltas` (else devices rebuild Core from chunks)."""
    webroot.publish(
        root,
        OS,
        parse_version(release.version),
        release.core,
        release.efiboot,
        keypair.key,
        force=force,
        chunking=webroot.Chunking(deltas=deltas),
    )


def publish_unchecked(
    root: Path, keypair: KeyPair, version: str, core: Path, efiboot: Path, os_name: str = OS
) -> None:
    """Sign `core` and `efiboot` for `version` with `keypair` and serve them under
    `os_name`'s names, with none of `rampart publish`'s checks of what they are: what
    an attacker serves with payloads the vendor's key signed for another purpose (another
    OS, or another kind), since the signatures bind only the version."""
    release = root / "dist" / version
    release.mkdir(parents=True, exist_ok=True)
    for kind, source in (("core", core), ("efiboot", efiboot)):
        data = source.read_bytes()
        digest = hashlib.blake2b(data).digest()
        signature = keypair.key.sign_message(digest, version.encode(), prehashed=True)
        (release / f"{os_name}-{kind}").write_bytes(data)
        (release / f"{os_name}-{kind}.sig").write_bytes(signature.to_bytes())
    version_file = wire.version_file(root, os_name)
    version_file.parent.mkdir(parents=True, exist_ok=True)
    version_file.write_text(f'version = "{version}"\n')


@pytest.fixture
def vendor(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "vendor")


@pytest.fixture
def webroot_dir() -> Iterator[Path]:
    """A webroot in a world-readable temporary directory (`world_readable_tmp`), for the
    hostile servers of tests/device/hostile.py; removed afterwards."""
    root = services.world_readable_tmp()
    yield root / "webroot"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def served(tmp_path: Path, pki: services.Pki) -> Iterator[services.Nginx]:
    """nginx serving an (initially empty) webroot over HTTPS on loopback."""
    root = services.world_readable_tmp()
    try:
        with start_nginx(tmp_path / "nginx", root / "webroot", pki.server) as server:
            (root / "webroot").mkdir()
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def chip(tmp_path: Path) -> Iterator[tpm.Tpm]:
    """A real swtpm, fresh for the test."""
    yield from start_swtpm(tmp_path / "tpm")


# The Secure Boot tests' fixtures (tests/device/sbkit.py), for every test here.
from tests.device.sbkit import bindir, keys, loaders, updated  # noqa: E402, F401

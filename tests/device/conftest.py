"""Client test harness: a test PKI, a real nginx serving a webroot over HTTPS on
loopback, and devices on the file backend."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rampart.contracts import wire
from rampart.contracts.version import parse_version
from rampart.device import config as device_config
from rampart.device import update
from rampart.vendor import webroot
from tests.conftest import KeyPair, make_keypair
from tests.releases import build_payloads

OS = "clipos"


# --- PKI -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_ca(
    directory: Path, name: str
) -> tuple[Cert, ec.EllipticCurvePrivateKey, x509.Certificate]:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    out = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out.key, key)
    return out, key, cert


def make_server_cert(
    directory: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    hosts: list[str],
) -> Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out.key, key)
    return out


@dataclass(frozen=True)
class Pki:
    ca: Cert
    server: Cert  # localhost, 127.0.0.1
    wrong_host: Cert  # signed by the CA, for another name
    other_ca: Cert
    other_server: Cert  # localhost, signed by another CA


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_cert = make_ca(d, "rootca")
    other, other_key, other_cert = make_ca(d, "otherca")
    return Pki(
        ca=ca,
        server=make_server_cert(d, "server", ca_key, ca_cert, ["localhost", "127.0.0.1"]),
        wrong_host=make_server_cert(d, "wrong", ca_key, ca_cert, ["update.example.org"]),
        other_ca=other,
        other_server=make_server_cert(d, "other-server", other_key, other_cert, ["localhost"]),
    )


# --- nginx -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NGINX_CONF = """\
user root;
worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {state}/access.log;
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {protocols};
        ssl_ciphers {ciphers};
        root {root};
        location = /to-http/update/v1/clipos/version {{
            return 302 http://127.0.0.1:{port}/update/v1/clipos/version;
        }}
        location /to-https/ {{
            rewrite ^/to-https/(.*)$ https://localhost:{port}/$1 redirect;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    port: int
    root: Path
    state: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def access_log(self) -> str:
        return (self.state / "access.log").read_text()

    def logged(self, text: str, timeout: float = 30.0) -> bool:
        """Whether the access log shows `text` within `timeout` seconds: nginx writes a
        request's line after sending the response, so the client may be done first."""
        deadline = time.monotonic() + timeout
        while text not in self.access_log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_nginx(
    state: Path,
    root: Path,
    cert: Cert,
    protocols: str = "TLSv1.2 TLSv1.3",
    ciphers: str = "HIGH:!aNULL",
) -> Nginx:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is not installed: run `make setup`"
    state.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = state / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            state=state,
            port=port,
            cert=cert.cert,
            key=cert.key,
            root=root,
            protocols=protocols,
            ciphers=ciphers,
        )
    )
    process = subprocess.Popen(
        [
            nginx,
            "-c",
            str(conf),
            "-p",
            str(state),
            "-e",
            str(state / "error.log"),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"nginx exited: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Nginx(port, root, state, process)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("nginx did not start")


# --- devices ---------------------------------------------------------------------------


def world_readable_tmp() -> Path:
    """A directory the fetch user can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="rampart-test-", dir="/var/tmp"))
    path.chmod(0o755)
    return path


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
        return update.open_device(config, remote, identity, self.download, self.run_dir)

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


def publish(root: Path, keypair: KeyPair, release: Release, force: bool = False) -> None:
    webroot.publish(
        root,
        OS,
        parse_version(release.version),
        release.core,
        release.efiboot,
        keypair.key,
        force=force,
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
def served(tmp_path: Path, pki: Pki) -> Iterator[Nginx]:
    """nginx serving an (initially empty) webroot over HTTPS on loopback."""
    root = world_readable_tmp()
    server = start_nginx(tmp_path / "nginx", root / "webroot", pki.server)
    (root / "webroot").mkdir()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)

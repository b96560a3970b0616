"""Device configuration, read from the same files as the CLIP OS updater.

System config dir (default /usr/lib/rampart, read-only, part of Core):
  config.toml   os_name, [core] destination/size, [efiboot] destination, plus
                Rampart's additions below, every one with a safe default
  pubkey        the vendor's minisign public key
Remote config dir (default /etc/rampart, on the state partition):
  remote.toml   update_url, dist_url
  rootca.pem    the only CA trusted for HTTPS
Running version: VERSION_ID of os-release; identity: machine-id.
See docs/client.md for every key.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rampart import files
from rampart.contracts import osrel, signing
from rampart.contracts.version import Version, parse_version
from rampart.contracts.wire import check_name
from rampart.errors import FormatError, LocalError, UsageError

DEFAULT_CONFIG_DIR = Path("/usr/lib/rampart")
DEFAULT_REMOTE_DIR = Path("/etc/rampart")
DEFAULT_DOWNLOAD_DIR = Path("/var/lib/rampart/download")
DEFAULT_RUN_DIR = Path("/run/rampart")
DEFAULT_OS_RELEASE = Path("/etc/os-release")
DEFAULT_MACHINE_ID = Path("/etc/machine-id")
DEFAULT_TUF_DIR = Path("/var/lib/rampart/tuf")
DEFAULT_LOADER_DIR = Path("/var/lib/rampart/bootloader")
DEFAULT_IDENTITY_DIR = Path("/var/lib/rampart/identity")
DEFAULT_EFIVARS = Path("/sys/firmware/efi/efivars")
DEFAULT_CHANNEL = "stable"

_SIZE = re.compile(r"(?P<n>\d+)(?P<unit>[bBkKmMgGtT]?)", re.ASCII)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class TrustMode(StrEnum):
    AUTO = "auto"  # TUF when a root is there, else minisign (CLIP OS webroots)
    TUF = "tuf"
    MINISIGN = "minisign"


class Backend(StrEnum):
    LVM = "lvm"
    FILE = "file"


def parse_size(value: object, where: str) -> int:
    """A size as LVM writes it ("500M", "4G", or a number of bytes), in bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match["n"]) * _UNITS[match["unit"].lower()]
    raise FormatError(f"{where}: {value!r} is not a size (like 500M, 4G or a byte count)")


@dataclass(frozen=True)
class DeviceConfig:
    """Everything the client needs, validated, with safe defaults."""

    os_name: str
    public_key: signing.PublicKey
    # [core]
    backend: Backend
    core_destination: str  # volume group (lvm) or directory (file)
    core_size: int  # size of a new Core LV
    file_capacity: int  # the file backend's stand-in for the VG size
    max_core_size: int
    # [efiboot]
    esp_directory: Path  # the ESP's EFI/Linux
    boot_tries: int  # 0: no boot counting
    max_efiboot_size: int
    # [download]
    connect_timeout: float
    read_timeout: float
    min_speed: int  # bytes/s averaged over stall_window, else the download fails
    stall_window: float
    fetch_user: str | None  # None: fetch in-process (tests, non-root)
    # [update]
    reboot: bool
    report: bool
    # [tpm]
    tpm_tcti: str = "device:/dev/tpmrm0"  # how tpm2-tools reach the TPM
    tpm_pcrs: tuple[int, ...] = (7,)  # what the state key is sealed to
    tpm_required: bool = False  # True: a machine without a TPM is an error
    # [trust]
    trust_mode: TrustMode = TrustMode.AUTO
    tuf_dir: Path = DEFAULT_TUF_DIR  # the TUF metadata this device verified
    # [bootloader]
    loader_dir: Path = DEFAULT_LOADER_DIR  # a release's boot loader, staged until its good boot
    efivars: Path = DEFAULT_EFIVARS  # the firmware's variables (db, dbx, boot options)
    # [identity]
    identity_dir: Path = DEFAULT_IDENTITY_DIR  # the file key, request counter and nonce
    sign_requests: bool = True  # sign checks and reports with the device's key


@dataclass(frozen=True)
class RemoteConfig:
    update_url: str
    dist_url: str
    root_ca: Path
    tuf_url: str = ""  # the TUF metadata (<webroot>/tuf); "" when dist_url has no /dist
    channel: str = DEFAULT_CHANNEL  # the channel a device in TUF mode follows


@dataclass(frozen=True)
class Identity:
    machine_id: str
    version: Version


def _read_toml(path: Path) -> dict[str, Any]:
    data = files.read_small(path, "configuration file", 1 << 20)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FormatError(f"{path}: invalid TOML: {exc}") from None


def _get(
    table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None
) -> Any:
    if key not in table:
        if default is None:
            raise FormatError(f"{where}: missing required key '{key}'")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise FormatError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _table(doc: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise FormatError(f"{where}: [{name}] must be a table")
    return value


def load_device_config(config_dir: Path) -> DeviceConfig:
    path = config_dir / "config.toml"
    doc = _read_toml(path)
    where = str(path)
    os_name = _get(doc, "os_name", str, where)
    try:
        check_name(os_name, "os_name")
    except UsageError as exc:
        raise FormatError(f"{where}: {exc}") from None
    core = _table(doc, "core", where)
    efiboot = _table(doc, "efiboot", where)
    download = _table(doc, "download", where)
    update = _table(doc, "update", where)
    tpm = _table(doc, "tpm", where)
    trust = _table(doc, "trust", where)
    loader = _table(doc, "bootloader", where)
    ident = _table(doc, "identity", where)
    try:
        trust_mode = TrustMode(_get(trust, "mode", str, f"{where} [trust]", "auto"))
    except ValueError:
        raise FormatError(f"{where}: [trust] mode must be 'auto', 'tuf' or 'minisign'") from None
    backend_name = _get(core, "backend", str, f"{where} [core]", "lvm")
    try:
        backend = Backend(backend_name)
    except ValueError:
        raise FormatError(f"{where}: [core] backend must be 'lvm' or 'file'") from None
    fetch_user = _get(download, "fetch_user", str, f"{where} [download]", "rampart-fetch")
    boot_tries = _get(efiboot, "boot_tries", int, f"{where} [efiboot]", 0)
    if not 0 <= boot_tries <= 16:
        raise FormatError(f"{where}: [efiboot] boot_tries must be between 0 and 16")
    pubkey_name = _get(doc, "pubkey", str, where, "pubkey")
    config = DeviceConfig(
        os_name=os_name,
        public_key=signing.load_public_key(config_dir / pubkey_name),
        backend=backend,
        core_destination=_get(core, "destination", str, f"{where} [core]"),
        core_size=parse_size(
            _get(core, "size", (str, int), f"{where} [core]", "500M"), f"{where} [core] size"
        ),
        file_capacity=parse_size(
            _get(core, "capacity", (str, int), f"{where} [core]", "4G"), f"{where} [core] capacity"
        ),
        max_core_size=parse_size(
            _get(download, "max_core_size", (str, int), f"{where} [download]", "16G"),
            f"{where} [download] max_core_size",
        ),
        esp_directory=Path(_get(efiboot, "destination", str, f"{where} [efiboot]")),
        boot_tries=boot_tries,
        max_efiboot_size=parse_size(
            _get(download, "max_efiboot_size", (str, int), f"{where} [download]", "512M"),
            f"{where} [download] max_efiboot_size",
        ),
        connect_timeout=float(
            _get(download, "connect_timeout", (int, float), f"{where} [download]", 15)
        ),
        read_timeout=float(_get(download, "read_timeout", (int, float), f"{where} [download]", 60)),
        min_speed=_get(download, "min_speed", int, f"{where} [download]", 1024),
        stall_window=float(_get(download, "stall_window", (int, float), f"{where} [download]", 60)),
        fetch_user=fetch_user or None,
        reboot=_get(update, "reboot", bool, f"{where} [update]", False),
        report=_get(update, "report", bool, f"{where} [update]", True),
        tpm_tcti=_get(tpm, "tcti", str, f"{where} [tpm]", "device:/dev/tpmrm0"),
        tpm_pcrs=_tpm_pcrs(_get(tpm, "pcrs", list, f"{where} [tpm]", [7]), where),
        tpm_required=_get(tpm, "required", bool, f"{where} [tpm]", False),
        trust_mode=trust_mode,
        tuf_dir=Path(_get(trust, "metadata_dir", str, f"{where} [trust]", str(DEFAULT_TUF_DIR))),
        loader_dir=Path(
            _get(loader, "staging_dir", str, f"{where} [bootloader]", str(DEFAULT_LOADER_DIR))
        ),
        efivars=Path(_get(loader, "efivars", str, f"{where} [bootloader]", str(DEFAULT_EFIVARS))),
        identity_dir=Path(
            _get(ident, "dir", str, f"{where} [identity]", str(DEFAULT_IDENTITY_DIR))
        ),
        sign_requests=_get(ident, "sign", bool, f"{where} [identity]", True),
    )
    _check_ranges(config, where)
    return config


def _tpm_pcrs(value: list[Any], where: str) -> tuple[int, ...]:
    if (
        not value
        or any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 23 for p in value)
        or len(set(value)) != len(value)
    ):
        raise FormatError(f"{where}: [tpm] pcrs must list distinct PCR numbers from 0 to 23")
    return tuple(sorted(value))


def _check_ranges(config: DeviceConfig, where: str) -> None:
    """Numbers that would make no sense (or divide by zero) are refused."""
    positive = {
        "[core] size": config.core_size,
        "[core] capacity": config.file_capacity,
        "[download] max_core_size": config.max_core_size,
        "[download] max_efiboot_size": config.max_efiboot_size,
        "[download] connect_timeout": config.connect_timeout,
        "[download] read_timeout": config.read_timeout,
        "[download] stall_window": config.stall_window,
    }
    for name, value in positive.items():
        if not math.isfinite(value) or value <= 0:
            raise FormatError(f"{where}: {name} must be a finite number greater than 0")
    for name, value in (
        ("connect_timeout", config.connect_timeout),
        ("read_timeout", config.read_timeout),
        ("stall_window", config.stall_window),
    ):
        if value > 86400:
            raise FormatError(f"{where}: [download] {name} must be at most 86400 seconds")
    if config.min_speed < 0:
        raise FormatError(f"{where}: [download] min_speed must not be negative")


def _check_https_url(url: str, key: str, where: str) -> str:
    try:
        parts = urlsplit(url)  # raises ValueError on a bad IPv6 literal
    except ValueError:
        raise FormatError(f"{where}: {key} is not a valid URL: {url[:200]!r}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise FormatError(f"{where}: {key} must be an https:// URL, not {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise FormatError(f"{where}: {key} has an invalid port") from None
    try:
        parts.hostname.encode("idna")  # what connecting does: an empty or long label fails
    except UnicodeError:
        raise FormatError(f"{where}: {key} has an invalid host name") from None
    if parts.username or parts.password or parts.query or parts.fragment:
        raise FormatError(f"{where}: {key} must not carry credentials, a query or a fragment")
    return url.rstrip("/")


def load_remote_config(remote_dir: Path) -> RemoteConfig:
    path = remote_dir / "remote.toml"
    doc = _read_toml(path)
    where = str(path)
    root_ca = remote_dir / "rootca.pem"
    if not root_ca.is_file():
        raise LocalError(f"{root_ca}: pinned root CA not found")
    dist_url = _check_https_url(_get(doc, "dist_url", str, where), "dist_url", where)
    # The TUF repository sits beside dist/ in the webroot, unless tuf_url says otherwise.
    default_tuf = dist_url.removesuffix("/dist") + "/tuf" if dist_url.endswith("/dist") else ""
    tuf_url = _get(doc, "tuf_url", str, where, default_tuf or "")
    channel = _get(doc, "channel", str, where, DEFAULT_CHANNEL)
    try:
        check_name(channel, "channel")
    except UsageError as exc:
        raise FormatError(f"{where}: {exc}") from None
    return RemoteConfig(
        update_url=_check_https_url(_get(doc, "update_url", str, where), "update_url", where),
        dist_url=dist_url,
        root_ca=root_ca,
        tuf_url=_check_https_url(tuf_url, "tuf_url", where) if tuf_url else "",
        channel=channel,
    )


def read_os_release_version(path: Path) -> Version:
    """VERSION_ID of an os-release file (semver; build metadata kept but ignored)."""
    data = files.read_small(path, "os-release", 1 << 16).decode("utf-8", errors="replace")
    value = osrel.parse_os_release(data).get("VERSION_ID")
    if value is None:
        raise FormatError(f"{path}: no VERSION_ID")
    try:
        return parse_version(value.strip(), f"{path}: VERSION_ID")
    except UsageError as exc:
        raise FormatError(str(exc)) from None


def read_machine_id(path: Path) -> str:
    text = files.read_small(path, "machine-id", 4096).decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise FormatError(f"{path}: not a machine id (32 lowercase hex digits)")
    return text


def load_identity(os_release: Path, machine_id: Path) -> Identity:
    return Identity(read_machine_id(machine_id), read_os_release_version(os_release))

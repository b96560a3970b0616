"""The update protocol v1, as CLIP OS's updater speaks it, written once.

A device, the vendor's publishing tools and the server share these rules; each
imports them from here and none writes them again (docs/formats.md "Webroot" and
"Version check" describe the same bytes for a reader).

    GET  <update_url>/<os>/version         `version = "<V>"` (TOML), at most 4 KiB
    POST <update_url>/<os>/report          an install report (JSON, at most 16 KiB)
    GET  <base>/dist/<V>/<os>-core[.sig]   the Core image and its minisign signature
    GET  <base>/dist/<V>/<os>-efiboot[.sig] the signed UKI and its signature
    GET  <base>/dist/<V>/<os>-core.caibx[.sig]  Core's chunk index (optional: incremental)
    GET  <base>/dist/store.castr/<4 hex>/<id>.cacnk  a chunk (contracts/chunks.py)

Every request but the payloads' carries `clipos-machineid` (32 lowercase hex
digits) and `clipos-version` (the running version's core, at most 128 bytes).
In a static webroot the default channel's version file is
`update/v1/<os>/version` and another channel's `channels/<c>/update/v1/<os>/version`.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rampart import files
from rampart.contracts import identity
from rampart.contracts.version import Version, parse_version
from rampart.errors import FormatError, LocalError, RampartError, UsageError

PROTOCOL = "v1"
PAYLOADS = ("core", "efiboot")  # the kinds of payload, in the order a device fetches them
SIGNATURE_SUFFIX = ".sig"
MACHINE_ID_HEADER = "clipos-machineid"
VERSION_HEADER = "clipos-version"
MAX_VERSION_HEADER = 128
VERSION_DOCUMENT_MAX = 4096
REPORT_MAX = 16 * 1024
REPORT_ERROR_MAX = 2000
OUTCOMES = ("success", "failure")

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)  # an OS or channel name
MACHINE_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)


def check_name(text: str, what: str) -> str:
    """An OS or channel name (a path segment): lowercase letters, digits, `.`, `_`,
    `-`, starting with a letter or digit; at most 64. UsageError otherwise."""
    if not NAME.fullmatch(text):
        raise UsageError(
            f"{what} {text!r} is invalid: use 1-64 lowercase letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return text


def check_machine_id(text: str) -> str:
    """`text` if it is a machine id (32 lowercase hex digits), else UsageError."""
    if not MACHINE_ID.fullmatch(text):
        raise UsageError(f"machine id {text[:40]!r} is not 32 lowercase hex digits")
    return text


# --- paths ---------------------------------------------------------------------------


def version_path(os_name: str, channel: str | None = None) -> str:
    """The version file's path below a webroot (None: the default channel)."""
    base = "" if channel is None else f"channels/{channel}/"
    return f"{base}update/{PROTOCOL}/{os_name}/version"


def release_path(version: Version) -> str:
    """The directory of a release's payloads below a webroot (`dist/<V>`)."""
    return f"dist/{version.core}"


def payload_name(os_name: str, kind: str) -> str:
    """A payload's file name (`<os>-core`, `<os>-efiboot`); its signature adds `.sig`."""
    if kind not in PAYLOADS:
        raise ValueError(f"unknown payload kind {kind!r}")
    return f"{os_name}-{kind}"


INDEX_SUFFIX = ".caibx"
STORE = "store.castr"  # the chunk store, in the webroot's dist/
INDEX_MAX = 64 << 20  # the largest index a device fetches (1.6 M chunks)


def index_name(os_name: str) -> str:
    """Core's chunk index in a release (`<os>-core.caibx`); its signature adds `.sig`."""
    return payload_name(os_name, "core") + INDEX_SUFFIX


DELTA_SUFFIX = ".delta"


def delta_name(os_name: str, base: Version) -> str:
    """Core's delta from the base release `base` (contracts/delta.py), in the new
    release (`<os>-core.from-<base>.delta`); its signature adds `.sig`."""
    return f"{payload_name(os_name, 'core')}.from-{base.core}{DELTA_SUFFIX}"


LOADER_MAX = 4 << 20  # the largest boot loader a device fetches (systemd-boot: 100 KiB)


def loader_name(os_name: str) -> str:
    """The boot loader a release carries (`<os>-bootloader.efi`: systemd-boot, signed
    for Secure Boot; contracts/bootloader.py); its signature adds `.sig`."""
    return f"{os_name}-bootloader.efi"


SBVAR_MAX = 1 << 20  # the largest Secure Boot variable update a device fetches
SBVARS = ("db", "dbx")  # the variables a release may update, in the order they apply


def sbvar_name(os_name: str, variable: str) -> str:
    """A signed append to the firmware's `variable` (db or dbx) a release carries
    (`<os>-db.auth`, `<os>-dbx.auth`: what `rampart keys db-append|dbx-append` makes);
    its signature adds `.sig`."""
    if variable not in SBVARS:
        raise ValueError(f"unknown Secure Boot variable {variable!r}")
    return f"{os_name}-{variable}.auth"


def store_dir(webroot: Path) -> Path:
    return webroot / "dist" / STORE


def version_url(update_url: str, os_name: str) -> str:
    return f"{update_url}/{os_name}/version"


def report_url(update_url: str, os_name: str) -> str:
    return f"{update_url}/{os_name}/report"


def version_file(webroot: Path, os_name: str, channel: str | None = None) -> Path:
    return webroot / version_path(os_name, channel)


def release_dir(webroot: Path, version: Version) -> Path:
    return webroot / release_path(version)


# --- the version document ------------------------------------------------------------


# A Rampart server's answer to a signed version check carries a nonce for the
# device's next requests under this extra key (contracts/identity.py); CLIP OS's
# updater reads `version` only.
NONCE_KEY = "rampart_nonce"


def render_version_document(version: Version | str, nonce: str | None = None) -> bytes:
    text = f'version = "{version}"\n'
    if nonce is not None:
        text += f'{NONCE_KEY} = "{nonce}"\n'
    return text.encode()


def version_nonce(data: bytes) -> str | None:
    """The nonce of a version document (a valid one), if it has one."""
    try:
        value = tomllib.loads(data.decode("utf-8")).get(NONCE_KEY)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, str) and identity.NONCE.fullmatch(value) else None


def parse_version_document(data: bytes, source: str) -> Version:
    """The version a version document names (TOML `version = "x.y.z"`; unknown keys
    ignored). FormatError if it is too large, not TOML, or names no valid version."""
    if len(data) > VERSION_DOCUMENT_MAX:
        raise FormatError(f"{source}: version file larger than {VERSION_DOCUMENT_MAX} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise FormatError(f"{source}: version file is not valid TOML") from None
    value = doc.get("version")
    if not isinstance(value, str) or len(value) > MAX_VERSION_HEADER:
        raise FormatError(f"{source}: version file has no valid 'version' string")
    try:
        return parse_version(value, f"{source}: version")
    except UsageError as exc:
        raise FormatError(str(exc)) from None


def read_version_file(path: Path) -> Version | None:
    """The version a version file names, or None if there is no such file."""
    try:
        data = files.read_small(path, "version file", VERSION_DOCUMENT_MAX)
    except LocalError:
        if not path.exists():
            return None
        raise
    return parse_version_document(data, str(path))


@dataclass(frozen=True)
class Channel:
    name: str | None  # None: the default channel
    os_name: str
    version: Version


def list_channels(webroot: Path, problems: list[str] | None = None) -> list[Channel]:
    """Every version file of the webroot, parsed; unparsable ones go to `problems`."""
    found: list[Channel] = []
    roots: list[tuple[str | None, Path]] = [(None, webroot)]
    channels_dir = webroot / "channels"
    if channels_dir.is_dir():
        roots += [(c.name, c) for c in sorted(channels_dir.iterdir()) if c.is_dir()]
    for name, root in roots:
        v1 = root / "update" / "v1"
        if not v1.is_dir():
            continue
        for os_dir in sorted(v1.iterdir()):
            path = os_dir / "version"
            if not path.is_file():
                continue
            try:
                data = files.read_small(path, "version file", VERSION_DOCUMENT_MAX)
                found.append(Channel(name, os_dir.name, parse_version_document(data, str(path))))
            except RampartError as exc:
                if problems is None:
                    raise
                problems.append(str(exc))
    return found


# --- request headers -----------------------------------------------------------------


def identity_headers(machine_id: str, version: Version) -> dict[str, str]:
    return {MACHINE_ID_HEADER: machine_id, VERSION_HEADER: version.core}


def parse_identity(machine_id: str | None, version: str | None) -> tuple[str, Version]:
    """The machine id and running version of a request's headers; UsageError (whose
    text is the answer's reason) if either is missing or malformed."""
    if machine_id is None or not MACHINE_ID.fullmatch(machine_id):
        raise UsageError(f"{MACHINE_ID_HEADER} must be 32 lowercase hex digits")
    if version is None or len(version) > MAX_VERSION_HEADER:
        raise UsageError(f"{VERSION_HEADER} missing or longer than {MAX_VERSION_HEADER} bytes")
    try:
        return machine_id, parse_version(version)
    except UsageError:
        raise UsageError(f"{VERSION_HEADER} is not a semantic version") from None


# --- the install report --------------------------------------------------------------


@dataclass(frozen=True)
class InstallReport:
    """How an update attempt ended, as a device reports it."""

    from_version: str | None
    to_version: str | None
    outcome: str  # one of OUTCOMES
    error: str = ""

    def render(self) -> bytes:
        return json.dumps(
            {
                "from": self.from_version,
                "to": self.to_version,
                "outcome": self.outcome,
                "error": self.error[:REPORT_ERROR_MAX],
            }
        ).encode()


def parse_report(body: bytes) -> InstallReport:
    """An install report's body; UsageError (the answer's reason) if it is malformed.
    The versions are kept as their core (no build metadata); the error text is cut
    to REPORT_ERROR_MAX characters."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise UsageError("report is not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError("report must be a JSON object")
    outcome = doc.get("outcome")
    if outcome not in OUTCOMES:
        raise UsageError("outcome must be 'success' or 'failure'")
    versions: dict[str, str | None] = {}
    for key in ("from", "to"):
        value = doc.get(key)
        if value is None:
            versions[key] = None
            continue
        if not isinstance(value, str) or len(value) > MAX_VERSION_HEADER:
            raise UsageError(f"'{key}' must be a version string")
        try:
            versions[key] = parse_version(value).core
        except UsageError:
            raise UsageError(f"'{key}' is not a semantic version") from None
    error = doc.get("error", "")
    if not isinstance(error, str):
        raise UsageError("'error' must be a string")
    return InstallReport(versions["from"], versions["to"], outcome, error[:REPORT_ERROR_MAX])

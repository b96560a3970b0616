"""The `.osrel` section of a UKI: os-release text, whose ID names the OS and whose
IMAGE_VERSION is what systemd-boot sorts boot entries by."""

from __future__ import annotations

import re

from rampart.contracts.version import parse_version
from rampart.contracts.wire import check_name
from rampart.errors import UsageError

SORT_KEYS = ("IMAGE_VERSION", "VERSION", "VERSION_ID", "BUILD_ID")


def os_release(os_name: str, version: str) -> str:
    """The `.osrel` text: ID is the OS name; IMAGE_VERSION is what systemd-boot sorts by."""
    check_name(os_name, "OS name")
    parsed = parse_version(version)
    if parsed.build or str(parsed) != version:
        raise UsageError(f"version {version!r}: build metadata is not allowed in a boot entry")
    return (
        f'NAME="{os_name}"\n'
        f"ID={os_name}\n"
        f"VERSION_ID={version}\n"
        f'PRETTY_NAME="{os_name} {version}"\n'
        f"IMAGE_VERSION={version}\n"
    )


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines of an os-release file; values unquoted, bad lines skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[key] = value
    return out


def sort_version(release: dict[str, str]) -> str | None:
    """The version systemd-boot sorts by: IMAGE_VERSION, then VERSION, VERSION_ID, BUILD_ID."""
    for key in SORT_KEYS:
        if release.get(key):
            return release[key]
    return None

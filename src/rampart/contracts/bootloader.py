"""What identifies a boot loader (systemd-boot), read by the vendor's tools before a
release ships one and by the device before it installs one and for `status`.

systemd-boot carries its identity in a `.sdmagic` section, `#### LoaderInfo:
systemd-boot 252.39-1~deb12u2 ####` (the same string it sets as the `LoaderInfo`
EFI variable when it runs). A file without it is not a systemd-boot: refused.
"""

from __future__ import annotations

import re

from rampart.contracts import pe
from rampart.errors import FormatError

# The steps of a device's boot loader install (device/bootloader.py), in order: the
# names `rampart bootloader install --halt-at` takes (a power-cut test stops there).
STEPS = (
    "checked",
    "main-written",
    "main-removed",
    "main-renamed",
    "boot-option",
    "fallback-written",
    "fallback-removed",
    "fallback-renamed",
)

_MAGIC = re.compile(rb"#### LoaderInfo: (systemd-boot [ -~]{1,120}?) ####")


def loader_info(data: bytes, source: str) -> str:
    """The LoaderInfo of the systemd-boot image `data` ("systemd-boot 252.39-1~deb12u2");
    FormatError if it is not a PE image with systemd-boot's `.sdmagic`."""
    magic = pe.section_data(data, ".sdmagic", source)
    found = None if magic is None else _MAGIC.fullmatch(magic.strip())
    if found is None:
        raise FormatError(f"{source}: not a systemd-boot image (no LoaderInfo in .sdmagic)")
    return found.group(1).decode("ascii")

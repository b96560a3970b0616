"""Offline-rollback protection on the device (docs/client.md).

Each release carries a security epoch, `rampart.epoch=N` on its signed UKI's
command line (none: epoch 0). The TPM's NV counter (`rampart.device.tpm`) holds the
lowest epoch allowed to boot; the initramfs refuses a Core whose epoch is below it.

- `rampart mark-good`, once the running version is blessed, raises the counter to
  the lowest epoch among the installed, bootable versions (as Android Verified
  Boot does): the fallback version stays bootable, and the counter never goes above
  that minimum nor down.
- `rampart update` refuses a release whose epoch is below the counter (it would
  never boot) or below the running version's epoch (a downgrade of security).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rampart.contracts import cmdline
from rampart.contracts.version import Version
from rampart.device import tpm
from rampart.device.config import DeviceConfig
from rampart.device.esp import Esp
from rampart.device.slots import SlotBackend, open_backend, slot_name
from rampart.errors import LocalError, RampartError, VerificationError

log = logging.getLogger(__name__)

PROC_CMDLINE = Path("/proc/cmdline")


def uki_epoch(path: Path) -> int:
    """The security epoch of the UKI `path` (0 without `rampart.epoch`)."""
    return cmdline.efi_epoch(path)


def running_epoch(proc_cmdline: Path = PROC_CMDLINE) -> int:
    """The epoch the running kernel was booted with (`rampart.epoch=` of /proc/cmdline)."""
    try:
        line = proc_cmdline.read_bytes()[: 1 << 16].decode("utf-8", errors="replace")
    except OSError as exc:
        raise LocalError(
            f"{proc_cmdline}: cannot read the kernel command line: {exc.strerror}"
        ) from None
    return cmdline.cmdline_epoch(line, str(proc_cmdline))


@dataclass(frozen=True)
class Installed:
    """A version the machine can boot: a boot entry not marked bad, and its Core slot."""

    version: Version
    entry: Path
    epoch: int


def bootable(esp: Esp, slots: SlotBackend) -> list[Installed]:
    """The installed, bootable versions, by version: every boot entry with tries left
    (or no counter) whose slot `core_<V>` exists, with its UKI's epoch."""
    names = {slot.name for slot in slots.slots()}
    return [
        Installed(entry.version, entry.path, uki_epoch(entry.path))
        for entry in esp.entries()
        if not entry.bad and slot_name(entry.version) in names
    ]


def machine_tpm(config: DeviceConfig) -> tpm.Tpm | None:
    """The TPM `[tpm]` names, None when the machine has none (LocalError if required)."""
    return tpm.device_tpm(config.tpm_tcti, required=config.tpm_required)


def read_counter(chip: tpm.Tpm) -> int:
    """The rollback counter (0 before it was first advanced).

    `Tpm.counter` cannot tell an undefined counter from a TPM that does not answer:
    when it reads nothing, the TPM is asked for its persistent handles, which raises
    LocalError if it is unreachable (a failure must not pass for counter 0)."""
    value = chip.counter()
    if value is None:
        chip.persistent_handles()
        return 0
    return value


def advance_counter(chip: tpm.Tpm, installed: list[Installed]) -> int:
    """Raise the counter to the lowest epoch of `installed`; its value afterwards.

    Never above that minimum (the fallback must stay bootable) and never down. The
    TPM is not written when the counter is already there: a counter's first
    increment would take it to 1 even for epoch 0."""
    current = read_counter(chip)
    if not installed:
        return current
    floor = min(item.epoch for item in installed)
    if floor <= current:
        return current
    value = chip.advance_counter(floor)
    lowest = next(item for item in installed if item.epoch == floor)
    log.info("rollback counter: %d -> %d (the epoch of %s)", current, value, lowest.version)
    return value


def protect_after_blessing(config: DeviceConfig, esp: Esp, running: Version) -> int | None:
    """mark-good's second step: advance the counter if the machine has a TPM.

    The rollback counter afterwards, or None without a TPM. Any failure here comes
    after the entry was blessed, and says so (LocalError, exit 3)."""
    try:
        chip = machine_tpm(config)
        if chip is None:
            return None
        return advance_counter(chip, bootable(esp, open_backend(config)))
    except (RampartError, OSError) as exc:
        raise LocalError(
            f"{running.core}: boot entry blessed, but the rollback counter could not be "
            f"advanced: {exc}"
        ) from None


def check_epoch(version: Version, epoch: int, counter: int | None, running: int) -> None:
    """Refuse (VerificationError) a release whose epoch is below the TPM's rollback
    counter (None: no TPM) or below the running version's epoch."""
    if counter is not None and epoch < counter:
        raise VerificationError(
            f"release {version.core} has security epoch {epoch}, below this machine's "
            f"rollback counter {counter}: refusing to install it"
        )
    if epoch < running:
        raise VerificationError(
            f"release {version.core} has security epoch {epoch}, below the running "
            f"version's epoch {running}: refusing to install it"
        )

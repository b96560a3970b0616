"""`rampart status`: running version, slots, boot entries, pending update, and the
running security epoch and the TPM's rollback counter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rampart.device import bootloader, rollback, secureboot, trust
from rampart.device.config import DeviceConfig, Identity
from rampart.device.esp import Esp
from rampart.device.slots import busy_reason, open_backend
from rampart.device.update import READY_FILE
from rampart.errors import RampartError


def collect(
    config: DeviceConfig,
    identity: Identity,
    run_dir: Path,
    proc_cmdline: Path = rollback.PROC_CMDLINE,
) -> dict[str, Any]:
    """The status as a JSON-ready dict."""
    running = identity.version
    report: dict[str, Any] = {
        "os": config.os_name,
        "running": running.core,
        "machine_id": identity.machine_id,
        "backend": str(config.backend),
        "volume_group": config.core_destination,
    }
    try:
        backend = open_backend(config)
        report["free"] = backend.free_space()
        report["slots"] = [
            {
                "name": slot.name,
                "size": slot.size,
                "version": None if slot.version is None else slot.version.core,
                "running": slot.version == running,
                "busy": busy_reason(slot, running),
            }
            for slot in backend.slots()
        ]
    except RampartError as exc:
        report["slots_error"] = str(exc)
    esp = Esp(config.esp_directory, config.os_name)
    try:
        default = esp.default()
        report["entries"] = [
            {
                "name": entry.path.name,
                "version": entry.version.core,
                "tries_left": entry.tries_left,
                "tries_done": entry.tries_done,
                "default": default is not None and entry.path == default.path,
                "running": entry.version == running,
            }
            for entry in esp.entries()
        ]
    except RampartError as exc:
        report["entries_error"] = str(exc)
    try:
        report["running_epoch"] = rollback.running_epoch(proc_cmdline)
    except RampartError as exc:
        report["running_epoch"] = None
        report["running_epoch_error"] = str(exc)
    report["rollback_counter"] = None
    try:
        chip = rollback.machine_tpm(config)
        if chip is not None:
            report["rollback_counter"] = rollback.read_counter(chip)
    except RampartError as exc:
        report["rollback_counter_error"] = str(exc)
    ready = run_dir / READY_FILE
    report["update_ready"] = (
        ready.read_bytes()[:200].decode("utf-8", errors="replace").strip()
        if ready.is_file()
        else None
    )
    report["trust"] = {"mode": str(config.trust_mode), **_trust_state(config)}
    try:
        esp = Esp(config.esp_directory, config.os_name)
        report["bootloader"] = bootloader.status(esp, config.loader_dir, config.efivars)
    except RampartError as exc:
        report["bootloader_error"] = str(exc)
    try:
        report["secureboot"] = secureboot.status(config.loader_dir)
    except RampartError as exc:
        report["secureboot_error"] = str(exc)
    return report


def _trust_state(config: DeviceConfig) -> dict[str, Any]:
    """What the TUF metadata this device verified says; python-tuf is loaded only when
    there is some."""
    if not (config.tuf_dir / trust.ROOT_FILE).exists():
        return {"metadata_dir": str(config.tuf_dir), "root_version": None}
    from rampart.device.tufclient import local_state

    return local_state(config.tuf_dir)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _render_trust(state: dict[str, Any]) -> str:
    if state.get("root_version") is None:
        return f"trust: {state['mode']} (no verified TUF metadata)"
    expires = state.get("timestamp_expires")
    fresh = "EXPIRED" if state.get("expired") else "fresh"
    return f"trust: {state['mode']}, TUF root {state['root_version']}, " + (
        f"timestamp {state['timestamp_version']} {fresh} until {expires}"
        if expires
        else "no timestamp yet"
    )


def _section(
    report: dict[str, Any], key: str, title: str, render: Callable[[Any], str]
) -> list[str]:
    """A part of the report as an indented section, or its error on one line."""
    if key not in report:
        return [f"{title}: {report[key + '_error']}"]
    return [f"{title}:", *(f"  {line}" for line in render(report[key]).split("\n"))]


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['os']} {report['running']} (machine {report['machine_id']})"]
    if "slots" in report:
        lines.append(
            f"slots ({report['backend']} backend, {report['volume_group']}, "
            f"{_mib(report['free'])} free):"
        )
        for slot in report["slots"]:
            state = "running" if slot["running"] else (slot["busy"] or "standby")
            lines.append(f"  {slot['name']:<32} {_mib(slot['size']):>12}  {state}")
    else:
        lines.append(f"slots: {report['slots_error']}")
    if "entries" in report:
        lines.append("boot entries:")
        for entry in report["entries"]:
            notes = []
            if entry["tries_left"] is not None:
                notes.append(f"{entry['tries_left']} tries left")
            if entry["default"]:
                notes.append("default")
            if entry["running"]:
                notes.append("running")
            lines.append(f"  {entry['name']:<40} {', '.join(notes)}")
    else:
        lines.append(f"boot entries: {report['entries_error']}")
    if report["running_epoch"] is not None:
        lines.append(f"security epoch: {report['running_epoch']}")
    else:
        lines.append(f"security epoch: {report['running_epoch_error']}")
    if "rollback_counter_error" in report:
        lines.append(f"rollback counter: {report['rollback_counter_error']}")
    elif report["rollback_counter"] is None:
        lines.append("rollback counter: none (no TPM)")
    else:
        lines.append(f"rollback counter: {report['rollback_counter']}")
    ready = report["update_ready"]
    lines.append(f"update ready: {ready} (reboot to use it)" if ready else "update ready: no")
    lines.append(_render_trust(report["trust"]))
    lines.extend(_section(report, "bootloader", "boot loader", bootloader.render_status))
    lines.extend(_section(report, "secureboot", "Secure Boot updates", secureboot.render_status))
    return "\n".join(lines)

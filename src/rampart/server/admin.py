"""Fleet administration: the operations behind `rampart channel|machine|fleet` and the
admin API, with their rules. Both front ends call these and nothing else."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from rampart.contracts import wire
from rampart.contracts.version import parse_version
from rampart.errors import ConflictError, RampartError, UsageError
from rampart.server import audit
from rampart.server.audit import Actor
from rampart.server.rollout import ChannelState, RolloutState
from rampart.server.store import Store

DEFAULT_CHANNEL = "stable"
SILENT_LISTED = 1000  # silent machines listed in the fleet view (all are counted)
LAST_SEEN_LISTED = 200  # machines seen last, with what each proved, in the fleet view
_KEY_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _proven(store: Store, machine_ids: list[str]) -> Any:
    """What each machine proved, for the fleet view: a function of (machine-id, os)."""
    keys = store.admitted_keys(machine_ids)
    known = store.known_pcr7_sets()

    def proof(machine_id: str, os_name: str | None) -> dict[str, Any]:
        key = keys.get(machine_id)
        if key is None:
            return {
                "authenticated": False,
                "key": None,
                "attested_at": None,
                "pcr7": None,
                "pcr7_good": None,
                "epoch": None,
            }
        pcr7 = key["pcr7"]
        good = None if pcr7 is None else pcr7 in known.get(os_name or "", frozenset())
        return {
            "authenticated": key["last_auth"] is not None,
            "key": key["kind"],
            "attested_at": key["attested_at"],
            "pcr7": pcr7,
            "pcr7_good": good,
            "epoch": key["epoch"],
        }

    return proof


def check_published(webroot: Path, os_name: str, version: str) -> str:
    """`version`, if the webroot holds a complete release of it for `os_name`."""
    parsed = parse_version(version)
    if parsed.build:
        raise UsageError(f"version {version}: build metadata is not allowed")
    release = wire.release_dir(webroot, parsed)
    for kind in wire.PAYLOADS:
        for name in (f"{os_name}-{kind}", f"{os_name}-{kind}.sig"):
            if not (release / name).is_file():
                raise UsageError(f"{release / name}: not in the webroot; publish {version} first")
    return parsed.core


def bootstrap(store: Store, webroot: Path) -> list[ChannelState]:
    """Create channels from the static webroot's version files when the database has none
    for that OS: the default channel becomes `stable`, named channels keep their names."""
    known = {c.os for c in store.channels()}
    created = []
    for static in wire.list_channels(webroot, []):
        if static.os_name in known:  # the database is the truth once it knows the OS
            continue
        name = static.name or DEFAULT_CHANNEL
        if any(c.os == static.os_name and c.name == name for c in store.channels()):
            continue
        created.append(
            store.create_channel(
                static.os_name,
                name,
                static.version.core,
                default=static.name is None,
                by=audit.SERVER,
            )
        )
    return created


def create_channel(
    store: Store,
    webroot: Path,
    os_name: str,
    name: str,
    version: str | None,
    default: bool,
    *,
    by: Actor,
) -> ChannelState:
    wire.check_name(os_name, "OS name")
    wire.check_name(name, "channel name")
    if version is not None:
        version = check_published(webroot, os_name, version)
    return store.create_channel(os_name, name, version, default, by=by)


def set_version(
    store: Store,
    webroot: Path,
    os_name: str,
    name: str,
    version: str,
    force: bool = False,
    *,
    by: Actor,
) -> ChannelState:
    """Point a channel at a published version (not backwards unless `force`)."""
    version = check_published(webroot, os_name, version)
    current = store.channel_row(os_name, name)
    if (
        current["version"]
        and parse_version(version) < parse_version(current["version"])
        and not force
    ):
        raise ConflictError(
            f"channel {name} names {current['version']}; refusing to go back to {version} "
            "(use --force)"
        )
    values: dict[str, Any] = {"version": version}
    if current["rollout_version"] == version:
        values.update(
            rollout_version=None, rollout_percent=0.0, rollout_state=RolloutState.NONE.value
        )
    return store.update_channel(os_name, name, action="channel.version", by=by, **values)


def _check_percent(percent: float) -> float:
    if not 0 <= percent <= 100:
        raise UsageError(f"rollout percentage {percent} must be between 0 and 100")
    return float(percent)


def start_rollout(
    store: Store,
    webroot: Path,
    os_name: str,
    name: str,
    version: str,
    percent: float,
    failure_threshold: float | None = None,
    min_reports: int | None = None,
    min_failing: int | None = None,
    *,
    by: Actor,
) -> ChannelState:
    """Offer `version` to `percent` % of the channel's machines."""
    version = check_published(webroot, os_name, version)
    percent = _check_percent(percent)
    current = store.channel_row(os_name, name)
    if current["version"] and parse_version(version) <= parse_version(current["version"]):
        raise ConflictError(
            f"channel {name} already names {current['version']}; a rollout must be newer"
        )
    if current["rollout_version"] is not None:
        running = parse_version(current["rollout_version"])
        if parse_version(version) <= running:
            raise ConflictError(
                f"channel {name} is rolling out {current['rollout_version']}; raise, pause or "
                "resume it, or start a newer version"
            )
    values: dict[str, Any] = {
        "rollout_version": version,
        "rollout_percent": percent,
        "rollout_state": RolloutState.ACTIVE.value,
        "rollout_started_at": time.time(),
    }
    if failure_threshold is not None:
        if not 0 <= failure_threshold <= 1:
            raise UsageError("failure threshold must be between 0 and 1")
        values["failure_threshold"] = failure_threshold
    if min_reports is not None:
        if min_reports < 1:
            raise UsageError("minimum number of reports must be at least 1")
        values["min_reports"] = min_reports
    if min_failing is not None:
        if min_failing < 1:
            raise UsageError("minimum number of failing machines must be at least 1")
        values["min_failing"] = min_failing
    if percent >= 100:
        return _complete(store, os_name, name, version, by)
    return store.update_channel(os_name, name, action="rollout.start", by=by, **values)


def _complete(store: Store, os_name: str, name: str, version: str, by: Actor) -> ChannelState:
    return store.update_channel(
        os_name,
        name,
        action="rollout.complete",
        by=by,
        version=version,
        rollout_version=None,
        rollout_percent=0.0,
        rollout_state=RolloutState.NONE.value,
    )


def raise_rollout(
    store: Store, os_name: str, name: str, percent: float, *, by: Actor
) -> ChannelState:
    """Raise (never lower) the share of machines offered the rollout; 100 completes it."""
    percent = _check_percent(percent)
    current = store.channel_row(os_name, name)
    if current["rollout_version"] is None:
        raise ConflictError(f"channel {name} has no rollout in progress")
    if percent < current["rollout_percent"]:
        raise ConflictError(
            f"rollout is at {current['rollout_percent']} %; lowering it would take the update "
            "away from machines already offered it (pause the rollout instead)"
        )
    if percent >= 100:
        return _complete(store, os_name, name, current["rollout_version"], by)
    return store.update_channel(
        os_name, name, action="rollout.raise", by=by, rollout_percent=percent
    )


def pause_rollout(store: Store, os_name: str, name: str, *, by: Actor) -> ChannelState:
    current = store.channel_row(os_name, name)
    if current["rollout_version"] is None:
        raise ConflictError(f"channel {name} has no rollout in progress")
    return store.update_channel(
        os_name, name, action="rollout.pause", by=by, rollout_state=RolloutState.PAUSED.value
    )


def resume_rollout(store: Store, os_name: str, name: str, *, by: Actor) -> ChannelState:
    current = store.channel_row(os_name, name)
    if current["rollout_version"] is None:
        raise ConflictError(f"channel {name} has no rollout in progress")
    return store.update_channel(
        os_name, name, action="rollout.resume", by=by, rollout_state=RolloutState.ACTIVE.value
    )


def assign(store: Store, machine_id: str, os_name: str, channel: str | None, *, by: Actor) -> None:
    store.assign(wire.check_machine_id(machine_id), channel, os_name, by=by)


def fleet(store: Store, silent_days: float = 7.0, now: float | None = None) -> dict[str, Any]:
    """The fleet view: channels, versions per channel, silent machines, recent failures."""
    now = time.time() if now is None else now
    defaults = {c.os: c.name for c in store.channels() if c.default}  # unassigned machines
    silent_before = now - silent_days * 86400
    silent = [
        {
            "machine_id": m["machine_id"],
            "version": m["version"],
            "channel": m["channel"] or defaults.get(m["os"]),
            "last_seen": m["last_seen"],
        }
        for m in store.machines(limit=SILENT_LISTED, seen_before=silent_before, authenticated=True)
    ]
    machines = store.machines(limit=LAST_SEEN_LISTED, authenticated=True)
    counts = store.counts()
    proven = _proven(store, [m["machine_id"] for m in machines])
    return {
        "channels": [
            {
                k: row[k]
                for k in (
                    "os",
                    "name",
                    "version",
                    "is_default",
                    "rollout_version",
                    "rollout_percent",
                    "rollout_state",
                    "failure_threshold",
                    "min_reports",
                    "min_failing",
                )
            }
            for row in store.channel_rows()
        ],
        "versions": store.versions_per_channel(),
        "machines": counts["machines"],
        "last_seen": [
            {
                "machine_id": m["machine_id"],
                "version": m["version"],
                "channel": m["channel"] or defaults.get(m["os"]),
                "last_seen": m["last_seen"],
                **proven(m["machine_id"], m["os"]),
            }
            for m in machines
        ],
        "identity": store.identity_counts(),
        "silent_days": silent_days,
        "silent_count": store.count_machines(seen_before=silent_before, authenticated=True),
        "silent": silent,
        "recent_failures": [
            {k: r[k] for k in ("machine_id", "os", "from_version", "to_version", "error", "at")}
            for r in store.recent_reports(20, "failure", authenticated=True)
        ],
        "counts": counts,
    }


# --- device identity (rampart.server.devices; docs/server.md "Device identity") --------


def read_public_key(text: str, where: str) -> tuple[str, str]:
    """A device's public key as `rampart identity` prints it (PEM), or its `--json`
    output: (its kind, base64 DER); UsageError otherwise."""
    from cryptography.hazmat.primitives import serialization

    from rampart.contracts import identity

    if text.lstrip().startswith("{"):
        try:
            text = str(json.loads(text)["public_key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{where}: not the JSON of `rampart identity --json`") from None
    try:
        key = serialization.load_pem_public_key(text.encode())
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kind, _ = identity.load_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm, RampartError) as exc:
        raise UsageError(f"{where}: not a device's public key (PEM): {exc}") from None
    return kind, identity.encode_key(der)


def admit(
    store: Store,
    machine_id: str,
    *,
    by: Actor,
    key_id: str | None = None,
    public_key: tuple[str, str] | None = None,
) -> str:
    """Admit the machine's key: one enrolled by the operator (`public_key`, from
    `read_public_key`), the pending one `key_id` names, or its only pending key."""
    machine_id = wire.check_machine_id(machine_id)
    if key_id is not None and not _KEY_ID.fullmatch(key_id):
        raise UsageError(f"key id {key_id[:80]!r}: 64 lowercase hex digits (a fingerprint)")
    return store.admit(machine_id, by=by, key_id=key_id, enroll=public_key)


def enroll(store: Store, lines: list[str], where: str, *, by: Actor) -> list[tuple[str, str]]:
    """Admit a list of machines before they first call: JSON lines, each the output
    of `rampart identity --json` on one machine. (machine-id, key id) of each."""
    admitted = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        here = f"{where}:{number}"
        try:
            item = json.loads(line)
            machine_id = str(item["machine_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{here}: not the JSON of `rampart identity --json`") from None
        key = read_public_key(line, here)
        admitted.append((machine_id, admit(store, machine_id, by=by, public_key=key)))
    return admitted


def reject(store: Store, machine_id: str, *, by: Actor, key_id: str | None = None) -> list[str]:
    return store.reject(wire.check_machine_id(machine_id), by=by, key_id=key_id)


def check_pcr7(value: str) -> str:
    value = value.strip().lower().removeprefix("0x")
    if not _KEY_ID.fullmatch(value):
        raise UsageError(f"PCR 7 value {value[:80]!r}: 64 hex digits (a SHA-256 bank value)")
    return value


def add_known_pcr7(
    store: Store, os_name: str, value: str, note: str | None = None, *, by: Actor
) -> str:
    wire.check_name(os_name, "OS name")
    value = check_pcr7(value)
    store.add_known_pcr7(os_name, value, note, by=by)
    return value


def learn_pcr7(store: Store, os_name: str, machine_id: str, *, by: Actor) -> str:
    """Add the PCR 7 value `machine_id` last attested (a reference machine, booted as
    the fleet should be) to the known-good values of `os_name`."""
    machine_id = wire.check_machine_id(machine_id)
    row = store.admitted_keys([machine_id]).get(machine_id)
    if row is None or not row["pcr7"]:
        raise UsageError(
            f"machine {machine_id} has attested no PCR 7 yet (an admitted TPM key, and a "
            "check after its admission)"
        )
    return add_known_pcr7(store, os_name, str(row["pcr7"]), f"learned from {machine_id}", by=by)


def set_attestation(
    store: Store, os_name: str, name: str, require: bool, *, by: Actor
) -> ChannelState:
    """Whether the channel offers updates only to machines attested with a known-good
    PCR 7 (the others are told to keep their version)."""
    store.channel_row(os_name, name)
    return store.update_channel(
        os_name, name, action="channel.attestation", by=by, require_attestation=require
    )

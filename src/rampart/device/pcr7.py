"""PCR 7 from the firmware's event log, and PCR 7 after a Secure Boot change
(docs/client.md "PCR 7 without the passphrase").

The firmware measures its Secure Boot configuration into PCR 7 (TCG PC Client
Platform Firmware Profile, 3.3.4.8 and 10.4.4): one EV_EFI_VARIABLE_DRIVER_CONFIG
event for each of SecureBoot, PK, KEK, db and dbx (the digest: SHA-256 of a
UEFI_VARIABLE_DATA holding the variable's GUID, name and contents), EV_SEPARATOR,
then one EV_EFI_VARIABLE_AUTHORITY for each db entry that verified an image it
started, each entry once. PCR 7 is the replay of these events' digests.

The event log is read with tpm2-tools' `tpm2_eventlog` (its YAML read with PyYAML's
safe loader): this module parses no binary log itself. `replay` recomputes PCR 7
from the log, which must give what the TPM holds (`check`): a log that does not
cannot predict anything. `predict` replays the same events with the
DRIVER_CONFIG digests of the variables that will change computed from their new
contents, and with the authority events the next boot's images will cause.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rampart import run
from rampart.contracts import efivars
from rampart.errors import FormatError, VerificationError

LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
PCR = 7
DRIVER_CONFIG = "EV_EFI_VARIABLE_DRIVER_CONFIG"
AUTHORITY = "EV_EFI_VARIABLE_AUTHORITY"
SEPARATOR = "EV_SEPARATOR"
# The variables the firmware measures as its Secure Boot configuration, and their GUIDs.
CONFIG = {
    "SecureBoot": efivars.EFI_GLOBAL_VARIABLE,
    "PK": efivars.EFI_GLOBAL_VARIABLE,
    "KEK": efivars.EFI_GLOBAL_VARIABLE,
    "db": efivars.IMAGE_SECURITY_DATABASE,
    "dbx": efivars.IMAGE_SECURITY_DATABASE,
}
MAX_LOG_OUTPUT = 64 << 20


@dataclass(frozen=True)
class Variable:
    """A UEFI_VARIABLE_DATA: what a DRIVER_CONFIG or AUTHORITY event measures."""

    guid: uuid.UUID
    name: str
    data: bytes

    def measured(self) -> bytes:
        """Its bytes, as the firmware hashes them."""
        name = self.name.encode("utf-16-le")
        header = struct.pack("<QQ", len(self.name), len(self.data))
        return self.guid.bytes_le + header + name + self.data

    def digest(self) -> bytes:
        return hashlib.sha256(self.measured()).digest()


@dataclass(frozen=True)
class Event:
    """One event of PCR 7: its type, its SHA-256 digest, and the variable it measures
    (DRIVER_CONFIG and AUTHORITY events)."""

    type: str
    digest: bytes
    variable: Variable | None = None


def read_log(path: Path = LOG) -> list[Event]:
    """The PCR 7 events of the event log at `path`, as `tpm2_eventlog` reads it.
    LocalError if it cannot be read, FormatError if what it prints is not a log with
    SHA-256 digests."""
    done = run.run(["tpm2_eventlog", str(path)], timeout=60)
    if len(done.stdout) > MAX_LOG_OUTPUT:
        raise FormatError(f"{path}: tpm2_eventlog printed more than {MAX_LOG_OUTPUT} bytes")
    import yaml  # PyYAML: only to read tpm2_eventlog's YAML

    try:
        document = yaml.safe_load(done.stdout)
    except yaml.YAMLError as exc:
        raise FormatError(f"{path}: tpm2_eventlog's output is not YAML ({exc})") from None
    return parse(document, str(path))


def parse(document: Any, source: str) -> list[Event]:
    """The PCR 7 events of `tpm2_eventlog`'s document."""
    if not isinstance(document, dict) or not isinstance(document.get("events"), list):
        raise FormatError(f"{source}: not an event log (no events)")
    found = []
    for number, raw in enumerate(document["events"]):
        where = f"{source}: event {number}"
        if not isinstance(raw, dict) or raw.get("PCRIndex") != PCR:
            continue
        kind = raw.get("EventType")
        if not isinstance(kind, str):
            raise FormatError(f"{where}: no event type")
        found.append(Event(kind, _sha256(raw, where), _variable(raw, kind, where)))
    return found


def _sha256(raw: dict[str, Any], where: str) -> bytes:
    for entry in raw.get("Digests") or ():
        if isinstance(entry, dict) and entry.get("AlgorithmId") == "sha256":
            try:
                digest = bytes.fromhex(str(entry.get("Digest", "")))
            except ValueError:
                digest = b""
            if len(digest) == 32:
                return digest
    raise FormatError(f"{where}: no SHA-256 digest (the log has no sha256 bank)")


def _variable(raw: dict[str, Any], kind: str, where: str) -> Variable | None:
    if kind not in (DRIVER_CONFIG, AUTHORITY):
        return None
    event = raw.get("Event")
    if not isinstance(event, dict):
        raise FormatError(f"{where}: {kind} without its variable")
    try:
        guid = uuid.UUID(str(event["VariableName"]))
        name = str(event["UnicodeName"])
        data = bytes.fromhex(str(event.get("VariableData") or ""))
    except (KeyError, ValueError):
        raise FormatError(f"{where}: {kind} with a malformed variable") from None
    if int(event.get("VariableDataLength", len(data))) != len(data):
        raise FormatError(f"{where}: {kind}'s variable data is cut short")
    return Variable(guid, name, data)


def replay(events: Sequence[Event]) -> bytes:
    """PCR 7 after `events`, from its reset value (zeros)."""
    value = bytes(32)
    for event in events:
        value = hashlib.sha256(value + event.digest).digest()
    return value


def check(events: Sequence[Event], current: bytes, source: str) -> None:
    """VerificationError unless the events replay to `current` (what the TPM holds),
    and each DRIVER_CONFIG or AUTHORITY digest is that of the variable it names: a
    log that does not explain PCR 7 cannot predict it."""
    for number, event in enumerate(events):
        if event.variable is not None and event.variable.digest() != event.digest:
            raise VerificationError(
                f"{source}: PCR 7 event {number} ({event.type} {event.variable.name}) does "
                "not hash to its digest: the firmware measures differently than predicted"
            )
    if replay(events) != current:
        raise VerificationError(
            f"{source}: the PCR 7 events replay to {replay(events).hex()}, the TPM holds "
            f"{current.hex()}"
        )


def predict(
    events: Sequence[Event],
    variables: Mapping[str, bytes],
    authorities: Sequence[bytes] | None = None,
) -> bytes:
    """PCR 7 at the next boot: `events` (checked) with the DRIVER_CONFIG events of
    `variables` (name: new contents, e.g. db after an append) measured anew, and,
    with `authorities` (each a db entry, `signature_data`), its AUTHORITY events
    replaced by one per entry, in that order (the next boot's images and the db
    entries that verify them). VerificationError if a variable has no event."""
    changed = []
    seen = set()
    separator = False
    for event in events:
        variable = event.variable
        if event.type == SEPARATOR:
            separator = True
        if event.type == DRIVER_CONFIG and variable is not None and variable.name in variables:
            measured = replace(variable, data=variables[variable.name])
            event = Event(event.type, measured.digest(), measured)
            seen.add(variable.name)
        if event.type == AUTHORITY and authorities is not None:
            continue
        changed.append(event)
        if event.type == SEPARATOR and authorities is not None and separator:
            for entry in authorities:
                measured = Variable(efivars.IMAGE_SECURITY_DATABASE, "db", entry)
                changed.append(Event(AUTHORITY, measured.digest(), measured))
    missing = set(variables) - seen
    if missing:
        raise VerificationError(
            f"the event log measures no {', '.join(sorted(missing))}: PCR 7 cannot be predicted"
        )
    return replay(changed)


def signature_data(owner: uuid.UUID, certificate: bytes) -> bytes:
    """A db entry as an AUTHORITY event measures it: its owner GUID, then the DER
    certificate (an EFI_SIGNATURE_DATA)."""
    return owner.bytes_le + certificate

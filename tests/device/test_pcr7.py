"""PCR 7 from the event log (device/pcr7.py): a log as OVMF writes it (the TCG
crypto-agile format, made here byte by byte) read by the real `tpm2_eventlog`, its
PCR 7 events replayed to the value their digests make, a digest that does not match
its variable refused, and the value after a db append and a new signer predicted."""

from __future__ import annotations

import hashlib
import struct
import uuid
from pathlib import Path

import pytest

from rampart.contracts import efivars
from rampart.device import pcr7
from rampart.errors import VerificationError

EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_EFI_ACTION = 0x80000007
SHA256 = 0x000B
OWNER = uuid.UUID("11111111-2222-3333-4444-555555555555")


def spec_id_event() -> bytes:
    """The log's first entry (TCG_PCR_EVENT, SHA-1 format): the Spec ID Event03 that
    says the others carry SHA-256 digests."""
    spec = (
        b"Spec ID Event03\0"
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
        + struct.pack("<HH", SHA256, 32)
        + b"\0"
    )
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec


def event(pcr: int, kind: int, data: bytes, digest: bytes | None = None) -> bytes:
    """A TCG_PCR_EVENT2 with one SHA-256 digest (of `data`, unless given)."""
    digest = hashlib.sha256(data).digest() if digest is None else digest
    return struct.pack("<IIIH", pcr, kind, 1, SHA256) + digest + struct.pack("<I", len(data)) + data


def variable(name: str, data: bytes) -> pcr7.Variable:
    return pcr7.Variable(pcr7.CONFIG.get(name, efivars.IMAGE_SECURITY_DATABASE), name, data)


def a_log(
    path: Path,
    db: bytes,
    authority: bytes | list[bytes],
    bad_digest: bool = False,
    dbx: bytes = b"dbx list",
) -> bytes:
    """A log like OVMF's under Secure Boot: SecureBoot, PK, KEK, db, dbx, the
    separator, the authorities (the db entries that verified the loader, then the UKI
    if another), and an event of another PCR; PCR 7's value after it."""
    config = [
        variable("SecureBoot", b"\x01"),
        variable("PK", b"pk list"),
        variable("KEK", b"kek list"),
        variable("db", db),
        variable("dbx", dbx),
    ]
    entries = [spec_id_event()]
    digests = []
    for number, var in enumerate(config):
        digest = var.digest() if not (bad_digest and number == 3) else bytes(32)
        entries.append(event(7, EV_EFI_VARIABLE_DRIVER_CONFIG, var.measured(), digest))
        digests.append(digest)
    separator = struct.pack("<I", 0)
    entries.append(event(7, EV_SEPARATOR, separator))
    digests.append(hashlib.sha256(separator).digest())
    for entry in [authority] if isinstance(authority, bytes) else authority:
        auth = pcr7.Variable(efivars.IMAGE_SECURITY_DATABASE, "db", entry)
        entries.append(event(7, EV_EFI_VARIABLE_AUTHORITY, auth.measured()))
        digests.append(auth.digest())
    entries.append(event(4, EV_EFI_ACTION, b"Calling EFI Application from Boot Option"))
    path.write_bytes(b"".join(entries))
    value = bytes(32)
    for digest in digests:
        value = hashlib.sha256(value + digest).digest()
    return value


def test_the_events_tpm2_eventlog_reads_replay_to_pcr_7(tmp_path: Path) -> None:
    log = tmp_path / "binary_bios_measurements"
    authority = pcr7.signature_data(OWNER, b"the db certificate")
    value = a_log(log, b"db list", authority)
    events = pcr7.read_log(log)
    assert [e.type for e in events] == [pcr7.DRIVER_CONFIG] * 5 + [pcr7.SEPARATOR, pcr7.AUTHORITY]
    assert [e.variable.name for e in events if e.variable] == [
        "SecureBoot", "PK", "KEK", "db", "dbx", "db",
    ]  # fmt: skip
    assert pcr7.replay(events) == value
    pcr7.check(events, value, str(log))
    with pytest.raises(VerificationError, match="replay to"):
        pcr7.check(events, bytes(32), str(log))


def test_an_event_whose_digest_is_not_its_variable_s_refuses_any_prediction(
    tmp_path: Path,
) -> None:
    log = tmp_path / "binary_bios_measurements"
    value = a_log(log, b"db list", b"entry", bad_digest=True)
    events = pcr7.read_log(log)
    with pytest.raises(VerificationError, match="does not hash to its digest"):
        pcr7.check(events, value, str(log))


def test_the_prediction_after_a_db_append_and_a_new_signer_is_the_next_boot_s_value(
    tmp_path: Path,
) -> None:
    """What the next boot's log will be, written as the firmware would write it, replays
    to what `predict` computes from this boot's log and the changes."""
    old_entry = pcr7.signature_data(OWNER, b"old db certificate")
    new_entry = pcr7.signature_data(OWNER, b"new db certificate")
    events = pcr7.read_log(_log(tmp_path, "now", b"db", old_entry))
    after_append = a_log(tmp_path / "next-1", b"db" + b" appended", old_entry)
    assert pcr7.predict(events, {"db": b"db appended"}) == after_append
    both = a_log(tmp_path / "next-2", b"db appended", new_entry)
    assert pcr7.predict(events, {"db": b"db appended"}, [new_entry]) == both
    assert pcr7.predict(events, {}) == pcr7.replay(events)
    with pytest.raises(VerificationError, match="measures no KEK2"):
        pcr7.predict(events, {"KEK2": b"x"})


def _log(tmp_path: Path, name: str, db: bytes, authority: bytes) -> Path:
    path = tmp_path / name
    a_log(path, db, authority)
    return path

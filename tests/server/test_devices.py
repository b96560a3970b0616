"""Authenticated devices (rampart.server.devices): signed checks and reports, admission
by an operator or on first use, replays, impersonation, and TPM attestation of PCR 7
(the device side's own code signs: rampart.device.identity; quotes from a real swtpm).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rampart.contracts import identity as contract
from rampart.contracts import wire
from rampart.device import identity, tpm
from rampart.server import admin, audit, db, devices
from rampart.server import store as store_module
from rampart.server.app import Settings, create_app
from rampart.server.store import Check, Proof, Store
from tests.conftest import start_swtpm
from tests.server import signing
from tests.server.conftest import OS, Server, headers, machine_id
from tests.server.signing import Device
from tests.server.test_commands import cli, js

BY = signing.BY


def file_device(tmp_path: Path, n: int) -> Device:
    return signing.file_device(tmp_path / f"device-{n}", machine_id(n))


def _key(server: Server, mid: str) -> dict[str, object]:
    [row] = server.store.machine_keys(mid)
    return row


def _seen(server: Server, mid: str) -> dict[str, object]:
    view = admin.fleet(server.store)
    rows: list[dict[str, object]] = [m for m in view["last_seen"] if m["machine_id"] == mid]
    return rows[0]


def _fleet_line(server: Server, db_url: str, mid: str) -> str:
    """`rampart fleet`'s line for machine `mid`."""
    code, out, err = cli(server.webroot, "fleet", "--db", db_url)
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.startswith(f"  {mid} ")]
    return line


# --- admission ------------------------------------------------------------------------


def test_an_unsigned_check_gets_the_clip_os_answer_and_no_nonce(server: Server) -> None:
    response = server.client.get(f"/update/v1/{OS}/version", headers=headers(machine_id(1)))
    assert response.content == b'version = "1.0.0"\n'


def test_a_new_key_is_pending_and_its_requests_are_anonymous(
    server: Server, tmp_path: Path
) -> None:
    device = file_device(tmp_path, 1)
    status, text = device.check(server.client)
    assert status == 200 and 'rampart_nonce = "' in text
    assert wire.parse_version_document(text.encode(), "answer").core == "1.0.0"
    key = _key(server, device.mid)
    assert (key["state"], key["kind"], key["key_id"]) == ("pending", "file", device.key.key_id)
    assert [m["machine_id"] for m in admin.fleet(server.store)["last_seen"]] == []  # not counted
    machine = server.store.machine(device.mid)
    assert machine is not None and machine["authenticated"] is False
    status, text = device.report(server.client)
    assert (status, json.loads(text)) == (200, {"recorded": True, "authenticated": False})


def test_an_admitted_key_authenticates_checks_and_reports(
    server: Server, db_url: str, tmp_path: Path
) -> None:
    device = file_device(tmp_path, 2)
    device.check(server.client)
    admin.admit(server.store, device.mid, by=BY)
    assert device.check(server.client)[0] == 200
    seen = _seen(server, device.mid)
    assert (seen["authenticated"], seen["key"], seen["epoch"]) == (True, "file", 1)
    assert seen["attested_at"] is None  # a file key attests nothing
    assert _fleet_line(server, db_url, device.mid).endswith(": file key, not attested, epoch 1")
    assert json.loads(device.report(server.client)[1])["authenticated"] is True
    entry = audit.entries(server.store.engine, 1)[0]
    assert (entry["action"], entry["target"]) == ("machine.admit", device.mid)


def test_first_use_admission_admits_a_machine_s_first_key_only(
    server: Server, tmp_path: Path
) -> None:
    server.store.set_admission("first-use", by=BY)
    device = file_device(tmp_path, 3)
    time.sleep(0.05)  # the caches follow the generation within cache_ttl (0 here)
    device.check(server.client)
    assert _key(server, device.mid)["state"] == "admitted"
    assert _seen(server, device.mid)["authenticated"] is True
    # Someone else's key for the same machine-id, later: pending, never admitted.
    thief = Device(device.mid, tmp_path / "thief", identity.ensure(tmp_path / "thief", None))
    thief.check(server.client)
    states = {r["key_id"]: r["state"] for r in server.store.machine_keys(device.mid)}
    assert states == {device.key.key_id: "admitted", thief.key.key_id: "pending"}


def test_a_rejected_key_goes_anonymous(server: Server, tmp_path: Path) -> None:
    device = file_device(tmp_path, 4)
    device.check(server.client)
    admin.admit(server.store, device.mid, by=BY)
    admin.reject(server.store, device.mid, by=BY)
    assert device.check(server.client)[0] == 200
    assert json.loads(device.report(server.client)[1])["authenticated"] is False


def test_enrollment_with_the_key_before_the_machine_calls(webroot: Path, tmp_path: Path) -> None:
    device = file_device(tmp_path, 5)
    described = {"machine_id": device.mid, **identity.describe(device.key)}
    listing = tmp_path / "fleet.jsonl"
    listing.write_text(json.dumps(described) + "\n")
    assert js(webroot, "machine", "admit", "--enroll", str(listing)) == [
        {"machine_id": device.mid, "key_id": device.key.key_id}
    ]
    pem = tmp_path / "key.pem"
    pem.write_text(device.key.pem())
    code, _, err = cli(webroot, "machine", "admit", device.mid, "--key", str(pem))
    assert code == 4 and "already admitted" in err
    other = file_device(tmp_path, 6)
    (tmp_path / "other.pem").write_text(other.key.pem())
    js(webroot, "machine", "admit", device.mid, "--key", str(tmp_path / "other.pem"))
    keys = {r["key_id"]: r["state"] for r in js(webroot, "machine", "keys", device.mid)}
    assert keys == {device.key.key_id: "replaced", other.key.key_id: "admitted"}
    (tmp_path / "bad.pem").write_text("not a key")
    code, _, err = cli(webroot, "machine", "admit", device.mid, "--key", str(tmp_path / "bad.pem"))
    assert code == 2 and "not a device's public key" in err
    code, _, err = cli(webroot, "machine", "admit", machine_id(9))
    assert code == 2 and "0 pending keys" in err
    assert js(webroot, "machine", "admission", "first-use") == {"admission": "first-use"}


# --- attacks --------------------------------------------------------------------------


def test_replayed_check_is_refused(server: Server, tmp_path: Path) -> None:
    device = file_device(tmp_path, 10)
    device.check(server.client)
    admin.admit(server.store, device.mid, by=BY)
    sent = {**headers(device.mid), **device.signed("version")}
    first = server.client.get(f"/update/v1/{OS}/version", headers=sent)
    again = server.client.get(f"/update/v1/{OS}/version", headers=sent)
    assert first.status_code == 200
    assert again.status_code == 401 and "replayed request" in again.text
    assert again.headers["www-authenticate"] == "Rampart-Signature"


def test_replayed_report_to_another_instance_is_refused(
    published: Path, db_url: str, tmp_path: Path
) -> None:
    """Two servers on one database: a report accepted by A, replayed to B (whose
    memory still holds an older counter), is refused when B records it."""
    engine = db.make_engine(db_url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    settings = Settings(published, flush_interval=0.02, cache_ttl=0.0)
    settings.new_machines_per_hour = 0
    device = file_device(tmp_path, 11)
    with (
        TestClient(create_app(store, settings)) as a,
        TestClient(create_app(Store(engine), settings)) as b,
    ):
        device.check(a)
        admin.admit(store, device.mid, by=BY)
        assert device.check(b)[0] == 200  # B caches the key and its counter
        body = b'{"from": "1.0.0", "to": "1.0.1", "outcome": "failure", "error": "x"}'
        sent = {**headers(device.mid), **device.signed("report", body)}
        path = f"/update/v1/{OS}/report"
        assert a.post(path, content=body, headers=sent).status_code == 200
        replay = b.post(path, content=body, headers=sent)
        assert replay.status_code == 401 and "already used" in replay.text
    assert len(store.recent_reports(10, "failure")) == 1
    engine.dispose()


def test_forged_report_body_is_refused(server: Server, tmp_path: Path) -> None:
    device = file_device(tmp_path, 12)
    device.check(server.client)
    admin.admit(server.store, device.mid, by=BY)
    body = b'{"from": "1.0.0", "to": "1.0.1", "outcome": "success", "error": ""}'
    sent = {**headers(device.mid), **device.signed("report", body)}
    forged = body.replace(b"success", b"failure")
    response = server.client.post(f"/update/v1/{OS}/report", content=forged, headers=sent)
    assert response.status_code == 401 and "bad signature" in response.text
    assert server.store.recent_reports(10, "failure") == []


def test_a_check_signed_as_another_machine_is_not_that_machine(
    server: Server, tmp_path: Path
) -> None:
    """A's key, admitted; B signs a check claiming A's machine-id with its own key: a
    pending key for A, an anonymous answer, and A's record unchanged."""
    victim = file_device(tmp_path, 13)
    victim.check(server.client)
    admin.admit(server.store, victim.mid, by=BY)
    victim.check(server.client)
    before = _key(server, victim.mid)
    impostor = Device(victim.mid, tmp_path / "imp", identity.ensure(tmp_path / "imp", None))
    assert impostor.check(server.client)[0] == 200
    assert json.loads(impostor.report(server.client, "failure")[1])["authenticated"] is False
    after = {r["key_id"]: r for r in server.store.machine_keys(victim.mid)}
    assert after[victim.key.key_id] == before
    assert after[impostor.key.key_id]["state"] == "pending"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({contract.KEY_HEADER: "AAAA"}, "go together"),
        ({contract.KEY_HEADER: "@@", contract.AUTH_HEADER: "v=1"}, "not base64"),
    ],
)
def test_a_malformed_signature_is_one_clear_401(
    server: Server, header: dict[str, str], reason: str
) -> None:
    sent = {**headers(machine_id(14)), **header}
    response = server.client.get(f"/update/v1/{OS}/version", headers=sent)
    assert response.status_code == 401 and reason in response.text


# --- the recorder's counters, in one statement --------------------------------------


def test_one_batch_raises_each_key_s_counter_and_refuses_the_counters_it_took(
    server: Server,
) -> None:
    """Store.record_checks with a batch of several keys: each key's counter rises to its
    last request's, what a quote proved is kept, and a counter not above the last one
    accepted (a replay, in the batch or before it) is refused."""
    store = server.store
    mids = [machine_id(n) for n in range(3)]
    proofs = [signing.proof(store, m) for m in mids]
    first, second, third = proofs
    pcr7 = "ab" * 32
    attested = Proof(third.machine_id, third.key_id, third.counter, pcr7, 7, True)
    again = Proof(first.machine_id, first.key_id, first.counter + 10, None, None, False)
    stale = Proof(second.machine_id, second.key_id, 0, None, None, False)

    def check(proof: Proof, at: float) -> Check:
        return Check(proof.machine_id, OS, "1.0.0", "stable", None, at, None, proof)

    batch = [check(first, 1.0), check(second, 2.0), check(attested, 3.0), check(again, 4.0)]
    assert store.record_checks(batch) == set()
    assert store.record_checks([check(stale, 5.0), check(first, 6.0)]) == {0, 1}
    keys = {m: _key(server, m) for m in mids}
    assert keys[mids[0]]["counter"] == again.counter and keys[mids[0]]["last_auth"] == 4.0
    assert keys[mids[1]]["counter"] == second.counter and keys[mids[1]]["pcr7"] is None
    assert (keys[mids[2]]["pcr7"], keys[mids[2]]["epoch"]) == (pcr7, 7)
    assert keys[mids[2]]["attested_at"] == 3.0


def test_raising_counters_finds_each_key_by_its_primary_key(tmp_path: Path) -> None:
    """SQLite's plan of the counters' statement: the batch's rows drive a primary-key
    lookup each (read through the state index, each row of a batch walked every
    admitted key: a signed check-in cost more the larger the fleet)."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    db.migrate(engine)
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + str(store_module._SQL_COUNTERS_SQLITE.text), {"rows": "[]"}
        ).all()
    details = [str(row[-1]) for row in plan]
    assert any("machine_keys USING INDEX sqlite_autoindex_machine_keys_1" in d for d in details)
    assert not any("ix_machine_keys_state" in d for d in details), details
    engine.dispose()


# --- attestation ----------------------------------------------------------------------


@pytest.fixture
def chip(tmp_path: Path) -> Iterator[tpm.Tpm]:
    yield from start_swtpm(tmp_path / "tpm")


def _tpm_device(tmp_path: Path, chip: tpm.Tpm, n: int) -> Device:
    return Device(machine_id(n), tmp_path / f"tpm-{n}", identity.ensure(tmp_path / "id", chip))


def test_a_tpm_device_is_attested_with_a_fresh_nonce(
    server: Server, db_url: str, tmp_path: Path, chip: tpm.Tpm
) -> None:
    device = _tpm_device(tmp_path, chip, 20)
    device.check(server.client)  # pending; the answer's nonce is kept
    admin.admit(server.store, device.mid, by=BY)
    device.check(server.client)
    seen = _seen(server, device.mid)
    pcr7 = chip.pcr_values((7,))[7].hex()
    assert (seen["authenticated"], seen["key"], seen["pcr7"]) == (True, "tpm", pcr7)
    assert seen["attested_at"] is not None and seen["pcr7_good"] is False  # not known yet
    assert "tpm key, PCR 7 unknown, epoch" in _fleet_line(server, db_url, device.mid)
    admin.learn_pcr7(server.store, OS, device.mid, by=BY)
    assert _seen(server, device.mid)["pcr7_good"] is True
    assert "tpm key, PCR 7 known good, epoch" in _fleet_line(server, db_url, device.mid)


def test_attestation_with_a_stale_nonce_is_not_attestation(
    server: Server, tmp_path: Path, chip: tpm.Tpm
) -> None:
    device = _tpm_device(tmp_path, chip, 21)
    device.check(server.client)
    admin.admit(server.store, device.mid, by=BY)
    secret = server.store.nonce_secret()
    old = devices.make_nonce(secret, device.mid, time.time() - devices.NONCE_LIFETIME - 60)
    identity.save_nonce(device.directory, old)
    assert device.check(server.client)[0] == 200
    seen = _seen(server, device.mid)
    assert seen["authenticated"] is True and seen["attested_at"] is None
    identity.save_nonce(device.directory, devices.make_nonce(b"x" * 32, device.mid, time.time()))
    device.check(server.client)  # a nonce this server never handed out
    assert _seen(server, device.mid)["attested_at"] is None


def test_nonce_under_an_empty_key_before_the_first_refresh(
    server: Server, tmp_path: Path, chip: tpm.Tpm
) -> None:
    """A worker that has not loaded the nonce key yet hands out no nonce, and takes
    none as fresh: an HMAC under an empty key is one anyone can make."""
    device = _tpm_device(tmp_path, chip, 23)
    device.check(server.client)
    admin.admit(server.store, device.mid, by=BY)
    unloaded = devices.Devices(server.store)
    assert unloaded.nonce(device.mid) is None
    identity.save_nonce(device.directory, devices.make_nonce(b"", device.mid, time.time()))
    sent = device.headers("version")
    signed = asyncio.run(unloaded.authenticate(sent, "version", OS, device.mid, "1.0.0"))
    assert signed.proof is not None and signed.proof.attested is False
    asyncio.run(unloaded.sync(0))
    assert unloaded.nonce(device.mid) is not None


def test_attestation_with_a_wrong_pcr7_is_flagged_and_withheld(
    server: Server, tmp_path: Path, chip: tpm.Tpm
) -> None:
    """A machine whose PCR 7 is not known good (Secure Boot off, another db) is shown
    so, and a channel that requires attestation keeps its version."""
    device = _tpm_device(tmp_path, chip, 22)
    device.check(server.client)
    admin.admit(server.store, device.mid, by=BY)
    device.check(server.client)
    admin.learn_pcr7(server.store, OS, device.mid, by=BY)
    admin.start_rollout(server.store, server.webroot, OS, "stable", "1.0.1", 99.99, by=BY)
    admin.set_attestation(server.store, OS, "stable", True, by=BY)
    time.sleep(0.05)
    assert "1.0.1" in device.check(server.client)[1]  # attested, known good: offered
    chip._tool("tpm2_pcrextend", "7:sha256=" + hashlib.sha256(b"other").hexdigest())
    status, text = device.check(server.client)
    assert status == 200 and 'version = "1.0.0"' in text  # withheld
    seen = _seen(server, device.mid)
    assert seen["pcr7_good"] is False
    anonymous = server.client.get(f"/update/v1/{OS}/version", headers=headers(device.mid))
    assert anonymous.content == b'version = "1.0.0"\n'  # unsigned: withheld too

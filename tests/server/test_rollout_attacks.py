"""Attacks on the auto-halt of a staged rollout, against the real `rampart serve` (its
default settings) from several real client addresses (127.0.0.0/8 is all loopback on
Linux: each request is sent from the source address it names).

The fleet's machines sign their checks and reports with their admitted keys
(docs/server.md "Device identity"); an attacker can invent machine-ids, or know the
real ones, but holds none of their keys. The rules under test: only what an admitted
key signed counts (the rest is stored, anonymous); among that, only machines first
seen before the rollout started, offered its version by a check before their report;
a halt needs at least `min_failing` distinct failing machines; one address introduces
at most 60 new machine-ids an hour.
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rampart.server import admin, audit, db
from rampart.server.rollout import in_rollout
from rampart.server.store import Store
from rampart.testbed.services import RampartServe
from tests.server.conftest import OS
from tests.server.signing import Device, SignedFleet, file_device
from tests.server.test_postgres_restart import start_server

VERSION = "1.0.1"
PERCENT = 5.0
FLEET = 200  # real machines, each from its own address, known before the rollout


@dataclass
class Rollout:
    server: RampartServe
    store: Store
    webroot: Path
    fleet: SignedFleet  # the real machines: their keys are admitted

    def request(
        self,
        method: str,
        path: str,
        mid: str,
        source: str,
        body: bytes | None = None,
        signer: Device | None = None,
    ) -> tuple[int, str]:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.server.port, timeout=30, source_address=(source, 0)
        )
        try:
            headers = {"clipos-machineid": mid, "clipos-version": "1.0.0"}
            if signer is not None:
                kind = "version" if method == "GET" else "report"
                headers.update(signer.signed(kind, body or b""))
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def check(self, mid: str, source: str, signer: Device | None = None) -> tuple[int, str]:
        return self.request("GET", f"/update/v1/{OS}/version", mid, source, signer=signer)

    def report(self, mid: str, outcome: str, source: str, signer: Device | None = None) -> int:
        doc = {"from": "1.0.0", "to": VERSION, "outcome": outcome, "error": ""}
        body = json.dumps(doc).encode()
        status, text = self.request("POST", f"/update/v1/{OS}/report", mid, source, body, signer)
        assert status == 200, text  # stored, whether or not it counts
        return status

    def real_check(self, mid: str, source: str) -> tuple[int, str]:
        """A check the machine signs with its admitted key."""
        return self.check(mid, source, self.fleet(mid))

    def real_report(self, mid: str, outcome: str, source: str) -> int:
        return self.report(mid, outcome, source, self.fleet(mid))

    def state(self) -> str:
        return str(self.store.channel_row(OS, "stable")["rollout_state"])

    def start(self) -> None:
        admin.start_rollout(
            self.store, self.webroot, OS, "stable", VERSION, PERCENT, by=audit.cli_actor()
        )


def fleet_address(n: int) -> str:
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


def minted(count: int, inside: bool = True) -> list[str]:
    """Fresh machine-ids whose bucket is (or is not) inside the rollout."""
    found: list[str] = []
    while len(found) < count:
        mid = secrets.token_hex(16)
        if in_rollout(mid, VERSION, PERCENT) == inside:
            found.append(mid)
    return found


@pytest.fixture
def rollout(published: Path, tmp_path: Path) -> Iterator[tuple[Rollout, list[str]]]:
    """The real server on SQLite; FLEET machines checked in from their own addresses,
    then a 5 % rollout of 1.0.1 started; yields it and the fleet's machines in it."""
    url = f"sqlite:///{tmp_path / 'server.sqlite'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    server = start_server(published, url, tmp_path / "serve.log")
    live = Rollout(server, store, published, SignedFleet(store, tmp_path / "fleet"))
    try:
        fleet = [f"{n:032x}" for n in range(1, FLEET + 1)]
        for n, mid in enumerate(fleet):
            status, answer = live.real_check(mid, fleet_address(n))
            assert status == 200 and answer.startswith('version = "1.0.0"\n'), answer
        live.start()
        inside = [m for m in fleet if in_rollout(m, VERSION, PERCENT)]
        assert len(inside) >= 6, "too few fleet machines in the rollout for the test"
        # The server sees the rollout within its cache time (1 s).
        deadline = time.monotonic() + 10
        while not live.check(inside[0], fleet_address(fleet.index(inside[0])))[1].startswith(
            f'version = "{VERSION}"\n'
        ):
            assert time.monotonic() < deadline, "the server never offered the rollout"
            time.sleep(0.2)
        yield live, inside
    finally:
        assert server.stop() in (0, -15), server.log_tail(30)
        engine.dispose()


def test_minted_machine_ids_and_failure_reports_do_not_halt_a_rollout(
    rollout: tuple[Rollout, list[str]],
) -> None:
    live, inside = rollout
    # From one address: machine-ids inside the rollout, a check each, then a failure.
    statuses: Counter[int] = Counter()
    for mid in minted(100):
        status, answer = live.check(mid, "127.0.0.66")
        statuses[status] += 1
        if status == 200:
            assert answer == f'version = "{VERSION}"\n'  # they are in the rollout
        live.report(mid, "failure", "127.0.0.66")
    assert statuses[429] >= 100 - 60, f"new machine-ids not limited per address: {statuses}"
    # From 20 addresses, under each one's budget.
    for a in range(20):
        for mid in minted(5):
            assert live.check(mid, f"127.0.9.{a + 1}")[0] == 200
            live.report(mid, "failure", f"127.0.9.{a + 1}")
    # Failure reports from machine-ids never checked, and reports before the check.
    for mid in minted(20):
        live.report(mid, "failure", "127.0.0.67")
        live.check(mid, "127.0.0.67")
    # Known machines of the fleet that were never offered the rollout.
    outside = [f"{n:032x}" for n in range(1, FLEET + 1) if f"{n:032x}" not in inside]
    for mid in outside[:20]:
        live.report(mid, "failure", "127.0.0.68")
    assert live.state() == "active"
    # Four real failures (under the minimum of 5 distinct failing machines): still active.
    for mid in inside[:4]:
        live.real_check(mid, "127.0.0.69")
        live.real_report(mid, "failure", "127.0.0.69")
    assert live.state() == "active"
    # The fifth real failing machine halts it: real evidence still works.
    live.real_check(inside[4], "127.0.0.69")
    live.real_report(inside[4], "failure", "127.0.0.69")
    assert live.state() == "halted"


def test_forged_reports_in_real_machines_names_do_not_halt_a_rollout(
    rollout: tuple[Rollout, list[str]], tmp_path: Path
) -> None:
    """The halt attack of the outside review, repeated: the attacker knows the machine-ids
    of the fleet's machines in the rollout (their checks were offered the version), and
    sends failure reports in their names, unsigned, then signed with keys of its own.
    Before device identity, six of them halted the rollout."""
    live, inside = rollout
    for mid in inside:
        live.report(mid, "failure", "127.0.0.72")  # unsigned
        thief = file_device(tmp_path / "thief" / mid, mid)
        assert live.check(mid, "127.0.0.72", thief)[0] == 200  # its key: pending
        live.report(mid, "failure", "127.0.0.72", thief)
    assert live.state() == "active"
    keys = live.store.machine_keys(inside[0])
    assert sorted(k["state"] for k in keys) == ["admitted", "pending"]
    counts = live.store.counts()
    assert counts.get("reports_failure", 0) == 0 and counts["anonymous_reports"] >= 2 * len(inside)


def test_fake_success_reports_cannot_dilute_real_failures(
    rollout: tuple[Rollout, list[str]],
) -> None:
    live, inside = rollout
    # Minted machine-ids inside the rollout, from 30 addresses (under each one's budget),
    # checked and then reporting success; more reporting success without a check.
    for a in range(30):
        for mid in minted(10):
            assert live.check(mid, f"127.0.8.{a + 1}")[0] == 200
            live.report(mid, "success", f"127.0.8.{a + 1}")
    for mid in minted(100):
        live.report(mid, "success", "127.0.0.70")
    assert live.state() == "active"
    # Five real machines of the rollout fail: 5 of 5 counted machines, the rollout halts
    # (300 fake successes would have made it 5 of 305 if they counted).
    for mid in inside[:5]:
        assert live.real_check(mid, "127.0.0.71")[1].startswith(f'version = "{VERSION}"\n')
        live.real_report(mid, "failure", "127.0.0.71")
    assert live.state() == "halted"

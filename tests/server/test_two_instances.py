"""Beyond one server (docs/server.md "Deployment"): two `rampart serve`
instances on one PostgreSQL database, sharing one webroot, behind the documented nginx
whose upstream names both.

What one instance learns, the other knows: machines enrolled or admitted through either
sign check-ins and reports to both; a replay to the other instance is refused; an
administrative change made through one is what the other answers a second later; a
dashboard session opened on one is valid on the other. What must happen once happens
once: the auto-halt of a rollout that both instances receive failures for, the audit
trail's entries under concurrent writers on both (one chain, no fork), and the TUF
signing that both instances hold keys for (each change signed by one of them).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rampart.device import identity
from rampart.server.guard import COOKIE
from rampart.testbed import services
from tests.server import httpkit
from tests.server.signing import Device, file_device
from tests.server.test_nginx_frontend import (
    WAIT,
    nginx_in_front,
    published_webroot,
    rampart,
    tuf_options,
)

OS = "clipos"
TTL = 1.0  # seconds: how old an instance's cache of the channels may be (fleet.Fleet)


@dataclass
class Endpoint:
    """One HTTP(S) server: nginx (TLS, with its CA) or an app instance (plain HTTP)."""

    port: int
    ca: Path | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        return httpkit.request(self.port, method, path, body, headers, ca=self.ca, timeout=WAIT)

    def check(self, device: Device, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A signed version check (or one with `headers`); keeps the answer's nonce."""
        sent = headers or device.headers("version")
        status, _, body = self.request("GET", f"/update/v1/{OS}/version", headers=sent)
        if status == 200:
            identity.save_nonce(device.directory, body.decode().split('rampart_nonce = "')[1][:-2])
        return status, body

    def report(self, device: Device, outcome: str) -> int:
        body = json.dumps({"from": "1.0.0", "to": "1.0.1", "outcome": outcome, "error": ""})
        sent = device.headers("report", body.encode())
        return self.request("POST", f"/update/v1/{OS}/report", body.encode(), sent)[0]

    def api(self, token: str, method: str, path: str, payload: object = None) -> object:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        body = None if payload is None else json.dumps(payload).encode()
        status, _, answer = self.request(method, path, body, headers)
        assert status in (200, 201), (method, path, status, answer)
        return json.loads(answer)


@dataclass
class Pair:
    webroot: Path
    db: str
    token: str
    front: Endpoint  # nginx
    apps: tuple[Endpoint, Endpoint]
    logs: tuple[Path, Path]
    tmp: Path

    def cli(self, *argv: str | Path) -> str:
        return rampart(*argv, "--webroot", self.webroot, "--db", self.db)

    def device(self, n: int) -> Device:
        return file_device(self.tmp / f"device-{n}", f"{0xA0 + n:032x}")

    def requests(self, app: int, path: str) -> int:
        """How many requests for `path` instance `app` answered (its -v access lines)."""
        text = self.logs[app].read_text()
        return len(re.findall(rf'"[A-Z]+ {re.escape(path)} HTTP/1\.1" \d{{3}}', text))


@pytest.fixture
def pair(tmp_path: Path, postgres: services.Cluster) -> Iterator[Pair]:
    name = "t_" + secrets.token_hex(6)
    postgres.create_database(name)
    url = postgres.url_for(name)
    try:
        webroot, _, token = published_webroot(tmp_path, db=url)
        options = ["-v", *tuf_options(tmp_path, webroot)]
        logs = (tmp_path / "app1.log", tmp_path / "app2.log")
        with (
            # The first creates the schema and the channels; then the second starts.
            services.RampartServe(
                webroot, logs[0], db=url, options=options, timeout=WAIT, name="app1"
            ) as app1,
            services.RampartServe(
                webroot, logs[1], db=url, options=options, timeout=WAIT, name="app2"
            ) as app2,
            nginx_in_front(tmp_path, webroot, [app1.port, app2.port]) as (port, ca),
        ):
            apps = (Endpoint(app1.port), Endpoint(app2.port))
            yield Pair(webroot, url, token, Endpoint(port, ca), apps, logs, tmp_path)
    finally:
        postgres.drop_database(name)


def _halts(pair: Pair) -> list[dict[str, object]]:
    lines = pair.cli("audit", "log", "--json").splitlines()
    entries = [json.loads(line)["entry"] for line in lines]
    return [e for e in entries if e["action"] == "rollout.halt"]


def test_two_instances_on_one_postgresql_behind_nginx(pair: Pair) -> None:
    front, (app1, app2) = pair.front, pair.apps
    devices = [pair.device(n) for n in range(8)]

    # Enrollment: the machines' `rampart identity --json` lines, admitted in the
    # database both instances read.
    enrolled = pair.tmp / "enroll.jsonl"
    lines = [json.dumps({"machine_id": d.mid, **identity.describe(d.key)}) for d in devices[:6]]
    enrolled.write_text("\n".join(lines) + "\n")
    pair.cli("machine", "admit", "--enroll", enrolled)
    # A seventh presents its key to one instance and is admitted through the other.
    late = devices[6]
    assert app1.check(late)[0] == 200
    pending = pair.apps[1].api(pair.token, "GET", f"/admin/api/machines/keys?machine_id={late.mid}")
    assert isinstance(pending, list) and [k["state"] for k in pending] == ["pending"]
    app2.api(pair.token, "POST", f"/admin/api/machines/{late.mid}/admit", {})

    # Authenticated check-ins through nginx, which sends them to both instances.
    admitted = devices[:7]
    for device in admitted:
        status, body = front.check(device)
        assert status == 200 and body.startswith(b'version = "1.0.1"\nrampart_nonce = "'), body
    version_path = f"/update/v1/{OS}/version"
    assert pair.requests(0, version_path) >= 3 and pair.requests(1, version_path) >= 3
    # A check accepted by one instance, replayed to the other: refused.
    replayed = devices[0].headers("version")
    assert app1.check(devices[0], replayed)[0] == 200
    status, body = app2.check(devices[0], replayed)
    assert status == 401 and b"replayed request" in body, body
    fleet = json.loads(pair.cli("fleet", "--json"))
    assert fleet["counts"]["machines"] == 7 and fleet["counts"]["anonymous_machines"] == 0

    # A change made through one instance is what the other answers a second later.
    app1.api(
        pair.token,
        "PUT",
        f"/admin/api/channels/{OS}/stable/version",
        {"version": "1.0.0", "force": True},
    )
    time.sleep(TTL)
    assert app2.check(devices[1])[1].startswith(b'version = "1.0.0"\n')
    rollout = {"version": "1.0.1", "percent": 99.99, "failure_threshold": 0.5, "min_reports": 4}
    rollout["min_failing"] = 3
    app2.api(pair.token, "POST", f"/admin/api/channels/{OS}/stable/rollout", rollout)
    time.sleep(TTL)
    for device in admitted:  # offered 1.0.1 by whichever instance nginx chose
        assert front.check(device)[1].startswith(b'version = "1.0.1"\n')

    # A dashboard session opened on one instance is valid on the other, and through nginx.
    status, headers, _ = app1.request(
        "POST", "/admin/login", f"token={pair.token}".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert status == 303
    cookie = {"Cookie": headers["set-cookie"].split(";")[0]}
    assert cookie["Cookie"].startswith(f"{COOKIE}=")
    for endpoint in (app2, front, front):
        status, _, page = endpoint.request("GET", "/admin/", headers=cookie)
        assert status == 200 and b"Signed in as" in page

    # Failure reports from every admitted machine, at once, through nginx to both: the
    # rollout halts once. Meanwhile operators on both instances make changes, and
    # an unenrolled machine's forged failure does not count.
    forged = devices[7]
    outcomes: dict[str, int] = {}
    changes: list[object] = []

    def report(device: Device) -> None:
        outcomes[device.mid] = front.report(device, "failure")

    def assign(app: Endpoint, start: int) -> None:
        for n in range(start, start + 10):
            body = {"os": OS, "channel": "stable"}
            changes.append(
                app.api(pair.token, "PUT", f"/admin/api/machines/{n:032x}/channel", body)
            )

    threads = [threading.Thread(target=report, args=(d,)) for d in [*admitted, forged]]
    threads += [
        threading.Thread(target=assign, args=(app, n)) for app, n in ((app1, 0), (app2, 100))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert set(outcomes.values()) == {200} and len(changes) == 20
    channel = app1.api(pair.token, "GET", "/admin/api/channels")
    assert isinstance(channel, list)
    assert [c["rollout_state"] for c in channel if c["name"] == "stable"] == ["halted"]
    [halt] = _halts(pair)
    assert halt["via"] == "server"
    verdict = json.loads(pair.cli("audit", "verify", "--json"))
    assert verdict["problems"] == [] and verdict["entries"] >= 20 + 2 + 2

    # Both instances hold the TUF keys; each change was signed once, by one of them:
    # the channels role's versions follow each other, one per signing logged.
    deadline = time.monotonic() + WAIT
    head = pair.webroot / "heads" / OS / "stable.json"
    while not head.exists() or b"halted" not in head.read_bytes():
        assert time.monotonic() < deadline, "the halt was not signed"
        time.sleep(0.1)
    versions = sorted(
        int(p.name.split(".")[0]) for p in (pair.webroot / "tuf").glob("*.channels.json")
    )
    assert versions == list(range(1, versions[-1] + 1))
    signings = [len(re.findall(r"TUF: signed channels", log.read_text())) for log in pair.logs]
    assert sum(signings) == versions[-1] - 1, (signings, versions)

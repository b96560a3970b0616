"""Faults of the server found by a fault-injection run: the
silent-machine count, a SIGKILL of the server, a SIGKILL of uvicorn's supervisor."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, text

from rampart.server import db
from rampart.testbed.services import RampartServe
from tests.server.conftest import OS, Server, headers
from tests.server.test_postgres_restart import PATH, probe, start_server

SILENT = 1_500  # more than the 1,000 the fleet view used to count


def test_silent_machine_count_is_not_capped_at_1000(server: Server) -> None:
    old = time.time() - 30 * 86400
    rows = [
        {
            "machine_id": f"{n:032x}",
            "os": OS,
            "version": "1.0.0",
            "first_seen": old,
            "last_seen": old,
            "authenticated": True,
        }
        for n in range(SILENT)
    ]
    with server.store.engine.begin() as conn:
        conn.execute(insert(db.machines), rows)
    server.check(f"{SILENT + 1:032x}")  # and one that is not silent
    page = server.client.get("/admin/", headers=server.auth).text
    assert f"{SILENT} machine(s) silent" in re.sub("<[^>]*>", "", page)  # 692479c: 1000
    assert f"<span id=silent>{SILENT}</span> machine(s) silent" in page
    view = server.client.get("/admin/api/fleet", headers=server.auth).json()
    assert (view["machines"], view["silent_count"]) == (SILENT + 1, SILENT)
    assert len(view["silent"]) == 1000  # the list stays bounded; the count does not


def _load(port: int, stop: threading.Event, answered: list[str], prefix: str) -> None:
    """Checks in a loop from 8 machine-ids; the machine-id of each 200."""
    ids = [f"{prefix}{i:024x}" for i in range(8)]
    n = 0
    while not stop.is_set():
        n += 1
        answer = probe(port, ids[n % len(ids)], timeout=5.0)
        if answer.status == 200:
            answered.append(str(answer.machine_id))
        elif answer.status == 0:
            return  # the server is gone


def test_sigkill_of_the_server_loses_no_check_answered_200(tmp_path: Path, published: Path) -> None:
    """Checks answered 200 are in the database even when the server is killed with
    SIGKILL under load (on 692479c the last 15-60 ms of them were in memory only)."""
    url = f"sqlite:///{tmp_path / 'kill.sqlite'}"
    server = start_server(published, url, tmp_path / "serve.log")
    stop = threading.Event()
    answered: list[list[str]] = [[] for _ in range(4)]
    threads = [
        threading.Thread(target=_load, args=(server.port, stop, answered[n], f"{n:08x}"))
        for n in range(4)
    ]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3.0)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        server.kill()
    total = sum(len(a) for a in answered)
    assert total > 100, f"too little load to mean anything: {total} checks answered"
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            recorded = int(conn.execute(text("SELECT count(*) FROM checks")).scalar() or 0)
    finally:
        engine.dispose()
    # Every check answered 200 is recorded (a check recorded whose answer the kill cut
    # off is not a loss).
    assert recorded >= total, f"{total} checks answered 200, {recorded} recorded after SIGKILL"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_sigkill_of_the_supervisor_ends_its_workers(tmp_path: Path, published: Path) -> None:
    """`rampart serve --workers 2`, its supervisor killed with SIGKILL: the workers end
    (on 692479c they kept serving, and a restart on the same port failed)."""
    url = f"sqlite:///{tmp_path / 'workers.sqlite'}"
    server = start_server(published, url, tmp_path / "serve.log", "--workers", "2")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # uvicorn's supervisor spawns its workers through multiprocessing: the ones
            # that run the server are the children that are not its resource tracker.
            workers = [
                p
                for p in _children(server.pid)
                if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text()
            ]
            if len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, f"workers: {workers}\n{server.log_tail(30)}"
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [p for p in workers if _alive(p)]
        answer = probe(server.port, None, timeout=2.0)
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        server.close()  # what else is left of its process group (the resource tracker)
    assert not alive, f"workers {alive} outlived their supervisor (port answers {answer.status})"
    # The port is free: a new server starts on it.
    with RampartServe(
        published,
        tmp_path / "again.log",
        db=url,
        port=server.port,
        ready_path=PATH,
        timeout=30,
    ):
        assert probe(server.port, None, timeout=5.0).status == 200


def test_a_check_is_answered_only_once_committed(server: Server) -> None:
    """No flush needed: by the time a check is answered, it is in the database."""
    response = server.client.get(f"/update/v1/{OS}/version", headers=headers("ab" * 16))
    assert response.status_code == 200
    with server.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT machine_id FROM checks")).scalars().all()
    assert rows == ["ab" * 16]


@pytest.mark.parametrize("per_hour", [3])
def test_new_machine_ids_over_the_address_budget_get_429_and_are_not_recorded(
    published: Path, tmp_path: Path, per_hour: int
) -> None:
    from fastapi.testclient import TestClient

    from rampart.server import admin
    from rampart.server.app import Settings, create_app
    from rampart.server.store import Store

    engine = db.make_engine(f"sqlite:///{tmp_path / 'budget.sqlite'}")
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    app = create_app(store, Settings(published, new_machines_per_hour=per_hour))
    with TestClient(app, client=("192.0.2.7", 40000)) as client:
        statuses = [
            client.get(f"/update/v1/{OS}/version", headers=headers(f"{n:032x}")).status_code
            for n in range(5)
        ]
        # a known machine is never limited
        known = client.get(f"/update/v1/{OS}/version", headers=headers(f"{0:032x}"))
    assert statuses == [200] * per_hour + [429] * (5 - per_hour)
    assert known.status_code == 200
    assert store.count_machines() == per_hour
    engine.dispose()

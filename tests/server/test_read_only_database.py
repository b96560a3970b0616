"""A database that turns read-only, then writable again (a PostgreSQL failover to a
standby and back, an operator's `default_transaction_read_only`): checks get 503 while
it lasts, and once it is writable the service answers 200 again for good, with no
second burst of 503 from connections that were opened while it was read-only."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rampart.server import admin, db
from rampart.server.app import Settings, create_app
from rampart.server.store import Store
from tests.server.conftest import OS, headers

RECOVERY_WITHIN = 10.0  # seconds after the database is writable again
AFTER_SECONDS = 4.0  # then this long of checks, all of which must be 200


@pytest.fixture
def database(postgres: object) -> Iterator[tuple[object, str, str]]:
    name = "ro_" + secrets.token_hex(6)
    url = postgres.create_database(name)  # type: ignore[attr-defined]
    try:
        yield postgres, name, url
    finally:
        postgres.drop_database(name)  # type: ignore[attr-defined]


def test_no_second_burst_of_503_after_a_read_only_database_recovers(
    database: tuple[object, str, str], published: Path
) -> None:
    cluster, name, url = database
    engine = db.make_engine(url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    settings = Settings(published, flush_interval=0.02, cache_ttl=0.0)
    settings.new_machines_per_hour = 0  # every machine-id here comes from one address
    app = create_app(store, settings)

    def sql(statement: str) -> None:
        cluster.query(statement, "postgres")  # type: ignore[attr-defined]

    def check(n: int) -> int:
        mid = f"{n:032x}"
        return int(client.get(f"/update/v1/{OS}/version", headers=headers(mid)).status_code)

    n = 0
    try:
        with TestClient(app) as client:
            for _ in range(20):
                n += 1
                assert check(n) == 200
            # Read-only: new sessions start read-only; the open ones are ended, so the
            # pool reconnects, read-only.
            sql(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
            sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "  # noqa: S608 - our name
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            during: Counter[int] = Counter()
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                n += 1
                during[check(n)] += 1
            assert during[503] > 0, f"no 503 while the database was read-only: {during}"
            # Writable again, for new sessions; the pooled ones stay read-only.
            sql(f"ALTER DATABASE {name} SET default_transaction_read_only = off")
            back = time.monotonic()
            statuses: list[tuple[float, int]] = []
            while time.monotonic() - back < RECOVERY_WITHIN:
                n += 1
                statuses.append((time.monotonic(), check(n)))
                if statuses[-1][1] == 200:
                    break
            assert statuses[-1][1] == 200, f"no 200 within {RECOVERY_WITHIN:g} s: {statuses[-5:]}"
            after: Counter[int] = Counter()
            recovered = time.monotonic()
            while time.monotonic() - recovered < AFTER_SECONDS:
                n += 1
                after[check(n)] += 1
    finally:
        sql(f"ALTER DATABASE {name} SET default_transaction_read_only = off")
        engine.dispose()
    assert set(after) == {200}, f"after recovery: {dict(after)} (first 200 came first)"

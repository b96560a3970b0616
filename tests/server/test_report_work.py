"""An install report to a version with an active rollout costs the same whatever the
size of the `checks` and `reports` tables (on 692479c each report scanned `checks`
under the write lock: reports fell from 768/s to 5-12/s on a large table)."""

from __future__ import annotations

import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, column, event, func, insert, select, table, text

from rampart.server import admin, audit, db
from rampart.server.rollout import in_rollout
from rampart.server.store import Check, Report, Store
from rampart.testbed import services
from tests.server.conftest import OS, machine_id, upgrade_to
from tests.server.signing import proof

VERSION = "1.0.1"
HISTORY = 40_000  # checks added between the two measurements


def _rollout(
    url: str, published: Path, min_reports: int = 1000, **limits: Any
) -> tuple[Engine, Store, list[str]]:
    """A migrated database, a 50 % rollout of 1.0.1 (halting after `min_reports` and
    `limits`), 40 machines known before it and offered it; the machines in the rollout."""
    engine = db.make_engine(url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    machines = [machine_id(n) for n in range(40)]
    now = time.time()
    store.record_checks(
        [
            Check(m, OS, "1.0.0", "stable", "1.0.0", now - 10, None, proof(store, m))
            for m in machines
        ]
    )
    admin.start_rollout(
        store,
        published,
        OS,
        "stable",
        VERSION,
        50,
        min_reports=min_reports,
        **limits,
        by=audit.cli_actor(),
    )
    inside = [m for m in machines if in_rollout(m, VERSION, 50)]
    store.record_checks(
        [
            Check(m, OS, "1.0.0", "stable", VERSION, time.time(), None, proof(store, m))
            for m in inside
        ]
    )
    return engine, store, inside


def _history(engine: Engine, n: int) -> None:
    """`n` old checks (and reports) of other machines, as a long-running fleet has."""
    rows = [
        {
            "machine_id": f"{i:032x}",
            "os": OS,
            "version": "1.0.0",
            "channel": "stable",
            "offered": VERSION if i % 2 else "1.0.0",
            "at": 1_000_000.0 + i,
            "address": "192.0.2.1",
        }
        for i in range(10_000, 10_000 + n)
    ]
    with engine.begin() as conn:
        conn.execute(insert(db.checks), rows)
        conn.execute(
            insert(db.reports),
            [
                {
                    "machine_id": r["machine_id"],
                    "os": OS,
                    "from_version": "1.0.0",
                    "to_version": VERSION,
                    "outcome": "success",
                    "error": "",
                    "at": r["at"],
                    "address": None,
                }
                for r in rows[: n // 4]
            ],
        )


class Statements:
    """The SQL statements an engine runs while recording."""

    def __init__(self, engine: Engine) -> None:
        self.seen: list[str] = []
        self.executemany = 0  # of them, those run once per row
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(
        self, _conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, many: bool
    ) -> None:
        self.seen.append(" ".join(statement.split()))
        self.executemany += many


def test_report_does_not_read_the_checks_or_reports_tables(db_url: str, published: Path) -> None:
    """On SQLite and PostgreSQL: no statement of a report reads `checks` or `reports`
    (only the report's own INSERT touches `reports`), and their number is constant."""
    engine, store, inside = _rollout(db_url, published)
    try:
        statements = Statements(engine)
        store.record_report(
            Report(
                inside[0],
                OS,
                "1.0.0",
                VERSION,
                "failure",
                "x",
                time.time(),
                None,
                proof(store, inside[0]),
            )
        )
        small = list(statements.seen)
        _history(engine, 5_000)
        statements.seen.clear()
        store.record_report(
            Report(
                inside[1],
                OS,
                "1.0.0",
                VERSION,
                "failure",
                "x",
                time.time(),
                None,
                proof(store, inside[1]),
            )
        )
        large = list(statements.seen)
    finally:
        engine.dispose()
    assert len(small) == len(large), (small, large)
    for statement in large:
        assert not re.search(r"\bchecks\b", statement), statement
        if re.search(r"\breports\b", statement):
            assert statement.startswith("INSERT INTO reports"), statement


def test_a_report_batch_takes_a_fixed_number_of_statements_whatever_its_size(
    db_url: str, published: Path
) -> None:
    """A batch of reports to a version rolled out on one channel runs the same statements,
    one report or all of the rollout's machines: the raise of the signing keys' counters,
    the INSERT, the rollouts' read, the
    tally's lock, one read of what the batch's machines were offered, when they were
    first seen and what counted for them, and the writes (SQLite: the outcomes, then the
    tally; PostgreSQL, where each statement is a round trip: both in one). The reads
    were three statements; on PostgreSQL the rows went one by one (executemany)."""
    engine, store, inside = _rollout(db_url, published)
    try:
        statements = Statements(engine)
        seen = []
        for machines in (inside[:1], inside):
            proofs = {m: proof(store, m) for m in machines}  # signed by admitted keys
            statements.seen.clear()
            store.record_reports(
                [
                    Report(m, OS, "1.0.0", VERSION, "success", "", time.time(), None, proofs[m])
                    for m in machines
                ]
            )
            seen.append([s for s in statements.seen if s.split()[0] not in ("BEGIN", "COMMIT")])
        with engine.connect() as conn:
            tally = conn.execute(select(db.rollout_tallies)).one()
            outcomes = conn.execute(select(func.count()).select_from(db.rollout_outcomes)).scalar()
            stored = conn.execute(select(func.count()).select_from(db.reports)).scalar()
    finally:
        engine.dispose()
    assert len(inside) > 10 and (tally.machines, tally.failures) == (len(inside), 0)
    assert outcomes == len(inside) and stored == len(inside) + 1
    postgresql = engine.dialect.name == "postgresql"
    writes = ["WITH"] if postgresql else ["INSERT", "UPDATE"]
    counters = "UPDATE" if postgresql else "WITH"  # the keys' counters, raised
    for batch in seen:
        kinds = [s.split()[0] for s in batch]
        assert kinds == [counters, "INSERT", "SELECT", "INSERT", "SELECT", *writes]
    if engine.dialect.name == "postgresql":  # rows as arrays, not one by one
        assert statements.executemany == 0


def _plan_rows(node: dict[str, Any], seen: dict[str, int]) -> None:
    """Add up, per table, the rows each scan of a PostgreSQL plan (EXPLAIN ANALYZE,
    JSON) read: those it returned and those its filters removed, over all its loops."""
    table = node.get("Relation Name")
    if table is not None:
        removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Join Filter", 0)
        seen[table] = seen.get(table, 0) + (node["Actual Rows"] + removed) * node["Actual Loops"]
    for child in node.get("Plans", []):
        _plan_rows(child, seen)


def test_report_batch_on_a_new_postgresql_table_reads_only_its_machines(
    db_url: str, published: Path
) -> None:
    """Counting a batch reads the rows of the batch's machines only, found by their whole
    key, before the database has any statistics of the tables (a new rollout). On
    PostgreSQL the planner took `machine_id IN (...)` as a filter over every offer and
    outcome of the rollout: a batch of 16 read all 18,000 offers (55 ms)."""
    engine, store, inside = _rollout(db_url, published)
    try:
        with engine.begin() as conn:  # more offers of the rollout, of other machines
            conn.execute(
                insert(db.offers),
                [
                    {
                        "os": OS,
                        "channel": "stable",
                        "version": VERSION,
                        "machine_id": f"{i:032x}",
                        "at": 1.0,
                    }
                    for i in range(10_000, 13_000)
                ],
            )
        mids = inside[:8]
        params = {"os": OS, "channel": "stable", "version": VERSION, "mids": mids}
        postgresql = engine.dialect.name == "postgresql"
        prefix = "EXPLAIN (ANALYZE, FORMAT JSON) " if postgresql else "EXPLAIN QUERY PLAN "
        explain = text(prefix + store._countable.text)
        if "IN :mids" in store._countable.text:
            explain = explain.bindparams(bindparam("mids", expanding=True))
        with engine.connect() as conn:
            if postgresql:
                plan = conn.execute(explain, params).scalar_one()
                seen: dict[str, int] = {}
                _plan_rows(plan[0]["Plan"], seen)
                assert seen == {"offers": 8, "machines": 8, "rollout_outcomes": 0}, seen
            else:
                steps = [row[3] for row in conn.execute(explain, params)]
                for table in ("o", "m", "r"):
                    assert any(s.startswith(f"SEARCH {table} USING") for s in steps), steps
                assert not any(s.startswith("SCAN") for s in steps), steps
    finally:
        engine.dispose()


def test_a_batch_of_reports_counts_in_its_order_as_one_by_one(db_url: str, published: Path) -> None:
    """One transaction for a batch: a machine reporting twice counts once (its latest
    outcome), a machine-id first seen during the rollout does not count, and the report
    that halts the rollout is the last one counted for it."""
    engine, store, inside = _rollout(
        db_url, published, min_reports=4, failure_threshold=0.5, min_failing=2
    )
    minted = machine_id(999)
    store.record_checks(
        [Check(minted, OS, "1.0.0", "stable", VERSION, time.time(), None, proof(store, minted))]
    )
    at = time.time() + 1

    def report(mid: str, outcome: str) -> Report:
        return Report(mid, OS, "1.0.0", VERSION, outcome, "", at, None, proof(store, mid))

    batch = [
        report(inside[0], "failure"),
        report(inside[0], "success"),
        report(minted, "failure"),
        report(inside[1], "failure"),
        report(inside[2], "failure"),
        report(inside[3], "failure"),  # 3 of 4 machines failed: halts
        report(inside[4], "success"),  # after the halt: not counted
    ]
    try:
        halted = store.record_reports(batch)
        with engine.connect() as conn:
            outcomes = dict(
                conn.execute(
                    select(db.rollout_outcomes.c.machine_id, db.rollout_outcomes.c.outcome)
                ).all()
            )
            tally = conn.execute(select(db.rollout_tallies)).one()
            stored = conn.execute(select(func.count()).select_from(db.reports)).scalar()
        state = store.channel_row(OS, "stable")["rollout_state"]
    finally:
        engine.dispose()
    assert halted == ["stable"]
    assert state == "halted"
    assert outcomes == {
        inside[0]: "success",
        inside[1]: "failure",
        inside[2]: "failure",
        inside[3]: "failure",
    }
    assert (tally.machines, tally.failures) == (4, 3)
    assert stored == len(batch)


def test_report_work_does_not_grow_with_the_checks_table(tmp_path: Path, published: Path) -> None:
    """SQLite's own count of the virtual-machine instructions one report executes, before
    and after 40,000 more checks (and 10,000 reports) are stored: about the same."""
    engine, store, inside = _rollout(f"sqlite:///{tmp_path / 'work.sqlite'}", published)
    steps = [0]

    def install(dbapi_connection: Any, _record: Any) -> None:
        def tick() -> int:
            steps[0] += 1
            return 0

        dbapi_connection.set_progress_handler(tick, 100)  # every 100 instructions

    engine.dispose()  # new connections get the handler
    event.listen(engine, "connect", install)

    def work(mid: str) -> int:
        steps[0] = 0
        store.record_report(
            Report(mid, OS, "1.0.0", VERSION, "failure", "x", time.time(), None, proof(store, mid))
        )
        return steps[0] * 100

    try:
        work(inside[0])  # warm: schema read, statement cache
        small = work(inside[1])
        _history(engine, HISTORY)
        large = work(inside[2])
    finally:
        engine.dispose()
    assert large < 2 * small + 2_000, (
        f"one report: {small} SQLite instructions with the small table, {large} with "
        f"{HISTORY} more checks"
    )


def test_upgrade_keeps_the_evidence_of_a_rollout_in_progress(db_url: str) -> None:
    """A database of revision 0001 with a rollout in progress: after the upgrade, the
    offers, each machine's latest report after its offer, and the totals are there."""
    engine = db.make_engine(db_url)
    upgrade_to(engine, "0001")
    a, b, c = (machine_id(n) for n in (1, 2, 3))
    check = {"os": OS, "version": "1.0.0", "channel": "stable", "address": None}
    report = {"os": OS, "from_version": "1.0.0", "to_version": VERSION, "error": ""}
    # The tables as revision 0001 made them (the columns of today's are more).
    checks = table("checks", *map(column, ("machine_id", *check, "offered", "at")))
    reports = table("reports", *map(column, ("machine_id", *report, "outcome", "at")))
    with engine.begin() as conn:
        conn.execute(
            insert(checks),
            [
                dict(check, machine_id=a, offered=VERSION, at=10.0),
                dict(check, machine_id=a, offered=VERSION, at=30.0),
                dict(check, machine_id=b, offered=VERSION, at=10.0),
                dict(check, machine_id=c, offered="1.0.0", at=10.0),  # not offered
            ],
        )
        conn.execute(
            insert(reports),
            [
                dict(report, machine_id=a, outcome="failure", at=20.0),
                dict(report, machine_id=a, outcome="success", at=40.0),  # its latest
                dict(report, machine_id=b, outcome="failure", at=5.0),  # before its offer
                dict(report, machine_id=c, outcome="failure", at=20.0),  # never offered
            ],
        )
    try:
        db.migrate(engine)
        with engine.connect() as conn:
            offers = conn.execute(db.offers.select()).all()
            outcomes = conn.execute(db.rollout_outcomes.select()).all()
            tallies = conn.execute(db.rollout_tallies.select()).all()
    finally:
        engine.dispose()
    assert sorted((o.machine_id, o.at) for o in offers) == [(a, 10.0), (b, 10.0)]
    assert [(o.machine_id, o.outcome) for o in outcomes] == [(a, "success")]
    assert [(t.channel, t.version, t.machines, t.failures) for t in tallies] == [
        ("stable", VERSION, 1, 0)
    ]


def test_checks_older_than_the_retention_are_pruned(db_url: str, published: Path) -> None:
    """At start (and then every hour) each worker deletes the checks older than
    --check-retention-days, in chunks; newer checks, machines and offers stay."""
    from fastapi.testclient import TestClient

    from rampart.server.app import Settings, create_app

    engine, store, inside = _rollout(db_url, published)
    _history(engine, 2_500)  # at 1970 + 11 days: older than any retention
    deleted = store.prune_checks(before=1_011_000.0, chunk=300)  # the first 1,000, in chunks
    assert deleted == 1_000
    with engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(db.checks)).scalar()
    assert left == 40 + len(inside) + 1_500
    app = create_app(store, Settings(published, check_retention_days=90))
    with TestClient(app):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                left = conn.execute(select(func.count()).select_from(db.checks)).scalar()
            if left == 40 + len(inside):
                break
            time.sleep(0.1)
    with engine.connect() as conn:
        machines = conn.execute(select(func.count()).select_from(db.machines)).scalar()
        offers = conn.execute(select(func.count()).select_from(db.offers)).scalar()
    engine.dispose()
    assert left == 40 + len(inside)  # the recent checks of the rollout's machines
    assert (machines, offers) == (40, len(inside))


def test_concurrent_halting_reports_halt_a_rollout_once(
    postgres: services.Cluster, published: Path
) -> None:
    """Two instances (two engines) each record a batch that crosses the threshold,
    both having listed the rollout as active before either locked its tally: the
    second to lock finds it halted, so the rollout halts once (one audit entry, one
    halted answer). Before the fix both halted it, and the trail said so twice."""
    name = "t_" + secrets.token_hex(6)
    postgres.create_database(name)
    url = postgres.url_for(name)
    engine, store, inside = _rollout(url, published, min_reports=2, failure_threshold=0.5)
    other = Store(db.make_engine(url))
    at = time.time() + 1

    def failures(mids: list[str]) -> list[Report]:
        return [
            Report(m, OS, "1.0.0", VERSION, "failure", "", at, None, proof(store, m)) for m in mids
        ]

    key = {"os": OS, "channel": "stable", "version": VERSION}
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def record(name: str, on: Store, batch: list[Report]) -> None:
        try:
            results[name] = on.record_reports(batch)
        except BaseException as exc:
            errors.append(exc)

    try:
        with engine.connect() as blocker:
            holding = blocker.begin()
            blocker.execute(
                text(
                    "INSERT INTO rollout_tallies (os, channel, version, machines, failures) "
                    "VALUES (:os, :channel, :version, 0, 0) ON CONFLICT (os, channel, version) "
                    "DO UPDATE SET machines = rollout_tallies.machines"
                ),
                key,
            )
            threads = [
                threading.Thread(target=record, args=("first", store, failures(inside[0:5]))),
                threading.Thread(target=record, args=("second", other, failures(inside[5:10]))),
            ]
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = :db AND wait_event_type = 'Lock'"
            )
            # Each look in its own transaction: PostgreSQL keeps one snapshot of
            # pg_stat_activity for a whole transaction, and a look taken before both
            # batches waited would then never change.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
                assert watch.execute(waiting, {"db": name}).scalar_one() == 0
                for thread in threads:
                    thread.start()
                deadline = time.monotonic() + 60
                while watch.execute(waiting, {"db": name}).scalar_one() < 2:
                    assert not errors and all(t.is_alive() for t in threads), (errors, results)
                    assert time.monotonic() < deadline, "the two batches never met the lock"
                    time.sleep(0.05)
            holding.rollback()
            for thread in threads:
                thread.join(60)
        assert not errors, errors
        halts = [e for e in audit.entries(store.engine) if e["action"] == "rollout.halt"]
        intact = audit.verify(store.engine)
        state = store.channel_row(OS, "stable")["rollout_state"]
    finally:
        engine.dispose()
        other.engine.dispose()
        postgres.drop_database(name)
    assert sorted(map(len, results.values())) == [0, 1], results
    assert state == "halted" and len(halts) == 1
    assert not intact.problems, intact.problems

"""Fleet state in the database: channels, machines, checks, reports, tokens.

Synchronous (SQLAlchemy Core); the web app calls it from worker threads. Every
administrative change bumps a generation counter, which the app polls to drop
its caches, so a change is visible to every worker within a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from rampart.contracts import identity
from rampart.errors import ConflictError, UsageError
from rampart.server import audit, db, roles
from rampart.server.audit import Actor
from rampart.server.rollout import DEFAULT_MIN_FAILING, ChannelState, RolloutState, should_halt

GENERATION = "generation"
DEFAULT_CHECK_RETENTION_DAYS = 90.0


# The states of a machine's key (rampart.server.devices).
PENDING, ADMITTED, REJECTED, REPLACED = "pending", "admitted", "rejected", "replaced"
FIRST_USE, OPERATOR_ADMISSION = "first-use", "operator"
_ADMISSION, _NONCE_KEY = "admission", "nonce_key"
MAX_PENDING = 4  # keys a machine may present before an operator decides


@dataclass(frozen=True)
class KeyState:
    """A key's state, and (admitted) the last request counter accepted from it."""

    state: str
    counter: int


@dataclass(frozen=True)
class Proof:
    """An authenticated request (rampart.server.devices): the machine, its admitted key,
    the request counter, and what its TPM quoted (`attested`: with a fresh nonce)."""

    machine_id: str
    key_id: str
    counter: int
    pcr7: str | None
    epoch: int | None
    attested: bool


@dataclass(frozen=True)
class Check:
    machine_id: str
    os: str
    version: str
    channel: str
    offered: str | None
    at: float
    address: str | None
    proof: Proof | None = None


@dataclass(frozen=True)
class Report:
    machine_id: str
    os: str
    from_version: str | None
    to_version: str | None
    outcome: str
    error: str
    at: float
    address: str | None
    proof: Proof | None = None


def _channel(row: Any) -> ChannelState:
    return ChannelState(
        os=row.os,
        name=row.name,
        version=row.version,
        rollout_version=row.rollout_version,
        rollout_percent=row.rollout_percent,
        rollout_state=RolloutState(row.rollout_state),
        default=bool(row.is_default),
        require_attestation=bool(row.require_attestation),
    )


# The statements of a report (text: built once, nothing to compile per report).
_SQL_REPORT = text(
    "INSERT INTO reports (machine_id, os, from_version, to_version, outcome, error, at, address, "
    "authenticated) VALUES (:machine_id, :os, :from_version, :to_version, :outcome, :error, :at, "
    ":address, :authenticated)"
)
# PostgreSQL: the batch in one statement, as arrays (psycopg's executemany sends and
# reads each row on its own, in pipeline mode: most of a batch's CPU time in the server).
_REPORT_COLUMNS = ("machine_id", "os", "from_version", "to_version", "outcome", "error", "at")
_SQL_REPORT_PG = text(
    "INSERT INTO reports (machine_id, os, from_version, to_version, outcome, error, at, address, "
    "authenticated) "
    "SELECT * FROM unnest(CAST(:machine_id AS text[]), CAST(:os AS text[]), "
    "CAST(:from_version AS text[]), CAST(:to_version AS text[]), CAST(:outcome AS text[]), "
    "CAST(:error AS text[]), CAST(:at AS double precision[]), CAST(:address AS text[]), "
    "CAST(:authenticated AS boolean[]))"
)
# The checks of a batch, and their machines' rows, as arrays: one statement each,
# whatever the batch's size (an executemany cost the worker more than the statement).
_SQL_CHECKS_PG = text(
    "INSERT INTO checks (machine_id, os, version, channel, offered, at, address, authenticated) "
    "SELECT * FROM unnest(CAST(:machine_id AS text[]), CAST(:os AS text[]), "
    "CAST(:version AS text[]), CAST(:channel AS text[]), CAST(:offered AS text[]), "
    "CAST(:at AS double precision[]), CAST(:address AS text[]), "
    "CAST(:authenticated AS boolean[]))"
)
_SQL_MACHINES_PG = (
    "INSERT INTO machines (machine_id, os, version, first_seen, last_seen, address, "
    "authenticated) "
    "SELECT * FROM unnest(CAST(:machine_id AS text[]), CAST(:os AS text[]), "
    "CAST(:version AS text[]), CAST(:first_seen AS double precision[]), "
    "CAST(:last_seen AS double precision[]), CAST(:address AS text[]), "
    "CAST(:authenticated AS boolean[])) "
    "ON CONFLICT (machine_id) DO UPDATE SET os = excluded.os, version = excluded.version, "
    "first_seen = COALESCE(machines.first_seen, excluded.first_seen), "
    "last_seen = excluded.last_seen, address = excluded.address"
)
_SQL_MACHINES_PROVEN_PG = text(_SQL_MACHINES_PG + ", authenticated = excluded.authenticated")
_SQL_MACHINES_ANONYMOUS_PG = text(_SQL_MACHINES_PG + " WHERE machines.authenticated = false")
_SQL_ROLLOUTS = text(
    "SELECT name, failure_threshold, min_reports, min_failing, rollout_started_at "
    "FROM channels WHERE os = :os AND rollout_version = :version AND rollout_state = 'active' "
    "ORDER BY name"
)
_SQL_TALLY_LOCK = text(
    "INSERT INTO rollout_tallies (os, channel, version, machines, failures) "
    "VALUES (:os, :channel, :version, 0, 0) ON CONFLICT (os, channel, version) "
    "DO UPDATE SET machines = rollout_tallies.machines RETURNING machines, failures"
)
_SQL_OUTCOME_SET = text(
    "INSERT INTO rollout_outcomes (os, channel, version, machine_id, outcome, at) "
    "VALUES (:os, :channel, :version, :mid, :outcome, :at) "
    "ON CONFLICT (os, channel, version, machine_id) "
    "DO UPDATE SET outcome = excluded.outcome, at = excluded.at"
)
# Raising the counters of the admitted keys that signed a batch, one statement: only
# a counter above the stored one is taken; the keys raised come back.
_SQL_COUNTERS_PG = text(
    "UPDATE machine_keys AS k SET counter = u.counter, last_auth = u.at, "
    "epoch = COALESCE(u.epoch, k.epoch), "
    "attested_at = CASE WHEN u.attested THEN u.at ELSE k.attested_at END, "
    "pcr7 = CASE WHEN u.attested THEN u.pcr7 ELSE k.pcr7 END "
    "FROM unnest(CAST(:mid AS text[]), CAST(:kid AS text[]), CAST(:counter AS bigint[]), "
    "CAST(:at AS double precision[]), CAST(:epoch AS bigint[]), CAST(:attested AS boolean[]), "
    "CAST(:pcr7 AS text[])) AS u(mid, kid, counter, at, epoch, attested, pcr7) "
    "WHERE k.machine_id = u.mid AND k.key_id = u.kid AND k.state = 'admitted' "
    "AND k.counter < u.counter RETURNING k.machine_id, k.key_id"
)
# SQLite: the rows as one JSON array of arrays, one statement whatever the batch's size
# (a VALUES list of placeholders made a new statement for each size: parsed on each
# call, and kept in the compiled cache, it made much of what a full collection walked).
# `+state` keeps SQLite from reading every admitted key through ix_machine_keys_state
# for each row of the batch (it cannot know how few rows json_each gives): each row
# finds its key by the primary key.
_SQL_COUNTERS_SQLITE = text(
    "WITH u(mid, kid, counter, at, epoch, attested, pcr7) AS (SELECT value ->> 0, "
    "value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6 "
    "FROM json_each(:rows)) "
    "UPDATE machine_keys SET counter = u.counter, last_auth = u.at, "
    "epoch = COALESCE(u.epoch, machine_keys.epoch), "
    "attested_at = CASE WHEN u.attested THEN u.at ELSE machine_keys.attested_at END, "
    "pcr7 = CASE WHEN u.attested THEN u.pcr7 ELSE machine_keys.pcr7 END FROM u "
    "WHERE machine_keys.machine_id = u.mid AND machine_keys.key_id = u.kid "
    "AND +machine_keys.state = 'admitted' AND machine_keys.counter < u.counter "
    "RETURNING machine_id, key_id"
)
_CHUNK = 500  # machine-ids per IN (...) list
# What counting a batch for a rollout needs of each of its machines, in one round trip:
# when the channel offered it the version, when it was first seen, and the outcome
# already counted for it (NULL: none). A machine never offered, or unknown, has no row.
# Each row is found by its whole primary key. SQLite does that for `machine_id IN
# (...)`. PostgreSQL, on tables it has no statistics of yet (a rollout's first minutes,
# before autovacuum analyzes them), took the key's first three columns for the index
# scan and `machine_id` as a filter: every batch read all the rollout's offers and
# outcomes (a batch of 16 took 55 ms with 18,000 offers, and more as the rollout
# grew). There, each machine-id of the batch drives a lookup of its own (LATERAL;
# LIMIT 1 keeps the planner from flattening it back into a join it may reorder).
_SQL_COUNTABLE = text(
    "SELECT o.machine_id, o.at, m.first_seen, r.outcome FROM offers o "
    "JOIN machines m ON m.machine_id = o.machine_id "
    "LEFT JOIN rollout_outcomes r ON r.os = o.os AND r.channel = o.channel "
    "AND r.version = o.version AND r.machine_id = o.machine_id "
    "WHERE o.os = :os AND o.channel = :channel AND o.version = :version "
    "AND o.machine_id IN :mids"
).bindparams(bindparam("mids", expanding=True))
_SQL_COUNTABLE_PG = text(
    "SELECT b.mid, o.at, m.first_seen, r.outcome "
    "FROM unnest(CAST(:mids AS text[])) AS b(mid) "
    "CROSS JOIN LATERAL (SELECT at FROM offers WHERE os = :os AND channel = :channel "
    "AND version = :version AND machine_id = b.mid LIMIT 1) AS o "
    "CROSS JOIN LATERAL (SELECT first_seen FROM machines WHERE machine_id = b.mid LIMIT 1) AS m "
    "LEFT JOIN LATERAL (SELECT outcome FROM rollout_outcomes WHERE os = :os "
    "AND channel = :channel AND version = :version AND machine_id = b.mid LIMIT 1) AS r ON true"
)
_SQL_TALLY_SET = text(
    "UPDATE rollout_tallies SET machines = :machines, failures = :failures "
    "WHERE os = :os AND channel = :channel AND version = :version"
)
# PostgreSQL: the outcomes and the tally in one statement (one round trip).
_SQL_COUNTS_PG = text(
    "WITH o AS (INSERT INTO rollout_outcomes (os, channel, version, machine_id, outcome, at) "
    "SELECT :os, :channel, :version, u.mid, u.outcome, u.at FROM unnest(CAST(:mids AS text[]), "
    "CAST(:outcomes AS text[]), CAST(:ats AS double precision[])) AS u(mid, outcome, at) "
    "ON CONFLICT (os, channel, version, machine_id) "
    "DO UPDATE SET outcome = excluded.outcome, at = excluded.at) "
    "UPDATE rollout_tallies SET machines = :machines, failures = :failures "
    "WHERE os = :os AND channel = :channel AND version = :version"
)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """All database access of the server."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # SQLite has one writer at a time: the threads of a worker queue here, handed
        # the lock at once, instead of sleeping in SQLite's busy handler (its back-off
        # of up to 100 ms per try cut a report storm to tens per second).
        self._writer: AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        self._postgresql = engine.dialect.name == "postgresql"
        self._countable = _SQL_COUNTABLE_PG if self._postgresql else _SQL_COUNTABLE
        # The recorder's statements, built once per store, not once per batch. PostgreSQL's
        # take a batch as arrays (_columns), SQLite's as a list of rows.
        self._check_insert: Any = _SQL_CHECKS_PG if self._postgresql else insert(db.checks)
        self._upserts: dict[bool, Any] = (
            {True: _SQL_MACHINES_PROVEN_PG, False: _SQL_MACHINES_ANONYMOUS_PG}
            if self._postgresql
            else {proven: self._machine_upsert(proven) for proven in (True, False)}
        )
        self._offer_insert = self._insert(db.offers).on_conflict_do_nothing()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """A write transaction of the hot path (checks, reports, pruning)."""
        with self._writer, self.engine.begin() as conn:
            yield conn

    def _insert(self, table: Any) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    # --- reads for the hot path ------------------------------------------------------

    def generation(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(db.server_state.c.value).where(db.server_state.c.key == GENERATION)
            ).scalar()
        return int(value or 0)

    def channels(self) -> list[ChannelState]:
        with self.engine.connect() as conn:
            return [_channel(r) for r in conn.execute(select(db.channels)).all()]

    def assignment(self, machine_id: str) -> tuple[bool, str | None]:
        """(whether the machine is known, the channel it was assigned to)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(db.machines.c.channel).where(db.machines.c.machine_id == machine_id)
            ).first()
        if row is None:
            return False, None
        return True, None if row.channel is None else str(row.channel)

    # --- writes from clients -----------------------------------------------------------

    def record_checks(self, batch: Sequence[Check]) -> set[int]:
        """Insert the checks, update each machine's last-seen state and note the first
        offer of each update to each machine, in one transaction. Returns the positions
        of the checks refused: signed with a counter already used (a replay)."""
        if not batch:
            return set()
        with self._writing() as conn:
            refused = self._accept_proofs(conn, batch)
            kept = [c for i, c in enumerate(batch) if i not in refused]
            if kept:
                self._record_checks(conn, kept)
        return refused

    def _accept_proofs(self, conn: Any, batch: Sequence[Check | Report]) -> set[int]:
        """Raise each admitted key's counter to its request's, and note what the machine
        proved; the positions of the requests whose counter was not above the last one
        accepted (another worker or instance took it first: a replay). One statement for
        the batch (a key's second request in the batch, rare, one more each)."""
        first: dict[tuple[str, str], tuple[int, Check | Report]] = {}
        later: list[tuple[int, Check | Report]] = []
        for i, row in enumerate(batch):
            if row.proof is None:
                continue
            key = (row.proof.machine_id, row.proof.key_id)
            if key in first:
                later.append((i, row))
            else:
                first[key] = (i, row)
        refused: set[int] = set()
        if first:
            accepted = self._raise_counters(conn, [row for _, row in first.values()])
            refused = {i for key, (i, _) in first.items() if key not in accepted}
        for i, row in later:
            if not self._raise_counters(conn, [row]):
                refused.add(i)
        return refused

    def _raise_counters(self, conn: Any, rows: Sequence[Check | Report]) -> set[tuple[str, str]]:
        """One UPDATE of the rows' keys (each at most once); the keys it raised."""
        proofs = [(row.proof, row.at) for row in rows if row.proof is not None]
        columns: dict[str, list[Any]] = {
            "mid": [p.machine_id for p, _ in proofs],
            "kid": [p.key_id for p, _ in proofs],
            "counter": [p.counter for p, _ in proofs],
            "at": [at for _, at in proofs],
            "epoch": [p.epoch for p, _ in proofs],
            "attested": [p.attested for p, _ in proofs],
            "pcr7": [p.pcr7 for p, _ in proofs],
        }
        if self._postgresql:
            found = conn.execute(_SQL_COUNTERS_PG, columns).all()
        else:
            rows_json = json.dumps([list(row) for row in zip(*columns.values(), strict=True)])
            found = conn.execute(_SQL_COUNTERS_SQLITE, {"rows": rows_json}).all()
        return {(str(r[0]), str(r[1])) for r in found}

    def _record_checks(self, conn: Any, batch: Sequence[Check]) -> None:
        """Every check is stored; the machine rows and the offers follow the checks a
        machine's admitted key signed. An anonymous check creates a machine's row and
        updates it only while no authenticated check did: a machine-id someone else
        knows cannot change what its machine proved."""
        latest: dict[str, Check] = {}
        anonymous: dict[str, Check] = {}
        offered: dict[tuple[str, str, str, str], float] = {}
        for check in batch:
            if check.proof is None:
                anonymous[check.machine_id] = check
                continue
            latest[check.machine_id] = check
            if check.offered is not None and check.offered != check.version:
                key = (check.os, check.channel, check.offered, check.machine_id)
                offered.setdefault(key, check.at)
        conn.execute(self._check_insert, self._batch([_check_row(c) for c in batch]))
        for rows, proven in ((latest, True), (anonymous, False)):
            if rows:
                conn.execute(self._upserts[proven], self._batch(_machine_rows(rows, proven)))
        if offered:
            conn.execute(
                self._offer_insert,
                [
                    {"os": k[0], "channel": k[1], "version": k[2], "machine_id": k[3], "at": t}
                    for k, t in sorted(offered.items())
                ],
            )

    def _batch(self, rows: list[dict[str, Any]]) -> Any:
        """The parameters of one of the recorder's statements for `rows`."""
        return _columns(rows) if self._postgresql else rows

    def _machine_upsert(self, proven: bool) -> Any:
        stmt = self._insert(db.machines)
        machines = db.machines.c
        values = {
            "os": stmt.excluded.os,
            "version": stmt.excluded.version,
            # a machine assigned before its first check has none yet
            "first_seen": func.coalesce(machines.first_seen, stmt.excluded.first_seen),
            "last_seen": stmt.excluded.last_seen,
            "address": stmt.excluded.address,
        }
        if proven:
            values["authenticated"] = stmt.excluded.authenticated
            return stmt.on_conflict_do_update(index_elements=[machines.machine_id], set_=values)
        return stmt.on_conflict_do_update(
            index_elements=[machines.machine_id],
            set_=values,
            where=machines.authenticated.is_(False),
        )

    def record_report(self, report: Report) -> str | None:
        """Store one report (record_reports); the channel it halted, if any."""
        halted = self.record_reports([report])
        return halted[0] if halted else None

    def record_reports(self, batch: Sequence[Report], refused: set[int] | None = None) -> list[str]:
        """Store install reports, in one transaction; halt the rollouts they belong to if
        they fail too often.

        A report counts for an active rollout of its `to` version on a channel only if
        its machine was first seen before the rollout started and that channel offered
        it the version before the report (reports are not authenticated: a machine-id
        minted during the rollout, or never offered it, is no evidence). The machine's
        latest counted outcome and the rollout's totals are kept up to date here. The
        work is set-based: one INSERT for the batch, then for each rollout the batch
        touches a few statements that read and write rows by primary key, whatever the
        number of reports in the batch or of checks and reports stored (SQLite: six
        statements for a batch of one rollout; PostgreSQL, where each statement is a
        round trip: five, rows passed as arrays). Signed reports whose counter was taken
        are not stored; their positions go into `refused`. Reports count in
        the batch's order; once one halts a rollout, the later ones no longer count for
        it (as if each were written alone). Returns the channels whose rollout halted.
        """
        if not batch:
            return []
        halted: list[str] = []
        with self._writing() as conn:
            replayed = self._accept_proofs(conn, batch)
            if refused is not None:
                refused.update(replayed)
            batch = [r for i, r in enumerate(batch) if i not in replayed]
            if not batch:
                return []
            if self._postgresql:
                columns = {c: [getattr(r, c) for r in batch] for c in _REPORT_COLUMNS}
                conn.execute(
                    _SQL_REPORT_PG,
                    dict(
                        columns,
                        address=[r.address for r in batch],
                        authenticated=[r.proof is not None for r in batch],
                    ),
                )
            else:
                conn.execute(_SQL_REPORT, [_report_row(r) for r in batch])
            targets: dict[tuple[str, str], list[Report]] = {}
            for report in batch:
                # Only what a machine's admitted key signed is evidence for a rollout.
                if report.to_version is not None and report.proof is not None:
                    targets.setdefault((report.os, report.to_version), []).append(report)
            for (os_name, version), reports in sorted(targets.items()):
                rollouts = conn.execute(_SQL_ROLLOUTS, {"os": os_name, "version": version})
                rows = rollouts.all()
                for row in rows:  # in name order: concurrent writers lock tallies alike
                    if self._count_rollout(conn, os_name, version, row, reports):
                        halted.append(str(row.name))
        return halted

    def _count_rollout(
        self,
        conn: Any,
        os_name: str,
        version: str,
        row: Any,
        reports: Sequence[Report],
    ) -> bool:
        """Count `reports` for the rollout `row` of `version`; whether they halted it."""
        started = row.rollout_started_at
        key = {"os": os_name, "channel": row.name, "version": version}
        # The upsert creates or locks the rollout's tally row: concurrent batches of one
        # rollout (PostgreSQL) take turns from here, so a machine is counted once.
        tally = conn.execute(_SQL_TALLY_LOCK, key).one()
        machines, failures = int(tally.machines), int(tally.failures)
        mids = sorted({r.machine_id for r in reports})
        offered: dict[str, float] = {}
        first_seen: dict[str, float | None] = {}
        outcomes: dict[str, str | None] = {}
        for i in range(0, len(mids), _CHUNK):
            chunk = dict(key, mids=mids[i : i + _CHUNK])
            for mid, at, seen, outcome in conn.execute(self._countable, chunk).all():
                offered[mid], first_seen[mid], outcomes[mid] = at, seen, outcome
        changed: dict[str, dict[str, Any]] = {}
        halts = False
        for report in reports:
            seen = first_seen.get(report.machine_id)
            if seen is None or (started is not None and seen >= started):
                continue  # a machine-id first seen during the rollout
            at = offered.get(report.machine_id)
            if at is None or at > report.at:
                continue  # never offered this version before this report
            previous = outcomes.get(report.machine_id)
            machines += previous is None
            failures += (report.outcome == "failure") - (previous == "failure")
            outcomes[report.machine_id] = report.outcome
            changed[report.machine_id] = dict(
                key, mid=report.machine_id, outcome=report.outcome, at=report.at
            )
            if should_halt(
                machines, failures, row.failure_threshold, row.min_reports, row.min_failing
            ):
                halts = True
                break
        tally_set = dict(key, machines=machines, failures=failures)
        if changed and self._postgresql:
            outcomes_set = {
                "mids": list(changed),
                "outcomes": [c["outcome"] for c in changed.values()],
                "ats": [c["at"] for c in changed.values()],
            }
            conn.execute(_SQL_COUNTS_PG, dict(tally_set, **outcomes_set))
        elif changed:
            conn.execute(_SQL_OUTCOME_SET, list(changed.values()))
            conn.execute(_SQL_TALLY_SET, tally_set)
        if halts:
            done = conn.execute(
                update(db.channels)
                .where(
                    and_(
                        db.channels.c.os == os_name,
                        db.channels.c.name == row.name,
                        db.channels.c.rollout_state == RolloutState.ACTIVE.value,
                    )
                )
                .values(rollout_state=RolloutState.HALTED.value, updated_at=time.time())
            )
            if done.rowcount != 1:
                # No longer active: a concurrent batch (another instance), which listed
                # the rollout when this one did and held the tally first, halted it, or
                # an operator changed it. Its reports still count in the tally.
                return False
            self._bump(conn)
            audit.record(
                conn,
                audit.SERVER,
                "rollout.halt",
                f"{os_name}/{row.name}",
                {"rollout_state": RolloutState.ACTIVE.value},
                {
                    "rollout_state": RolloutState.HALTED.value,
                    "rollout_version": version,
                    "machines": machines,
                    "failures": failures,
                },
            )
        return halts

    def prune_checks(self, before: float, chunk: int = 10_000) -> int:
        """Delete the checks recorded before `before` (UNIX time), `chunk` rows per
        transaction so that no write waits long behind it; the number deleted."""
        deleted = 0
        while True:
            with self._writing() as conn:
                old = select(db.checks.c.id).where(db.checks.c.at < before).limit(chunk)
                doomed = delete(db.checks).where(db.checks.c.id.in_(old.scalar_subquery()))
                n = int(conn.execute(doomed).rowcount)
            deleted += n
            if n < chunk:
                return deleted

    def probe_write(self) -> None:
        """A write that changes nothing: raises if the database cannot be written."""
        with self._writing() as conn:
            conn.execute(
                update(db.server_state)
                .where(db.server_state.c.key == GENERATION)
                .values(value=db.server_state.c.value)
            )

    # --- administration ----------------------------------------------------------------

    def _bump(self, conn: Any) -> None:
        stmt = self._insert(db.server_state).values(key=GENERATION, value=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=[db.server_state.c.key],
            set_={"value": db.server_state.c.value + 1},
        )
        conn.execute(stmt)

    def _get_channel(self, conn: Any, os_name: str, name: str, lock: bool = False) -> Any:
        query = select(db.channels).where(
            and_(db.channels.c.os == os_name, db.channels.c.name == name)
        )
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            raise UsageError(f"unknown channel {name!r} for {os_name}")
        return row

    def create_channel(
        self, os_name: str, name: str, version: str | None, default: bool = False, *, by: Actor
    ) -> ChannelState:
        with self.engine.begin() as conn:
            exists = conn.execute(
                select(db.channels.c.name).where(
                    and_(db.channels.c.os == os_name, db.channels.c.name == name)
                )
            ).first()
            if exists is not None:
                raise ConflictError(f"channel {name!r} for {os_name} already exists")
            has_default = conn.execute(
                select(func.count())
                .select_from(db.channels)
                .where(and_(db.channels.c.os == os_name, db.channels.c.is_default.is_(True)))
            ).scalar()
            if default and has_default:
                conn.execute(
                    update(db.channels).where(db.channels.c.os == os_name).values(is_default=False)
                )
            conn.execute(
                insert(db.channels).values(
                    os=os_name,
                    name=name,
                    version=version,
                    is_default=default or not has_default,
                    rollout_version=None,
                    rollout_percent=0.0,
                    rollout_state="none",
                    failure_threshold=0.2,
                    min_reports=5,
                    min_failing=DEFAULT_MIN_FAILING,
                    updated_at=time.time(),
                )
            )
            self._bump(conn)
            row = self._get_channel(conn, os_name, name)
            audit.record(conn, by, "channel.create", f"{os_name}/{name}", None, _audited(row))
            return _channel(row)

    def update_channel(
        self, os_name: str, name: str, *, action: str, by: Actor, **values: Any
    ) -> ChannelState:
        """Change a channel's columns; the audit trail gets `action` by `by`, with the
        values that changed."""
        with self.engine.begin() as conn:
            before = self._get_channel(conn, os_name, name, lock=True)
            conn.execute(
                update(db.channels)
                .where(and_(db.channels.c.os == os_name, db.channels.c.name == name))
                .values(updated_at=time.time(), **values)
            )
            self._bump(conn)
            after = self._get_channel(conn, os_name, name)
            old, new = audit.changes(_audited(before), _audited(after))
            audit.record(conn, by, action, f"{os_name}/{name}", old, new)
            return _channel(after)

    def channel_row(self, os_name: str, name: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(self._get_channel(conn, os_name, name)._mapping)

    def channel_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(db.channels).order_by(db.channels.c.os, db.channels.c.name)
            ).all()
        return [dict(r._mapping) for r in rows]

    def assign(self, machine_id: str, channel: str | None, os_name: str, *, by: Actor) -> None:
        with self.engine.begin() as conn:
            if channel is not None:
                self._get_channel(conn, os_name, channel)
            known = conn.execute(
                select(db.machines.c.os, db.machines.c.channel)
                .where(db.machines.c.machine_id == machine_id)
                .with_for_update()
            ).first()
            stmt = self._insert(db.machines).values(
                machine_id=machine_id, os=os_name, channel=channel
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=[db.machines.c.machine_id], set_={"channel": channel}
            )
            conn.execute(stmt)
            self._bump(conn)
            before = None if known is None else {"os": known.os, "channel": known.channel}
            audit.record(
                conn, by, "machine.assign", machine_id, before, {"os": os_name, "channel": channel}
            )

    def machines(
        self,
        limit: int = 10_000,
        seen_before: float | None = None,
        authenticated: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Machines, most recently seen first (never seen last); only those last seen
        before `seen_before` if given, only those (not) authenticated if given."""
        query = (
            select(db.machines)
            .order_by(db.machines.c.last_seen.desc().nulls_last(), db.machines.c.machine_id)
            .limit(limit)
        )
        if seen_before is not None:
            query = query.where(db.machines.c.last_seen < seen_before)
        if authenticated is not None:
            query = query.where(db.machines.c.authenticated.is_(authenticated))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [dict(r._mapping) for r in rows]

    def count_machines(
        self, seen_before: float | None = None, authenticated: bool | None = None
    ) -> int:
        """How many machines there are (last seen before `seen_before`, (not)
        authenticated, if given)."""
        query = select(func.count()).select_from(db.machines)
        if seen_before is not None:
            query = query.where(db.machines.c.last_seen < seen_before)
        if authenticated is not None:
            query = query.where(db.machines.c.authenticated.is_(authenticated))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def machine(self, machine_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(db.machines).where(db.machines.c.machine_id == machine_id)
            ).first()
        return None if row is None else dict(row._mapping)

    def versions_per_channel(self) -> list[dict[str, Any]]:
        """(os, channel, version, machines): how many machines run what, per channel."""
        default = {c.os: c.name for c in self.channels() if c.default}
        counts: dict[tuple[str, str, str], int] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    db.machines.c.os,
                    db.machines.c.channel,
                    db.machines.c.version,
                    func.count().label("n"),
                )
                .where(
                    and_(db.machines.c.version.is_not(None), db.machines.c.authenticated.is_(True))
                )
                .group_by(db.machines.c.os, db.machines.c.channel, db.machines.c.version)
            ).all()
        for row in rows:
            channel = row.channel or default.get(row.os, "?")
            key = (row.os or "?", channel, row.version)
            counts[key] = counts.get(key, 0) + int(row.n)
        return [
            {"os": k[0], "channel": k[1], "version": k[2], "machines": n}
            for k, n in sorted(counts.items())
        ]

    def recent_reports(
        self, limit: int = 50, outcome: str | None = None, authenticated: bool | None = None
    ) -> list[dict[str, Any]]:
        query = select(db.reports).order_by(db.reports.c.id.desc()).limit(limit)
        if outcome is not None:
            query = query.where(db.reports.c.outcome == outcome)
        if authenticated is not None:
            query = query.where(db.reports.c.authenticated.is_(authenticated))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def counts(self) -> dict[str, int]:
        """The fleet's figures: checks, machines and reports by outcome that machines'
        admitted keys signed; and the anonymous ones, which count for nothing."""
        result: dict[str, int] = {}
        with self.engine.connect() as conn:
            for table, name in ((db.checks, "checks"), (db.machines, "machines")):
                rows = conn.execute(
                    select(table.c.authenticated, func.count()).group_by(table.c.authenticated)
                ).all()
                found = {bool(a): int(n) for a, n in rows}
                result[name] = found.get(True, 0)
                result[f"anonymous_{name}"] = found.get(False, 0)
            rows = conn.execute(
                select(db.reports.c.authenticated, db.reports.c.outcome, func.count()).group_by(
                    db.reports.c.authenticated, db.reports.c.outcome
                )
            ).all()
        result["anonymous_reports"] = 0
        for authenticated, outcome, n in rows:
            if authenticated:
                result[f"reports_{outcome}"] = int(n)
            else:
                result["anonymous_reports"] += int(n)
        return result

    # --- device keys (rampart.server.devices) -----------------------------------------

    def _setting(self, conn: Any, name: str) -> str | None:
        value = conn.execute(select(db.settings.c.value).where(db.settings.c.name == name)).scalar()
        return None if value is None else str(value)

    def nonce_secret(self) -> bytes:
        """The key of the server's nonces, made once and shared by every instance."""
        with self.engine.begin() as conn:
            conn.execute(
                self._insert(db.settings)
                .values(name=_NONCE_KEY, value=secrets.token_hex(32))
                .on_conflict_do_nothing()
            )
            return bytes.fromhex(self._setting(conn, _NONCE_KEY) or "")

    def first_use_admission(self) -> bool:
        with self.engine.connect() as conn:
            return self._setting(conn, _ADMISSION) == FIRST_USE

    def set_admission(self, mode: str, *, by: Actor) -> None:
        """`first-use`: a machine's first key is admitted when it first signs a request;
        `operator`: every key waits for `machine admit`."""
        if mode not in (FIRST_USE, OPERATOR_ADMISSION):
            raise UsageError(f"admission {mode!r}: {FIRST_USE} or {OPERATOR_ADMISSION}")
        with self.engine.begin() as conn:
            before = self._setting(conn, _ADMISSION) or OPERATOR_ADMISSION
            stmt = self._insert(db.settings).values(name=_ADMISSION, value=mode)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[db.settings.c.name], set_={"value": mode}
                )
            )
            self._bump(conn)
            if before != mode:
                audit.record(
                    conn, by, "admission.set", "admission", {"mode": before}, {"mode": mode}
                )

    def machine_key_states(self, machine_id: str) -> dict[str, KeyState]:
        keys = db.machine_keys.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(keys.key_id, keys.state, keys.counter).where(keys.machine_id == machine_id)
            ).all()
        return {str(r.key_id): KeyState(str(r.state), int(r.counter)) for r in rows}

    def present_key(
        self, machine_id: str, key_id: str, kind: str, public_key: str, first_use: bool
    ) -> bool:
        """A machine signed a request with a key the server did not know: keep it as
        pending (up to MAX_PENDING per machine), or admit it if `first_use` and the
        machine has no admitted key. Whether it is admitted now."""
        keys = db.machine_keys.c
        now = time.time()
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(keys.key_id, keys.state).where(keys.machine_id == machine_id)
            ).all()
            states = {str(r.key_id): str(r.state) for r in rows}
            if key_id in states:
                return states[key_id] == ADMITTED
            admit = first_use and ADMITTED not in states.values()
            if not admit and list(states.values()).count(PENDING) >= MAX_PENDING:
                return False
            conn.execute(
                self._insert(db.machine_keys)
                .values(
                    machine_id=machine_id,
                    key_id=key_id,
                    kind=kind,
                    public_key=public_key,
                    state=ADMITTED if admit else PENDING,
                    first_seen=now,
                    decided_at=now if admit else None,
                    decided_by="first use" if admit else None,
                    counter=0,
                )
                .on_conflict_do_nothing()
            )
            if admit:
                self._bump(conn)
                after = {"key_id": key_id, "kind": kind, "how": FIRST_USE}
                audit.record(conn, audit.SERVER, "machine.admit", machine_id, None, after)
            return admit

    def admit(
        self,
        machine_id: str,
        *,
        by: Actor,
        key_id: str | None = None,
        enroll: tuple[str, str] | None = None,
    ) -> str:
        """Admit a key of the machine: `enroll` (its kind and base64 DER: an operator's
        enrollment, before or after the machine first signed), else the pending key
        `key_id` names (or its only pending key). The machine's admitted key before, if
        any, is replaced. The key id admitted."""
        keys = db.machine_keys.c
        now = time.time()
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(keys.key_id, keys.state)
                .where(keys.machine_id == machine_id)
                .with_for_update()
            ).all()
            states = {str(r.key_id): str(r.state) for r in rows}
            if enroll is not None:
                kind, public_key = enroll
                key_id = identity.key_id(identity.decode_key(public_key))
                if key_id not in states:
                    conn.execute(
                        insert(db.machine_keys).values(
                            machine_id=machine_id,
                            key_id=key_id,
                            kind=kind,
                            public_key=public_key,
                            state=PENDING,
                            first_seen=now,
                            counter=0,
                        )
                    )
                    states[key_id] = PENDING
            elif key_id is None:
                pending = [k for k, v in states.items() if v == PENDING]
                if len(pending) != 1:
                    listed = ", ".join(k[:16] for k in pending) or "none"
                    raise UsageError(
                        f"machine {machine_id} has {len(pending)} pending keys ({listed}); "
                        "name one with --key-id, or enroll one with --key"
                    )
                key_id = pending[0]
            elif key_id not in states:
                raise UsageError(f"machine {machine_id} never presented key {key_id}")
            old = [k for k, v in states.items() if v == ADMITTED and k != key_id]
            if states[key_id] == ADMITTED:
                raise ConflictError(f"machine {machine_id}: key {key_id[:16]} is already admitted")
            if old:
                conn.execute(
                    update(db.machine_keys)
                    .where(and_(keys.machine_id == machine_id, keys.key_id.in_(old)))
                    .values(state=REPLACED, decided_at=now, decided_by=by.name[:64])
                )
            conn.execute(
                update(db.machine_keys)
                .where(and_(keys.machine_id == machine_id, keys.key_id == key_id))
                .values(state=ADMITTED, decided_at=now, decided_by=by.name[:64])
            )
            self._bump(conn)
            before = {"key_id": old[0]} if old else None
            after = {"key_id": key_id, "was": states[key_id]}
            audit.record(conn, by, "machine.admit", machine_id, before, after)
            return key_id

    def reject(self, machine_id: str, *, by: Actor, key_id: str | None = None) -> list[str]:
        """Reject the machine's key `key_id` (default: every pending and admitted key);
        its requests are anonymous from then on. The key ids rejected."""
        keys = db.machine_keys.c
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(keys.key_id, keys.state)
                .where(keys.machine_id == machine_id)
                .with_for_update()
            ).all()
            chosen = [
                str(r.key_id)
                for r in rows
                if (key_id is None and r.state in (PENDING, ADMITTED)) or r.key_id == key_id
            ]
            if not chosen:
                raise UsageError(f"machine {machine_id} has no such key to reject")
            before = {str(r.key_id): str(r.state) for r in rows if str(r.key_id) in chosen}
            conn.execute(
                update(db.machine_keys)
                .where(and_(keys.machine_id == machine_id, keys.key_id.in_(chosen)))
                .values(state=REJECTED, decided_at=time.time(), decided_by=by.name[:64])
            )
            conn.execute(
                update(db.machines)
                .where(db.machines.c.machine_id == machine_id)
                .values(authenticated=False)
            )
            self._bump(conn)
            audit.record(
                conn, by, "machine.reject", machine_id, before, dict.fromkeys(chosen, REJECTED)
            )
            return chosen

    def machine_keys(
        self, machine_id: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        """The keys machines presented or were enrolled with (machine-id, then newest)."""
        keys = db.machine_keys.c
        query = select(db.machine_keys).order_by(keys.machine_id, keys.first_seen.desc())
        if machine_id is not None:
            query = query.where(keys.machine_id == machine_id)
        if state is not None:
            query = query.where(keys.state == state)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def admitted_keys(self, machine_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The admitted key's row of each of `machine_ids` that has one."""
        keys = db.machine_keys.c
        found: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(machine_ids), _CHUNK):
                rows = conn.execute(
                    select(db.machine_keys).where(
                        and_(
                            keys.machine_id.in_(list(machine_ids[i : i + _CHUNK])),
                            keys.state == ADMITTED,
                        )
                    )
                ).all()
                found.update({str(r.machine_id): dict(r._mapping) for r in rows})
        return found

    def identity_counts(self) -> dict[str, int]:
        """How many keys are in each state (machines admitted, pending, ...)."""
        keys = db.machine_keys.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(keys.state, func.count()).group_by(keys.state)).all()
        found = dict.fromkeys((PENDING, ADMITTED, REJECTED, REPLACED), 0)
        found.update({str(state): int(n) for state, n in rows})
        return found

    def known_pcr7_sets(self) -> dict[str, frozenset[str]]:
        """The known-good PCR 7 values of each OS."""
        found: dict[str, set[str]] = {}
        for row in self.known_pcr7():
            found.setdefault(str(row["os"]), set()).add(str(row["value"]))
        return {k: frozenset(v) for k, v in found.items()}

    def known_pcr7(self, os_name: str | None = None) -> list[dict[str, Any]]:
        query = select(db.known_pcr7).order_by(db.known_pcr7.c.os, db.known_pcr7.c.value)
        if os_name is not None:
            query = query.where(db.known_pcr7.c.os == os_name)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def add_known_pcr7(self, os_name: str, value: str, note: str | None, *, by: Actor) -> None:
        """A PCR 7 value machines of `os_name` measure when they booted as they should."""
        with self.engine.begin() as conn:
            exists = conn.execute(
                select(db.known_pcr7.c.value).where(
                    and_(db.known_pcr7.c.os == os_name, db.known_pcr7.c.value == value)
                )
            ).first()
            if exists is not None:
                raise ConflictError(f"PCR 7 {value[:16]}… is already known good for {os_name}")
            conn.execute(
                insert(db.known_pcr7).values(
                    os=os_name, value=value, note=note, added_at=time.time()
                )
            )
            self._bump(conn)
            audit.record(conn, by, "pcr7.add", os_name, None, {"value": value, "note": note})

    def remove_known_pcr7(self, os_name: str, value: str, *, by: Actor) -> None:
        with self.engine.begin() as conn:
            gone = conn.execute(
                delete(db.known_pcr7).where(
                    and_(db.known_pcr7.c.os == os_name, db.known_pcr7.c.value == value)
                )
            ).rowcount
            if not gone:
                raise UsageError(f"PCR 7 {value[:16]}… is not known good for {os_name}")
            self._bump(conn)
            audit.record(conn, by, "pcr7.remove", os_name, {"value": value}, None)

    # --- tokens ------------------------------------------------------------------------

    def create_token(self, name: str, role: str = roles.ADMIN, *, by: Actor) -> str:
        """A new admin token of `role`; only its SHA-256 is stored. Returned once."""
        roles.check(role)
        token = "rpt_" + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            if conn.execute(select(db.tokens.c.name).where(db.tokens.c.name == name)).first():
                raise ConflictError(f"a token named {name!r} already exists")
            conn.execute(
                insert(db.tokens).values(
                    name=name, digest=token_digest(token), created_at=time.time(), role=role
                )
            )
            audit.record(conn, by, "token.create", name, None, {"role": role})
        return token

    def revoke_token(self, name: str, *, by: Actor) -> None:
        with self.engine.begin() as conn:
            revoked = conn.execute(
                delete(db.tokens).where(db.tokens.c.name == name).returning(db.tokens.c.role)
            ).first()
            if revoked is None:
                raise UsageError(f"no token named {name!r}")
            audit.record(conn, by, "token.revoke", name, {"role": revoked.role}, None)

    def list_tokens(self) -> list[dict[str, object]]:
        """Each token's name, role and creation time (never its digest), by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(db.tokens.c.name, db.tokens.c.role, db.tokens.c.created_at).order_by(
                    db.tokens.c.name
                )
            ).all()
        return [{"name": r.name, "role": r.role, "created_at": r.created_at} for r in rows]

    def token_roles(self) -> list[tuple[str, str, str]]:
        """(digest, name, role) of every token, for `token_holder`."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(db.tokens.c.digest, db.tokens.c.name, db.tokens.c.role)
            ).all()
        return [(str(r.digest), str(r.name), str(r.role)) for r in rows]

    def token_digests(self) -> list[str]:
        with self.engine.connect() as conn:
            return [str(d) for d in conn.execute(select(db.tokens.c.digest)).scalars().all()]


_CHECK_COLUMNS = ("machine_id", "os", "version", "channel", "offered", "at", "address")
_REPORT_FIELDS = (*_REPORT_COLUMNS, "address")


def _check_row(check: Check) -> dict[str, Any]:
    return {k: getattr(check, k) for k in _CHECK_COLUMNS} | {
        "authenticated": check.proof is not None
    }


def _report_row(report: Report) -> dict[str, Any]:
    return {k: getattr(report, k) for k in _REPORT_FIELDS} | {
        "authenticated": report.proof is not None
    }


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows (the same keys each) as one list per column: PostgreSQL's unnest parameters."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def _machine_rows(latest: dict[str, Check], proven: bool) -> list[dict[str, Any]]:
    return [
        {
            "machine_id": c.machine_id,
            "os": c.os,
            "version": c.version,
            "first_seen": c.at,
            "last_seen": c.at,
            "address": c.address,
            "authenticated": proven,
        }
        for c in sorted(latest.values(), key=lambda c: c.machine_id)
    ]


def _audited(row: Any) -> dict[str, Any]:
    """A channel row as the audit trail records it (without its update time)."""
    return {k: v for k, v in row._mapping.items() if k != "updated_at"}


def token_holder(token: str, known: Sequence[tuple[str, str, str]]) -> tuple[str, str] | None:
    """The (name, role) of the token presented, among `known` ((digest, name, role),
    `Store.token_roles`), or None; every digest is compared, in constant time."""
    presented = token_digest(token)
    found = None
    for digest, name, role in known:
        if hmac.compare_digest(presented, digest):
            found = (name, role)
    return found

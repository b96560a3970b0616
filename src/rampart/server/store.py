"""Fleet state in the database: channels, machines, checks, reports, tokens.

Synchronous (SQLAlchemy Core); the web app calls it from worker threads. Every
administrative change bumps a generation counter, which the app polls to drop
its caches, so a change is visible to every worker within a second.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from rampart.errors import ConflictError, UsageError
from rampart.server import db
from rampart.server.rollout import ChannelState, RolloutState, should_halt

GENERATION = "generation"


@dataclass(frozen=True)
class Check:
    machine_id: str
    os: str
    version: str
    channel: str
    offered: str | None
    at: float
    address: str | None


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


def _channel(row: Any) -> ChannelState:
    return ChannelState(
        os=row.os,
        name=row.name,
        version=row.version,
        rollout_version=row.rollout_version,
        rollout_percent=row.rollout_percent,
        rollout_state=RolloutState(row.rollout_state),
        default=bool(row.is_default),
    )


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """All database access of the server."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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

    def assignment(self, machine_id: str) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(db.machines.c.channel).where(db.machines.c.machine_id == machine_id)
            ).scalar()
        return None if value is None else str(value)

    # --- writes from clients -----------------------------------------------------------

    def record_checks(self, batch: Sequence[Check]) -> None:
        """Insert the checks and update each machine's last-seen state, in one transaction."""
        if not batch:
            return
        latest: dict[str, Check] = {}
        for check in batch:
            latest[check.machine_id] = check
        with self.engine.begin() as conn:
            conn.execute(insert(db.checks), [c.__dict__ for c in batch])
            stmt = self._insert(db.machines)
            stmt = stmt.on_conflict_do_update(
                index_elements=[db.machines.c.machine_id],
                set_={
                    "os": stmt.excluded.os,
                    "version": stmt.excluded.version,
                    "last_seen": stmt.excluded.last_seen,
                    "address": stmt.excluded.address,
                },
            )
            conn.execute(
                stmt,
                [
                    {
                        "machine_id": c.machine_id,
                        "os": c.os,
                        "version": c.version,
                        "first_seen": c.at,
                        "last_seen": c.at,
                        "address": c.address,
                    }
                    for c in sorted(latest.values(), key=lambda c: c.machine_id)
                ],
            )

    def record_report(self, report: Report) -> str | None:
        """Store an install report; halt the rollout it belongs to if it fails too often.

        Returns the name of a channel whose rollout was halted, if any.
        """
        with self.engine.begin() as conn:
            conn.execute(insert(db.reports), [report.__dict__])
            if report.to_version is None:
                return None
            rows = conn.execute(
                select(db.channels).where(
                    and_(
                        db.channels.c.os == report.os,
                        db.channels.c.rollout_version == report.to_version,
                        db.channels.c.rollout_state == RolloutState.ACTIVE.value,
                    )
                )
            ).all()
            for row in rows:
                # The latest outcome per machine that reported for this version.
                # Only machines this rollout was offered to count: reports are not
                # authenticated, and a machine of another channel is not evidence.
                offered = (
                    select(db.checks.c.machine_id)
                    .where(
                        and_(
                            db.checks.c.os == report.os,
                            db.checks.c.channel == row.name,
                            db.checks.c.offered == report.to_version,
                        )
                    )
                    .distinct()
                )
                latest = (
                    select(db.reports.c.machine_id, func.max(db.reports.c.id).label("id"))
                    .where(
                        and_(
                            db.reports.c.os == report.os,
                            db.reports.c.to_version == report.to_version,
                            db.reports.c.machine_id.in_(offered),
                        )
                    )
                    .group_by(db.reports.c.machine_id)
                    .subquery()
                )
                outcomes = (
                    conn.execute(
                        select(db.reports.c.outcome).join(latest, db.reports.c.id == latest.c.id)
                    )
                    .scalars()
                    .all()
                )
                failures = sum(1 for o in outcomes if o == "failure")
                if should_halt(len(outcomes), failures, row.failure_threshold, row.min_reports):
                    conn.execute(
                        update(db.channels)
                        .where(and_(db.channels.c.os == row.os, db.channels.c.name == row.name))
                        .values(rollout_state=RolloutState.HALTED.value, updated_at=time.time())
                    )
                    self._bump(conn)
                    return str(row.name)
        return None

    # --- administration ----------------------------------------------------------------

    def _bump(self, conn: Any) -> None:
        stmt = self._insert(db.server_state).values(key=GENERATION, value=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=[db.server_state.c.key],
            set_={"value": db.server_state.c.value + 1},
        )
        conn.execute(stmt)

    def _get_channel(self, conn: Any, os_name: str, name: str) -> Any:
        row = conn.execute(
            select(db.channels).where(and_(db.channels.c.os == os_name, db.channels.c.name == name))
        ).first()
        if row is None:
            raise UsageError(f"unknown channel {name!r} for {os_name}")
        return row

    def create_channel(
        self, os_name: str, name: str, version: str | None, default: bool = False
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
                    updated_at=time.time(),
                )
            )
            self._bump(conn)
            return _channel(self._get_channel(conn, os_name, name))

    def update_channel(self, os_name: str, name: str, **values: Any) -> ChannelState:
        with self.engine.begin() as conn:
            self._get_channel(conn, os_name, name)
            conn.execute(
                update(db.channels)
                .where(and_(db.channels.c.os == os_name, db.channels.c.name == name))
                .values(updated_at=time.time(), **values)
            )
            self._bump(conn)
            return _channel(self._get_channel(conn, os_name, name))

    def channel_row(self, os_name: str, name: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(self._get_channel(conn, os_name, name)._mapping)

    def channel_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(db.channels).order_by(db.channels.c.os, db.channels.c.name)
            ).all()
        return [dict(r._mapping) for r in rows]

    def assign(self, machine_id: str, channel: str | None, os_name: str) -> None:
        with self.engine.begin() as conn:
            if channel is not None:
                self._get_channel(conn, os_name, channel)
            stmt = self._insert(db.machines).values(
                machine_id=machine_id, os=os_name, channel=channel
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=[db.machines.c.machine_id], set_={"channel": channel}
            )
            conn.execute(stmt)
            self._bump(conn)

    def machines(
        self, limit: int = 10_000, seen_before: float | None = None
    ) -> list[dict[str, Any]]:
        """Machines, most recently seen first (never seen last); only those last seen
        before `seen_before` if given."""
        query = (
            select(db.machines)
            .order_by(db.machines.c.last_seen.desc().nulls_last(), db.machines.c.machine_id)
            .limit(limit)
        )
        if seen_before is not None:
            query = query.where(db.machines.c.last_seen < seen_before)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [dict(r._mapping) for r in rows]

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
                .where(db.machines.c.version.is_not(None))
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

    def recent_reports(self, limit: int = 50, outcome: str | None = None) -> list[dict[str, Any]]:
        query = select(db.reports).order_by(db.reports.c.id.desc()).limit(limit)
        if outcome is not None:
            query = query.where(db.reports.c.outcome == outcome)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            checks = conn.execute(select(func.count()).select_from(db.checks)).scalar()
            machines = conn.execute(select(func.count()).select_from(db.machines)).scalar()
            rows = conn.execute(
                select(db.reports.c.outcome, func.count()).group_by(db.reports.c.outcome)
            ).all()
        result = {"checks": int(checks or 0), "machines": int(machines or 0)}
        for outcome, n in rows:
            result[f"reports_{outcome}"] = int(n)
        return result

    # --- tokens ------------------------------------------------------------------------

    def create_token(self, name: str) -> str:
        """A new admin token; only its SHA-256 is stored. Returned once."""
        token = "rpt_" + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            if conn.execute(select(db.tokens.c.name).where(db.tokens.c.name == name)).first():
                raise ConflictError(f"a token named {name!r} already exists")
            conn.execute(
                insert(db.tokens).values(
                    name=name, digest=token_digest(token), created_at=time.time()
                )
            )
        return token

    def revoke_token(self, name: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(delete(db.tokens).where(db.tokens.c.name == name)).rowcount == 0:
                raise UsageError(f"no token named {name!r}")

    def token_digests(self) -> list[str]:
        with self.engine.connect() as conn:
            return [str(d) for d in conn.execute(select(db.tokens.c.digest)).scalars().all()]


def token_matches(token: str, digests: Sequence[str]) -> bool:
    """Constant-time comparison of a presented token against the stored digests."""
    presented = token_digest(token)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest)
    return found

"""The server's database: schema (SQLAlchemy Core), engines, migrations (Alembic).

SQLite (a file next to the webroot) is the embedded default; PostgreSQL is the
choice for a fleet. Times are UNIX seconds (floats), the same on both. The
schema is created or upgraded by `migrate()` when the server starts, before any
worker runs.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.exc import SQLAlchemyError

from rampart.errors import LocalError, UsageError

metadata = MetaData()
_ID = BigInteger().with_variant(Integer, "sqlite")

channels = Table(
    "channels",
    metadata,
    Column("os", String(64), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("version", String(128), nullable=True),
    Column("is_default", Boolean, nullable=False, default=False),
    Column("rollout_version", String(128), nullable=True),
    Column("rollout_percent", Float, nullable=False, default=0.0),
    Column("rollout_state", String(16), nullable=False, default="none"),
    Column("failure_threshold", Float, nullable=False, default=0.2),
    Column("min_reports", Integer, nullable=False, default=5),
    Column("updated_at", Float, nullable=False),
    # Distinct machines whose latest counted report failed, needed before an auto-halt.
    Column("min_failing", Integer, nullable=False, default=5, server_default="5"),
    # When the rollout of rollout_version started: only machines seen before count.
    Column("rollout_started_at", Float, nullable=True),
    # True: offer updates only to machines whose last check was attested with a
    # known-good PCR 7 (rampart.server.devices); the others keep their version.
    Column("require_attestation", Boolean, nullable=False, default=False, server_default="0"),
)

machines = Table(
    "machines",
    metadata,
    Column("machine_id", String(32), primary_key=True),
    Column("os", String(64), nullable=True),
    Column("channel", String(64), nullable=True),  # assigned by an administrator
    Column("version", String(128), nullable=True),  # the running version it last reported
    Column("first_seen", Float, nullable=True),
    Column("last_seen", Float, nullable=True),
    Column("address", String(64), nullable=True),
    # True once a check signed by the machine's admitted key recorded it: from then on
    # only such checks change its row, and only such machines count (fleet, rollouts).
    Column("authenticated", Boolean, nullable=False, default=False, server_default="0"),
    Index("ix_machines_last_seen", "last_seen"),
)

checks = Table(
    "checks",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("machine_id", String(32), nullable=False),
    Column("os", String(64), nullable=False),
    Column("version", String(128), nullable=False),
    Column("channel", String(64), nullable=False),
    Column("offered", String(128), nullable=True),
    Column("at", Float, nullable=False),
    Column("address", String(64), nullable=True),
    Column("authenticated", Boolean, nullable=False, default=False, server_default="0"),
    Index("ix_checks_machine", "machine_id"),
    Index("ix_checks_at", "at"),
)

reports = Table(
    "reports",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("machine_id", String(32), nullable=False),
    Column("os", String(64), nullable=False),
    Column("from_version", String(128), nullable=True),
    Column("to_version", String(128), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("error", Text, nullable=True),
    Column("at", Float, nullable=False),
    Column("address", String(64), nullable=True),
    Column("authenticated", Boolean, nullable=False, default=False, server_default="0"),
    Index("ix_reports_to", "os", "to_version"),
    Index("ix_reports_at", "at"),
)

tokens = Table(
    "admin_tokens",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("digest", String(64), nullable=False, unique=True),  # SHA-256 of the token
    Column("created_at", Float, nullable=False),
    # rampart.server.roles: auditor, operator or admin
    Column("role", String(16), nullable=False, server_default="admin"),
)

# Dashboard sign-ins: the SHA-256 of a random session id (the cookie holds the id), and
# the digest of the token it was opened with; a session counts only while that token
# exists and until it expires (rampart.server.sessions).
sessions = Table(
    "admin_sessions",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("token_digest", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_admin_sessions_token", "token_digest"),
)

# Which machine was first offered which version, on which channel, and when: one row
# per (channel, version, machine), written with the checks. A report counts for a
# rollout only if its machine was offered the version before it reported.
offers = Table(
    "offers",
    metadata,
    Column("os", String(64), primary_key=True),
    Column("channel", String(64), primary_key=True),
    Column("version", String(128), primary_key=True),
    Column("machine_id", String(32), primary_key=True),
    Column("at", Float, nullable=False),
)

# The latest counted outcome of each machine for a rollout (channel, version), and
# their running totals: the auto-halt reads one row, whatever the size of `checks`.
rollout_outcomes = Table(
    "rollout_outcomes",
    metadata,
    Column("os", String(64), primary_key=True),
    Column("channel", String(64), primary_key=True),
    Column("version", String(128), primary_key=True),
    Column("machine_id", String(32), primary_key=True),
    Column("outcome", String(16), nullable=False),
    Column("at", Float, nullable=False),
)

rollout_tallies = Table(
    "rollout_tallies",
    metadata,
    Column("os", String(64), primary_key=True),
    Column("channel", String(64), primary_key=True),
    Column("version", String(128), primary_key=True),
    Column("machines", Integer, nullable=False),  # machines with a counted report
    Column("failures", Integer, nullable=False),  # of which the latest report failed
)

# Device keys (rampart.server.devices): each key a machine presented, or an operator
# enrolled, and its state: pending (seen, not admitted), admitted (at most one per
# machine), rejected, replaced (admitted before another). The admitted key's row holds
# the last request counter accepted and what the machine last proved.
machine_keys = Table(
    "machine_keys",
    metadata,
    Column("machine_id", String(32), primary_key=True),
    Column("key_id", String(64), primary_key=True),  # SHA-256 of the key (DER), hex
    Column("kind", String(8), nullable=False),  # tpm or file (contracts/identity.py)
    Column("public_key", Text, nullable=False),  # base64 SubjectPublicKeyInfo
    Column("state", String(16), nullable=False),
    Column("first_seen", Float, nullable=False),
    Column("decided_at", Float, nullable=True),
    Column("decided_by", String(64), nullable=True),
    Column("counter", BigInteger, nullable=False, default=0),
    Column("last_auth", Float, nullable=True),  # last authenticated request
    Column("attested_at", Float, nullable=True),  # last fresh quote (TPM keys)
    Column("pcr7", String(64), nullable=True),  # the PCR 7 value it quoted, hex
    Column("epoch", BigInteger, nullable=True),  # the security epoch it runs
    Index("ix_machine_keys_state", "state"),
)

# Known-good PCR 7 values, per OS (what a machine booted with Secure Boot on and the
# fleet's keys measures).
known_pcr7 = Table(
    "known_pcr7",
    metadata,
    Column("os", String(64), primary_key=True),
    Column("value", String(64), primary_key=True),
    Column("note", String(128), nullable=True),
    Column("added_at", Float, nullable=False),
)

# Settings shared by every instance: admission (operator or first-use), the nonce key.
settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# The audit trail (rampart.server.audit): append-only (triggers refuse UPDATE and
# DELETE), each entry's canonical JSON in `entry`, chained by SHA-256; the columns beside
# it are copies for queries. `audit_head` (one row, id 1) holds the last seq and hash.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", _ID, primary_key=True, autoincrement=False),
    Column("at", Float, nullable=False),
    Column("name", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(256), nullable=False),
    Column("entry", Text, nullable=False),
    Column("prev", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_log_at", "at"),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

server_state = Table(
    "server_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)


def default_url(webroot: Path) -> str:
    """SQLite in a file next to the webroot: `<webroot>.sqlite`."""
    return f"sqlite:///{webroot.resolve()}.sqlite"


def make_engine(url: str) -> Engine:
    """An engine for `url` (sqlite:///PATH or postgresql://...), tuned for the server."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        _private_sqlite_files(url)
    elif url.startswith("postgresql+psycopg://"):
        kwargs.update(
            # No ping before each use (a round trip per transaction, a tenth of a
            # report batch's): a connection that died (PostgreSQL restarted) fails its
            # statement, the pool drops every connection older than that, and the
            # request gets 503 like any other in an outage (tests/server/
            # test_postgres_restart.py).
            pool_pre_ping=False,
            pool_size=8,
            max_overflow=4,
            pool_timeout=5,
            connect_args={"connect_timeout": 5},
        )
    else:
        raise UsageError(
            f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:/// or postgresql://"
        )
    try:
        engine = create_engine(url, **kwargs)
    except (SQLAlchemyError, ValueError) as exc:
        raise UsageError(f"invalid database URL: {exc}") from None
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    if engine.dialect.name == "postgresql":
        _never_pool_read_only(engine)

    @event.listens_for(engine, "handle_error")
    def _read_only_is_a_disconnect(context: Any) -> None:
        # A connection opened while the database was read-only (a PostgreSQL standby
        # or default_transaction_read_only, an SQLite file that could not be opened for
        # writing) stays read-only after the database is writable again. Treated as a
        # disconnect, it invalidates the whole pool: every connection opened before is
        # replaced at its next use, instead of failing one write each after recovery.
        if read_only_error(context.original_exception):
            context.is_disconnect = True

    return engine


def _never_pool_read_only(engine: Engine) -> None:
    """A PostgreSQL session opened while the database was read-only never becomes
    writable: it is closed after its one use instead of waiting in the pool to fail a
    write after the database is writable again. (The invalidation of the whole pool
    on a read-only error misses a session opened after the last failure, for a read,
    which a read-only session serves.)"""

    @event.listens_for(engine, "connect")
    def _note_read_only(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SHOW transaction_read_only")
        record.info["read_only"] = cursor.fetchone()[0] == "on"
        cursor.close()
        dbapi_connection.commit()

    @event.listens_for(engine, "checkin")
    def _close_read_only(_dbapi_connection: Any, record: Any) -> None:
        if record.info.get("read_only"):
            record.invalidate()


def _private_sqlite_files(url: str) -> None:
    """Create the SQLite file mode 0600 (SQLite gives its -wal and -shm files the mode of
    the database file) and tighten the mode of files made before: they hold the digests
    of the admin tokens and sessions. An existing file is changed by path, never opened:
    closing a descriptor of a database this process has open would drop SQLite's locks."""
    try:
        database = make_url(url).database
    except (SQLAlchemyError, ValueError) as exc:
        raise UsageError(f"invalid database URL: {exc}") from None
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    with contextlib.suppress(FileExistsError):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            raise
        except OSError as exc:
            raise LocalError(f"{path}: cannot create the database: {exc.strerror}") from None
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            info = name.lstat()
            mine = stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()
            if mine and stat.S_IMODE(info.st_mode) != 0o600:
                name.chmod(0o600)


def read_only_error(exc: BaseException | None) -> bool:
    """True for a database's refusal to write because it (or the connection) is read-only."""
    if exc is None:
        return False
    if getattr(exc, "sqlstate", None) == "25006":  # PostgreSQL: read_only_sql_transaction
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == 8:  # SQLITE_READONLY and its extended codes
        return True
    return "readonly database" in str(exc)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise LocalError(
            f"database: cannot create or upgrade the schema: {exc.__class__.__name__}"
            f": {str(exc).splitlines()[0]}"
        ) from None

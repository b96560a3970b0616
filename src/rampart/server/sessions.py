"""Dashboard sessions: what the browser's cookie stands for.

Signing in with an admin token opens a session: a random id (256 bits) that the
cookie carries, of which the database keeps only the SHA-256, with the digest of
the token it was opened with and an expiry. A session authorizes a request only
while it has not expired, has not been closed (sign-out) and its token has not been
revoked (the lookup joins the token table), so the cookie never holds, and never
outlives, an admin token.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import Engine, and_, delete, insert, select

from rampart.server import audit, db
from rampart.server.store import token_digest, token_holder

LIFETIME = 8 * 3600.0  # seconds
MAX_ID = 128  # longer cookies are not looked up


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def open_session(
    engine: Engine, token: str, now: float | None = None, address: str | None = None
) -> str | None:
    """A new session id for a valid token (None for an invalid one), recorded in the
    audit trail as the token's, from `address`; expired sessions are removed on the way."""
    now = time.time() if now is None else now
    if not token or len(token) > 256:
        return None
    with engine.begin() as conn:
        known = conn.execute(select(db.tokens.c.digest, db.tokens.c.name, db.tokens.c.role))
        found = token_holder(token, [(str(d), str(n), str(r)) for d, n, r in known])
        if found is None:
            return None
        conn.execute(delete(db.sessions).where(db.sessions.c.expires_at <= now))
        session_id = "rps_" + secrets.token_urlsafe(32)
        digest = _digest(session_id)
        conn.execute(
            insert(db.sessions).values(
                digest=digest,
                token_digest=token_digest(token),
                created_at=now,
                expires_at=now + LIFETIME,
            )
        )
        by = audit.Actor("cookie", found[0], found[1], address)
        audit.record(conn, by, "session.open", found[0], None, {"session": digest[:12]}, now)
    return session_id


def session_holder(
    engine: Engine, session_id: str, now: float | None = None
) -> tuple[str, str] | None:
    """The (name, role) of the token an open, unexpired session was opened with, while
    that token exists; None otherwise."""
    if not session_id or len(session_id) > MAX_ID:
        return None
    now = time.time() if now is None else now
    query = (
        select(db.tokens.c.name, db.tokens.c.role)
        .join(db.sessions, db.tokens.c.digest == db.sessions.c.token_digest)
        .where(and_(db.sessions.c.digest == _digest(session_id), db.sessions.c.expires_at > now))
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else (str(row.name), str(row.role))


def close_session(engine: Engine, session_id: str, address: str | None = None) -> None:
    """Sign out: the session id stops working at once (recorded in the audit trail, if
    it was open)."""
    if not session_id or len(session_id) > MAX_ID:
        return
    digest = _digest(session_id)
    with engine.begin() as conn:
        holder = conn.execute(
            select(db.tokens.c.name, db.tokens.c.role)
            .join(db.sessions, db.tokens.c.digest == db.sessions.c.token_digest)
            .where(db.sessions.c.digest == digest)
        ).first()
        closed = conn.execute(delete(db.sessions).where(db.sessions.c.digest == digest)).rowcount
        if closed and holder is not None:
            by = audit.Actor("cookie", str(holder.name), str(holder.role), address)
            audit.record(conn, by, "session.close", by.name, {"session": digest[:12]}, None)

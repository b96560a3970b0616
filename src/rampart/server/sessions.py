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

from rampart.server import db
from rampart.server.store import token_digest, token_matches

LIFETIME = 8 * 3600.0  # seconds
MAX_ID = 128  # longer cookies are not looked up


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def open_session(engine: Engine, token: str, now: float | None = None) -> str | None:
    """A new session id for a valid token (None for an invalid one); expired sessions
    are removed on the way."""
    now = time.time() if now is None else now
    with engine.begin() as conn:
        digests = [str(d) for d in conn.execute(select(db.tokens.c.digest)).scalars()]
        if not token or len(token) > 256 or not token_matches(token, digests):
            return None
        conn.execute(delete(db.sessions).where(db.sessions.c.expires_at <= now))
        session_id = "rps_" + secrets.token_urlsafe(32)
        conn.execute(
            insert(db.sessions).values(
                digest=_digest(session_id),
                token_digest=token_digest(token),
                created_at=now,
                expires_at=now + LIFETIME,
            )
        )
    return session_id


def session_valid(engine: Engine, session_id: str, now: float | None = None) -> bool:
    """Whether the session is open, unexpired, and its token still exists."""
    return session_holder(engine, session_id, now) is not None


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


def close_session(engine: Engine, session_id: str) -> None:
    """Sign out: the session id stops working at once."""
    if session_id and len(session_id) <= MAX_ID:
        with engine.begin() as conn:
            conn.execute(delete(db.sessions).where(db.sessions.c.digest == _digest(session_id)))

"""The audit trail: every state-changing action, append-only and hash-chained, in the
database (docs/server.md "The audit trail").

Each entry says who (how they came, their name and role), from which address, what
(an action and its target), when, and the state before and after. It is written in the
transaction that makes the change, so a change is never without its entry nor an entry
without its change. Its text is canonical JSON (`entry`), and its hash is

    hash = SHA-256(prev || "\\n" || entry)      prev: the hash of the entry before it
                                              (64 zeros before the first)

The head row (`audit_head`) holds the last sequence number and hash; taking its row
lock is the last step of a writing transaction, so concurrent writers (threads, or
`rampart serve` instances on one PostgreSQL) append one after another and never fork
the chain. Triggers refuse UPDATE and DELETE on the log. Someone who can write the
database can still drop them and rewrite the whole chain; `verify(expect=...)` finds
that against an anchor (a sequence number and its hash) kept elsewhere.
"""

from __future__ import annotations

import getpass
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from rampart.errors import UsageError
from rampart.server import db

GENESIS = "0" * 64
PAGE = 1000  # entries per query while verifying or exporting


@dataclass(frozen=True)
class Actor:
    """Who made a change: how they came ("bearer" and "cookie": the admin API and the
    dashboard, with a token; "cli": `rampart` on the database; "server": the server
    itself), their name (the token's, the local user's) and role, and their address."""

    via: str
    name: str
    role: str
    address: str | None = None


SERVER = Actor("server", "rampart serve", "system")


def cli_actor() -> Actor:
    """The local user running a `rampart` verb on the database: an admin (whoever can
    write the database can do everything)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return Actor("cli", user, "admin", "local")


def canonical(value: Any) -> str:
    """The canonical JSON of `value`: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(prev: str, entry: str) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + entry.encode()).hexdigest()


def record(
    conn: Connection,
    actor: Actor,
    action: str,
    target: str,
    before: Any = None,
    after: Any = None,
    now: float | None = None,
) -> int:
    """Append an entry in the caller's transaction, after its change; its sequence
    number. The head's row lock, taken here, is held until the transaction ends."""
    head = conn.execute(
        select(db.audit_head.c.seq, db.audit_head.c.hash)
        .where(db.audit_head.c.id == 1)
        .with_for_update()
    ).one()
    seq, prev = int(head.seq) + 1, str(head.hash)
    at = time.time() if now is None else now
    entry = canonical(
        {
            "seq": seq,
            "at": at,
            "via": actor.via,
            "name": actor.name,
            "role": actor.role,
            "address": actor.address,
            "action": action,
            "target": target,
            "before": before,
            "after": after,
        }
    )
    digest = entry_hash(prev, entry)
    conn.execute(
        insert(db.audit_log).values(
            seq=seq,
            at=at,
            name=actor.name[:64],
            role=actor.role,
            action=action,
            target=target[:256],
            entry=entry,
            prev=prev,
            hash=digest,
        )
    )
    conn.execute(update(db.audit_head).where(db.audit_head.c.id == 1).values(seq=seq, hash=digest))
    return seq


def changes(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys whose values differ, before and after."""
    keys = sorted(k for k in after if before.get(k) != after.get(k))
    return {k: before.get(k) for k in keys}, {k: after.get(k) for k in keys}


def described(value: Any) -> str:
    """A before or after as one line: `key=value, ...`, or `-` for nothing."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


# --- reading ------------------------------------------------------------------------


def _rows(engine: Engine, since: int = 0) -> Iterator[Any]:
    """The log's rows from sequence number `since` + 1 on, oldest first, in pages."""
    last = since
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(db.audit_log)
                .where(db.audit_log.c.seq > last)
                .order_by(db.audit_log.c.seq)
                .limit(PAGE)
            ).all()
        yield from rows
        if len(rows) < PAGE:
            return
        last = int(rows[-1].seq)


def export_line(row: Any) -> str:
    """One line of the JSON-lines export: the entry, its prev and its hash."""
    return canonical({"entry": json.loads(row.entry), "prev": row.prev, "hash": row.hash})


def entries(engine: Engine, limit: int = 50, before: int | None = None) -> list[dict[str, Any]]:
    """The newest `limit` entries (older than sequence number `before`, if given),
    newest first: each one's fields, with its hash."""
    query = select(db.audit_log).order_by(db.audit_log.c.seq.desc()).limit(limit)
    if before is not None:
        query = query.where(db.audit_log.c.seq < before)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [dict(json.loads(r.entry), hash=r.hash) for r in rows]


def since_for_newest(engine: Engine, limit: int) -> int:
    """The sequence number before the newest `limit` entries (the numbers have no gap:
    the head's number tells where they start)."""
    with engine.connect() as conn:
        seq = conn.execute(select(db.audit_head.c.seq).where(db.audit_head.c.id == 1)).scalar()
    return max(0, int(seq or 0) - limit)


def newer(engine: Engine, since: int = 0) -> Iterator[dict[str, Any]]:
    """The entries after `since`, oldest first."""
    return (json.loads(row.entry) for row in _rows(engine, since))


def export(engine: Engine, since: int = 0) -> Iterator[str]:
    """The JSON-lines export from sequence number `since` + 1 on, oldest first."""
    return (export_line(row) for row in _rows(engine, since))


# --- verifying ----------------------------------------------------------------------


@dataclass
class Verdict:
    """What `verify` found: the entries checked, the last one's number and hash (an
    anchor to keep), and the problems (none: the chain is intact)."""

    entries: int = 0
    seq: int = 0
    hash: str = GENESIS
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "intact": not self.problems,
            "entries": self.entries,
            "seq": self.seq,
            "hash": self.hash,
            "problems": self.problems,
        }


@dataclass(frozen=True)
class Link:
    """One entry as verify reads it: from the database or from an export line."""

    seq: int
    entry: str
    prev: str
    hash: str
    columns: dict[str, Any] | None = None  # the database's indexed copies, if any


def parse_anchor(text: str) -> tuple[int, str]:
    """`SEQ:HASH` (what `rampart audit verify` prints) as (seq, hash)."""
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise UsageError(f"anchor {text!r}: expected SEQ:HASH (a number, 64 hex digits)")
    return int(seq), digest


def check_chain(
    links: Iterable[Link],
    expect: tuple[int, str] | None = None,
    start: tuple[int, str] = (0, GENESIS),
) -> Verdict:
    """Walk the chain from `start` (the sequence number and hash before the first link):
    every link must follow the one before it by number and by hash, and hash to what it
    says; the entry at `expect`'s number must have `expect`'s hash."""
    verdict = Verdict(seq=start[0], hash=start[1])
    problems = verdict.problems
    seen_anchor = expect is None or expect[0] <= start[0]
    for link in links:
        verdict.entries += 1
        if link.seq <= verdict.seq:
            problems.append(f"entry {link.seq} follows entry {verdict.seq} (out of order)")
        elif link.seq > verdict.seq + 1:
            gone = verdict.seq + 1, link.seq - 1
            named = f"entry {gone[0]}" if gone[0] == gone[1] else f"entries {gone[0]} to {gone[1]}"
            problems.append(f"entry {link.seq} follows entry {verdict.seq} ({named} removed)")
        if link.prev != verdict.hash:
            problems.append(
                f"entry {link.seq}: does not chain to the entry before it "
                "(an entry before it was altered, removed or moved)"
            )
        if entry_hash(link.prev, link.entry) != link.hash:
            problems.append(f"entry {link.seq}: its hash does not match its contents (altered)")
        try:
            fields = json.loads(link.entry)
        except json.JSONDecodeError:
            fields = None
        if not isinstance(fields, dict) or fields.get("seq") != link.seq:
            problems.append(f"entry {link.seq}: its text does not name it")
        elif link.columns is not None and any(fields.get(k) != v for k, v in link.columns.items()):
            problems.append(f"entry {link.seq}: its columns differ from its text (altered)")
        if expect is not None and link.seq == expect[0]:
            seen_anchor = True
            if link.hash != expect[1]:
                problems.append(
                    f"entry {link.seq}: hash {link.hash[:16]}… is not the anchor's "
                    f"{expect[1][:16]}… (the log was rewritten)"
                )
        verdict.seq, verdict.hash = link.seq, link.hash
    if not seen_anchor and expect is not None:
        problems.append(
            f"the anchor names entry {expect[0]}, but the log ends at entry {verdict.seq} "
            "(entries removed from its end)"
        )
    return verdict


def verify(engine: Engine, expect: tuple[int, str] | None = None) -> Verdict:
    """Check the whole log in the database, and its head."""
    links = (
        Link(
            int(row.seq),
            str(row.entry),
            str(row.prev),
            str(row.hash),
            {
                "at": row.at,
                "name": row.name,
                "role": row.role,
                "action": row.action,
                "target": row.target,
            },
        )
        for row in _rows(engine)
    )
    verdict = check_chain(links, expect)
    with engine.connect() as conn:
        head = conn.execute(select(db.audit_head).where(db.audit_head.c.id == 1)).first()
    if head is None:
        verdict.problems.append("the log's head row is missing")
    elif (int(head.seq), str(head.hash)) != (verdict.seq, verdict.hash):
        verdict.problems.append(
            f"the head names entry {head.seq}, the log ends at entry {verdict.seq} "
            "(entries removed from its end, or the head altered)"
        )
    return verdict


def verify_export(
    lines: Iterable[str], where: str, expect: tuple[int, str] | None = None
) -> Verdict:
    """Check a JSON-lines export (`export`). One that does not start at the first entry
    is taken to start where its first line says it does: an anchor (`expect`) is what
    ties it to the history before."""
    links = links_of_export(lines, where)
    first = next(links, None)
    if first is None:
        return check_chain([], expect)
    start = (first.seq - 1, first.prev if first.seq > 1 else GENESIS)
    return check_chain(itertools.chain([first], links), expect, start)


def links_of_export(lines: Iterable[str], where: str) -> Iterator[Link]:
    """The links of a JSON-lines export (`export`); UsageError on a line that is not one."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            entry, prev, digest = item["entry"], item["prev"], item["hash"]
            seq = entry["seq"]
        except (json.JSONDecodeError, KeyError, TypeError):
            seq = prev = digest = None
        if not isinstance(seq, int) or not isinstance(prev, str) or not isinstance(digest, str):
            raise UsageError(f"{where}:{number}: not a line of `rampart audit log --json`")
        yield Link(seq, canonical(entry), prev, digest)

"""The audit trail (rampart.server.audit): every state-changing action is an entry of an
append-only, hash-chained log, written in the change's own transaction; `audit verify`
finds an entry altered, removed or moved, a log cut short, and (against an anchor) a
chain rewritten by someone who could write the database."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from rampart.errors import AuditError, ConflictError
from rampart.server import admin, audit, db, sessions
from rampart.server.guard import COOKIE
from rampart.server.store import Check, Report, Store
from tests.conftest import run_cli
from tests.server.conftest import OS, Server, machine_id, upgrade_to
from tests.server.signing import proof
from tests.server.test_commands import cli, js

OPERATOR = audit.Actor("bearer", "ops", "operator", "192.0.2.1")


def _store(url: str, published: Path) -> Store:
    engine = db.make_engine(url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    return store


def _actions(engine: Engine) -> list[tuple[str, str, str]]:
    """(action, target, who) of every entry, oldest first."""
    return [
        (e["action"], e["target"], f"{e['name']}/{e['role']}/{e['via']}")
        for e in reversed(audit.entries(engine, 1000))
    ]


def _drop_triggers(engine: Engine) -> None:
    """What someone who can write the database does first to change the log."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("DROP TRIGGER audit_log_append_only ON audit_log"))
            conn.execute(text("DROP TRIGGER audit_head_kept ON audit_head"))
        else:
            for name in ("audit_log_append_only_update", "audit_log_append_only_delete"):
                conn.execute(text(f"DROP TRIGGER {name}"))


def _sample(store: Store, published: Path, n: int = 6) -> None:
    """`n` administrative changes."""
    for i in range(n):
        admin.assign(store, machine_id(i), OS, "stable" if i % 2 else None, by=OPERATOR)


# --- what is recorded -----------------------------------------------------------------


def test_every_change_through_the_cli_is_recorded_with_who_and_what(webroot: Path) -> None:
    js(webroot, "channel", "create", "beta", "--os", OS, "--version", "1.0.0")
    js(webroot, "channel", "set", "beta", "--os", OS, "--version", "1.0.1")
    js(webroot, "channel", "rollout", "start", "beta", "--os", OS, "--version", "1.0.2",
       "--percent", "10")  # fmt: skip
    js(webroot, "channel", "rollout", "raise", "beta", "--os", OS, "--percent", "50")
    js(webroot, "channel", "rollout", "pause", "beta", "--os", OS)
    js(webroot, "channel", "rollout", "resume", "beta", "--os", OS)
    js(webroot, "channel", "rollout", "raise", "beta", "--os", OS, "--percent", "100")
    js(webroot, "machine", "assign", machine_id(1), "--os", OS, "--channel", "beta")
    js(webroot, "token", "create", "watcher", "--role", "auditor")
    cli(webroot, "token", "revoke", "watcher")
    engine = db.make_engine(db.default_url(webroot))
    entries = list(reversed(audit.entries(engine, 100)))
    assert [(e["action"], e["target"]) for e in entries] == [
        ("channel.create", f"{OS}/beta"),
        ("channel.version", f"{OS}/beta"),
        ("rollout.start", f"{OS}/beta"),
        ("rollout.raise", f"{OS}/beta"),
        ("rollout.pause", f"{OS}/beta"),
        ("rollout.resume", f"{OS}/beta"),
        ("rollout.complete", f"{OS}/beta"),
        ("machine.assign", machine_id(1)),
        ("token.create", "watcher"),
        ("token.revoke", "watcher"),
    ]
    assert {(e["via"], e["role"], e["address"]) for e in entries} == {("cli", "admin", "local")}
    assert entries[1]["before"] == {"version": "1.0.0"}
    assert entries[1]["after"] == {"version": "1.0.1"}
    assert entries[3]["before"] == {"rollout_percent": 10.0}
    assert entries[3]["after"] == {"rollout_percent": 50.0}
    completed = entries[6]["after"]
    assert completed["version"] == "1.0.2" and completed["rollout_state"] == "none"
    assert entries[7]["before"] is None and entries[7]["after"] == {"os": OS, "channel": "beta"}
    assert entries[8]["after"] == {"role": "auditor"}  # never the token nor its digest
    assert entries[9]["before"] == {"role": "auditor"} and entries[9]["after"] is None
    assert [e["seq"] for e in entries] == list(range(1, 11))
    log = cli(webroot, "audit", "log")[1]
    assert "rollout.pause clipos/beta: rollout_state=active -> rollout_state=paused" in log


def test_changes_through_the_api_and_the_dashboard_name_the_token_role_and_address(
    server: Server,
) -> None:
    ops = server.store.create_token("ops", "operator", by=audit.cli_actor())
    response = server.client.put(
        f"/admin/api/machines/{machine_id(7)}/channel",
        json={"os": OS, "channel": "stable"},
        headers={"Authorization": f"Bearer {ops}"},
    )
    assert response.status_code == 200, response.text
    signed_in = server.client.post(
        "/admin/login", data={"token": server.token}, follow_redirects=False
    )
    assert signed_in.status_code == 303
    session_id = signed_in.cookies[COOKIE]
    page = server.client.get("/admin/", headers={"Cookie": f"{COOKIE}={session_id}"}).text
    assert "Signed in as <b id=who>tests</b> (<span id=role>admin</span>)" in page
    trail = page.split("<table id=audit>")[1].split("</table>")[0]
    assert "session.open" in trail and "machine.assign" in trail and "ops (operator" in trail
    server.client.post(
        "/admin/logout",
        headers={"Origin": "http://testserver", "Cookie": f"{COOKIE}={session_id}"},
        follow_redirects=False,
    )
    entries = list(reversed(audit.entries(server.store.engine, 10)))
    assigned, opened, closed = entries[-3:]
    assert (assigned["action"], assigned["name"], assigned["role"], assigned["via"]) == (
        "machine.assign",
        "ops",
        "operator",
        "bearer",
    )
    assert assigned["address"] == "testclient"  # the TestClient's peer
    assert (opened["action"], opened["name"], opened["role"], opened["via"]) == (
        "session.open",
        "tests",
        "admin",
        "cookie",
    )
    assert closed["action"] == "session.close"
    assert opened["after"]["session"] == closed["before"]["session"]
    assert session_id not in json.dumps(entries)  # the session id is a secret
    assert sessions.session_holder(server.store.engine, session_id) is None


def test_an_auditor_reads_and_verifies_the_trail_through_the_api(server: Server) -> None:
    watcher = server.store.create_token("watcher", "auditor", by=audit.cli_actor())
    auth = {"Authorization": f"Bearer {watcher}"}
    listed = server.client.get("/admin/api/audit?limit=1", headers=auth)
    assert listed.status_code == 200
    assert [e["action"] for e in listed.json()] == ["token.create"]
    verdict = server.client.get("/admin/api/audit/verify", headers=auth).json()
    assert verdict["intact"] and verdict["entries"] == verdict["seq"] >= 2


def test_an_auto_halt_is_recorded_as_the_server_s(published: Path, db_url: str) -> None:
    store = _store(db_url, published)
    try:
        mids = [machine_id(n) for n in range(8)]
        store.record_checks(
            [Check(m, OS, "1.0.0", "stable", None, 1.0, None, proof(store, m)) for m in mids]
        )
        admin.start_rollout(
            store, published, OS, "stable", "1.0.1", 100 - 1e-9, min_reports=2, min_failing=2,
            by=OPERATOR,
        )  # fmt: skip
        store.record_checks(
            [Check(m, OS, "1.0.0", "stable", "1.0.1", 2e9, None, proof(store, m)) for m in mids]
        )
        failures = [
            Report(m, OS, "1.0.0", "1.0.1", "failure", "x", 2e9 + 1, None, proof(store, m))
            for m in mids
        ]
        assert store.record_reports(failures) == ["stable"]
        last = audit.entries(store.engine, 1)[0]
        assert (last["action"], last["name"], last["role"]) == (
            "rollout.halt",
            "rampart serve",
            "system",
        )
        assert last["after"]["rollout_state"] == "halted" and last["after"]["failures"] >= 2
        assert audit.verify(store.engine).problems == []
    finally:
        store.engine.dispose()


def test_a_refused_change_leaves_no_entry(published: Path, db_url: str) -> None:
    store = _store(db_url, published)
    try:
        before = audit.verify(store.engine).seq
        with pytest.raises(ConflictError, match="a rollout must be newer"):
            admin.start_rollout(store, published, OS, "stable", "1.0.0", 10, by=OPERATOR)
        with pytest.raises(ConflictError, match="no rollout in progress"):
            admin.pause_rollout(store, OS, "stable", by=OPERATOR)
        assert audit.verify(store.engine).seq == before
    finally:
        store.engine.dispose()


# --- append-only, and what verify finds -------------------------------------------------


def test_the_database_refuses_to_change_or_delete_an_entry(published: Path, db_url: str) -> None:
    store = _store(db_url, published)
    try:
        _sample(store, published, 2)
        for statement in (
            "UPDATE audit_log SET action = 'x' WHERE seq = 1",
            "DELETE FROM audit_log WHERE seq = 2",
            "DELETE FROM audit_head",
        ):
            with (
                pytest.raises(SQLAlchemyError, match=r"append-only|is kept"),
                store.engine.begin() as conn,
            ):
                conn.execute(text(statement))
        assert audit.verify(store.engine).problems == []
    finally:
        store.engine.dispose()


def _tampered(published: Path, db_url: str, *statements: str) -> list[str]:
    """The problems verify finds after `statements` ran on a log of six entries after
    the bootstrap's, its triggers dropped."""
    store = _store(db_url, published)
    try:
        _sample(store, published)
        assert audit.verify(store.engine).problems == []
        _drop_triggers(store.engine)
        with store.engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
        return audit.verify(store.engine).problems
    finally:
        store.engine.dispose()


def test_verify_finds_an_altered_entry(published: Path, db_url: str) -> None:
    problems = _tampered(
        published,
        db_url,
        "UPDATE audit_log SET entry = "
        """replace(entry, '"channel":"stable"', '"channel":"eve"') WHERE seq = 3""",
    )
    assert problems == ["entry 3: its hash does not match its contents (altered)"]


def test_verify_finds_an_altered_column(published: Path, db_url: str) -> None:
    problems = _tampered(published, db_url, "UPDATE audit_log SET name = 'eve' WHERE seq = 3")
    assert problems == ["entry 3: its columns differ from its text (altered)"]


def test_verify_finds_a_removed_entry(published: Path, db_url: str) -> None:
    problems = _tampered(published, db_url, "DELETE FROM audit_log WHERE seq = 4")
    assert problems[0] == "entry 5 follows entry 3 (entry 4 removed)"
    assert "entry 5: does not chain to the entry before it" in problems[1]


def test_verify_finds_reordered_entries(published: Path, db_url: str) -> None:
    """Entries 3 and 4 swap their places (their numbers)."""
    problems = _tampered(
        published,
        db_url,
        "UPDATE audit_log SET seq = -3 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = 4",
        "UPDATE audit_log SET seq = 4 WHERE seq = -3",
    )
    assert any("does not chain" in p for p in problems)
    assert any("its text does not name it" in p for p in problems)


def test_verify_finds_entries_cut_from_the_end(published: Path, db_url: str) -> None:
    problems = _tampered(published, db_url, "DELETE FROM audit_log WHERE seq >= 6")
    assert problems == [
        "the head names entry 7, the log ends at entry 5 (entries removed from its end, "
        "or the head altered)"
    ]


def test_verify_finds_a_rewritten_chain_against_an_anchor(published: Path, db_url: str) -> None:
    """Whoever can write the database can recompute every hash after a change: the
    chain is intact again, but not the one an anchor was taken of."""
    store = _store(db_url, published)
    try:
        _sample(store, published)
        anchor = audit.verify(store.engine)
        _drop_triggers(store.engine)
        with store.engine.begin() as conn:
            rows = conn.execute(text("SELECT seq, entry FROM audit_log ORDER BY seq")).all()
            conn.execute(text("DELETE FROM audit_log"))
            prev = audit.GENESIS
            for _seq, entry in rows:
                entry = entry.replace('"name":"ops"', '"name":"eve"')
                fields = json.loads(entry)
                digest = audit.entry_hash(prev, entry)
                conn.execute(
                    text(
                        "INSERT INTO audit_log (seq, at, name, role, action, target, entry, "
                        "prev, hash) VALUES (:seq, :at, :name, :role, :action, :target, "
                        ":entry, :prev, :hash)"
                    ),
                    {"entry": entry, "prev": prev, "hash": digest}
                    | {k: fields[k] for k in ("seq", "at", "name", "role", "action", "target")},
                )
                prev = digest
            conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
        assert audit.verify(store.engine).problems == []  # consistent again...
        problems = audit.verify(store.engine, (anchor.seq, anchor.hash)).problems
        assert problems == [
            f"entry {anchor.seq}: hash {prev[:16]}… is not the anchor's {anchor.hash[:16]}… "
            "(the log was rewritten)"
        ]
    finally:
        store.engine.dispose()


def test_verify_cli_prints_an_anchor_and_exits_5_on_a_problem(webroot: Path) -> None:
    for n in range(3):
        js(webroot, "machine", "assign", machine_id(n), "--os", OS, "--default")
    code, out, _ = cli(webroot, "audit", "verify")
    assert code == 0 and "intact, 3 entries; anchor 3:" in out
    anchor = out.split("anchor ")[1].split()[0]
    assert js(webroot, "audit", "verify", "--expect", anchor)["intact"]
    engine = db.make_engine(db.default_url(webroot))
    _drop_triggers(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 3"))
        conn.execute(text("UPDATE audit_head SET seq = 2, hash = (SELECT hash FROM audit_log "
                          "WHERE seq = 2)"))  # fmt: skip
    engine.dispose()
    code, out, err = cli(webroot, "audit", "verify", "--expect", anchor)
    assert code == AuditError.exit_code
    assert "the anchor names entry 3, but the log ends at entry 2" in err
    code, _, err = cli(webroot, "audit", "verify", "--expect", "3:xyz")
    assert code == 2 and "expected SEQ:HASH" in err


def test_an_export_verifies_on_its_own_and_its_tampering_is_found(
    webroot: Path, tmp_path: Path
) -> None:
    for n in range(4):
        js(webroot, "machine", "assign", machine_id(n), "--os", OS, "--default")
    code, out, _ = cli(webroot, "audit", "log", "--json", "--all")
    assert code == 0
    lines = out.splitlines()
    assert [json.loads(line)["entry"]["seq"] for line in lines] == [1, 2, 3, 4]
    export = tmp_path / "audit.jsonl"
    export.write_text(out)
    result = run_cli("audit", "verify", "--file", export, "--json")
    assert result.code == 0 and json.loads(result.out)["entries"] == 4
    export.write_text("\n".join([lines[0], lines[2], lines[1], lines[3]]) + "\n")
    result = run_cli("audit", "verify", "--file", export)
    assert result.code == AuditError.exit_code and "out of order" in result.err
    export.write_text(out.replace(machine_id(2), machine_id(9)))
    result = run_cli("audit", "verify", "--file", export)
    assert result.code == AuditError.exit_code
    assert "entry 3: its hash does not match its contents" in result.err
    export.write_text("{not json\n")
    result = run_cli("audit", "verify", "--file", export)
    assert result.code == 2 and f"{export}:1: not a line of" in result.err
    tail = cli(webroot, "audit", "log", "--json", "--limit", "2")[1].splitlines()
    assert tail == lines[2:]
    export.write_text("\n".join(tail) + "\n")  # a tail verifies from where it starts
    assert run_cli("audit", "verify", "--file", export).code == 0


# --- concurrent writers ---------------------------------------------------------------


def test_concurrent_writers_never_fork_the_chain(published: Path, db_url: str) -> None:
    """Four writers, each with its own engine (as `rampart serve` instances on one
    database), change machines and halt nothing: every change gets one entry, numbered
    without a gap, and the chain is intact."""
    store = _store(db_url, published)
    writers = [Store(db.make_engine(db_url)) for _ in range(4)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(15):
                by = audit.Actor("bearer", f"w{k}", "operator", None)
                admin.assign(writers[k], machine_id(100 * k + i), OS, "stable", by=by)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        verdict = audit.verify(store.engine)
        assert verdict.problems == []
        assigned = [a for a in _actions(store.engine) if a[0] == "machine.assign"]
        assert len(assigned) == 60
        assert verdict.entries == verdict.seq
    finally:
        for writer in writers:
            writer.engine.dispose()
        store.engine.dispose()


def test_upgrade_starts_an_empty_chain(db_url: str) -> None:
    engine = db.make_engine(db_url)
    try:
        upgrade_to(engine, "0004")
        db.migrate(engine)
        verdict = audit.verify(engine)
        assert (verdict.entries, verdict.seq, verdict.hash) == (0, 0, audit.GENESIS)
        assert verdict.problems == []
    finally:
        engine.dispose()

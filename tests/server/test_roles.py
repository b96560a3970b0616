"""Roles of admin tokens (rampart.server.roles): each token carries one, `token
create --role` sets it, `token list` shows it, and tokens made before roles existed
are admins after the upgrade."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from rampart.errors import UsageError
from rampart.server import audit, db, roles
from rampart.server.store import Store, token_digest, token_holder
from tests.server.conftest import OS, Server, machine_id, upgrade_to
from tests.server.test_commands import cli, js


def test_each_role_may_do_what_the_roles_below_it_may() -> None:
    allowed = {(r, n) for r in roles.ROLES for n in roles.ROLES if roles.allows(r, n)}
    assert allowed == {
        ("auditor", "auditor"),
        ("operator", "auditor"),
        ("operator", "operator"),
        ("admin", "auditor"),
        ("admin", "operator"),
        ("admin", "admin"),
    }
    assert not roles.allows("root", "auditor")
    with pytest.raises(UsageError, match="role 'root'"):
        roles.allows("admin", "root")


def test_tokens_carry_their_role_and_list_never_shows_them(webroot: Path) -> None:
    auditor = js(webroot, "token", "create", "audit", "--role", "auditor")
    assert auditor["role"] == "auditor"
    admin = js(webroot, "token", "create", "ops")
    assert admin["role"] == "admin"  # the default
    listed = js(webroot, "token", "list")
    assert [(t["name"], t["role"]) for t in listed] == [("audit", "auditor"), ("ops", "admin")]
    text = cli(webroot, "token", "list")[1]
    assert auditor["token"] not in text and admin["token"] not in text
    code, _, err = cli(webroot, "token", "create", "x", "--role", "root")
    assert code == 2 and "invalid choice" in err
    store = Store(db.make_engine(db.default_url(webroot)))
    known = store.token_roles()
    assert token_holder(auditor["token"], known) == ("audit", "auditor")
    assert token_holder(admin["token"], known) == ("ops", "admin")
    assert token_holder("rpt_" + "x" * 43, known) is None


def test_upgrade_makes_the_tokens_made_before_roles_admins(db_url: str) -> None:
    """A database of revision 0003 with a token: it could do everything, and after the
    upgrade it is an admin."""
    engine = db.make_engine(db_url)
    upgrade_to(engine, "0003")
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO admin_tokens (name, digest, created_at) VALUES ('old', :d, 1.0)"),
            {"d": token_digest("rpt_old")},
        )
    try:
        db.migrate(engine)
        with engine.connect() as conn:
            rows = conn.execute(select(db.tokens.c.name, db.tokens.c.role)).all()
            conn.execute(insert(db.tokens).values(name="n", digest="d" * 64, created_at=2.0))
    finally:
        engine.dispose()
    assert [(r.name, r.role) for r in rows] == [("old", "admin")]


def _admin_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the admin API and the dashboard (the routers
    the app includes), path parameters filled in, and /metrics."""
    from fastapi.routing import APIRoute

    from rampart.server import admin_api, dashboard

    found = []
    for route in [*admin_api.router.routes, *dashboard.router.routes]:
        assert isinstance(route, APIRoute)
        if route.path in ("/admin/login", "/admin/logout"):
            continue
        path = route.path.format(
            os_name=OS, name="stable", machine_id=machine_id(7), value="0" * 64
        )
        found += [(method, path) for method in sorted(route.methods or ())]
    return [*found, ("GET", "/metrics")]


@pytest.mark.parametrize("role", roles.ROLES)
def test_each_admin_route_admits_exactly_the_roles_it_needs(server: Server, role: str) -> None:
    """Per role and endpoint: a token below what a route needs gets 403 before the
    route runs; one at or above it passes the door (the route may still refuse what
    it is asked, with another status)."""
    token = server.store.create_token(f"t-{role}", role, by=audit.cli_actor())
    routes = _admin_routes()
    assert len(routes) >= 12, routes
    for method, path in routes:
        response = server.client.request(
            method, path, headers={"authorization": f"Bearer {token}"}, json={}
        )
        needed = roles.needed(method, path)
        if roles.allows(role, needed):
            assert response.status_code != 403, (role, method, path, response.text)
        else:
            assert response.status_code == 403, (role, method, path, response.text)
            assert f"needs {needed}" in response.json()["detail"]

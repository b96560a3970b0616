"""The update server over HTTP, on SQLite and on a real PostgreSQL: the CLIP OS protocol,
channels and rollouts, reports, bad input, administration and metrics."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rampart.server import admin, db, state
from rampart.server.app import Settings, create_app
from rampart.server.rollout import in_rollout
from rampart.server.store import Store
from tests.server.conftest import OS, Server, headers, machine_id


def count(server: Server, table: object) -> int:
    server.flush()
    with server.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)  # type: ignore[arg-type]


def test_exact_response_bytes_a_clipos_client_receives(server: Server, published: Path) -> None:
    response = server.client.get(f"/update/v1/{OS}/version", headers=headers(machine_id(1)))
    assert response.status_code == 200
    assert response.content == b'version = "1.0.0"\n'
    # ... the same bytes as the static webroot's version file
    assert response.content == (published / f"update/v1/{OS}/version").read_bytes()


def test_check_is_recorded_with_machine_version_channel_and_offer(server: Server) -> None:
    server.check(machine_id(2), "1.0.0+build.7")
    server.flush()
    with server.store.engine.connect() as conn:
        row = conn.execute(select(db.checks)).one()
        machine = conn.execute(select(db.machines)).one()
    assert (row.machine_id, row.version, row.channel, row.offered) == (
        machine_id(2),
        "1.0.0",
        "stable",
        "1.0.0",
    )
    assert row.address is not None
    assert (machine.machine_id, machine.version, machine.os) == (machine_id(2), "1.0.0", OS)


def test_request_without_headers_gets_the_default_and_records_nothing(server: Server) -> None:
    response = server.client.get(f"/update/v1/{OS}/version")
    assert response.content == b'version = "1.0.0"\n'
    assert count(server, db.checks) == 0
    assert count(server, db.machines) == 0


def test_machines_on_beta_get_beta_and_stable_gets_stable(server: Server) -> None:
    server.client.post(
        "/admin/api/channels",
        headers=server.auth,
        json={"os": OS, "name": "beta", "version": "1.0.2"},
    ).raise_for_status()
    server.client.put(
        f"/admin/api/machines/{machine_id(3)}/channel",
        headers=server.auth,
        json={"os": OS, "channel": "beta"},
    ).raise_for_status()
    assert server.check(machine_id(3)) == "1.0.2"
    assert server.check(machine_id(4)) == "1.0.0"
    # back to the default channel
    server.client.put(
        f"/admin/api/machines/{machine_id(3)}/channel",
        headers=server.auth,
        json={"os": OS, "channel": None},
    ).raise_for_status()
    assert server.check(machine_id(3)) == "1.0.0"


def test_staged_rollout_offers_the_new_version_to_the_chosen_share(server: Server) -> None:
    response = server.client.post(
        f"/admin/api/channels/{OS}/stable/rollout",
        headers=server.auth,
        json={"version": "1.0.1", "percent": 25},
    )
    assert response.status_code == 200, response.text
    machines = [machine_id(n) for n in range(400)]
    offered = {m for m in machines if server.check(m) == "1.0.1"}
    assert offered == {m for m in machines if in_rollout(m, "1.0.1", 25)}
    assert 70 <= len(offered) <= 130
    # Raising the share keeps everyone who already had it.
    server.client.post(
        f"/admin/api/channels/{OS}/stable/rollout/raise", headers=server.auth, json={"percent": 60}
    ).raise_for_status()
    raised = {m for m in machines if server.check(m) == "1.0.1"}
    assert offered < raised
    # Lowering is refused: it would take the update away.
    response = server.client.post(
        f"/admin/api/channels/{OS}/stable/rollout/raise", headers=server.auth, json={"percent": 10}
    )
    assert response.status_code == 409
    # A paused rollout stops being offered; resuming offers it again.
    server.client.post(
        f"/admin/api/channels/{OS}/stable/rollout/pause", headers=server.auth
    ).raise_for_status()
    assert all(server.check(m) == "1.0.0" for m in machines[:50])
    server.client.post(
        f"/admin/api/channels/{OS}/stable/rollout/resume", headers=server.auth
    ).raise_for_status()
    assert {m for m in machines if server.check(m) == "1.0.1"} == raised
    # 100 % completes the rollout: the channel now names 1.0.1.
    done = server.client.post(
        f"/admin/api/channels/{OS}/stable/rollout/raise", headers=server.auth, json={"percent": 100}
    ).json()
    assert (done["version"], done["rollout_version"]) == ("1.0.1", None)
    assert server.check(machine_id(9999)) == "1.0.1"


def test_rollout_halts_itself_when_failures_cross_the_threshold(server: Server) -> None:
    outcomes = ["success", "success", "failure", "failure"]
    for n in range(len(outcomes)):  # known before the rollout: their reports count
        assert server.check(machine_id(100 + n)) == "1.0.0"
    server.client.post(
        f"/admin/api/channels/{OS}/stable/rollout",
        headers=server.auth,
        json={
            "version": "1.0.1",
            "percent": 100 - 0.01,
            "min_reports": 4,
            "min_failing": 2,
            "failure_threshold": 0.25,
        },
    ).raise_for_status()
    # Reports from machines that were never offered the rollout do not count.
    for n in range(10):
        server.client.post(
            f"/update/v1/{OS}/report",
            headers=headers(machine_id(900 + n)),
            json={"from": "1.0.0", "to": "1.0.1", "outcome": "failure", "error": "forged"},
        ).raise_for_status()
    channel = server.client.get("/admin/api/channels", headers=server.auth).json()[0]
    assert channel["rollout_state"] == "active"
    for n in range(len(outcomes)):
        assert server.check(machine_id(100 + n)) == "1.0.1"
    server.flush()
    for n, outcome in enumerate(outcomes):
        response = server.report(
            machine_id(100 + n), {"from": "1.0.0", "to": "1.0.1", "outcome": outcome, "error": "x"}
        )
        assert response.status_code == 200
    channel = server.client.get("/admin/api/channels", headers=server.auth).json()[0]
    assert channel["rollout_state"] == "halted"
    assert server.check(machine_id(100)) == "1.0.0"


def test_deeply_nested_report_is_a_400(server: Server) -> None:
    body = b"[" * 8000 + b"]" * 8000
    response = server.client.post(
        f"/update/v1/{OS}/report", headers=headers(machine_id(1)), content=body
    )
    assert response.status_code == 400


def test_reports_update_the_fleet_view(server: Server) -> None:
    server.check(machine_id(5), "1.0.0")
    server.report(
        machine_id(5),
        {"from": "1.0.0", "to": "1.0.1", "outcome": "failure", "error": "Core does not fit"},
    ).raise_for_status()
    server.flush()
    view = server.client.get("/admin/api/fleet", headers=server.auth).json()
    assert view["counts"]["reports_failure"] == 1
    assert view["recent_failures"][0]["error"] == "Core does not fit"
    assert view["versions"] == [{"os": OS, "channel": "stable", "version": "1.0.0", "machines": 1}]


def test_channel_cannot_point_at_a_version_the_webroot_does_not_hold(server: Server) -> None:
    response = server.client.put(
        f"/admin/api/channels/{OS}/stable/version", headers=server.auth, json={"version": "9.9.9"}
    )
    assert response.status_code == 400
    assert "not in the webroot" in response.json()["error"]


@pytest.mark.parametrize(
    ("hdrs", "status", "reason"),
    [
        ({"clipos-machineid": "xyz", "clipos-version": "1.0.0"}, 400, "32 lowercase hex"),
        ({"clipos-machineid": "A" * 32, "clipos-version": "1.0.0"}, 400, "32 lowercase hex"),
        ({"clipos-machineid": "0" * 32, "clipos-version": "1.0"}, 400, "semantic version"),
        ({"clipos-machineid": "0" * 32, "clipos-version": "1" * 200}, 400, "128 bytes"),
        ({"clipos-machineid": "0" * 32}, 400, "clipos-version"),
        ({"clipos-version": "1.0.0"}, 400, "clipos-machineid"),
    ],
)
def test_malformed_identification_is_a_400_and_records_nothing(
    server: Server, hdrs: dict[str, str], status: int, reason: str
) -> None:
    response = server.client.get(f"/update/v1/{OS}/version", headers=hdrs)
    assert response.status_code == status
    assert reason in response.text and response.text.count("\n") == 1
    assert count(server, db.checks) == 0


def test_unknown_os_is_a_404(server: Server) -> None:
    for os_name in ("nope", "../etc", "UPPER"):
        response = server.client.get(
            f"/update/v1/{os_name}/version", headers=headers(machine_id(1))
        )
        assert response.status_code == 404
    assert count(server, db.checks) == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"outcome": "maybe"}', "outcome"),
        (b'{"outcome": "success", "to": "1.0"}', "semantic version"),
        (b'{"outcome": "success", "error": 42}', "'error'"),
        (b'{"outcome": "success", "error": "' + b"x" * 20_000 + b'"}', "larger than"),
    ],
)
def test_malformed_report_is_refused_and_records_nothing(
    server: Server, body: bytes, reason: str
) -> None:
    response = server.client.post(
        f"/update/v1/{OS}/report", headers=headers(machine_id(1)), content=body
    )
    assert response.status_code in (400, 413)
    assert reason in response.text
    assert count(server, db.reports) == 0


def test_injection_attempts_are_inert(server: Server) -> None:
    evil = "'); DROP TABLE checks; --"
    response = server.report(
        machine_id(6),
        {
            "from": "1.0.0",
            "to": "1.0.1",
            "outcome": "failure",
            "error": evil + "<script>alert(1)</script>",
        },
    )
    assert response.status_code == 200
    assert server.check(machine_id(6)) == "1.0.0"
    assert count(server, db.checks) == 1
    page = server.client.get("/admin/", headers=server.auth)
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;" in page.text
    response = server.client.put(
        "/admin/api/machines/x'%20OR%201=1--/channel",
        headers=server.auth,
        json={"os": OS, "channel": "stable"},
    )
    assert response.status_code == 400


def test_admin_api_needs_a_valid_token(server: Server) -> None:
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        assert server.client.get("/admin/api/fleet", headers=auth).status_code == 401
        assert server.client.get("/metrics", headers=auth).status_code == 401
    response = server.client.post(
        "/admin/api/channels",
        headers={"Authorization": "Bearer x"},
        json={"os": OS, "name": "evil"},
    )
    assert response.status_code == 401
    assert [c["name"] for c in server.store.channel_rows()] == ["stable"]
    # Only the token's SHA-256 is stored.
    with server.store.engine.connect() as conn:
        digests = conn.execute(select(db.tokens.c.digest)).scalars().all()
    assert server.token not in digests and len(digests[0]) == 64


def test_openapi_schema_lists_the_admin_api(server: Server) -> None:
    assert server.client.get("/admin/openapi.json").status_code == 401
    schema = server.client.get("/admin/openapi.json", headers=server.auth).json()
    assert "/admin/api/channels/{os_name}/{name}/rollout" in schema["paths"]
    assert "/update/v1/{os_name}/version" not in schema["paths"]


def test_metrics(server: Server) -> None:
    server.check(machine_id(7))
    server.report(machine_id(7), {"from": "1.0.0", "to": "1.0.1", "outcome": "success"})
    server.flush()
    text = server.client.get("/metrics", headers=server.auth).text
    assert "rampart_checks_total 1\n" in text
    assert "rampart_anonymous_checks_total 0\n" in text
    assert 'rampart_reports_total{outcome="success"} 1\n' in text
    assert 'rampart_machines{os="clipos",channel="stable",version="1.0.0"} 1\n' in text


def test_payloads_are_served_with_range_requests(server: Server, published: Path) -> None:
    core = (published / "dist/1.0.1/clipos-core").read_bytes()
    response = server.client.get("/dist/1.0.1/clipos-core", headers={"Range": "bytes=100-199"})
    assert response.status_code == 206
    assert response.content == core[100:200]
    assert server.client.get("/dist/../../etc/passwd").status_code == 404


def test_chunk_store_is_served_with_ranges_and_cached_for_good(
    server: Server, published: Path
) -> None:
    """The chunk store's files are named by their content: cached as immutable. The
    payloads keep their default headers; neither needs the database."""
    chunk = next((published / "dist/store.castr").glob("*/*.cacnk"))
    path = f"/dist/store.castr/{chunk.parent.name}/{chunk.name}"
    response = server.client.get(path)
    assert response.status_code == 200 and response.content == chunk.read_bytes()
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    partial = server.client.get(path, headers={"Range": "bytes=0-9"})
    assert partial.status_code == 206 and partial.content == chunk.read_bytes()[:10]
    index = server.client.get("/dist/1.0.1/clipos-core.caibx")
    assert index.status_code == 200 and "immutable" not in index.headers.get("cache-control", "")


def test_while_it_serves_the_interpreter_is_tuned_for_the_hot_path(
    published: Path, db_url: str
) -> None:
    """While it serves, what start-up made is out of the garbage collector's sight (a
    full collection walked it: pauses of 70-98 ms every 4 s under load) and the event
    loop hands the interpreter to the database threads after 1 ms, not 5 (each
    statement of a recording transaction waited for it): both made the p99 of signed
    check-ins (bench/auth_paced.py). Once it stops, the interpreter is as it was."""
    engine = db.make_engine(db_url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    app = create_app(store, Settings(published))
    interval = sys.getswitchinterval()
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(state.SWITCH_INTERVAL)
        assert client.get(f"/update/v1/{OS}/version").status_code == 200
    assert gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == pytest.approx(interval)
    engine.dispose()

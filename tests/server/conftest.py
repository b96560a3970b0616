"""Server test harness: a published webroot, a migrated database (SQLite, and a real
PostgreSQL cluster started by the tests), and the app in-process."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import Engine

from rampart.contracts.version import parse_version
from rampart.release import webroot as webroot_mod
from rampart.server import admin, audit, db
from rampart.server.app import Settings, create_app
from rampart.server.store import Store
from rampart.testbed import services
from tests.conftest import KeyPair, make_keypair
from tests.releases import build_payloads
from tests.server.signing import SignedFleet

OS = "clipos"
VERSIONS = ("1.0.0", "1.0.1", "1.0.2")


def machine_id(n: int) -> str:
    return f"{n:032x}"


def headers(mid: str, version: str = "1.0.0") -> dict[str, str]:
    return {"clipos-machineid": mid, "clipos-version": version}


@pytest.fixture(scope="session")
def vendor_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("vendor"))


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory, vendor_key: KeyPair) -> Path:
    """A webroot with 1.0.0, 1.0.1 and 1.0.2 published; the default channel at 1.0.0."""
    root = tmp_path_factory.mktemp("webroot") / "webroot"
    payloads = tmp_path_factory.mktemp("payloads")
    for version in VERSIONS:
        core, efiboot = build_payloads(payloads, version, core_size=50_000)
        webroot_mod.publish(
            root, OS, parse_version(version), core, efiboot, vendor_key.key, force=True
        )
    webroot_mod.publish(
        root,
        OS,
        parse_version("1.0.0"),
        payloads / "core-1.0.0",
        payloads / "efiboot-1.0.0",
        vendor_key.key,
        force=True,
    )
    return root


@pytest.fixture(scope="session")
def postgres() -> Iterator[services.Cluster]:
    """A private PostgreSQL cluster for the whole session (rampart.testbed.services)."""
    with services.Cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'server.sqlite'}"
        return
    cluster = request.getfixturevalue("postgres")
    name = "t_" + secrets.token_hex(6)
    cluster.create_database(name)
    try:
        yield cluster.url_for(name)
    finally:
        cluster.drop_database(name)


@dataclass
class Server:
    store: Store
    client: TestClient
    webroot: Path
    token: str
    fleet: SignedFleet  # machines whose admitted keys sign: what they send counts

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def flush(self) -> None:
        """Write the buffered checks now."""
        portal, app = self.client.portal, self.client.app
        assert portal is not None and isinstance(app, FastAPI)
        portal.call(app.state.recorder.flush)

    def check(self, mid: str, version: str = "1.0.0") -> str:
        """A check signed by the machine's admitted key; the version offered."""
        sent = self.fleet(mid).headers("version", version=version)
        response = self.client.get(f"/update/v1/{OS}/version", headers=sent)
        assert response.status_code == 200, response.text
        return str(response.text.split('"')[1])

    def report(self, mid: str, doc: dict[str, Any], version: str = "1.0.0") -> Response:
        """An install report signed by the machine's admitted key."""
        body = json.dumps(doc).encode()
        sent = self.signed(mid, "report", body, version)
        response: Response = self.client.post(f"/update/v1/{OS}/report", content=body, headers=sent)
        return response

    def signed(
        self, mid: str, kind: str, body: bytes = b"", version: str = "1.0.0"
    ) -> dict[str, str]:
        """The headers of a request `mid` signs with its admitted key."""
        return self.fleet(mid).headers(kind, body, version)


@pytest.fixture
def server(published: Path, db_url: str, tmp_path: Path) -> Iterator[Server]:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    store = Store(engine)
    admin.bootstrap(store, published)
    token = store.create_token("tests", by=audit.cli_actor())
    # One client address introduces hundreds of machines here: no newcomer limit.
    settings = Settings(published, flush_interval=0.02, cache_ttl=0.0)
    settings.new_machines_per_hour = 0
    app = create_app(store, settings)
    with TestClient(app) as client:
        yield Server(store, client, published, token, SignedFleet(store, tmp_path / "fleet"))
    engine.dispose()


@pytest.fixture
def webroot(published: Path, tmp_path: Path) -> Path:
    """A copy of the published webroot, for the admin verbs to change."""
    root = tmp_path / "webroot"
    shutil.copytree(published, root)
    return root


def upgrade_to(engine: Engine, revision: str) -> None:
    """Migrate the database of `engine` up to `revision` only (Alembic), as a server
    of that revision left it: for the tests of the upgrades after it."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

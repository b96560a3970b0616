"""The update service: an ASGI application (FastAPI on Starlette, run by uvicorn).

Wire-compatible with the CLIP OS client (docs/server.md):
  GET  /update/v1/{os}/version   per-machine answer `version = "X"` (TOML), recorded
  POST /update/v1/{os}/report    install report (JSON)
  GET  /dist/...                 the webroot's payloads, with range requests
  GET  /tuf/..., /heads/...      with --tuf-key: the TUF metadata and the channel heads,
                                 which rampart.server.signer keeps signed
Administration (bearer token, stored hashed): /admin/api/... (OpenAPI schema at
/admin/openapi.json), the fleet dashboard at /admin/, Prometheus metrics at /metrics.

The version check is the hot path. It answers from in-memory caches (channels,
machine assignments) that are dropped within a second of any administrative
change (a generation counter in the database), and it answers 200 only once the
check is committed: concurrent checks are written together, in one transaction per
batch, by a background task. If the database cannot be written, checks get 503 and
the service recovers by itself when a probe write succeeds again.

Here the application is only assembled: the routes are module-level functions on
routers (rampart.server.protocol, rampart.server.admin_api, rampart.server.dashboard)
that reach the app's objects through one ServerState on `app.state.server`
(rampart.server.state); the caches are rampart.server.fleet's, the recorders
rampart.server.recorder's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from rampart.contracts import wire
from rampart.errors import ConflictError, RampartError
from rampart.server import admin_api, dashboard, guard, protocol, signer, tuffiles
from rampart.server.fleet import TooManyNewMachines
from rampart.server.protocol import reason
from rampart.server.recorder import Unavailable
from rampart.server.state import ServerState, Settings
from rampart.server.store import Store

__all__ = ["ServerState", "Settings", "app_from_environment", "create_app"]

log = logging.getLogger(__name__)


def create_app(store: Store, settings: Settings) -> FastAPI:
    """The application for one webroot and one database (schema already migrated)."""
    server = ServerState.build(store, settings)
    app = FastAPI(
        title="Rampart update server",
        version="1",
        lifespan=server.lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = server
    # The same objects under their former names (the tests flush app.state.recorder).
    app.state.fleet = server.fleet
    app.state.recorder = server.checks
    app.state.store = store

    app.add_exception_handler(SQLAlchemyError, _database_down)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(TooManyNewMachines, _too_many_new)
    app.add_exception_handler(RampartError, _rampart_error)

    app.include_router(protocol.router)
    dist = settings.webroot / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    app.mount("/dist", _Dist(directory=dist), name="dist")
    if settings.tuf is not None:
        app.include_router(tuffiles.router)
    app.include_router(admin_api.router)
    app.include_router(dashboard.router)
    app.add_middleware(guard.AdminGuard, store=store)
    return app


class _Dist(StaticFiles):
    """The webroot's dist/: payloads, signatures and chunk indexes (with range
    requests), and the chunk store, whose files are named by their content and never
    change: cached for a year (`immutable`). No database work on any of it."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory=directory)
        self.store = os.path.realpath(directory / wire.STORE) + os.sep

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        if os.path.realpath(full_path).startswith(self.store):
            response.headers["Cache-Control"] = CHUNK_CACHE
        return response


CHUNK_CACHE = "public, max-age=31536000, immutable"


# --- exception handlers ---------------------------------------------------------------


async def _database_down(_: Request, exc: Exception) -> Response:
    log.error("database error: %s", str(exc).splitlines()[0])
    return reason(503, "database unavailable, retry later")


async def _unavailable(_: Request, __: Exception) -> Response:
    return reason(503, "database unavailable, retry later")


async def _client_gone(_: Request, __: Exception) -> Response:
    # The client closed the connection, or missed the body deadline
    # (rampart.server.connections): nobody to answer, nothing to log.
    return Response(status_code=400)


async def _too_many_new(_: Request, __: Exception) -> Response:
    return reason(429, "too many new machine ids from this address, retry later")


async def _rampart_error(_: Request, exc: Exception) -> Response:
    status = 409 if isinstance(exc, ConflictError) else 400
    return JSONResponse({"error": str(exc)}, status_code=status)


def app_from_environment() -> FastAPI:
    """The app for `rampart serve`'s workers: webroot and database from the environment
    (RAMPART_WEBROOT, RAMPART_DB), schema already migrated by the parent."""
    import os

    from rampart.server import db

    _end_with_supervisor()
    webroot = Path(os.environ["RAMPART_WEBROOT"])
    engine = db.make_engine(os.environ.get("RAMPART_DB") or db.default_url(webroot))
    settings = Settings(webroot)
    if os.environ.get("RAMPART_NEW_MACHINES_PER_HOUR"):
        settings.new_machines_per_hour = int(os.environ["RAMPART_NEW_MACHINES_PER_HOUR"])
    if os.environ.get("RAMPART_CHECK_RETENTION_DAYS"):
        settings.check_retention_days = float(os.environ["RAMPART_CHECK_RETENTION_DAYS"])
    options = signer.Options.from_environment(os.environ)
    if options is not None:  # checked by the parent; read again here, in each worker
        settings.tuf = options.load(webroot)
    return create_app(Store(engine), settings)


def _end_with_supervisor() -> None:
    """In a worker of `--workers N`: be sent SIGTERM (a graceful stop) when uvicorn's
    supervisor dies, even by SIGKILL, so that no orphaned worker keeps serving and
    holding the port. Nothing to do in a single process (no supervisor)."""
    import ctypes
    import multiprocessing
    import os
    import signal
    import sys

    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent.pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)

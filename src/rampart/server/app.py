"""The update service: an ASGI application (FastAPI on Starlette, run by uvicorn).

Wire-compatible with the CLIP OS client (docs/server.md):
  GET  /update/v1/{os}/version   per-machine answer `version = "X"` (TOML), recorded
  POST /update/v1/{os}/report    install report (JSON)
  GET  /dist/...                 the webroot's payloads, with range requests
Administration (bearer token, stored hashed): /admin/api/... (OpenAPI schema at
/admin/openapi.json), the fleet dashboard at /admin/, Prometheus metrics at /metrics.

The version check is the hot path. It answers from in-memory caches (channels,
machine assignments) that are dropped within a second of any administrative
change (a generation counter in the database), and it answers 200 only once the
check is committed: concurrent checks are written together, in one transaction per
batch, by a background task. If the database cannot be written, checks get 503 and
the service recovers by itself when a probe write succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from rampart.contracts import wire
from rampart.errors import ConflictError, RampartError, UsageError
from rampart.server import admin, guard
from rampart.server.fleet import Fleet, TooManyNewMachines
from rampart.server.recorder import Recorder, Unavailable, prune_checks
from rampart.server.rollout import DEFAULT_NEW_MACHINES_PER_HOUR, ChannelState, offer
from rampart.server.store import DEFAULT_CHECK_RETENTION_DAYS, Check, Report, Store

log = logging.getLogger(__name__)

MAX_VERSION_HEADER = wire.MAX_VERSION_HEADER
MAX_REPORT_BODY = wire.REPORT_MAX


def _reason(status: int, reason: str) -> PlainTextResponse:
    return PlainTextResponse(reason + "\n", status_code=status)


# --- admin API models --------------------------------------------------------------------


class ChannelCreate(BaseModel):
    os: str = Field(max_length=64)
    name: str = Field(max_length=64)
    version: str | None = Field(default=None, max_length=128)
    default: bool = False


class VersionSet(BaseModel):
    version: str = Field(max_length=128)
    force: bool = False


class RolloutStart(BaseModel):
    version: str = Field(max_length=128)
    percent: float = Field(ge=0, le=100)
    failure_threshold: float | None = Field(default=None, ge=0, le=1)
    min_reports: int | None = Field(default=None, ge=1)
    min_failing: int | None = Field(default=None, ge=1)


class RolloutRaise(BaseModel):
    percent: float = Field(ge=0, le=100)


class Assignment(BaseModel):
    os: str = Field(max_length=64)
    channel: str | None = Field(default=None, max_length=64)


@dataclass
class Settings:
    webroot: Path
    flush_interval: float = 0.05  # while the database cannot be written: probe interval
    cache_ttl: float = 1.0
    new_machines_per_hour: int = DEFAULT_NEW_MACHINES_PER_HOUR  # per address; 0: no limit
    check_retention_days: float = DEFAULT_CHECK_RETENTION_DAYS
    prune_every: float = 3600.0


def create_app(store: Store, settings: Settings) -> FastAPI:
    """The application for one webroot and one database (schema already migrated)."""
    fleet = Fleet(store, settings.cache_ttl, new_machines_per_hour=settings.new_machines_per_hour)
    recorder = Recorder(store, settings.flush_interval, store.record_checks)

    def write_reports(batch: list[Report]) -> None:
        for name in store.record_reports(batch):
            log.warning("rollout on channel %s halted: failure rate over threshold", name)

    # Reports too are committed in batches: one commit (and, with PostgreSQL, one turn
    # of the rollout's tally lock) for all the reports that arrived meanwhile.
    reports = Recorder(store, settings.flush_interval, write_reports)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(recorder.run())
        reports_task = asyncio.create_task(reports.run())
        pruner = asyncio.create_task(
            prune_checks(store, settings.check_retention_days, settings.prune_every)
        )
        try:
            yield
        finally:
            pruner.cancel()
            # No cancel: a batch being written must commit before the process exits.
            recorder.close()
            reports.close()
            await task
            await reports_task
            with contextlib.suppress(asyncio.CancelledError):
                await pruner

    app = FastAPI(
        title="Rampart update server",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.fleet = fleet
    app.state.recorder = recorder
    app.state.store = store

    @app.exception_handler(SQLAlchemyError)
    async def _database_down(_: Request, exc: SQLAlchemyError) -> Response:
        log.error("database error: %s", str(exc).splitlines()[0])
        return _reason(503, "database unavailable, retry later")

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, __: Unavailable) -> Response:
        return _reason(503, "database unavailable, retry later")

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, __: ClientDisconnect) -> Response:
        # The client closed the connection, or missed the body deadline
        # (rampart.server.connections): nobody to answer, nothing to log.
        return Response(status_code=400)

    @app.exception_handler(TooManyNewMachines)
    async def _too_many_new(_: Request, __: TooManyNewMachines) -> Response:
        return _reason(429, "too many new machine ids from this address, retry later")

    @app.exception_handler(RampartError)
    async def _rampart_error(_: Request, exc: RampartError) -> Response:
        status = 409 if isinstance(exc, ConflictError) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    # --- the CLIP OS protocol -------------------------------------------------------------

    def identify(request: Request) -> tuple[str | None, str | None, Response | None]:
        machine_id = request.headers.get(wire.MACHINE_ID_HEADER)
        version = request.headers.get(wire.VERSION_HEADER)
        if machine_id is None and version is None:
            return None, None, None
        try:
            machine_id, parsed = wire.parse_identity(machine_id, version)
        except UsageError as exc:
            return None, None, _reason(400, str(exc))
        return machine_id, parsed.core, None

    @app.get("/update/v1/{os_name}/version", include_in_schema=False)
    async def version_check(os_name: str, request: Request) -> Response:
        if not wire.NAME.fullmatch(os_name):
            return _reason(404, "unknown os")
        machine_id, running, error = identify(request)
        if error is not None:
            return error
        client = request.client
        address = client.host if client else None
        channel = await fleet.channel_for(os_name, machine_id, address)
        if channel is None:
            return _reason(404, "unknown os")
        offered = offer(channel, machine_id)
        if offered is None:
            return _reason(404, f"no version published on channel {channel.name}")
        if machine_id is not None and running is not None:
            # Recorded before it is answered: a 200 is never lost (docs/server.md).
            await recorder.record(
                Check(machine_id, os_name, running, channel.name, offered, time.time(), address)
            )
        return Response(
            wire.render_version_document(offered), media_type="application/octet-stream"
        )

    @app.post("/update/v1/{os_name}/report", include_in_schema=False)
    async def install_report(os_name: str, request: Request) -> Response:
        if not wire.NAME.fullmatch(os_name):
            return _reason(404, "unknown os")
        machine_id, _running, error = identify(request)
        if error is not None:
            return error
        if machine_id is None:
            return _reason(400, "clipos-machineid and clipos-version are required")
        await fleet.refresh()
        if not fleet.known_os(os_name):
            return _reason(404, "unknown os")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_REPORT_BODY):
            return _reason(413, f"report larger than {MAX_REPORT_BODY} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REPORT_BODY:
                return _reason(413, f"report larger than {MAX_REPORT_BODY} bytes")
        try:
            parsed = wire.parse_report(body)
        except UsageError as exc:
            return _reason(400, str(exc))
        client = request.client
        report = Report(
            machine_id,
            os_name,
            parsed.from_version,
            parsed.to_version,
            parsed.outcome,
            parsed.error,
            time.time(),
            client.host if client else None,
        )
        await reports.record(report)
        return JSONResponse({"recorded": True})

    dist = settings.webroot / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    app.mount("/dist", StaticFiles(directory=dist), name="dist")

    # --- administration ---------------------------------------------------------------

    async def require_admin(request: Request) -> None:
        # The guard (rampart.server.guard) authenticates every administrative request
        # before its body is read; this only refuses a route it did not guard.
        if not guard.admitted(request.scope):
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(dependencies=[Depends(require_admin)])
    webroot = settings.webroot

    def state(channel: ChannelState) -> dict[str, Any]:
        return {
            "os": channel.os,
            "name": channel.name,
            "version": channel.version,
            "default": channel.default,
            "rollout_version": channel.rollout_version,
            "rollout_percent": channel.rollout_percent,
            "rollout_state": str(channel.rollout_state),
        }

    @router.get("/admin/api/channels", tags=["channels"])
    async def list_channels() -> list[dict[str, Any]]:
        return await run_in_threadpool(store.channel_rows)

    @router.post("/admin/api/channels", status_code=201, tags=["channels"])
    async def create_channel(body: ChannelCreate) -> dict[str, Any]:
        return state(
            await run_in_threadpool(
                admin.create_channel, store, webroot, body.os, body.name, body.version, body.default
            )
        )

    @router.put("/admin/api/channels/{os_name}/{name}/version", tags=["channels"])
    async def set_version(os_name: str, name: str, body: VersionSet) -> dict[str, Any]:
        return state(
            await run_in_threadpool(
                admin.set_version, store, webroot, os_name, name, body.version, body.force
            )
        )

    @router.post("/admin/api/channels/{os_name}/{name}/rollout", tags=["rollouts"])
    async def start_rollout(os_name: str, name: str, body: RolloutStart) -> dict[str, Any]:
        return state(
            await run_in_threadpool(
                admin.start_rollout,
                store,
                webroot,
                os_name,
                name,
                body.version,
                body.percent,
                body.failure_threshold,
                body.min_reports,
                body.min_failing,
            )
        )

    @router.post("/admin/api/channels/{os_name}/{name}/rollout/raise", tags=["rollouts"])
    async def raise_rollout(os_name: str, name: str, body: RolloutRaise) -> dict[str, Any]:
        return state(
            await run_in_threadpool(admin.raise_rollout, store, os_name, name, body.percent)
        )

    @router.post("/admin/api/channels/{os_name}/{name}/rollout/pause", tags=["rollouts"])
    async def pause_rollout(os_name: str, name: str) -> dict[str, Any]:
        return state(await run_in_threadpool(admin.pause_rollout, store, os_name, name))

    @router.post("/admin/api/channels/{os_name}/{name}/rollout/resume", tags=["rollouts"])
    async def resume_rollout(os_name: str, name: str) -> dict[str, Any]:
        return state(await run_in_threadpool(admin.resume_rollout, store, os_name, name))

    @router.put("/admin/api/machines/{machine_id}/channel", tags=["machines"])
    async def assign(machine_id: str, body: Assignment) -> dict[str, Any]:
        await run_in_threadpool(admin.assign, store, machine_id, body.os, body.channel)
        return {"machine_id": machine_id, "os": body.os, "channel": body.channel}

    @router.get("/admin/api/machines", tags=["machines"])
    async def list_machines() -> list[dict[str, Any]]:
        return await run_in_threadpool(store.machines)

    @router.get("/admin/api/fleet", tags=["fleet"])
    async def fleet_view(silent_days: float = 7.0) -> dict[str, Any]:
        return await run_in_threadpool(admin.fleet, store, silent_days)

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        counts = await run_in_threadpool(store.counts)
        versions = await run_in_threadpool(store.versions_per_channel)
        lines = [
            "# HELP rampart_checks_total Version checks recorded.",
            "# TYPE rampart_checks_total counter",
            f"rampart_checks_total {counts['checks']}",
            "# HELP rampart_reports_total Install reports received, by outcome.",
            "# TYPE rampart_reports_total counter",
        ]
        for outcome in ("success", "failure"):
            total = counts.get("reports_" + outcome, 0)
            lines.append(f'rampart_reports_total{{outcome="{outcome}"}} {total}')
        lines += [
            "# HELP rampart_machines Machines by the version they last reported running.",
            "# TYPE rampart_machines gauge",
        ]
        for row in versions:
            labels = ",".join(f'{k}="{_label(str(row[k]))}"' for k in ("os", "channel", "version"))
            lines.append(f"rampart_machines{{{labels}}} {row['machines']}")
        return PlainTextResponse(
            "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @router.get("/admin/openapi.json", include_in_schema=False)
    async def openapi_schema() -> dict[str, Any]:
        return app.openapi()

    app.include_router(router)

    from rampart.server import dashboard

    dashboard.install(app, store, require_admin)
    app.add_middleware(guard.AdminGuard, store=store)
    return app


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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

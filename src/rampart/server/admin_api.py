"""The administration API: /admin/api/... (OpenAPI schema at /admin/openapi.json) and
Prometheus metrics at /metrics.

Every route is behind the guard (rampart.server.guard), which authenticates the request
before its body is read; `require_admin` only refuses a route it did not guard. The
operations themselves are rampart.server.admin's, run in the thread pool.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from rampart.server import admin, audit, signer
from rampart.server.rollout import ChannelState
from rampart.server.state import By, Server, require_admin

router = APIRouter(dependencies=[Depends(require_admin)])


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


def state(channel: ChannelState) -> dict[str, Any]:
    """A channel as the API answers it."""
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
async def list_channels(server: Server) -> list[dict[str, Any]]:
    return await run_in_threadpool(server.store.channel_rows)


@router.post("/admin/api/channels", status_code=201, tags=["channels"])
async def create_channel(body: ChannelCreate, server: Server, by: By) -> dict[str, Any]:
    return state(
        await run_in_threadpool(
            admin.create_channel,
            server.store,
            server.webroot,
            body.os,
            body.name,
            body.version,
            body.default,
            by=by,
        )
    )


@router.put("/admin/api/channels/{os_name}/{name}/version", tags=["channels"])
async def set_version(
    os_name: str, name: str, body: VersionSet, server: Server, by: By
) -> dict[str, Any]:
    return state(
        await run_in_threadpool(
            admin.set_version,
            server.store,
            server.webroot,
            os_name,
            name,
            body.version,
            body.force,
            by=by,
        )
    )


@router.post("/admin/api/channels/{os_name}/{name}/rollout", tags=["rollouts"])
async def start_rollout(
    os_name: str, name: str, body: RolloutStart, server: Server, by: By
) -> dict[str, Any]:
    return state(
        await run_in_threadpool(
            admin.start_rollout,
            server.store,
            server.webroot,
            os_name,
            name,
            body.version,
            body.percent,
            body.failure_threshold,
            body.min_reports,
            body.min_failing,
            by=by,
        )
    )


@router.post("/admin/api/channels/{os_name}/{name}/rollout/raise", tags=["rollouts"])
async def raise_rollout(
    os_name: str, name: str, body: RolloutRaise, server: Server, by: By
) -> dict[str, Any]:
    return state(
        await run_in_threadpool(
            admin.raise_rollout, server.store, os_name, name, body.percent, by=by
        )
    )


@router.post("/admin/api/channels/{os_name}/{name}/rollout/pause", tags=["rollouts"])
async def pause_rollout(os_name: str, name: str, server: Server, by: By) -> dict[str, Any]:
    return state(await run_in_threadpool(admin.pause_rollout, server.store, os_name, name, by=by))


@router.post("/admin/api/channels/{os_name}/{name}/rollout/resume", tags=["rollouts"])
async def resume_rollout(os_name: str, name: str, server: Server, by: By) -> dict[str, Any]:
    return state(await run_in_threadpool(admin.resume_rollout, server.store, os_name, name, by=by))


@router.put("/admin/api/machines/{machine_id}/channel", tags=["machines"])
async def assign(machine_id: str, body: Assignment, server: Server, by: By) -> dict[str, Any]:
    await run_in_threadpool(admin.assign, server.store, machine_id, body.os, body.channel, by=by)
    return {"machine_id": machine_id, "os": body.os, "channel": body.channel}


@router.get("/admin/api/machines", tags=["machines"])
async def list_machines(server: Server) -> list[dict[str, Any]]:
    return await run_in_threadpool(server.store.machines)


@router.get("/admin/api/fleet", tags=["fleet"])
async def fleet_view(server: Server, silent_days: float = 7.0) -> dict[str, Any]:
    return await run_in_threadpool(admin.fleet, server.store, silent_days)


@router.get("/admin/api/audit", tags=["audit"])
async def audit_log(
    server: Server, limit: int = Query(50, ge=1, le=1000), before: int | None = None
) -> list[dict[str, Any]]:
    """The newest entries of the audit trail (older than `before`), newest first."""
    return await run_in_threadpool(audit.entries, server.store.engine, limit, before)


@router.get("/admin/api/audit/verify", tags=["audit"])
async def audit_verify(server: Server) -> dict[str, Any]:
    """Walk the whole audit trail: intact or not, the problems, and the last entry's
    number and hash (an anchor)."""
    verdict = await run_in_threadpool(audit.verify, server.store.engine)
    return verdict.as_dict()


@router.get("/metrics", include_in_schema=False)
async def metrics(server: Server) -> Response:
    counts = await run_in_threadpool(server.store.counts)
    versions = await run_in_threadpool(server.store.versions_per_channel)
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
    if server.signer is not None:
        lines += await run_in_threadpool(signer.metric_lines, server.webroot)
    return PlainTextResponse(
        "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8"
    )


@router.get("/admin/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request) -> dict[str, Any]:
    app: FastAPI = request.app
    return app.openapi()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

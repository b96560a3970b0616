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


class Admission(BaseModel):
    key_id: str | None = Field(default=None, max_length=64)
    public_key: str | None = Field(default=None, max_length=4096)  # PEM, to enroll


class Rejection(BaseModel):
    key_id: str | None = Field(default=None, max_length=64)


class KnownGood(BaseModel):
    os: str = Field(max_length=64)
    value: str = Field(max_length=66)
    note: str | None = Field(default=None, max_length=128)


class AttestationPolicy(BaseModel):
    require: bool


class AdmissionMode(BaseModel):
    mode: str = Field(max_length=16)


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
        "require_attestation": channel.require_attestation,
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


@router.get("/admin/api/machines/keys", tags=["machines"])
async def machine_keys(
    server: Server, machine_id: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    """The keys machines presented or were enrolled with, and their state."""
    return await run_in_threadpool(server.store.machine_keys, machine_id, state)


@router.post("/admin/api/machines/{machine_id}/admit", tags=["machines"])
async def admit(machine_id: str, body: Admission, server: Server, by: By) -> dict[str, Any]:
    """Admit the machine's pending key (`key_id`, or its only one), or enroll
    `public_key` (PEM, as `rampart identity` prints it)."""
    key = None
    if body.public_key is not None:
        key = admin.read_public_key(body.public_key, "public_key")
    key_id = await run_in_threadpool(
        admin.admit, server.store, machine_id, by=by, key_id=body.key_id, public_key=key
    )
    return {"machine_id": machine_id, "key_id": key_id}


@router.post("/admin/api/machines/{machine_id}/reject", tags=["machines"])
async def reject(machine_id: str, body: Rejection, server: Server, by: By) -> dict[str, Any]:
    rejected = await run_in_threadpool(
        admin.reject, server.store, machine_id, by=by, key_id=body.key_id
    )
    return {"machine_id": machine_id, "rejected": rejected}


@router.get("/admin/api/attestation/known-good", tags=["attestation"])
async def known_good(server: Server, os: str | None = None) -> list[dict[str, Any]]:
    return await run_in_threadpool(server.store.known_pcr7, os)


@router.post("/admin/api/attestation/known-good", status_code=201, tags=["attestation"])
async def add_known_good(body: KnownGood, server: Server, by: By) -> dict[str, Any]:
    value = await run_in_threadpool(
        admin.add_known_pcr7, server.store, body.os, body.value, body.note, by=by
    )
    return {"os": body.os, "value": value}


@router.delete("/admin/api/attestation/known-good/{os_name}/{value}", tags=["attestation"])
async def remove_known_good(os_name: str, value: str, server: Server, by: By) -> dict[str, Any]:
    checked = admin.check_pcr7(value)
    await run_in_threadpool(server.store.remove_known_pcr7, os_name, checked, by=by)
    return {"os": os_name, "value": checked}


@router.put("/admin/api/channels/{os_name}/{name}/attestation", tags=["attestation"])
async def attestation_policy(
    os_name: str, name: str, body: AttestationPolicy, server: Server, by: By
) -> dict[str, Any]:
    channel = await run_in_threadpool(
        admin.set_attestation, server.store, os_name, name, body.require, by=by
    )
    return state(channel)


@router.get("/admin/api/settings/admission", tags=["settings"])
async def admission(server: Server) -> dict[str, Any]:
    first_use = await run_in_threadpool(server.store.first_use_admission)
    return {"mode": "first-use" if first_use else "operator"}


@router.put("/admin/api/settings/admission", tags=["settings"])
async def set_admission(body: AdmissionMode, server: Server, by: By) -> dict[str, Any]:
    await run_in_threadpool(server.store.set_admission, body.mode, by=by)
    return {"mode": body.mode}


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
        "# HELP rampart_anonymous_checks_total Version checks no admitted key signed.",
        "# TYPE rampart_anonymous_checks_total counter",
        f"rampart_anonymous_checks_total {counts['anonymous_checks']}",
        "# HELP rampart_anonymous_reports_total Install reports no admitted key signed.",
        "# TYPE rampart_anonymous_reports_total counter",
        f"rampart_anonymous_reports_total {counts['anonymous_reports']}",
    ]
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

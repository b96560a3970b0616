"""The CLIP OS protocol (docs/server.md): the version check and the install report.

The version check is the hot path: it answers from the fleet's in-memory caches, and
answers 200 only once the check is recorded (committed). The payloads under /dist are
static files, mounted by rampart.server.app.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from rampart.contracts import wire
from rampart.errors import UsageError
from rampart.server.devices import Denied
from rampart.server.recorder import Replayed
from rampart.server.rollout import offer
from rampart.server.state import state_of
from rampart.server.store import Check, Report

MAX_REPORT_BODY = wire.REPORT_MAX

router = APIRouter()


def reason(status: int, text: str) -> PlainTextResponse:
    """A plain-text error answer, one line."""
    return PlainTextResponse(text + "\n", status_code=status)


def _address(request: Request) -> str | None:
    client = request.client
    return client.host if client else None


def identify(request: Request) -> tuple[str | None, str | None, Response | None]:
    """The machine-id and the running core version from the request's headers (both
    None if it sends neither), or the answer to an invalid identity."""
    machine_id = request.headers.get(wire.MACHINE_ID_HEADER)
    version = request.headers.get(wire.VERSION_HEADER)
    if machine_id is None and version is None:
        return None, None, None
    try:
        machine_id, parsed = wire.parse_identity(machine_id, version)
    except UsageError as exc:
        return None, None, reason(400, str(exc))
    return machine_id, parsed.core, None


def _denied(text: str) -> PlainTextResponse:
    response = reason(401, text)
    response.headers["WWW-Authenticate"] = "Rampart-Signature"
    return response


@router.get("/update/v1/{os_name}/version", include_in_schema=False)
async def version_check(os_name: str, request: Request) -> Response:
    server = state_of(request)  # not a dependency: this is the hot path
    if not wire.NAME.fullmatch(os_name):
        return reason(404, "unknown os")
    machine_id, running, error = identify(request)
    if error is not None:
        return error
    address = _address(request)
    channel = await server.fleet.channel_for(os_name, machine_id, address)
    if channel is None:
        return reason(404, "unknown os")
    try:
        signed = await server.devices.authenticate(
            request.headers, "version", os_name, machine_id, running
        )
    except Denied as exc:
        return _denied(str(exc))
    offered = offer(channel, machine_id)
    if offered is None:
        return reason(404, f"no version published on channel {channel.name}")
    if (
        channel.require_attestation
        and running is not None
        and not server.devices.attested_good(os_name, signed.proof)
    ):
        offered = running  # withheld: this machine did not prove a known-good boot
    if machine_id is not None and running is not None:
        # Recorded before it is answered: a 200 is never lost (docs/server.md).
        check = Check(
            machine_id, os_name, running, channel.name, offered, time.time(), address, signed.proof
        )
        try:
            await server.checks.record(check)
        except Replayed:
            return _denied("replayed request: its counter was already used")
    nonce = server.devices.nonce(machine_id) if signed.signed and machine_id else None
    document = wire.render_version_document(offered, nonce)
    return Response(document, media_type="application/octet-stream")


@router.post("/update/v1/{os_name}/report", include_in_schema=False)
async def install_report(os_name: str, request: Request) -> Response:
    server = state_of(request)
    if not wire.NAME.fullmatch(os_name):
        return reason(404, "unknown os")
    machine_id, _running, error = identify(request)
    if error is not None:
        return error
    if machine_id is None:
        return reason(400, "clipos-machineid and clipos-version are required")
    await server.fleet.refresh()
    if not server.fleet.known_os(os_name):
        return reason(404, "unknown os")
    body = await _report_body(request)
    if body is None:
        return reason(413, f"report larger than {MAX_REPORT_BODY} bytes")
    try:
        parsed = wire.parse_report(body)
    except UsageError as exc:
        return reason(400, str(exc))
    try:
        signed = await server.devices.authenticate(
            request.headers, "report", os_name, machine_id, _running, body
        )
    except Denied as exc:
        return _denied(str(exc))
    report = Report(
        machine_id,
        os_name,
        parsed.from_version,
        parsed.to_version,
        parsed.outcome,
        parsed.error,
        time.time(),
        _address(request),
        signed.proof,
    )
    try:
        await server.reports.record(report)
    except Replayed:
        return _denied("replayed request: its counter was already used")
    if not signed.signed:
        return JSONResponse({"recorded": True})  # what the CLIP OS updater gets
    return JSONResponse({"recorded": True, "authenticated": signed.proof is not None})


async def _report_body(request: Request) -> bytes | None:
    """The report's body, or None if it is (or announces itself) larger than
    MAX_REPORT_BODY: reading stops as soon as it passes the cap."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_REPORT_BODY):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REPORT_BODY:
            return None
    return body

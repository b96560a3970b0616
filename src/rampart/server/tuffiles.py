"""The TUF metadata and the channel heads, served from the webroot as files (with
`--tuf-key` only; docs/server.md "Signing the TUF metadata"):

    GET /tuf/<N>.<role>.json, /tuf/timestamp.json   <webroot>/tuf/
    GET /heads/<os>/<channel>.json                  <webroot>/heads/<os>/

Only names of that shape are served: no directory listing, no other file of those
directories (the signer's lock and state files), no way out of them. Each file is read
whole before the answer starts, so a file renamed in place while it is sent (the
timestamp, every few seconds with a short lifetime) is never sent half old, half new.
The timestamp and the channel heads change under the same name: `Cache-Control:
no-cache`; the versioned metadata never changes.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from rampart.contracts import tuf, wire
from rampart.server.protocol import reason
from rampart.server.state import state_of

METADATA_NAME = re.compile(r"(?:timestamp|[1-9][0-9]{0,18}\.[a-z][a-z0-9_-]{0,63})\.json", re.ASCII)
MAX_FILE = 64 << 20  # a targets metadata file of many releases, with room to spare
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter()


def _read(directory: Path, name: str) -> bytes | None:
    """The file `name` of `directory`, whole; None if it is not a regular file there."""
    path = directory / name
    try:
        if not path.resolve().is_relative_to(directory.resolve()):
            return None  # a symbolic link out of the directory
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE + 1)
    except OSError:  # missing, a directory, unreadable
        return None
    return data if len(data) <= MAX_FILE else None


def _answer(data: bytes | None, no_cache: bool) -> Response:
    if data is None:
        return reason(404, "not found")
    return Response(data, media_type="application/json", headers=NO_CACHE if no_cache else None)


@router.api_route("/tuf/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def metadata(name: str, request: Request) -> Response:
    if not METADATA_NAME.fullmatch(name):
        return reason(404, "not found")
    directory = state_of(request).webroot / tuf.METADATA_DIR
    data = await run_in_threadpool(_read, directory, name)
    return _answer(data, no_cache=name == "timestamp.json")


@router.api_route("/heads/{os_name}/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def channel_head(os_name: str, name: str, request: Request) -> Response:
    channel = name.removesuffix(".json")
    if channel == name or not wire.NAME.fullmatch(os_name) or not wire.NAME.fullmatch(channel):
        return reason(404, "not found")
    target = state_of(request).webroot / tuf.channel_target(os_name, channel)
    data = await run_in_threadpool(_read, target.parent, target.name)
    return _answer(data, no_cache=True)

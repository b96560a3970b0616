"""The door of the administration: authenticate before reading a body, cap bodies
while they stream, refuse cross-site requests made with the dashboard's cookie.

An ASGI middleware in front of every administrative path (`/admin/...`, `/metrics`).
FastAPI reads and parses a route's body before it runs the route's dependencies, so
an authentication dependency comes too late: an anonymous client could make the
server read, hold and parse any body. Here, before a byte of the body is read:

1. a `Content-Length` over the cap is answered 413 (the body is never read);
2. the request is authenticated: `Authorization: Bearer <admin token>`, or, under
   `/admin/` only, the dashboard's session cookie (rampart.server.sessions);
   otherwise 401 (the dashboard page redirects to the sign-in form instead);
3. a state-changing request authenticated by the cookie must come from the server's
   own pages: its `Origin` must name the host it was sent to (403 otherwise);
4. the body is read up to the cap (413 as soon as a chunked body passes it) and
   handed to the application, which never sees more than the cap.

An answer given before the body was read closes the connection, so the rest of the
body is never read either. The sign-in and sign-out forms pass steps 2 (they need no
session) but not the others.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from rampart.server import roles, sessions
from rampart.server.store import Store, token_holder

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "rampart_admin"
MAX_ADMIN_BODY = 64 * 1024
MAX_FORM_BODY = 4096
LOGIN, LOGOUT, DASHBOARD = "/admin/login", "/admin/logout", "/admin/"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_ADMITTED = "rampart_admin"  # key in the request's state once authenticated


@dataclass(frozen=True)
class Holder:
    """Who the guard admitted: how the token came ("bearer" or "cookie"), its name and
    its role (rampart.server.roles)."""

    via: str
    name: str
    role: str


def holder(scope: Scope) -> Holder | None:
    """Who the guard admitted for this request, if it did."""
    found = scope.get("state", {}).get(_ADMITTED)
    return found if isinstance(found, Holder) else None


def admitted(scope: Scope) -> bool:
    """Whether the guard authenticated this request."""
    return bool(scope.get("state", {}).get(_ADMITTED))


def guarded(path: str) -> bool:
    return path == "/metrics" or path == "/admin" or path.startswith("/admin/")


def same_origin(headers: Headers) -> bool:
    """The request's Origin names the host it was sent to (default ports aside)."""
    origin, host = headers.get("origin"), headers.get("host")
    if not origin or not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
        return False
    return _authority(parts.netloc) == _authority(host)


def _authority(netloc: str) -> str:
    netloc = netloc.strip().lower()
    for port in (":443", ":80"):
        if netloc.endswith(port):
            return netloc[: -len(port)]
    return netloc


class AdminGuard:
    """ASGI middleware; everything outside the guarded paths passes untouched."""

    def __init__(self, app: App, store: Store) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        headers = Headers(scope=scope)
        form = path in (LOGIN, LOGOUT)
        cap = MAX_FORM_BODY if form else MAX_ADMIN_BODY
        length = headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            await _answer(send, 400, "invalid Content-Length")
            return
        if length is not None and int(length) > cap:
            await _answer(send, 413, f"request body larger than {cap} bytes")
            return
        if form:
            # Signing in or out from another site (a login CSRF) is refused; a client
            # that sends no Origin (curl) may sign in.
            if method not in _SAFE and "origin" in headers and not same_origin(headers):
                await _answer(send, 403, "cross-site request refused: Origin does not match")
                return
        elif not await self._admit(scope, headers, send):
            return
        body = await _read_capped(receive, cap)
        if body is None:
            await _answer(send, 413, f"request body larger than {cap} bytes")
            return
        if not isinstance(body, bytes):  # the client went away
            return
        await self.app(scope, _replay(body, receive), send)

    async def _admit(self, scope: Scope, headers: Headers, send: Send) -> bool:
        """Steps 2 and 3, and the role: whether the request may go on (else it was
        answered)."""
        path, method = scope["path"], scope["method"]
        try:
            how = await self._authenticate(headers, path)
        except SQLAlchemyError:
            await _answer(send, 503, "database unavailable, retry later", text=True)
            return False
        if how is None:
            if path == DASHBOARD and method in _SAFE:
                await _redirect(send, LOGIN)
                return False
            bearer = headers.get("authorization")
            reason = "invalid token" if bearer or _cookie(headers) else "missing bearer token"
            await _answer(send, 401, reason, {"www-authenticate": "Bearer"})
            return False
        if how.via == "cookie" and method not in _SAFE and not same_origin(headers):
            await _answer(send, 403, "cross-site request refused: Origin does not match")
            return False
        role = roles.needed(method, path)
        if not roles.allows(how.role, role):
            detail = f"token {how.name!r} is an {how.role}: {method} {path} needs {role}"
            await _answer(send, 403, detail)
            return False
        scope.setdefault("state", {})[_ADMITTED] = how
        return True

    async def _authenticate(self, headers: Headers, path: str) -> Holder | None:
        """Who the request comes from (its token's name and role, and how it was
        presented), or None."""
        header = headers.get("authorization", "")
        if header:
            token = header[7:] if header[:7].lower() == "bearer " else ""
            if not token or len(token) > 256:
                return None
            known = await run_in_threadpool(self.store.token_roles)
            found = token_holder(token, known)
            return None if found is None else Holder("bearer", *found)
        session_id = _cookie(headers)
        if session_id and path.startswith("/admin/"):  # the cookie never opens /metrics
            found = await run_in_threadpool(sessions.session_holder, self.store.engine, session_id)
            return None if found is None else Holder("cookie", *found)
        return None


def _cookie(headers: Headers) -> str | None:
    return cookie_parser(headers.get("cookie", "")).get(COOKIE)


async def _read_capped(receive: Receive, cap: int) -> bytes | Message | None:
    """The whole body, None past the cap, or the disconnect message."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(
    send: Send,
    status: int,
    detail: str,
    extra: dict[str, str] | None = None,
    text: bool = False,
) -> None:
    """An error answered before the body was read: the connection is closed after it."""
    if text:
        body, kind = (detail + "\n").encode(), b"text/plain; charset=utf-8"
    else:
        body, kind = json.dumps({"detail": detail}).encode(), b"application/json"
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    headers = [(b"location", location.encode()), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})

"""Connections of `rampart serve`: per-address limits, read deadlines, the TLS handshake.

uvicorn accepts a connection and waits for its request for as long as the client
likes: no deadline for the headers (its keep-alive timer runs only between two
requests and stops at the first byte), none for the body, and its only limit is a
count of connections per worker, past which it answers 503 to everybody. A few
thousand connections that trickle a header line now and then therefore starve
every device. `GuardedProtocol` is uvicorn's HTTP protocol (httptools) with the
limits the server needs, enforced on every connection whatever is in front of it:

* at most `per_address` open connections per client address and worker; the next
  one is reset at once, before any byte is read (other addresses are served);
* the TLS handshake (done here, not by the listening socket, so that the address
  limit applies before it) must complete within `handshake_timeout` seconds;
* a request's headers must be complete within `header_timeout` seconds of the
  connection (or of the previous response on a kept-alive connection), and its
  body within `body_timeout` seconds of its headers; past a deadline the
  connection is aborted.

The limits come from the environment (`RAMPART_LIMITS`, JSON; `RAMPART_TLS_CERT`
and `RAMPART_TLS_KEY`), set by `rampart serve` before uvicorn starts its workers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
from asyncio import sslproto
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rampart.errors import LocalError

LIMITS_ENV = "RAMPART_LIMITS"
CERT_ENV = "RAMPART_TLS_CERT"
KEY_ENV = "RAMPART_TLS_KEY"


@dataclass(frozen=True)
class Limits:
    """What one client may hold of a worker (0 disables a limit)."""

    per_address: int = 64
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str | None) -> Limits:
        return cls(**json.loads(text)) if text else cls()


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """Python's default server context (TLS 1.2 at least) with this chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise LocalError(f"--tls-cert {cert} / --tls-key {key}: cannot load: {exc}") from None
    return context


class _Worker:
    """The settings and the open-connection count of this worker process."""

    def __init__(self) -> None:
        self.limits = Limits.from_env(os.environ.get(LIMITS_ENV))
        cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
        self.tls = tls_context(cert, key) if cert and key else None
        self.open: Counter[str] = Counter()


_worker: _Worker | None = None


def _this_worker() -> _Worker:
    global _worker
    if _worker is None:
        _worker = _Worker()
    return _worker


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with address limits, deadlines and the handshake."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker = _this_worker()
        self.address: str | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.raw: asyncio.Transport | None = None

    # --- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.raw is not None:  # the handshake completed: the secure transport
            self.raw = None
            self._arm(self.worker.limits.header_timeout)
            super().connection_made(transport)
            return
        limits = self.worker.limits
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if address is not None and 0 < limits.per_address <= self.worker.open[address]:
            transport.abort()  # refused before reading a byte; connection_lost is ours
            return
        self.address = address
        if address is not None:
            self.worker.open[address] += 1
        if self.worker.tls is None:
            self._arm(limits.header_timeout)
            super().connection_made(transport)
            return
        # TLS over the accepted connection, set up before any byte is read: the SSL
        # protocol takes the transport now and calls connection_made again with the
        # secure transport once the handshake is done.
        self.raw = transport
        self._arm(limits.handshake_timeout)
        handshake: asyncio.Future[None] = self.loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        tls = sslproto.SSLProtocol(
            self.loop,
            self,
            self.worker.tls,
            handshake,
            server_side=True,
            ssl_handshake_timeout=math.ceil(limits.handshake_timeout) or None,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_done(self, handshake: asyncio.Future[None]) -> None:
        # Success calls connection_made (which clears self.raw) before this; a failed or
        # lost handshake never reaches connection_made nor connection_lost.
        failed = handshake.cancelled() or handshake.exception() is not None
        if failed or self.raw is not None:
            self._release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self.transport is not None:  # uvicorn saw the connection
            super().connection_lost(exc)

    def _release(self) -> None:
        self._disarm()
        if self.address is not None:
            self.worker.open[self.address] -= 1
            if self.worker.open[self.address] <= 0:
                del self.worker.open[self.address]
            self.address = None

    # --- deadlines ----------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self.deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        transport = self.transport or self.raw
        if transport is not None and not transport.is_closing():
            transport.abort()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.worker.limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()  # the request is in; the application's time is not limited here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self._arm(self.worker.limits.header_timeout)  # the next request's headers

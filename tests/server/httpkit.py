"""One HTTP request to a server on loopback, as the tests of real servers send it: a
new connection each time (HTTPS to `localhost` when given the CA that signed the
server's certificate, else plain HTTP to 127.0.0.1)."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    ca: Path | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lowercase names, body)."""
    conn: http.client.HTTPConnection
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection("localhost", port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        found = {k.lower(): v for k, v in response.getheaders()}
        return response.status, found, response.read()
    finally:
        conn.close()

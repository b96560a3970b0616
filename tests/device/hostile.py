"""A hostile HTTPS update server: serves a webroot, except for paths given a misbehaviour."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Behaviour = Callable[[BaseHTTPRequestHandler], None]


def endless(handler: BaseHTTPRequestHandler) -> None:
    """No Content-Length, and a body that never ends (bounded here at 64 MiB)."""
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    block = b"\0" * 65536
    for _ in range(1024):
        try:
            handler.wfile.write(block)
        except OSError:
            return


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """Announce a body, then send one byte every 0.2 s (bounded here at 60 s)."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    for _ in range(300):
        try:
            handler.wfile.write(b"x")
            handler.wfile.flush()
        except OSError:
            return
        time.sleep(0.2)


def body(data: bytes, length: int | None = None) -> Behaviour:
    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data) if length is None else length))
        handler.end_headers()
        try:
            handler.wfile.write(data)
        except OSError:
            return

    return send


class _Handler(BaseHTTPRequestHandler):
    root: Path
    behaviours: dict[str, Behaviour]
    posts: list[tuple[str, dict[str, str], bytes]]

    def log_message(self, *args: object) -> None:
        return

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.posts.append((self.path, dict(self.headers.items()), self.rfile.read(length)))
        body(b"{}")(self)

    def do_GET(self) -> None:
        behaviour = self.behaviours.get(self.path)
        if behaviour is not None:
            behaviour(self)
            return
        path = (self.root / self.path.lstrip("/")).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            self.send_error(404)
            return
        body(path.read_bytes())(self)


@contextmanager
def hostile_server(
    root: Path,
    cert: Path,
    key: Path,
    behaviours: dict[str, Behaviour],
    posts: list[tuple[str, dict[str, str], bytes]] | None = None,
) -> Iterator[str]:
    """Serve `root` over HTTPS on loopback; yield the base URL (https://localhost:PORT).

    POSTed requests are appended to `posts` as (path, headers, body).
    """
    handler = type(
        "Handler",
        (_Handler,),
        {"root": root, "behaviours": behaviours, "posts": [] if posts is None else posts},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


Sender = Callable[[BaseHTTPRequestHandler, int, int, bytes], None]


def send_range(handler: BaseHTTPRequestHandler, first: int, last: int, data: bytes) -> None:
    """A 206 for bytes first..last of `data`, honestly."""
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
    handler.send_header("Content-Length", str(last + 1 - first))
    handler.end_headers()
    try:
        handler.wfile.write(data[first : last + 1])
    except OSError:
        return


def ranged(data: bytes, send: Sender = send_range) -> Behaviour:
    """Serve `data` with range requests (`bytes=A-` and `bytes=A-B`); `send` answers
    each one (by default honestly: a hostile one changes what it says or sends)."""

    def serve(handler: BaseHTTPRequestHandler) -> None:
        spec = handler.headers.get("Range", "")
        if not spec.startswith("bytes="):
            body(data)(handler)
            return
        first_text, _, last_text = spec[len("bytes=") :].partition("-")
        first = int(first_text)
        last = min(int(last_text), len(data) - 1) if last_text else len(data) - 1
        send(handler, first, last, data)

    return serve

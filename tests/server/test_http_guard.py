"""Attacks on the server's HTTP layer. Against a real `rampart serve` (plain HTTP and
TLS): slow clients, one address holding every connection, bodies sent before (or
instead of) authenticating. In process (SQLite and PostgreSQL): the dashboard's
cookie used from another site, replayed after sign-out, expiry or revocation, or
taken to /metrics; and the SQLite file's mode. None of these tests measures a time:
each bound below is a generous limit on a wait, far above the deadlines the server
is started with."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from sqlalchemy import select, update

from rampart.server import audit, db
from rampart.testbed.services import Pki, RampartServe, free_port
from tests.server.conftest import OS, Server
from tests.server.test_dashboard_browser import RAMPART, make_webroot, rampart

WAIT = 30.0  # seconds: the bound of every wait in this file
# `rampart serve`'s documented default (--max-connections-per-address, docs/server.md)
DEFAULT_PER_ADDRESS = 64
VERSION_CHECK = (
    b"GET /update/v1/clipos/version HTTP/1.1\r\nHost: localhost\r\n"
    b"clipos-machineid: " + b"a" * 32 + b"\r\nclipos-version: 1.0.0\r\n\r\n"
)


@dataclass
class Serve:
    port: int
    pid: int
    token: str
    tls: ssl.SSLContext | None
    log: Path

    def connect(self, source: str = "127.0.0.1", handshake: bool = True) -> socket.socket:
        """A connection from `source` (a loopback address), TLS-wrapped when serving TLS."""
        sock = socket.socket()
        sock.settimeout(WAIT)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self.port))
        if self.tls is not None and handshake:
            return self.tls.wrap_socket(sock, server_hostname="localhost")
        return sock

    def status(self, request: bytes, source: str = "127.0.0.1") -> int:
        """The status of one request on a new connection (0: closed without an answer)."""
        try:
            with self.connect(source) as sock:
                sock.sendall(request)
                head = read_head(sock)
        except (ConnectionError, ssl.SSLError):
            return 0
        return int(head.split(b" ", 2)[1]) if head else 0

    def rss(self, field: str = "VmRSS") -> int:
        """The server process's resident memory (or its peak, VmHWM), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(sock: socket.socket, trickle: bytes | None) -> bool:
    """Whether the server closes `sock` within WAIT while the client sends `trickle`
    every 0.2 s (None: stays silent)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except (ConnectionError, ssl.SSLError):
            return True
        if trickle is not None:
            try:
                sock.sendall(trickle)
            except (ConnectionError, ssl.SSLError):
                return True
    return False


@contextlib.contextmanager
def serve(tmp_path: Path, pki: Pki | None, *flags: str) -> Iterator[Serve]:
    webroot = make_webroot(tmp_path)
    token = json.loads(rampart("token", "create", "ops", "--webroot", webroot, "--json"))["token"]
    tls = None if pki is None else pki.server
    context = None if pki is None else ssl.create_default_context(cafile=str(pki.ca.cert))
    log = tmp_path / "serve.log"
    with RampartServe(webroot, log, tls=tls, options=flags, timeout=WAIT) as process:
        yield Serve(process.port, process.pid, token, context, log)


@pytest.fixture(params=["http", "https"])
def tls(request: pytest.FixtureRequest, pki: Pki) -> Pki | None:
    return pki if request.param == "https" else None


# --- slow clients ------------------------------------------------------------------------


def test_slowloris_connection_is_cut_at_the_header_deadline(
    tmp_path: Path, tls: Pki | None
) -> None:
    flags = ("--header-timeout", "1", "--tls-handshake-timeout", "1", "--body-timeout", "1")
    with serve(tmp_path, tls, *flags) as server:
        # Headers trickled one line at a time, never finished.
        with server.connect() as sock:
            sock.sendall(b"GET /update/v1/clipos/version HTTP/1.1\r\nHost: localhost\r\n")
            assert closed_by_server(sock, b"X-Slow: 1\r\n")
        # A connection that never sends a byte (with TLS: never starts the handshake).
        with server.connect(handshake=False) as sock:
            assert closed_by_server(sock, None)
        # A request whose body never comes.
        with server.connect() as sock:
            sock.sendall(
                b"POST /update/v1/clipos/report HTTP/1.1\r\nHost: localhost\r\n"
                b"clipos-machineid: " + b"a" * 32 + b"\r\nclipos-version: 1.0.0\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            assert closed_by_server(sock, None)
        assert server.status(VERSION_CHECK) == 200
    assert "Traceback" not in server.log.read_text()  # dropped quietly


def test_one_address_cannot_take_every_connection(tmp_path: Path, tls: Pki | None) -> None:
    flags = ("--max-connections-per-address", "4", "--header-timeout", "600")
    with serve(tmp_path, tls, *flags) as server:
        held = [server.connect("127.0.0.2", handshake=False) for _ in range(4)]
        try:
            # The 5th connection from 127.0.0.2 is reset before it is read ...
            assert server.status(VERSION_CHECK, "127.0.0.2") == 0
            # ... while other addresses are served.
            assert server.status(VERSION_CHECK, "127.0.0.1") == 200
            assert server.status(VERSION_CHECK, "127.0.0.3") == 200
            # A connection closed gives its place back.
            held.pop().close()
            deadline = time.monotonic() + WAIT
            while server.status(VERSION_CHECK, "127.0.0.2") != 200:
                assert time.monotonic() < deadline, "the address never got its place back"
                time.sleep(0.1)
        finally:
            for sock in held:
                sock.close()


def still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed `sock` (a plain socket that sent nothing)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(WAIT)


def test_slow_clients_do_not_starve_a_server_on_its_default_settings(
    tmp_path: Path, tls: Pki | None
) -> None:
    """The review's attack on a `rampart serve` started with no flag: silent connections
    held open from one address. The defaults must hold: the address gets its per-address
    share and no more, other clients are served, and a silent connection is cut at the
    default header (or TLS handshake) deadline. A server so slow that it cut some of the
    held connections at that deadline before the next one came is tried again."""
    with serve(tmp_path, tls) as server:
        for _ in range(3):
            held = [
                server.connect("127.0.0.2", handshake=False) for _ in range(DEFAULT_PER_ADDRESS)
            ]
            try:
                if server.status(VERSION_CHECK, "127.0.0.2") == 0:
                    break  # reset: the address had its share
                assert not all(still_open(sock) for sock in held), (
                    f"a connection beyond {DEFAULT_PER_ADDRESS} from one address was served"
                )
            finally:
                for sock in held:
                    sock.close()
        else:
            pytest.fail("the held connections were cut before the next one came, 3 times")
        assert server.status(VERSION_CHECK, "127.0.0.1") == 200
        with server.connect("127.0.0.3", handshake=False) as silent:
            assert closed_by_server(silent, None), "a silent connection was kept"


# --- bodies before authentication --------------------------------------------------------


def test_anonymous_300_mib_chunked_body_is_refused_unread(tmp_path: Path) -> None:
    with serve(tmp_path, None) as server:
        before = server.rss()
        sent = 0
        with server.connect() as sock:
            sock.sendall(
                b"POST /admin/api/channels HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n" % (1 << 20) + b"[" * (1 << 20) + b"\r\n"

            def send_body() -> None:
                nonlocal sent
                with contextlib.suppress(OSError):
                    for _ in range(300):
                        sock.sendall(chunk)
                        sent += 1
                    sock.sendall(b"0\r\n\r\n")

            sender = threading.Thread(target=send_body)
            sender.start()
            head = read_head(sock)
            sender.join(WAIT)
        assert head.startswith(b"HTTP/1.1 401 "), head
        # The server holds nothing of the body: its peak memory grew by far less than the
        # body (692479c read all of it: +600 MiB).
        growth = server.rss("VmHWM") - before
        assert growth < 64 << 20, f"server grew by {growth >> 20} MiB ({sent} MiB sent)"


def test_over_cap_content_length_is_413_before_the_body(tmp_path: Path) -> None:
    with serve(tmp_path, None) as server:
        auth = f"Authorization: Bearer {server.token}\r\n".encode()
        for credentials in (b"", auth):
            with server.connect() as sock:  # the body is never sent
                sock.sendall(
                    b"POST /admin/api/channels HTTP/1.1\r\nHost: localhost\r\n"
                    + credentials
                    + b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
                )
                head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 413 "), head
        # A chunked body, authenticated, is cut as soon as it passes the cap.
        with server.connect() as sock:
            sock.sendall(
                b"POST /admin/api/channels HTTP/1.1\r\nHost: localhost\r\n" + auth + b"Content-"
                b"Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + (b"1000\r\n" + b" " * 4096 + b"\r\n")
                * 17
            )
            head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 413 "), head


# --- the dashboard's cookie and the database file ----------------------------------------


def sign_in(server: Server) -> str:
    """Sign in through the form as a browser does; the session id the cookie holds."""
    response = server.client.post(
        "/admin/login",
        data={"token": server.token},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    cookie = SimpleCookie(response.headers["set-cookie"])["rampart_admin"]
    assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "strict"
    assert cookie["path"] == "/admin"
    return cookie.value


def with_cookie(session_id: str, origin: str | None = None) -> dict[str, str]:
    headers = {"Cookie": f"rampart_admin={session_id}"}
    if origin is not None:
        headers["Origin"] = origin
    return headers


NEW_CHANNEL = {"os": OS, "name": "csrf", "version": "1.0.1"}


def test_cross_site_post_with_the_dashboard_cookie_is_refused(server: Server) -> None:
    session_id = sign_in(server)
    for origin in ("https://evil.example", "null", "http://testserver.evil.example", None):
        response = server.client.post(
            "/admin/api/channels", headers=with_cookie(session_id, origin), json=NEW_CHANNEL
        )
        assert response.status_code == 403, (origin, response.text)
    assert [c["name"] for c in server.store.channel_rows()] == ["stable"]
    # From the server's own origin the same request is accepted; with a bearer token,
    # which a browser never attaches by itself, no Origin is needed.
    own = with_cookie(session_id, "http://testserver")
    assert server.client.post("/admin/api/channels", headers=own, json=NEW_CHANNEL).is_success
    assert server.client.get("/admin/api/channels", headers=server.auth).is_success


def test_cross_site_sign_in_is_refused(server: Server) -> None:
    response = server.client.post(
        "/admin/login",
        data={"token": server.token},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


def test_dashboard_cookie_does_not_carry_the_admin_token(server: Server) -> None:
    session_id = sign_in(server)
    assert server.token not in session_id
    assert server.client.get("/admin/api/fleet", headers=with_cookie(session_id)).is_success
    # The database keeps only the session's SHA-256.
    with server.store.engine.connect() as conn:
        stored = conn.execute(select(db.sessions.c.digest)).scalars().all()
    assert stored == [hashlib.sha256(session_id.encode()).hexdigest()]
    # The token itself is not a session id.
    assert (
        server.client.get("/admin/api/fleet", headers=with_cookie(server.token)).status_code == 401
    )


def test_stolen_cookie_is_dead_after_sign_out(server: Server) -> None:
    session_id = sign_in(server)
    response = server.client.post(
        "/admin/logout",
        headers=with_cookie(session_id, "http://testserver"),
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert 'rampart_admin=""' in response.headers["set-cookie"]
    assert server.client.get("/admin/api/fleet", headers=with_cookie(session_id)).status_code == 401


def test_stolen_cookie_is_dead_after_it_expires(server: Server) -> None:
    session_id = sign_in(server)
    with server.store.engine.begin() as conn:
        conn.execute(update(db.sessions).values(expires_at=time.time() - 1))
    assert server.client.get("/admin/api/fleet", headers=with_cookie(session_id)).status_code == 401
    page = server.client.get("/admin/", headers=with_cookie(session_id), follow_redirects=False)
    assert (page.status_code, page.headers["location"]) == (303, "/admin/login")


def test_stolen_cookie_is_dead_once_its_token_is_revoked(server: Server) -> None:
    session_id = sign_in(server)
    server.store.revoke_token("tests", by=audit.cli_actor())
    assert server.client.get("/admin/api/fleet", headers=with_cookie(session_id)).status_code == 401


def test_dashboard_cookie_does_not_open_metrics(server: Server) -> None:
    session_id = sign_in(server)
    assert server.client.get("/metrics", headers=with_cookie(session_id)).status_code == 401
    assert server.client.get("/metrics", headers=server.auth).status_code == 200


def test_database_and_its_wal_are_private_to_the_server(tmp_path: Path) -> None:
    webroot = make_webroot(tmp_path)
    rampart("token", "create", "ops", "--webroot", webroot)  # creates <webroot>.sqlite
    database = Path(f"{webroot}.sqlite")
    engine = db.make_engine(db.default_url(webroot))
    with engine.connect() as conn:  # hold a connection: the -wal and -shm files exist
        conn.execute(select(db.tokens.c.digest)).all()
        files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    engine.dispose()
    assert modes == {f.name: 0o600 for f in files}
    # A database made world-readable before is made private again when opened.
    database.chmod(0o644)
    db.make_engine(db.default_url(webroot)).dispose()
    assert stat.S_IMODE(database.stat().st_mode) == 0o600


def test_unloadable_tls_key_is_one_line_and_exit_3(tmp_path: Path, pki: Pki) -> None:
    webroot = make_webroot(tmp_path)
    argv = [RAMPART, "serve", "--webroot", str(webroot), "--listen", f"127.0.0.1:{free_port()}"]
    argv += ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.other_server.key)]
    result = subprocess.run(  # a key that is not the certificate's
        argv,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if "created from the webroot" not in line]
    assert len(lines) == 1 and "cannot load" in lines[0], result.stderr

"""HTTPS for the update client: pinned root CA, TLS 1.2+, caps and timeouts.

Every request passes through `Transport.request`, which enforces in one place:
- HTTPS only, TLS 1.2 minimum, only the pinned `rootca.pem` trusted (the
  system store is never loaded), host names checked;
- redirects only to https:// URLs, at most MAX_REDIRECTS;
- a connect timeout, a read timeout, and a minimum average speed over a
  window (a server that trickles bytes fails instead of holding the client);
- a hard cap on every body, checked against Content-Length before reading and
  against the bytes actually received while reading;
- a download never takes the last `space_margin` bytes of its file system: a
  body of unannounced length is cut there, and a download stopped for lack of
  space (there, or ENOSPC) leaves no partial file behind;
- the CLIP OS identification headers on every request to the configured host
  (not to another host a redirect leads to).
Every failure becomes TransportError (network) or RemoteDataError (the server
sent something that breaks a limit). This module imports nothing that parses
signatures: it runs in the unprivileged fetch process.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import SplitResult, urljoin, urlsplit

from rampart import __version__
from rampart.errors import LocalError, RemoteDataError, TransportError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
CHUNK = 1 << 20  # bytes written to disk at once
READ = 1 << 16  # bytes asked of the socket at once (one TLS record is 16 KiB)
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Limits:
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    min_speed: int = 1024  # bytes per second, averaged over stall_window
    stall_window: float = 60.0
    space_margin: int = 16 << 20  # bytes a download leaves free on its file system


# A length or offset sent by the server: ASCII digits, at most 19 (below 2^63).
_NUMBER = r"[0-9]{1,19}"


def tls_context(root_ca: Path) -> ssl.SSLContext:
    """A client context trusting only `root_ca`, TLS 1.2 or 1.3, host names checked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(root_ca))
    except (OSError, ssl.SSLError) as exc:
        raise LocalError(f"{root_ca}: cannot load the pinned root CA: {exc}") from None
    return context


MISSING = (403, 404)  # what a server answers for a document it does not have


class Receiver(Protocol):
    """Where a streamed range goes (`Transport.stream`): told where the range starts,
    how long it is and the whole file's size, then handed the bytes in order, written
    straight into the buffer it offers."""

    def begin(self, offset: int, length: int, total: int) -> None: ...

    def buffer(self) -> memoryview:
        """Where the next bytes go: writable, non-empty while the range is not done."""
        ...

    def filled(self, count: int) -> None:
        """The first `count` bytes of the last `buffer()` now hold the next bytes."""
        ...


def feed(receiver: Receiver, chunk: bytes | memoryview) -> None:
    """Copy `chunk` into `receiver`'s buffers."""
    view = memoryview(chunk)
    while view:
        space = receiver.buffer()
        count = min(len(space), len(view))
        space[:count] = view[:count]
        receiver.filled(count)
        view = view[count:]


class Transport:
    """An HTTPS client bound to one pinned CA and one machine identity."""

    def __init__(self, root_ca: Path, headers: dict[str, str], limits: Limits) -> None:
        self.context = tls_context(root_ca)
        self.headers = {"User-Agent": f"rampart/{__version__}", **headers}
        self.limits = limits
        # A connection whose last response was read whole and not closed, kept for the
        # next request to the same host and port (many chunks: one TLS handshake).
        self.idle: tuple[str, int, http.client.HTTPSConnection] | None = None

    def _connection(self, host: str, port: int) -> tuple[http.client.HTTPSConnection, bool]:
        """The idle connection to host:port if there is one (True), else a new one."""
        idle, self.idle = self.idle, None
        if idle is not None:
            if idle[:2] == (host, port):
                return idle[2], True
            idle[2].close()
        conn = http.client.HTTPSConnection(
            host, port, context=self.context, timeout=self.limits.connect_timeout
        )
        return conn, False

    def _keep(
        self,
        host: str,
        port: int,
        conn: http.client.HTTPSConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        """Keep `conn` for the next request if its response was read whole and the
        server keeps the connection open; else close it. (A body read with read1 up to
        its length leaves the response open, its remaining length 0.)"""
        whole = response.isclosed() or response.length == 0
        if whole and not response.will_close:
            response.close()  # http.client sends nothing while a response is open
            if self.idle is not None:
                self.idle[2].close()
            self.idle = (host, port, conn)
        else:
            conn.close()

    def close(self) -> None:
        if self.idle is not None:
            self.idle[2].close()
            self.idle = None

    @contextmanager
    def request(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        body: bytes | None = None,
        identified: dict[str, str] | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """Open `url`, following https-only redirects (GET only); yield the final response.

        The identification headers, and `identified` (a signed request's headers), go
        only to the host of the first URL: a redirect to another host gets the request
        without them.
        """
        first_host = _https_target(url)[0].hostname
        for _ in range(MAX_REDIRECTS + 1):
            parts, port = _https_target(url)
            host = parts.hostname or ""
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            sent = (
                {**self.headers, **(identified or {})}
                if parts.hostname == first_host
                else {"User-Agent": self.headers["User-Agent"]}
            )
            conn, reused = self._connection(host, port)
            try:
                try:
                    response = self._send(
                        conn, reused, method, path, body, {**sent, **(headers or {})}
                    )
                except (OSError, http.client.HTTPException):
                    if not reused or method != "GET":
                        raise
                    # The server closed the idle connection meanwhile: once more, afresh.
                    conn.close()
                    conn, reused = self._connection(host, port)
                    response = self._send(
                        conn, False, method, path, body, {**sent, **(headers or {})}
                    )
            except ssl.SSLCertVerificationError as exc:
                conn.close()
                raise TransportError(
                    f"{url}: server certificate refused: {exc.verify_message}"
                ) from None
            except ssl.SSLError as exc:
                conn.close()
                raise TransportError(f"{url}: TLS handshake failed: {exc.reason or exc}") from None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                raise TransportError(f"{url}: {_describe(exc)}") from None
            if response.status in (301, 302, 303, 307, 308) and method == "GET":
                location = response.getheader("Location") or ""
                conn.close()
                try:
                    target = urljoin(url, location)
                    scheme = urlsplit(target).scheme
                except ValueError:
                    raise TransportError(
                        f"{url}: refusing a redirect to an invalid URL {location[:200]!r}"
                    ) from None
                if scheme != "https":
                    raise TransportError(f"{url}: refusing a redirect to {target[:200]!r}")
                _https_target(target, f"{url}: refusing a redirect to ")
                log.debug("redirected to %s", target)
                url = target
                continue
            try:
                yield response
            except BaseException:
                conn.close()
                raise
            self._keep(host, port, conn, response)
            return
        raise TransportError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _send(
        self,
        conn: http.client.HTTPSConnection,
        reused: bool,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> http.client.HTTPResponse:
        if not reused:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(self.limits.read_timeout)
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse()

    def _read_body(
        self,
        url: str,
        response: http.client.HTTPResponse,
        sink: Callable[[bytes], None],
        cap: int,
        already: int = 0,
        progress: Progress | None = None,
        expected: int | None = None,
    ) -> int:
        """Stream the body into `sink`; enforce `cap`, announced length and minimum speed."""
        received = 0
        window_start = time.monotonic()
        window_bytes = 0
        while True:
            try:
                chunk = response.read1(READ)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise TransportError(f"{url}: {_describe(exc)}") from None
            if not chunk:
                break
            received += len(chunk)
            if already + received > cap:
                raise RemoteDataError(f"{url}: body exceeds the cap of {cap} bytes")
            if expected is not None and already + received > expected:
                raise RemoteDataError(f"{url}: body longer than the announced {expected} bytes")
            sink(chunk)
            if progress is not None:
                progress(already + received, expected)
            window_bytes += len(chunk)
            elapsed = time.monotonic() - window_start
            if elapsed >= self.limits.stall_window:
                if window_bytes / elapsed < self.limits.min_speed:
                    raise TransportError(
                        f"{url}: too slow ({window_bytes / elapsed:.0f} B/s over "
                        f"{elapsed:.0f} s, minimum {self.limits.min_speed} B/s)"
                    )
                window_start, window_bytes = time.monotonic(), 0
        if expected is not None and already + received < expected:
            raise TransportError(
                f"{url}: connection closed after {already + received} of {expected} bytes"
            )
        return received

    def get_small(self, url: str, cap: int, identified: dict[str, str] | None = None) -> bytes:
        """GET a small document (a version file) in memory, at most `cap` bytes."""
        return self._get(url, cap, (), identified)[1]

    def get_document(self, url: str, cap: int) -> tuple[int, bytes]:
        """GET a small document (signed metadata) in memory, at most `cap` bytes: (200,
        its bytes), or (403 or 404, b"") when the server has no such document."""
        return self._get(url, cap, MISSING)

    def _get(
        self,
        url: str,
        cap: int,
        missing: tuple[int, ...],
        identified: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """GET `url` in memory, at most `cap` bytes: (200, its bytes), or (status, b"")
        for a status in `missing`; any other status is a TransportError."""
        with self.request(url, identified=identified) as response:
            if response.status in missing:
                self._read_body(url, response, lambda _: None, 1 << 16)
                return response.status, b""
            _check_status(url, response, (200,))
            length = _content_length(url, response)
            if length is not None and length > cap:
                raise RemoteDataError(f"{url}: announced {length} bytes, the cap is {cap}")
            parts: list[bytes] = []
            self._read_body(url, response, parts.append, cap, expected=length)
            return 200, b"".join(parts)

    def post(
        self, url: str, body: bytes, content_type: str, identified: dict[str, str] | None = None
    ) -> int:
        """POST `body`; return the status (the response body is read up to 64 KiB, dropped)."""
        headers = {"Content-Type": content_type}
        with self.request(url, headers, "POST", body, identified) as response:
            self._read_body(url, response, lambda _: None, 1 << 16)
            return response.status

    def download(self, url: str, dest: Path, cap: int, progress: Progress | None = None) -> int:
        """Download `url` into `dest`, resuming a partial file with a range request.

        Returns the final size. The file is not fsynced: what it holds is verified
        after it is copied, and fetched again if it does not verify.
        """
        have = dest.stat().st_size if dest.exists() else 0
        if have > cap:
            dest.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self.request(url, headers) as response:
            if response.status == 416 and have:
                response.read(0)
                if _unsatisfied_range(response) == have:  # `bytes */<have>`: all there
                    log.info("%s: already downloaded (%d bytes)", url, have)
                    return have
                log.info("%s: cached partial file does not fit the server's, restarting", url)
                dest.unlink()
                return self.download(url, dest, cap, progress)
            have, expected = _resumed(url, response, have, cap)
            sink = _Sink(dest, url, have, expected, self.limits.space_margin)
            try:
                received = sink.fill(
                    lambda write: self._read_body(
                        url, response, write, cap, have, progress, expected
                    )
                )
            finally:
                sink.close()
            return have + received

    def stream(
        self,
        url: str,
        start: int,
        end: int | None,
        cap: int,
        receiver: Receiver,
        progress: Progress | None = None,
    ) -> int:
        """Stream bytes `start` to `end` (excluded; None: to the end) of `url`, whose
        size may be at most `cap`, into `receiver`; the number of bytes streamed.

        A range request: the server must answer 206 with a Content-Range starting at
        `start` and giving the file's size (or, for a range from 0 to the end, 200
        with a Content-Length). Nothing is written to disk here: the receiver
        verifies and keeps what it needs.
        """
        last = "" if end is None else str(end - 1)
        with self.request(url, {"Range": f"bytes={start}-{last}"}) as response:
            _check_status(url, response, (200, 206))
            if response.status == 206:
                first, final, total = _content_range_whole(url, response)
                if first != start or (end is not None and final != end - 1):
                    raise RemoteDataError(
                        f"{url}: server sent bytes {first}-{final}, asked for {start}-{last}"
                    )
                length = final + 1 - first
            else:
                whole = _content_length(url, response)
                if start or end is not None or whole is None:
                    raise RemoteDataError(f"{url}: server ignored the range request")
                length = total = whole
            if total > cap:
                raise RemoteDataError(f"{url}: announced {total} bytes, the cap is {cap}")
            receiver.begin(start, length, total)
            received = self._read_body(
                url,
                response,
                lambda chunk: feed(receiver, chunk),
                start + length,
                start,
                progress,
                start + length,
            )
            return received


def _resumed(
    url: str, response: http.client.HTTPResponse, have: int, cap: int
) -> tuple[int, int | None]:
    """Where the response resumes (0 for a whole file) and the size it announces.
    RemoteDataError if it resumes elsewhere than asked or announces more than `cap`."""
    _check_status(url, response, (200, 206))
    length = _content_length(url, response)
    if response.status == 206:
        start, total = _content_range(url, response)
        if start != have:
            raise RemoteDataError(f"{url}: server resumed at {start}, asked for {have}")
        expected = total
    else:
        have = 0
        expected = length
    if expected is not None and expected > cap:
        raise RemoteDataError(f"{url}: announced {expected} bytes, the cap is {cap}")
    if have:
        log.info("%s: resuming at byte %d", url, have)
    return have, expected


class _Sink:
    """The download's file: opened at the resume point after a free-space check,
    written in CHUNK blocks gathered in one buffer, not fsynced (root verifies what
    it copies; after a crash, a download that does not verify is fetched again).
    A failure keeps what arrived for resuming, unless the disk is full: then the
    partial file cannot be completed and goes."""

    def __init__(self, dest: Path, url: str, have: int, expected: int | None, margin: int):
        self.dest = dest
        self.name = url.rsplit("/", 1)[-1]
        self.shown = dest.absolute()  # in the fetch process, dest is relative to its cwd
        disk = os.statvfs(dest.parent)
        self.free = disk.f_bavail * disk.f_frsize
        self.margin = margin
        self.room = self.free - margin  # what this download may still write
        if expected is not None and expected - have > self.room:
            raise LocalError(
                f"{self.shown}: not enough space to download {self.name} "
                f"({expected - have} bytes needed, {self.free} free, {margin} kept free)"
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = os.open(dest, flags, 0o600)
        except OSError as exc:
            raise LocalError(f"{self.shown}: cannot write the download: {exc.strerror}") from None
        self.out_of_space = False
        self.buffer = bytearray(CHUNK)  # filled in place: no allocation per record
        self.filled = 0
        self.written = 0
        try:
            if not have and os.fstat(self.fd).st_size:
                # Only a file that has bytes: truncating makes ext4 write the new
                # data back at close (auto_da_alloc), as slow as an fsync.
                os.ftruncate(self.fd, 0)
            os.lseek(self.fd, have, os.SEEK_SET)
        except BaseException:
            self.close()
            raise

    def fill(self, read_body: Callable[[Callable[[bytes], None]], int]) -> int:
        """Run `read_body` with this file's write function; what it received, written."""
        try:
            try:
                received = read_body(self.write)
            finally:
                if not self.out_of_space:
                    self.flush()  # what arrived is kept for resuming
        except OSError as exc:
            self.out_of_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            dropped = "; partial file removed" if self.out_of_space else ""
            raise LocalError(
                f"{self.shown}: cannot write the download: {exc.strerror}{dropped}"
            ) from None
        return received

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.room:  # only an unannounced length gets here
            self.out_of_space = True
            raise LocalError(
                f"{self.shown}: not enough space to download {self.name} "
                f"(no length announced; stopped after {self.written - len(chunk)} bytes, "
                f"{self.free} were free, {self.margin} kept free); partial file removed"
            )
        if self.filled + len(chunk) > CHUNK:  # TLS records are small: write 1 MiB blocks
            self.flush()
        if len(chunk) >= CHUNK:
            self._write(memoryview(chunk))
            return
        self.buffer[self.filled : self.filled + len(chunk)] = chunk
        self.filled += len(chunk)

    def flush(self) -> None:
        with memoryview(self.buffer) as view:
            self._write(view[: self.filled])
        self.filled = 0

    def _write(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.out_of_space:
            self.dest.unlink(missing_ok=True)


def _https_target(url: str, refusal: str = "") -> tuple[SplitResult, int]:
    """`url` split, with its port; TransportError unless an https:// URL with a valid
    host name (one IDNA can encode: connecting would fail outside the error tree)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or 443
    except ValueError:
        raise TransportError(f"{refusal}{url[:200]!r}: invalid URL or port") from None
    if parts.scheme != "https" or not host:
        raise TransportError(f"{refusal}{url[:200]!r}: refusing a non-HTTPS URL")
    try:
        host.encode("idna")
    except UnicodeError:
        raise TransportError(f"{refusal}{url[:200]!r}: invalid host name") from None
    return parts, port


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def _check_status(url: str, response: http.client.HTTPResponse, ok: tuple[int, ...]) -> None:
    if response.status not in ok:
        raise TransportError(f"{url}: HTTP {response.status} {response.reason[:80]}")


def _content_length(url: str, response: http.client.HTTPResponse) -> int | None:
    value = response.getheader("Content-Length")
    if value is None:
        return None
    if not re.fullmatch(_NUMBER, value.strip()):
        raise RemoteDataError(f"{url}: invalid Content-Length {value[:40]!r}")
    return int(value.strip())


def _unsatisfied_range(response: http.client.HTTPResponse) -> int | None:
    """The length a 416 answer gives (`Content-Range: bytes */<length>`, RFC 9110
    14.4), or None."""
    value = response.getheader("Content-Range") or ""
    match = re.fullmatch(rf"bytes \*/({_NUMBER})", value.strip())
    return None if match is None else int(match[1])


def _content_range_whole(url: str, response: http.client.HTTPResponse) -> tuple[int, int, int]:
    """The first and last byte of a 206 answer and the file's size, which it must give."""
    value = response.getheader("Content-Range") or ""
    match = re.fullmatch(rf"bytes ({_NUMBER})-({_NUMBER})/({_NUMBER})", value.strip())
    if match is None or int(match[1]) > int(match[2]) or int(match[2]) >= int(match[3]):
        raise RemoteDataError(f"{url}: invalid Content-Range {value[:60]!r}")
    return int(match[1]), int(match[2]), int(match[3])


def _content_range(url: str, response: http.client.HTTPResponse) -> tuple[int, int | None]:
    value = response.getheader("Content-Range") or ""
    match = re.fullmatch(rf"bytes ({_NUMBER})-({_NUMBER})/({_NUMBER}|\*)", value.strip())
    if match is None:
        raise RemoteDataError(f"{url}: invalid Content-Range {value[:60]!r}")
    total = None if match[3] == "*" else int(match[3])
    return int(match[1]), total

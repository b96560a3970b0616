"""Unprivileged network processing.

Everything that talks to the network and parses what it sends runs in a child
process forked from the root client, which before running any of it:
- opens what it needs as root (the pinned CA into a TLS context, the download
  directory as a file descriptor, then fchdir into it);
- drops every capability from its bounding set, sets no_new_privs, clears its
  supplementary groups and switches real, effective and saved ids to the
  dedicated fetch user (`rampart-fetch` by default). From then on it holds no
  capability and can write only where that user can: by design, nowhere but
  the download directory.
Forking (rather than exec'ing a helper) means the child needs no access to the
package files; the few modules a TLS connection loads lazily (IDNA encoding)
are imported before the fork, so the child needs no file access but the
download directory.

The child is forked as PID 1 of a new PID namespace (`run.fork_pid_namespace`):
whatever it starts (processes, threads, a zombie leader whose other threads
still run) lives in that namespace, which no process can leave, and dies with
it. Ending the child therefore ends everything the fetch ever ran, and the
kernel, not a scan of /proc, guarantees that nothing is left.

The download directory is handed over and taken back around each fetch:
1. root: the directory (0700) and its regular files with a single link chowned
   to the fetch user, anything else in it removed;
2. child: version check (TOML parsed here), downloads with resume, reports;
   one JSON reply on a pipe, capped;
3. root: the child is SIGKILLed and reaped, which ends its whole PID namespace;
   only then are the directory and files chowned back to root (files 0600) and
   anything but a regular file with one link removed. Root then copies each
   payload once into a directory only root can reach and verifies that copy
   (`update.download`): no unprivileged process is left that could change a
   file, and none could reach the copy that is verified and installed.
Every step inside the download directory works relative to a directory file
descriptor and never follows a symbolic link (O_NOFOLLOW, dir_fd).
"""

from __future__ import annotations

import contextlib
import ctypes
import encodings.idna  # noqa: F401 - imported before any fork: TLS loads it lazily
import errno
import fcntl
import json
import logging
import os
import pwd
import re
import signal
import stat
import stringprep  # noqa: F401 - imported before any fork: encodings.idna needs it
import struct
import unicodedata  # noqa: F401 - imported before any fork: encodings.idna needs it
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from rampart import run
from rampart.contracts import identity, wire
from rampart.contracts.version import Version, parse_version
from rampart.device.transport import MISSING, Limits, Progress, Receiver, Transport
from rampart.errors import (
    FormatError,
    LocalError,
    RampartError,
    RemoteDataError,
    TransportError,
    UsageError,
)

log = logging.getLogger(__name__)

VERSION_CAP = wire.VERSION_DOCUMENT_MAX
REPLY_CAP = 1 << 20
DOCUMENT = "document"  # the download directory's file for a fetched document
MAX_JOBS = 1024  # jobs in one fetch process (chunks of an incremental update)
REPLY_DEPTH = 3  # {"credentials": {"groups": [...]}}: the deepest a valid reply goes


@dataclass(frozen=True)
class Job:
    """One operation of the fetch process, as it crosses to the child and back: the
    protocol between the two processes. Callers use the Fetcher's typed methods."""

    op: str  # "version", "download", "document", "report" or "stream"
    url: str
    cap: int
    dest: str = ""
    body: str = ""
    start: int = 0  # stream: the first byte
    end: int = -1  # stream: the byte after the last (-1: to the end)
    # version, report: the signed request's headers (root signed them before the fork;
    # sent to the first host only, as the identification headers)
    signed: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Download:
    """A file to fetch into the download directory (resumed if part of it is there)."""

    url: str
    dest: Path
    cap: int  # the most bytes it may have


@dataclass(frozen=True)
class Stream:
    """A range of a file to stream to root, never written to disk (Fetcher.stream)."""

    url: str
    start: int
    end: int | None  # the byte after the last; None: to the end of the file
    cap: int  # the most bytes the whole file may have


def execute(
    transport: Transport,
    jobs: list[Job],
    progress: Progress | None,
    receivers: Sequence[Receiver] = (),
) -> list[Any]:
    """Run the jobs in this process; the result of each, in order (each stream job's
    bytes go to the next of `receivers`)."""
    results: list[Any] = []
    streams = iter(receivers)
    for job in jobs:
        if job.op == "stream":
            end = None if job.end < 0 else job.end
            results.append(
                transport.stream(job.url, job.start, end, job.cap, next(streams), progress)
            )
        elif job.op == "version":
            data = transport.get_small(job.url, min(job.cap, VERSION_CAP), dict(job.signed))
            version = str(wire.parse_version_document(data, job.url))
            nonce = wire.version_nonce(data)
            # One string crosses back: the version, and the server's nonce after a space.
            results.append(version if nonce is None else f"{version} {nonce}")
        elif job.op == "download":
            results.append(transport.download(job.url, Path(job.dest), job.cap, progress))
        elif job.op == "document":
            status, data = transport.get_document(job.url, job.cap)
            if status == 200:
                _write_document(Path(job.dest), data)
            results.append(status)
        elif job.op == "report":
            body = job.body.encode()
            results.append(transport.post(job.url, body, "application/json", dict(job.signed)))
        else:
            raise LocalError(f"unknown fetch operation {job.op!r}")
    return results


def _pairs(headers: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((headers or {}).items()))


def _write_document(dest: Path, data: bytes) -> None:
    """A fetched document into `dest` (created new: an old one is removed first)."""
    dest.unlink(missing_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def credentials() -> dict[str, Any]:
    """What this process may do: ids, groups, capabilities, no_new_privs."""
    status: dict[str, str] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            status[key] = value.strip()
    except OSError:
        pass
    return {
        "pid": os.getpid(),  # 1 in the fetch process: the first of its PID namespace
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "egid": os.getegid(),
        "groups": os.getgroups(),
        "cap_eff": status.get("CapEff", ""),
        "cap_prm": status.get("CapPrm", ""),
        "cap_bnd": status.get("CapBnd", ""),
        "no_new_privs": status.get("NoNewPrivs", ""),
    }


# --- the parent ----------------------------------------------------------------------


class Fetcher:
    """Runs fetch jobs: in a sandboxed child when `user` is set, else in-process."""

    def __init__(
        self,
        root_ca: Path,
        headers: dict[str, str],
        limits: Limits,
        user: str | None,
        download_dir: Path,
    ) -> None:
        self.root_ca = root_ca
        self.headers = headers
        self.limits = limits
        self.user = user
        self.download_dir = download_dir
        self.progress: Progress | None = None  # a progress bar, when interactive
        self.last_credentials: dict[str, Any] = {}

    def check_version(
        self, url: str, signed: dict[str, str] | None = None
    ) -> tuple[Version, str | None]:
        """The version the server's version document at `url` names, and the nonce it
        handed out (a Rampart server answering a signed request), if any."""
        [text] = self.run([Job("version", url, VERSION_CAP, signed=_pairs(signed))])
        text, _, nonce = text.partition(" ")
        try:
            return parse_version(text, f"{url}: version"), nonce or None
        except UsageError as exc:
            raise FormatError(str(exc)) from None

    def download(self, files: Sequence[Download]) -> list[int]:
        """Fetch `files` in one fetch process; the size of each."""
        jobs = [Job("download", f.url, f.cap, str(f.dest)) for f in files]
        sizes: list[int] = self.run(jobs)
        return sizes

    def document(self, url: str, cap: int) -> tuple[int, bytes]:
        """GET a small document (signed metadata, at most `cap` bytes) through the fetch
        process: (200, its bytes), or (403 or 404, b"") if the server has none. The bytes
        are read back by this process from the download directory, once the fetch
        process is gone; they are not trusted (the caller verifies them)."""
        [found] = self.documents([(url, cap)])
        return found

    def documents(self, wanted: Sequence[tuple[str, int]]) -> list[tuple[int, bytes]]:
        """`document` for each (url, cap), in one fetch process (one TLS connection)."""
        self.download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        names = [DOCUMENT if n == 0 else f"{DOCUMENT}.{n}" for n in range(len(wanted))]
        for name in names:
            (self.download_dir / name).unlink(missing_ok=True)
        statuses = self.run(
            [
                Job("document", url, cap, str(self.download_dir / name))
                for (url, cap), name in zip(wanted, names, strict=True)
            ]
        )
        return [
            (200, self._read_document(name, url, cap)) if status == 200 else (int(status), b"")
            for (url, cap), name, status in zip(wanted, names, statuses, strict=True)
        ]

    def _read_document(self, name: str, url: str, cap: int) -> bytes:
        dir_fd = open_directory(self.download_dir)
        try:
            fd = open_plain_file(dir_fd, name)
            if fd is None:
                raise LocalError(f"{self.download_dir / name}: the fetched document is missing")
            try:
                with os.fdopen(fd, "rb", closefd=False) as document:
                    data = document.read(cap + 1)
            finally:
                os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        if len(data) > cap:
            raise RemoteDataError(f"{url}: larger than the cap of {cap} bytes")
        return data

    def stream(self, ranges: Sequence[tuple[Stream, Receiver]]) -> list[int]:
        """Stream each range into its receiver, in one fetch process; the bytes of each.

        Sandboxed, the fetch process sends the bytes through a pipe (STREAM_HEADER, then
        the range's bytes, for each range in order) and root checks what it is told
        against what it asked before the receiver sees a byte. A receiver that raises
        ends the fetch process."""
        jobs = [
            Job("stream", s.url, s.cap, start=s.start, end=-1 if s.end is None else s.end)
            for s, _ in ranges
        ]
        receivers = [receiver for _, receiver in ranges]
        if self.user is None:
            transport = Transport(self.root_ca, self.headers, self.limits)
            self.last_credentials = credentials()
            try:
                return execute(transport, jobs, self.progress, receivers)
            finally:
                transport.close()
        sizes: list[int] = check_results(jobs, self._run_sandboxed(jobs, self.progress, receivers))
        return sizes

    def report(self, url: str, body: bytes, signed: dict[str, str] | None = None) -> int:
        """POST an install report; the HTTP status the server answered."""
        job = Job("report", url, wire.REPORT_MAX, body=body.decode(), signed=_pairs(signed))
        [status] = self.run([job])
        return int(status)

    def run(self, jobs: list[Job]) -> list[Any]:
        """Run `jobs` (sandboxed when a fetch user is set); each result checked for
        its operation's type and range (check_results)."""
        progress = self.progress
        if self.user is None:
            transport = Transport(self.root_ca, self.headers, self.limits)
            self.last_credentials = credentials()
            try:
                return execute(transport, jobs, progress)
            finally:
                transport.close()
        return check_results(jobs, self._run_sandboxed(jobs, progress))

    def _run_sandboxed(
        self, jobs: list[Job], progress: Progress | None, receivers: Sequence[Receiver] = ()
    ) -> list[Any]:
        try:
            account = pwd.getpwnam(self.user or "")
        except KeyError:
            raise LocalError(
                f"fetch user {self.user!r} does not exist (create it with systemd-sysusers, "
                'or set [download] fetch_user = "" to fetch without privilege separation)'
            ) from None
        if account.pw_uid == 0:
            raise LocalError(f"fetch user {self.user!r} is root; use an unprivileged account")
        transport = Transport(self.root_ca, self.headers, self.limits)  # CA read as root
        self._hand_over(account.pw_uid, account.pw_gid)
        dir_fd = os.open(self.download_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        read_end, write_end = os.pipe()
        stream_in, stream_out = _stream_pipe() if receivers else (-1, -1)
        child: run.PidNamespace | None = None
        status = -1
        streamed: list[int] = []
        try:
            child = run.fork_pid_namespace()
            if child is None:  # the child, PID 1 of its own PID namespace: never returns
                try:
                    os.close(read_end)
                    if stream_in >= 0:
                        os.close(stream_in)
                    _child(
                        transport,
                        jobs,
                        progress,
                        account.pw_uid,
                        account.pw_gid,
                        dir_fd,
                        write_end,
                        self.download_dir,
                        stream_out,
                    )
                finally:
                    os._exit(1)
            os.close(write_end)
            write_end = -1
            if stream_out >= 0:
                os.close(stream_out)
                stream_out = -1
                streamed = _pump(stream_in, [job for job in jobs if job.op == "stream"], receivers)
            with os.fdopen(read_end, "rb") as pipe:
                read_end = -1
                data = pipe.read(REPLY_CAP + 1)
        finally:
            for fd in (read_end, write_end, dir_fd, stream_in, stream_out):
                if fd >= 0:
                    os.close(fd)
            if child is not None:
                # Killing the namespace's first process kills every process of the
                # namespace; it is reaped only once all of them are gone.
                status = child.end()
            self._take_back()
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or len(data) > REPLY_CAP:
            raise LocalError(f"fetch process failed (wait status {status})")
        results = self._parse_reply(data, len(jobs))
        sizes = [r for j, r in zip(jobs, results, strict=True) if j.op == "stream"]
        if receivers and streamed != sizes:
            raise LocalError("fetch process sent a malformed reply: not the bytes it streamed")
        return results

    def _parse_reply(self, data: bytes, count: int) -> list[Any]:
        reply = read_reply(data)
        if not reply["ok"]:
            error = reply["error"]
            # The child is not trusted: it may only pick among these classes.
            kinds: dict[str, type[RampartError]] = {
                cls.__name__: cls
                for cls in (TransportError, RemoteDataError, FormatError, LocalError)
            }
            kind = kinds.get(error["kind"], RemoteDataError)
            message = error["message"][:500]
            raise kind("".join(c if c.isprintable() else "?" for c in message))
        self.last_credentials = reply["credentials"]
        results: list[Any] = reply["results"]
        if len(results) != count:
            raise LocalError(
                f"fetch process sent a malformed reply: {len(results)} results for {count} jobs"
            )
        return results

    def _hand_over(self, uid: int, gid: int) -> None:
        """Give the download directory to the fetch user for the fetch."""
        self.download_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._own(uid, gid, None)

    def _take_back(self) -> None:
        """Give the download directory back to root, once the fetch process's PID
        namespace is gone: no process is left that could change it meanwhile."""
        self._own(0, 0, 0o600)

    def _own(self, uid: int, gid: int, file_mode: int | None) -> None:
        """chown the directory and its regular files with one link to uid:gid, the
        directory 0700, the files `file_mode` (None: unchanged); remove anything else."""
        dir_fd = open_directory(self.download_dir)
        try:
            os.fchown(dir_fd, uid, gid)
            os.fchmod(dir_fd, 0o700)
            for name in os.listdir(dir_fd):  # noqa: PTH208 - a directory descriptor
                fd = open_plain_file(dir_fd, name)
                if fd is None:
                    remove_entry(dir_fd, name)
                    continue
                try:
                    os.fchown(fd, uid, gid)
                    if file_mode is not None:
                        os.fchmod(fd, file_mode)
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)


# --- streamed ranges: the child is not trusted, so root checks each range's header ---------

STREAM_HEADER = struct.Struct("<QQQ")  # before each range's bytes: offset, length, file size
PIPE_SIZE = 1 << 20  # the stream pipe's capacity (fcntl F_SETPIPE_SZ)
_F_SETPIPE_SZ = 1031


def _stream_pipe() -> tuple[int, int]:
    """A pipe for streamed bytes, enlarged to PIPE_SIZE where the kernel allows."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # the default (64 KiB) only costs system calls
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end


def _read_exact(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        part = os.read(fd, size - len(data))
        if not part:
            return None
        data += part
    return data


def _pump(fd: int, jobs: list[Job], receivers: Sequence[Receiver]) -> list[int]:
    """Read each range the fetch process streams into its receiver, after checking its
    header against the job; the bytes of each range that arrived whole. Stops at the
    end of the pipe (the fetch process failed: its reply says why)."""
    done: list[int] = []
    for job, receiver in zip(jobs, receivers, strict=True):
        header = _read_exact(fd, STREAM_HEADER.size)
        if header is None:
            break
        offset, length, total = STREAM_HEADER.unpack(header)
        end = total if job.end < 0 else job.end
        if offset != job.start or total > job.cap or offset + length != end or end > total:
            raise LocalError(
                f"fetch process sent a malformed stream: bytes {offset}+{length} of {total} "
                f"for {job.url[:200]} ({job.start}-{job.end}, at most {job.cap})"
            )
        receiver.begin(offset, length, total)
        left = length
        while left:
            space = receiver.buffer()
            count = os.readv(fd, [space[:left]])
            if count == 0:
                return done
            receiver.filled(count)
            left -= count
        done.append(length)
    return done


class _PipeSender:
    """The fetch process's receiver: a range's header, then its bytes, into the
    stream pipe, 1 MiB at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.chunk = bytearray(PIPE_SIZE)
        self.held = 0
        self.left = 0

    def begin(self, offset: int, length: int, total: int) -> None:
        _write_all(self.fd, STREAM_HEADER.pack(offset, length, total))
        self.left = length

    def buffer(self) -> memoryview:
        return memoryview(self.chunk)[self.held : self.held + self.left]

    def filled(self, count: int) -> None:
        self.held += count
        self.left -= count
        if self.held == len(self.chunk) or not self.left:
            with memoryview(self.chunk) as view:
                _write_all(self.fd, view[: self.held])
            self.held = 0


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- the reply: the child is not trusted, so root parses it by a strict schema ------------

_JSON_NESTING = re.compile(rb'["\\\[\]{}]')
_INT_MAX = (1 << 63) - 1
_CREDENTIAL_IDS = ("pid", "uid", "euid", "gid", "egid")
_CREDENTIAL_TEXTS = ("cap_eff", "cap_prm", "cap_bnd", "no_new_privs")


class _BadReply(Exception):
    """Why a reply breaks the schema (becomes a LocalError naming it)."""


def _nesting(data: bytes) -> int:
    """How deep arrays and objects nest in the JSON text `data`, counting up to
    REPLY_DEPTH + 1 only (the parser must never recurse on a hostile depth)."""
    depth = deepest = 0
    in_string = False
    skip = -1  # the offset of the character a backslash escapes
    for match in _JSON_NESTING.finditer(data):
        char, at = match[0], match.start()
        if at == skip:
            continue
        if in_string:
            if char == b"\\":
                skip = at + 1
            elif char == b'"':
                in_string = False
        elif char == b'"':
            in_string = True
        elif char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > REPLY_DEPTH:
                break
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


def _keys(value: object, where: str, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != set(required):
        raise _BadReply(f"{where} is not an object with exactly {', '.join(required)}")
    return value


def _integer(value: object, where: str, low: int = 0, high: int = _INT_MAX) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _BadReply(f"{where} is not an integer from {low} to {high}")
    return value


def _text(value: object, where: str, cap: int) -> str:
    if not isinstance(value, str) or len(value) > cap:
        raise _BadReply(f"{where} is not a string of at most {cap} characters")
    return value


def read_reply(data: bytes) -> dict[str, Any]:
    """The fetch child's reply, checked against its schema (LocalError if it breaks it):

        {"ok": true, "results": [<int or string>...], "credentials": {...}}
        {"ok": false, "error": {"kind": <string>, "message": <string>}}

    Size (REPLY_CAP) and nesting (REPLY_DEPTH) are bounded before parsing.
    """
    try:
        if len(data) > REPLY_CAP:
            raise _BadReply(f"larger than {REPLY_CAP} bytes")
        if _nesting(data) > REPLY_DEPTH:
            raise _BadReply(f"nested deeper than {REPLY_DEPTH}")
        try:
            reply = json.loads(data)
        except (ValueError, RecursionError):
            raise _BadReply("not JSON") from None
        if not isinstance(reply, dict) or reply.get("ok") not in (True, False):
            raise _BadReply("no boolean 'ok'")
        if not reply["ok"]:
            _check_error(reply)
        else:
            _check_results_and_credentials(reply)
        return reply
    except _BadReply as exc:
        raise LocalError(f"fetch process sent a malformed reply: {exc}") from None


def _check_error(reply: dict[str, Any]) -> None:
    error = _keys(_keys(reply, "the reply", ("ok", "error"))["error"], "error", ("kind", "message"))
    _text(error["kind"], "error.kind", 64)
    _text(error["message"], "error.message", 4096)


def _check_results_and_credentials(reply: dict[str, Any]) -> None:
    _keys(reply, "the reply", ("ok", "results", "credentials"))
    results = reply["results"]
    if not isinstance(results, list) or len(results) > MAX_JOBS:
        raise _BadReply(f"results is not a list of at most {MAX_JOBS} items")
    for number, result in enumerate(results):
        if isinstance(result, str):
            _text(result, f"results[{number}]", VERSION_CAP)
        else:
            _integer(result, f"results[{number}]")
    creds = _keys(
        reply["credentials"], "credentials", (*_CREDENTIAL_IDS, "groups", *_CREDENTIAL_TEXTS)
    )
    for key in _CREDENTIAL_IDS:
        _integer(creds[key], f"credentials.{key}", 0, (1 << 32) - 1)
    groups = creds["groups"]
    if not isinstance(groups, list) or len(groups) > 65536:
        raise _BadReply("credentials.groups is not a list of at most 65536 ids")
    for group in groups:
        _integer(group, "a group in credentials.groups", 0, (1 << 32) - 1)
    for key in _CREDENTIAL_TEXTS:
        _text(creds[key], f"credentials.{key}", 64)


def check_results(jobs: list[Job], results: list[Any]) -> list[Any]:
    """`results` if each has the type and range its job's operation returns (LocalError if not):
    a version string, a download's size (at most its cap), a report's HTTP status."""
    for job, result in zip(jobs, results, strict=True):
        where = f"the result of {job.op} {job.url[:200]}"
        try:
            if job.op == "version":
                _version_result(result, where)
            elif job.op in ("download", "stream"):
                _integer(result, where, 0, job.cap)
            elif job.op == "document":
                if _integer(result, where, 200, 404) not in (200, *MISSING):
                    raise _BadReply(f"{where} is not 200, 403 or 404")
            else:
                _integer(result, where, 100, 599)
        except _BadReply as exc:
            raise LocalError(f"fetch process sent a malformed reply: {exc}") from None
    return results


def _version_result(result: object, where: str) -> None:
    """A version (at most 128 characters), then the server's nonce after a space."""
    text = _text(result, where, 128 + 1 + 96)
    version, space, nonce = text.partition(" ")
    if len(version) > 128 or (space and not identity.NONCE.fullmatch(nonce)):
        raise _BadReply(f"{where} is not a version and a nonce")


def open_directory(path: Path) -> int:
    """`path` opened as a directory file descriptor, not through a symbolic link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def open_plain_file(dir_fd: int, name: str, writable: bool = False) -> int | None:
    """A descriptor of `name` in `dir_fd` (read-only, or read-write if `writable`) if
    it is a regular file with one link (a hard link could be root's file), opened
    without following a symbolic link; None if it is anything else or missing. The
    checks are on the opened file."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None  # never opened: a FIFO or a device could block or have effects
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(name, flags | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            return None  # replaced meanwhile
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        return None
    return fd


MAX_REMOVAL_DEPTH = 64


def remove_entry(dir_fd: int, name: str, depth: int = 0) -> None:
    """Remove `name` from the directory open as `dir_fd`: a file, a symbolic link (the
    link, never its target) or a directory tree the fetch user left behind.

    Every step is relative to a directory file descriptor opened with O_NOFOLLOW,
    so an entry replaced by a symbolic link meanwhile (renameat2 RENAME_EXCHANGE)
    can make a step fail but never lead outside the tree. LocalError for a tree
    deeper than MAX_REMOVAL_DEPTH or one that keeps changing; OSError otherwise.
    """
    for _ in range(3):
        try:
            os.unlink(name, dir_fd=dir_fd)  # anything but a directory
            return
        except FileNotFoundError:
            return
        except IsADirectoryError:
            pass
        if depth >= MAX_REMOVAL_DEPTH:
            raise LocalError(
                f"{name}: a directory tree deeper than {MAX_REMOVAL_DEPTH} levels in the "
                "download directory; remove it by hand"
            )
        try:
            sub = os.open(
                name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                continue  # no longer a directory: unlink it
            raise
        try:
            for child in os.listdir(sub):  # noqa: PTH208 - a directory descriptor
                remove_entry(sub, child, depth + 1)
        finally:
            os.close(sub)
        try:
            os.rmdir(name, dir_fd=dir_fd)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ENOTEMPTY):
                raise
    raise LocalError(f"{name}: keeps changing while it is removed from the download directory")


# --- the child ------------------------------------------------------------------------

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


def drop_privileges(uid: int, gid: int) -> None:
    """Empty the capability bounding set, set no_new_privs, become uid:gid with no groups."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        last = int(_CAP_LAST_CAP.read_text())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise OSError("privileges were not dropped")


def _child(
    transport: Transport,
    jobs: list[Job],
    progress: Progress | None,
    uid: int,
    gid: int,
    dir_fd: int,
    reply_fd: int,
    directory: Path,
    stream_fd: int = -1,
) -> NoReturn:
    """The forked child: drop privileges, run the jobs, write one JSON reply, exit."""
    code = 0
    try:
        os.umask(0o077)
        os.fchdir(dir_fd)
        os.close(dir_fd)
        drop_privileges(uid, gid)
        # Die with the root process (a changed uid cleared any earlier setting): a
        # killed client leaves no fetch namespace behind.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Paths inside the download directory become relative to it, so the child
        # needs no access to the directories above it.
        local = [
            replace(job, dest=os.path.relpath(job.dest, directory)) if job.dest else job
            for job in jobs
        ]
        sender = _PipeSender(stream_fd)  # one buffer: the ranges go one after the other
        senders = [sender for job in jobs if job.op == "stream"]
        results = execute(transport, local, progress, senders)
        reply: dict[str, Any] = {"ok": True, "results": results, "credentials": credentials()}
    except RampartError as exc:
        reply = {"ok": False, "error": {"kind": type(exc).__name__, "message": str(exc)}}
    except Exception as exc:
        reply = {"ok": False, "error": {"kind": "LocalError", "message": f"fetch: {exc}"}}
    if stream_fd >= 0:
        os.close(stream_fd)  # the end of the stream: root reads the reply next
    try:
        data = json.dumps(reply).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(reply_fd, view) :]
    except OSError:
        code = 1
    os._exit(code)

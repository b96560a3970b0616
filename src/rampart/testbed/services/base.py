"""What every service shares: free ports, a world-readable scratch directory, a health
probe, and `Service`, a long-running child process in its own process group.

A `Service` starts on construction and waits until its `ready` check passes (for at
most `timeout` seconds, polling every 50 ms); if the process exits first, or the
time runs out, it is stopped and ServiceError says so with the last lines of its
logs. `stop()` sends a signal to the process, waits for it, then SIGKILLs whatever is
left of its process group (the workers it forked): no process outlives a stop.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from rampart import run
from rampart.errors import LocalError

START_TIMEOUT = 30.0  # seconds for a service to become ready
STOP_TIMEOUT = 20.0  # seconds for a service to end after its stop signal
POLL = 0.05  # seconds between two health checks
# mkdtemp makes each directory: nothing is guessed there.
SCRATCH_PARENT = Path("/var/tmp")  # noqa: S108 - /tmp may be a small tmpfs


class ServiceError(RuntimeError):
    """A service could not start, did not become ready, or did not stop."""


# --- ports, directories, probes ------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def http_status(
    port: int,
    path: str = "/",
    *,
    headers: Mapping[str, str] | None = None,
    tls: bool = False,
    host: str = "127.0.0.1",
    timeout: float = 2.0,
) -> int:
    """The status of one GET of `path` (0: no HTTP answer). A health probe: with `tls`,
    the server's certificate is not checked."""
    conn: http.client.HTTPConnection
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def world_readable_tmp(prefix: str = "rampart-test-", parent: Path = SCRATCH_PARENT) -> Path:
    """A new directory every user can traverse (mode 0755, where pytest's are 0700): for
    what a process that dropped its privileges reads (the update client's fetch
    process, nginx's workers). The caller removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def log_tail(paths: Sequence[Path], lines: int = 20) -> str:
    """The last `lines` lines of each file, as the end of an error message ("" if none)."""
    parts = []
    for path in paths:
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if text:
            parts.append(f"\n{path} (last lines):\n  " + "\n  ".join(text[-lines:]))
    return "".join(parts)


# --- a long-running process ----------------------------------------------------------


class Closing:
    """A context manager whose exit is `close()`, which ends everything it started."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Service(Closing):
    """`argv` started in a new session (its own process group), stdin on /dev/null,
    stdout and stderr appended to `log`; ready once `ready()` is true.

    `env` replaces the environment (None: this process's, PYTHONPATH included);
    `logs` are other files worth showing when it fails (a server's own log file).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log: Path,
        *,
        ready: Callable[[], bool] | None = None,
        timeout: float = START_TIMEOUT,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        logs: Sequence[Path] = (),
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log = log
        self.logs = (log, *logs)
        self.returncode: int | None = None
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._process = run.spawn(
                self.argv,
                env=env,
                inherit_env=env is None,
                stdout_path=log,
                stderr_path=log,
                cwd=cwd,
                new_session=True,
            )
        except LocalError as exc:
            raise ServiceError(f"{name}: {exc}") from None
        if ready is not None:
            self.wait_ready(ready, timeout)

    @property
    def pid(self) -> int:
        """The main process's ID (also its process group's)."""
        return self._process.pid

    def running(self) -> bool:
        """Whether the main process has not ended (it is not reaped here)."""
        return self.returncode is None and not self._exited(0)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.logs, lines)

    def wait_ready(self, ready: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Wait until `ready()`; stop the service and raise ServiceError if it exits
        first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                self.close()
                raise ServiceError(
                    f"{self.name} exited with code {self.returncode} while starting"
                    f"{self.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                self.close()
                raise ServiceError(f"{self.name} not ready after {timeout:g} s{self.log_tail()}")
            time.sleep(POLL)

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the main process only (its workers get nothing from here)."""
        if self.returncode is None:  # not reaped: the process ID is still its own
            self._process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the main process to end and reap it, leaving the rest of its group
        alone (see what outlives it; stop or close ends them); its exit code (negative:
        the signal that ended it). ServiceError if it still runs after `timeout` s."""
        if not self._exited(timeout):
            raise ServiceError(f"{self.name} still running after {timeout:g} s{self.log_tail()}")
        if self.returncode is None:
            self.returncode = self._process.wait()
        return self.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` (SIGTERM: a graceful stop), wait up to `timeout` seconds for the
        main process to end, then SIGKILL what is left of its process group; the exit
        code. ServiceError (with everything killed) if it had to be killed."""
        if not self._end(sig, timeout):
            raise ServiceError(
                f"{self.name} did not stop within {timeout:g} s of "
                f"{signal.Signals(sig).name}: killed{self.log_tail()}"
            )
        return self._reap()  # reaped by _end: only its exit code is read

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop with SIGTERM, killing it if need be; never raises (a clean-up)."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, a power cut)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._end(signal.SIGKILL, STOP_TIMEOUT)

    def _exited(self, timeout: float) -> bool:
        """Whether the main process ended within `timeout` s, leaving it unreaped (so
        that its process ID, and its group's, are not reused meanwhile)."""
        if self.returncode is not None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    return True
            except ChildProcessError:  # reaped through the Popen object
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    def _reap(self) -> int:
        """Kill what is left of the process group, reap the main process: its exit code."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.returncode is None:
            self.returncode = self._process.wait()
        return self.returncode

    def _end(self, sig: int, timeout: float) -> bool:
        """Signal, wait, kill the rest; whether the main process ended by itself."""
        if self.returncode is not None:
            self._reap()
            return True
        if not self._exited(0):
            self.send_signal(sig)
        ended = self._exited(timeout)
        self._reap()
        return ended

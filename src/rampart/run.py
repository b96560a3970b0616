"""The one place that runs subprocesses.

Commands are argv lists (never a shell), stdin is /dev/null unless input is
given, the environment is reduced to what the tool needs, and a failure
becomes a `LocalError` naming the command and its last line of stderr.

`run` waits for the command; `spawn` starts a long-running one (a virtual
machine, a TPM emulator) and returns a `Process` handle, its output appended
to files. `fork_pid_namespace` forks a child (no exec) as the first process of
a new PID namespace, whose whole process tree ends with it: the client's
unprivileged fetch process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rampart.errors import LocalError

log = logging.getLogger(__name__)

_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TERM", "HOME", "TMPDIR")


@dataclass(frozen=True)
class Completed:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV}
    full_env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if env:
        full_env.update(env)
    return full_env


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    inherit_stderr: bool = False,
    pass_fds: Sequence[int] = (),
    cwd: Path | None = None,
) -> Completed:
    """Run `argv`; raise LocalError if it cannot start, times out, or fails while `check`.

    With `inherit_stderr`, the command writes to our stderr (progress bars) and
    `Completed.stderr` is empty. `pass_fds` stay open in the command, under the
    same numbers (a `secret_file`).
    """
    full_env = _environment(env)
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None if inherit_stderr else subprocess.PIPE,
            env=full_env,
            timeout=timeout,
            check=False,
            pass_fds=tuple(pass_fds),
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        if cwd is not None and exc.filename in (cwd, str(cwd)):
            raise LocalError(f"{argv[0]}: working directory {cwd} does not exist") from exc
        raise LocalError(f"{argv[0]}: command not found (run `make setup`)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LocalError(f"{argv[0]}: timed out after {timeout} s") from exc
    done = Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr or b"")
    if check and proc.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else "no error output"
        raise LocalError(f"{argv[0]} failed with exit code {proc.returncode}: {last}")
    return done


@contextlib.contextmanager
def secret_file(data: bytes) -> Iterator[tuple[int, str]]:
    """A secret as a file only in memory (memfd, never on disk), for a command that
    reads a second secret from a path: yields (fd, "/proc/self/fd/<fd>") to pass to `run`
    with `pass_fds=(fd,)`. Closed, and so gone, on exit."""
    fd = os.memfd_create("rampart-secret", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd, f"/proc/self/fd/{fd}"  # /dev/fd is a link udev makes; /proc is always there
    finally:
        os.close(fd)


class Process:
    """A command started by `spawn`: a thin handle over `subprocess.Popen`.

    Signals are never sent to a process that has already been reaped, so a
    recycled process ID cannot be hit.
    """

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        self._popen = popen
        self.argv = tuple(argv)

    @property
    def pid(self) -> int:
        return self._popen.pid

    def poll(self) -> int | None:
        """The exit code if the process has ended (reaping it), else None."""
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end and return its exit code (negative: killed by
        that signal); raise LocalError if it is still running after `timeout` seconds."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise LocalError(
                f"{self.argv[0]} (pid {self.pid}) still running after {timeout} s"
            ) from exc

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has been reaped (by poll or wait), else None."""
        return self._popen.returncode

    def send_signal(self, sig: int) -> None:
        """Send `sig`, unless the process has already been reaped."""
        self._popen.send_signal(sig)

    def kill(self) -> None:
        """Send SIGKILL, unless the process has already been reaped."""
        self._popen.kill()

    def terminate(self) -> None:
        """Send SIGTERM, unless the process has already been reaped."""
        self._popen.terminate()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout_path: Path | None = None,
    stderr_path: Path | None = None,
    cwd: Path | None = None,
    new_session: bool = False,
    inherit_env: bool = False,
) -> Process:
    """Start `argv` in the background with stdin on /dev/null and the reduced environment
    (with `inherit_env`, this process's whole environment; `env` is added either way).

    Its stdout and stderr are appended to the given files (created if missing; the
    same file for both if the paths are equal), or discarded when no file is given;
    with `new_session` it leads a new session and process group (its whole group can
    then be signalled with os.killpg). The caller must reap the process. Raise
    LocalError if it cannot start.
    """
    full_env = {**os.environ, **(env or {})} if inherit_env else _environment(env)
    log.debug("+ %s &", shlex.join(argv))
    with contextlib.ExitStack() as stack:
        try:
            out = stack.enter_context(open(stdout_path, "ab")) if stdout_path else None
            if stderr_path is not None and stderr_path == stdout_path:
                err = out
            else:
                err = stack.enter_context(open(stderr_path, "ab")) if stderr_path else None
        except OSError as exc:
            raise LocalError(
                f"{argv[0]}: cannot open its output file {exc.filename}: {exc.strerror}"
            ) from exc
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out if out is not None else subprocess.DEVNULL,
                stderr=err if err is not None else subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                start_new_session=new_session,
            )
        except FileNotFoundError as exc:
            if cwd is not None and exc.filename in (cwd, str(cwd)):
                raise LocalError(f"{argv[0]}: working directory {cwd} does not exist") from exc
            raise LocalError(f"{argv[0]}: command not found (run `make setup`)") from exc
        except OSError as exc:
            raise LocalError(f"{argv[0]}: cannot start: {exc.strerror}") from exc
    log.debug("%s started as pid %d", argv[0], popen.pid)
    return Process(popen, argv)


# --- a child whose whole process tree ends with it ------------------------------------

_CLONE_NEWPID = 0x20000000


class PidNamespace:
    """The first process (PID 1) of a new PID namespace, forked by `fork_pid_namespace`.

    When that process ends, however it ends, the kernel SIGKILLs every other
    process of the namespace, every thread of each, whatever its state (a
    zombie leader whose other threads still run included), and reports the
    first process's end to its parent only once all of them are gone
    (pid_namespaces(7); kernel/pid_namespace.c, zap_pid_ns_processes). No
    process can leave a PID namespace, so once `end` returns none of them is
    left: no scan of /proc is needed to find them.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    def end(self) -> int:
        """SIGKILL the namespace's first process (a no-op if it already exited), reap
        it and return its wait status: then no process of the namespace is left.

        A process that already called exit keeps its exit status: a SIGKILL sent to
        an exiting process is ignored.
        """
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)  # not reaped yet: the pid is still ours
            _, self.status = os.waitpid(self.pid, 0)
        return self.status


def fork_pid_namespace() -> PidNamespace | None:
    """fork() into a new PID namespace: None in the child, which is its PID 1, the
    handle in the parent, whose later children are born in its own namespace again.

    Needs CAP_SYS_ADMIN, and under systemd `RestrictNamespaces=` must allow
    `pid`; LocalError if the namespace cannot be created.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = -1
    try:
        if libc.unshare(_CLONE_NEWPID) != 0:
            error = ctypes.get_errno()
            raise LocalError(
                f"cannot create a PID namespace for the fetch process: {os.strerror(error)} "
                "(it needs CAP_SYS_ADMIN, and systemd's RestrictNamespaces= must allow pid)"
            )
        try:
            pid = os.fork()
        finally:
            # unshare(CLONE_NEWPID) only changed where this process's next child is
            # born: back to its own namespace (the child is PID 1 of the new one).
            if pid != 0 and libc.setns(own, _CLONE_NEWPID) != 0:
                error = ctypes.get_errno()
                if pid > 0:
                    PidNamespace(pid).end()
                raise LocalError(f"cannot return to the own PID namespace: {os.strerror(error)}")
    finally:
        os.close(own)
    if pid == 0:
        return None
    log.debug("forked pid %d as PID 1 of a new PID namespace", pid)
    return PidNamespace(pid)

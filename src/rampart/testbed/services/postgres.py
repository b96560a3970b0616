"""A private, throw-away PostgreSQL cluster for tests and benchmarks.

    cluster = Cluster()              # initdb + start, one database ("rampart")
    cluster.url                      # postgresql://postgres@127.0.0.1:PORT/rampart
    cluster.create_database("t1"); cluster.url_for("t1"); cluster.drop_database("t1")
    cluster.stop(); cluster.start()  # the same cluster again, on the same port
    cluster.destroy()                # stop (killing leftovers) and remove everything

The cluster lives in a fresh /var/tmp/rampart-pg-XXXX directory: the data
directory, the server log and the unix socket directory. It listens on
127.0.0.1 only, on a free port chosen once, and trusts every local connection
(no passwords). Debian's `postgresql` package (installed by `make setup`)
provides the binaries under /usr/lib/postgresql/VERSION/bin; the newest
version is used. initdb refuses to run as root, so when this process is root
the server's commands run as the `postgres` system user that the package
creates (through runuser or setpriv), and the data directory belongs to it.

Unlike the other services, pg_ctl starts the server as a daemon (not a child of
this process): stop() asks pg_ctl, then kills the postmaster's process group.
Every wait has a timeout; a failure raises PostgresError with the server log's tail.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rampart import run
from rampart.errors import LocalError
from rampart.testbed.services.base import Closing, ServiceError, free_port, port_open

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"  # the role initdb creates (--username)
DEFAULT_DATABASE = "rampart"
DEFAULT_PARENT = Path("/var/tmp")  # noqa: S108 - mkdtemp makes the directory
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
SETUP_HINT = "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: run make setup"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}", re.ASCII)
# Settings for a test cluster: no fsync (nothing survives a power loss, nor needs to),
# but synchronous_commit stays on, so a commit is in the OS's hands before the client hears
# of it and survives a crash of PostgreSQL itself (`stop(mode="immediate")`): tests that
# crash the server and count rows rely on it.
FAST_SETTINGS: Mapping[str, str] = {"fsync": "off", "full_page_writes": "off"}


@dataclass(frozen=True)
class Output:
    """What a PostgreSQL tool printed, as text."""

    returncode: int
    stdout: str
    stderr: str


class PostgresError(ServiceError):
    """The cluster could not be set up, started, stopped or queried."""


def postgres_bindir() -> Path:
    """The newest /usr/lib/postgresql/VERSION/bin holding initdb, pg_ctl and postgres."""
    candidates = []
    for path in Path("/").glob(BIN_GLOB.lstrip("/")):
        version = path.parent.name
        if not all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            continue
        key = tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)
        candidates.append((key, path))
    if not candidates:
        raise PostgresError(SETUP_HINT)
    return max(candidates)[1]


def check_name(name: str) -> str:
    """A database name safe to put in SQL unquoted: lowercase letters, digits, '_'."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"database name {name!r}: use [a-z_][a-z0-9_]*, at most 63 characters")
    return name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own unreaped child) counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Cluster(Closing):
    """One private PostgreSQL cluster, started on construction."""

    def __init__(
        self,
        database: str | None = DEFAULT_DATABASE,
        *,
        parent: Path = DEFAULT_PARENT,
        settings: Mapping[str, str] = FAST_SETTINGS,
        host: str = "127.0.0.1",
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.bindir = postgres_bindir()
        self.host = host
        self.start_timeout = start_timeout
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self.user = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresError(
                    f"no {SYSTEM_USER!r} system user (Debian's postgresql package creates it): "
                    "run make setup"
                ) from None
            self._drop = self._privilege_drop()
        else:
            self.user = pwd.getpwuid(os.geteuid())
            self._drop = []
        parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="rampart-pg-", dir=parent))
        self.root.chmod(0o755)
        self.datadir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.logfile = self.root / "server.log"
        self.port = 0
        self.database = database
        self._postmaster: int | None = None
        self._destroyed = False
        atexit.register(self.destroy)
        try:
            self._init(settings)
            self._start_first()
            if database is not None:
                self.create_database(database)
        except BaseException:
            self.destroy()
            raise

    # --- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL of the database made at construction (`database`)."""
        if self.database is None:
            raise PostgresError("this cluster was made without a database: use url_for(name)")
        return self.url_for(self.database)

    def url_for(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{check_name(name)}"

    def __repr__(self) -> str:
        return f"<Cluster {self.root} port {self.port}>"

    # --- running the server's commands as its owner -------------------------------------

    def _privilege_drop(self) -> list[str]:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        if Path(runuser).is_file():
            return [runuser, "-u", SYSTEM_USER, "--"]
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        if Path(setpriv).is_file():
            return [
                setpriv,
                f"--reuid={self.user.pw_uid}",
                f"--regid={self.user.pw_gid}",
                "--init-groups",
                "--reset-env",
            ]
        raise PostgresError("neither runuser nor setpriv found (util-linux): run make setup")

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": f"{self.bindir}:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(self.root),
            "PGDATA": str(self.datadir),
        }
        return env

    def _server_command(
        self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> Output:
        """Run a server-side tool (initdb, pg_ctl) as the cluster's owner."""
        return self._run([*self._drop, *argv], timeout, check, self._env())

    def _run(
        self, argv: Sequence[str], timeout: float, check: bool, env: Mapping[str, str]
    ) -> Output:
        tool = next((Path(a).name for a in argv if a.startswith(str(self.bindir))), argv[0])
        try:
            # cwd readable by the owner: pg_ctl wants a usable cwd
            done = run.run(argv, env=env, timeout=timeout, check=False, cwd=self.root)
        except LocalError as exc:
            raise PostgresError(f"{tool}: {exc}{self._log_tail()}") from None
        result = Output(
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise PostgresError(
                f"{tool} failed (exit code {result.returncode}): {output}{self._log_tail()}"
            )
        return result

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return "\nserver log (last lines):\n  " + "\n  ".join(tail) if tail else ""

    # --- creation, start, stop -------------------------------------------------------

    def _init(self, settings: Mapping[str, str]) -> None:
        for path in (self.datadir, self.socket_dir):
            path.mkdir(mode=0o700)
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.logfile.touch(mode=0o600)
        os.chown(self.logfile, self.user.pw_uid, self.user.pw_gid)
        self._server_command(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.datadir),
                "--username",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        config = {
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
            **{k: str(v) for k, v in settings.items()},
        }
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# rampart.testbed.services.postgres\n")
            for key, value in config.items():
                conf.write(f"{key} = {value}\n")

    def _start_first(self) -> None:
        """Start on a free port; retry with another if someone took it meanwhile."""
        last: PostgresError | None = None
        for _ in range(5):
            self.port = free_port(self.host)
            try:
                self.start()
                return
            except PostgresError as exc:
                last = exc
                if "already in use" not in str(exc) and "could not bind" not in str(exc):
                    raise
        raise last or PostgresError("no free port")

    def start(self) -> None:
        """Start the cluster (after stop()) on the same port; wait until it accepts
        connections."""
        if self._destroyed:
            raise PostgresError("the cluster was destroyed")
        if self.running():
            return
        if port_open(self.port, self.host):
            raise PostgresError(f"port {self.port} on {self.host} is taken by another process")
        self._server_command(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "--pgdata",
                str(self.datadir),
                "--log",
                str(self.logfile),
                "--wait",
                "--timeout",
                str(int(self.start_timeout)),
                "-o",
                f"-p {self.port}",
            ],
            timeout=self.start_timeout + 10,
        )
        self._postmaster = self._read_pid()
        self.wait_ready(self.start_timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the server accepts a query over TCP."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = self._psql("postgres", "SELECT 1", check=False, timeout=10)
            if result.returncode == 0:
                return
            last = (result.stderr or result.stdout).strip()
            time.sleep(0.1)
        raise PostgresError(
            f"PostgreSQL not ready on {self.host}:{self.port} after {timeout:g} s: "
            f"{last}{self._log_tail()}"
        )

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Stop the cluster (mode: smart, fast or immediate); kill it if it does not stop."""
        if not self.datadir.is_dir():
            return
        pid = self._read_pid() or self._postmaster
        if pid is None or not _pid_alive(pid):
            self._postmaster = None
            return
        result = self._server_command(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "--pgdata",
                str(self.datadir),
                "--mode",
                mode,
                "--wait",
                "--timeout",
                str(int(timeout)),
            ],
            timeout=timeout + 10,
            check=False,
        )
        if result.returncode != 0 or not self._wait_gone(pid, 5.0):
            self._kill(pid)
        self._postmaster = None

    def postmaster_pid(self) -> int | None:
        """The server's main process, while it runs."""
        pid = self._read_pid()
        return pid if pid is not None and _pid_alive(pid) else None

    def running(self) -> bool:
        pid = self._read_pid()
        return pid is not None and _pid_alive(pid)

    def _read_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(0.05)
        return not _pid_alive(pid)

    def _kill(self, pid: int) -> None:
        """SIGQUIT (immediate shutdown), then SIGKILL the postmaster, its children and
        what is left of its process group (pg_ctl makes it a group leader)."""
        children = self._children(pid)
        group = None
        with contextlib.suppress(OSError):
            group = pid if os.getpgid(pid) == pid else None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
        if not self._wait_gone(pid, 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 5.0)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)

    @staticmethod
    def _children(pid: int) -> list[int]:
        found = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    found += [int(p) for p in (task / "children").read_text().split()]
        return found

    def destroy(self) -> None:
        """Stop the cluster (killing what is left of it) and remove its directory."""
        if self._destroyed:
            return
        self._destroyed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.destroy)
        try:
            self.stop(mode="fast", timeout=15)
        except Exception:  # destroy must get to the removal
            pid = self._read_pid() or self._postmaster
            if pid is not None:
                self._kill(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        """destroy(): a cluster is thrown away when its `with` ends."""
        self.destroy()

    # --- databases -----------------------------------------------------------------

    def _psql(
        self, database: str, sql: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> Output:
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PGCONNECT_TIMEOUT": "5"}
        return self._run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            timeout,
            check,
            env,
        )

    def query(self, sql: str, database: str | None = None) -> str:
        """Run SQL with psql; its unaligned, tuples-only output."""
        name = database or self.database or "postgres"
        return self._psql(check_name(name), sql).stdout.strip()

    def create_database(self, name: str) -> str:
        """Create database `name`; return its URL."""
        self._psql("postgres", f"CREATE DATABASE {check_name(name)}")
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` (if it exists), disconnecting its sessions."""
        self._psql("postgres", f"DROP DATABASE IF EXISTS {check_name(name)} WITH (FORCE)")

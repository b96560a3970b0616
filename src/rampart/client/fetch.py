"""Unprivileged network processing.

Everything that talks to the network and parses what it sends runs here, in a
separate process started by the root client through `setpriv`: the dedicated
system user (`rampart-fetch` by default), no supplementary groups, no
capabilities (empty bounding set), `no_new_privs`. It can write only into the
download directory, which the root process hands to it for the fetch and
takes back afterwards:

1. root: download dir (0700) and its files chowned to the fetch user;
2. fetch process: version check (TOML parsed here), downloads with resume;
   a JSON result on stdout;
3. root: every process of the fetch user is killed, the directory and files
   are chowned back to root, and only then are signatures verified. No
   unprivileged process is left that could change a file after verification.

Protocol (stdin/stdout, JSON): request {"root_ca", "headers", "limits",
"jobs": [{"op": "version", "url", "cap"} | {"op": "download", "url", "dest",
"cap"}]}; reply {"ok": true, "results": [...], "credentials": {...}} or
{"ok": false, "error": {"kind", "message"}}.

Run as `python -m rampart.client.fetch`. This module and what it imports must
not need root or the crypto library.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rampart import errors, run
from rampart.client.transport import Limits, Progress, Transport
from rampart.errors import FormatError, LocalError, RampartError, RemoteDataError

log = logging.getLogger(__name__)

VERSION_CAP = 4096
REPLY_CAP = 1 << 20


@dataclass(frozen=True)
class Job:
    op: str  # "version", "download" or "report"
    url: str
    cap: int
    dest: str = ""
    body: str = ""


def parse_version_document(data: bytes, url: str) -> str:
    """The `version` string of a version file (TOML; unknown keys ignored)."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise FormatError(f"{url}: version file is not valid TOML") from None
    value = doc.get("version")
    if not isinstance(value, str) or len(value) > 128:
        raise FormatError(f"{url}: version file has no valid 'version' string")
    return value


def execute(transport: Transport, jobs: list[Job], progress: Progress | None) -> list[Any]:
    """Run the jobs in this process; the result of each, in order."""
    results: list[Any] = []
    for job in jobs:
        if job.op == "version":
            data = transport.get_small(job.url, min(job.cap, VERSION_CAP))
            results.append(parse_version_document(data, job.url))
        elif job.op == "download":
            results.append(transport.download(job.url, Path(job.dest), job.cap, progress))
        elif job.op == "report":
            results.append(transport.post(job.url, job.body.encode(), "application/json"))
        else:
            raise LocalError(f"unknown fetch operation {job.op!r}")
    return results


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


# --- the child -----------------------------------------------------------------------


def _child_progress() -> Progress | None:
    if not sys.stderr.isatty():
        return None
    from rampart.client.progress import Bar

    return Bar(sys.stderr).update


def child_main() -> int:
    """Entry point of the unprivileged process."""
    try:
        request = json.loads(sys.stdin.buffer.read(REPLY_CAP))
        transport = Transport(
            Path(request["root_ca"]), dict(request["headers"]), Limits(**request["limits"])
        )
        jobs = [Job(**job) for job in request["jobs"]]
        results = execute(transport, jobs, _child_progress())
        reply: dict[str, Any] = {"ok": True, "results": results, "credentials": credentials()}
    except RampartError as exc:
        reply = {"ok": False, "error": {"kind": type(exc).__name__, "message": str(exc)}}
    except (ValueError, KeyError, TypeError) as exc:
        reply = {"ok": False, "error": {"kind": "LocalError", "message": f"bad request: {exc}"}}
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()
    return 0


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
        self.last_credentials: dict[str, Any] = {}

    def run(self, jobs: list[Job], progress: Progress | None = None) -> list[Any]:
        if self.user is None:
            transport = Transport(self.root_ca, self.headers, self.limits)
            self.last_credentials = credentials()
            return execute(transport, jobs, progress)
        return self._run_sandboxed(jobs)

    def _run_sandboxed(self, jobs: list[Job]) -> list[Any]:
        try:
            account = pwd.getpwnam(self.user or "")
        except KeyError:
            raise LocalError(
                f"fetch user {self.user!r} does not exist (create it with systemd-sysusers, "
                'or set [download] fetch_user = "" to fetch without privilege separation)'
            ) from None
        if account.pw_uid == 0:
            raise LocalError(f"fetch user {self.user!r} is root; use an unprivileged account")
        request = {
            "root_ca": str(self.root_ca),
            "headers": self.headers,
            "limits": asdict(self.limits),
            "jobs": [asdict(job) for job in jobs],
        }
        self._hand_over(account.pw_uid, account.pw_gid)
        try:
            done = run.run(
                [
                    "setpriv",
                    f"--reuid={account.pw_uid}",
                    f"--regid={account.pw_gid}",
                    "--clear-groups",
                    "--no-new-privs",
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                    "--",
                    sys.executable,
                    "-I",
                    "-m",
                    "rampart.client.fetch",
                ],
                input=json.dumps(request).encode(),
                env={"HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"},
                check=False,
                inherit_stderr=True,
            )
        finally:
            self._take_back(account.pw_uid)
        if done.returncode != 0 or len(done.stdout) > REPLY_CAP:
            raise LocalError(f"fetch process failed (exit code {done.returncode})")
        try:
            reply = json.loads(done.stdout)
        except ValueError:
            raise LocalError("fetch process sent an unreadable reply") from None
        if not isinstance(reply, dict):
            raise LocalError("fetch process sent an unreadable reply")
        if not reply.get("ok"):
            error = reply.get("error") or {}
            kind = getattr(errors, str(error.get("kind")), None)
            if not (isinstance(kind, type) and issubclass(kind, RampartError)):
                kind = RemoteDataError
            raise kind(str(error.get("message", "fetch failed"))[:500])
        self.last_credentials = reply.get("credentials") or {}
        results = reply.get("results")
        if not isinstance(results, list) or len(results) != len(jobs):
            raise LocalError("fetch process sent an unreadable reply")
        return results

    def _hand_over(self, uid: int, gid: int) -> None:
        """Give the download directory to the fetch user for the fetch."""
        directory = self.download_dir
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(directory, uid, gid, follow_symlinks=False)
        os.chmod(directory, 0o700)
        for entry in directory.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chown(entry, uid, gid, follow_symlinks=False)
            else:
                remove_entry(entry)

    def _take_back(self, uid: int) -> None:
        """Kill every process of the fetch user, then chown everything back to root."""
        kill_user_processes(uid)
        directory = self.download_dir
        os.chown(directory, 0, 0, follow_symlinks=False)
        for entry in directory.iterdir():
            if entry.is_symlink() or not entry.is_file():
                remove_entry(entry)
                continue
            os.chown(entry, 0, 0, follow_symlinks=False)
            os.chmod(entry, 0o600, follow_symlinks=False)


def remove_entry(entry: Path) -> None:
    """Remove a file, symlink or directory tree the fetch user left behind."""
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
        return
    for child in entry.iterdir():
        remove_entry(child)
    entry.rmdir()


def kill_user_processes(uid: int) -> int:
    """SIGKILL every process whose real or effective uid is `uid`; return how many."""
    killed = 0
    for _ in range(5):  # a process may fork while we scan: repeat until none is left
        found = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                uids = next(
                    line.split()[1:3]
                    for line in (proc / "status").read_text().splitlines()
                    if line.startswith("Uid:")
                )
            except (OSError, StopIteration):
                continue
            if str(uid) in uids:
                found += 1
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    continue
        killed += found
        if not found:
            break
    return killed


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="rampart-fetch: %(message)s")
    sys.exit(child_main())

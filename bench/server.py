"""Load the update server's version check with wrk: rampart on SQLite and on PostgreSQL,
with one and two workers, and nginx serving the static version file as the baseline.

    .venv/bin/python bench/server.py [--duration 10] [--connections 64] [--threads 2]
                                     [--workers 1,2] [--rate R] [--json]
                                     [--auth] [--auth-checks 60000]
                                     [--tuf | --tuf-only] [--tuf-rate 500]

Debian packages: wrk, nginx, postgresql (`make setup` installs them). Run as root
or not: PostgreSQL runs as the `postgres` user when this script is root (it is
started by rampart.testbed.services, a private cluster on 127.0.0.1).

Set-up, in a work directory under /var/tmp (removed at the end): a vendor key
(`rampart keygen --unencrypted`), releases 1.0.0 and 1.0.1 (built by `rampart build
core|efiboot`) published with `rampart publish` into a webroot, 1,000 random
machine-ids (32 hex digits), and a wrk Lua script that sends each request from one
of them (picked at random, per request) with the headers clipos-machineid and
clipos-version: 1.0.0.

Each target is loaded for `--duration` seconds by `wrk -t THREADS -c CONNECTIONS`, as
fast as it answers (closed loop: the latencies are those of a saturated server), or
with --rate R paced by wrk's delay() to offer about R requests/s in all:
- nginx (one worker process, access log on, buffered) serving the webroot;
- `rampart serve --webroot W --db URL --workers N` for N in --workers, on SQLite
  (a fresh file) and on PostgreSQL (a fresh database of one cluster, with
  PostgreSQL's default, durable settings). Before the measured run every
  machine-id checks in once (a warm-up, so the server's machine cache is in its
  steady state); the rows it adds are counted and subtracted.

Counting what is recorded: wrk stops by closing its connections, abandoning the
requests in flight, which the server may or may not have answered and recorded.
So the script sends identified checks for all but the last second of the run and
anonymous requests (no headers, answered but never recorded) in the last second:
every identified check then completes before wrk stops, and the number of
identified checks wrk sent is the number of checks the server must have recorded.
After the run the server is stopped with SIGTERM (graceful: its check buffer is
flushed) and the rows of `checks` are counted.

Reported per target: requests/s (every request wrk completed, over the whole run),
checks/s (identified checks over the identified part of the run), p50/p90/p99/max
latency (wrk's histogram, every request), errors (HTTP status >= 400, which wrk
counts, plus socket connect/read/write errors and timeouts), for rampart the rows
recorded vs the identified checks sent, CPU seconds used by the server (and by
PostgreSQL) during the run, and the ratio of requests/s to nginx's.

Targets for rampart: >= 1500 checks/s, p99 < 50 ms, zero errors, recorded ==
completed.

Signed checks (--auth): after each server above, the same load against a fresh server
whose machines sign their checks (docs/server.md "Device identity"): each machine has
an Ed25519 key (a device without a TPM), enrolled with `rampart machine admit
--enroll` before the server starts; the warm-up's checks are signed too. Each check
carries its own counter, so a signed request is sent once: the script signs
--auth-checks of them (default 60,000) before the run, deals the machines out among
wrk's threads and has each thread send its list in order (a machine comes round
every 500 requests of its thread, far more than the thread has in flight, so its
counters reach the server in order). A thread past its list sends anonymous requests,
not counted. Recorded: the rows of `checks` an admitted key signed. Printed: the
signed/unsigned ratio of checks/s and p99 per database and worker count (goal:
>= 0.5x, and the targets above).

Check-ins with signed channel metadata (--tuf; --tuf-only skips the version-check
table above and the reports below), per database and worker count, all against one
`rampart serve --tuf-key KEY --max-connections-per-address 0` on a copy of the webroot
holding a TUF repository made by the vendor's verbs (`rampart tuf keygen
--no-password`, `tuf init` with one root key, `tuf add-release` of both releases); its
signer runs as in production (a round at start, which signs the channel heads, then
every 60 s and within a second of a change). After the warm-up above and 3 s of each
load below, paced, not measured (so that no measured load is the first after the
start: thread pools start on first use, and the warm-up's one connection warmed one
worker's machine cache), three loads, in this order, paced (--tuf-rate R checks/s
offered, the same for the three, on a database that has had little more than the
warm-up's writes, so that none follows the saturating loads' background work) and then
saturating (as fast as answered):
- today: the version GET alone, with the identity headers (what bench/server.py's
  table measures, with this section's client);
- tuf: a device's check-in in TUF mode when nothing changed: the version GET, then
  GET /tuf/<N+1>.root.json (404: no new root) and GET /tuf/timestamp.json (200), the
  identity headers on each (the device sends them to its server on every request);
- tuf+nginx: the same check-in sent to nginx in front of the same server, with
  docs/server.md's front-end configuration (the ```nginx block, adapted as
  tests/server/test_nginx_frontend.py adapts it but in plain HTTP, like the rest of
  this bench, and with nginx's one worker of rampart.testbed.services): nginx serves
  tuf/ and heads/ from the files, and proxies only the version GET.
A check is issued as the device issues it: its requests in turn, each once the
previous one is answered, on one keep-alive connection (a device opens an HTTPS
connection per document; that cost is in none of these loads). wrk's Lua state is per
thread, so wrk runs one connection per thread (-t and -c both --connections), the
same for the three loads. Paced, the load is wrk2's rather than the table's above: each
connection starts a check every CONNECTIONS/R s on a fixed schedule from a random
phase (with a pause after each answer instead, as above, the connections start
together and stay in step: their checks arrive in bursts of CONNECTIONS, which made
most of the paced latency in a first version of this section: today's p50 was 5 ms at
500 checks/s, 1.4 ms on a schedule). A check is complete when its last answer is in;
its latency is from its first request's sending to that answer, or from when it was
due if it started late (wrk2's correction of coordinated omission); a histogram of
0.5 % buckets in the script. Each load follows 2 idle seconds. The last second sends
anonymous check-ins, as above. Reported per load: checks/s
(identified checks completed within the identified phase, over it), requests/s,
p50/p90/p99/max latency of identified checks, errors (an answer with another status
than 200, 404, 200, socket errors, timeouts), rows added to `checks` against
identified checks started, CPU of the server, nginx, PostgreSQL and wrk; and the
ratios TUF/today: checks/s and p99 at saturation, p99 at the paced rate (the same
offered rate for each: "checks/s at the same p99"). No target: it is a comparison.

Install reports during a rollout (--reports N, default 10,000; 0 skips it;
--reports-only skips the version-check load above), per database and worker count:
the `checks` table first gets --history old checks (default 200,000, of other
machines, half of them offered the rollout's version), N machines are inserted as
known, a rollout of 1.0.1 at 99.99 % is started (`rampart channel rollout start`,
failure threshold 1: it never halts), and each machine checks in once (offered
1.0.1). Then 16 keep-alive connections send one success report per machine while
a thread sends about 100 version checks/s from known machines and a sampler counts
the rows of `checks` every 0.25 s. The reports come from wrk (--report-client wrk,
the default: a Lua script gives each of its threads every n-th machine; a thread
notes when its last report was answered and stops, and the script stops wrk once
all have) or from 16 threads of this script (--report-client python, http.client:
0.4 ms of CPU per report, a third of what the server took, on the host's two
cores; wrk took 0.1 ms). Reported:
reports/s (N over the time to send them all), report latency p50/p99/max, errors,
and the worst recording lag (how long a check answered 200 waited to appear in
`checks`). Targets: >= 500 reports/s, every check recorded within 1 s.

The exit code is 0 whether or not the targets are met (this is a benchmark, not a
test) and 1 if the set-up fails or a server does not start or stop.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common import Stop, T, build_release, in_work_directory, positive_int
from rampart.testbed import services

ROOT = Path(__file__).resolve().parent.parent
OS_NAME = "clipos"
RUNNING = "1.0.0"
PATH = f"/update/v1/{OS_NAME}/version"
MACHINES = 1000
TAIL_SECONDS = 1.0  # the last second of each run sends anonymous requests
TARGET_CHECKS_PER_S = 1500.0
TARGET_P99_MS = 50.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
FLUSH_TIMEOUT = 15.0
WRK_TIMEOUT = "5s"  # wrk's per-request timeout
DEFAULT_PARENT = Path("/var/tmp")
TARGET_REPORTS_PER_S = 500.0
TARGET_RECORD_LAG_S = 1.0
REPORT_THREADS = 16  # connections sending reports
REPORT_WRK_SECONDS = 600  # wrk's -d for the report load: it is stopped once done
CHECKS_PER_S_DURING_REPORTS = 100.0
SAMPLE_EVERY = 0.25


class BenchError(Exception):
    """The set-up failed or a server misbehaved: exit code 1."""


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise BenchError(f"{name} not found: run make setup")
    return found


def _rampart() -> str:
    beside = Path(sys.executable).parent / "rampart"
    if beside.is_file():
        return str(beside)
    return str(ROOT / ".venv" / "bin" / "rampart")


def _run(
    argv: Sequence[str | Path], timeout: float = 120, env: dict[str, str] | None = None
) -> str:
    try:
        result = subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(argv[0]).name} took more than {timeout:g} s") from None
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(str(a) for a in argv[:3])}...: exit code {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    return result.stdout


# --- processes ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    children = [int(p) for p in (task / "children").read_text().split()]
                    found += children
                    pending += children
    return found


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and each live descendant."""
    return {p: _cpu_seconds(p) for p in [pid, *_descendants(pid)]}


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two tree_cpu() snapshots by the processes alive at the end."""
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())


# --- wrk --------------------------------------------------------------------------------------

# The start of both wrk scripts: the machine-ids, and now() on CLOCK_MONOTONIC.
_LUA_IDS_AND_CLOCK = r"""local ids = {
%(ids)s
}
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end
"""

LUA = (
    r"""
-- Generated by bench/server.py: version checks from %(machines)d machine-ids.
"""
    + _LUA_IDS_AND_CLOCK
    + r"""
-- setup and done run in their own Lua state; each thread has another.
local threads = {}
local count = 0
function setup(thread)
  thread:set("tid", count)
  count = count + 1
  table.insert(threads, thread)
end

tid = 0
identified = 0
identified_seconds = -1
local checks = {}
local anonymous
local started, switch_at
local pause_ms = 0
-- wrk calls request() once on its first thread to check the script, before the run,
-- and never sends that request: it must not count.
local checked = true
function init(args)
  checked = tid ~= 0
  pause_ms = tonumber(args[2]) or 0
  for i, id in ipairs(ids) do
    local headers = {["clipos-machineid"] = id, ["clipos-version"] = "%(running)s"}
    checks[i] = wrk.format("GET", nil, headers)
  end
  anonymous = wrk.format("GET", nil, {})
  math.randomseed(7919 * tid + 17)
  started = now()
  switch_at = started + (tonumber(args[1]) or 1e9)
end

if %(paced)s then
  function delay()
    return pause_ms
  end
end

function request()
  if not checked then
    checked = true
    return anonymous
  end
  if switch_at > now() then
    identified = identified + 1
    return checks[math.random(#checks)]
  end
  if identified_seconds < 0 then identified_seconds = now() - started end
  return anonymous
end

function done(summary, latency, requests)
  local sent, seconds = 0, 0
  for _, thread in ipairs(threads) do
    sent = sent + thread:get("identified")
    local s = thread:get("identified_seconds")
    if s < 0 then s = summary.duration / 1e6 end
    seconds = seconds + s / #threads
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH-RESULT requests=%%d duration_us=%%d identified=%%d identified_s=%%.6f " ..
    "connect=%%d read=%%d write=%%d status=%%d timeout=%%d " ..
    "p50_us=%%d p90_us=%%d p99_us=%%d p999_us=%%d max_us=%%d mean_us=%%.1f\n",
    summary.requests, summary.duration, sent, seconds,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""
)


# Signed checks: each thread sends its own list of requests, each once and in order (a
# request's counter may not be used twice); the machines of a thread come round every
# len(machines)/threads requests, far more than a thread's connections have in flight,
# so a machine's counters reach the server in order. Past its list, or past the
# identified phase, a thread sends anonymous requests (answered, not counted).
SIGNED_LUA = (
    r"""
-- Generated by bench/server.py: version checks signed by %(machines)d machines' keys.
local ids = {}
"""
    + _LUA_IDS_AND_CLOCK.replace("local ids = {\n%(ids)s\n}\n", "")
    + r"""
local signed = {
%(signed)s
}
local keys = {
%(keys)s
}
local threads = {}
local count = 0
function setup(thread)
  thread:set("tid", count)
  count = count + 1
  table.insert(threads, thread)
end

tid = 0
identified = 0
identified_seconds = -1
local checks = {}
local next_check = 1
local anonymous
local started, switch_at
local checked = true
function init(args)
  checked = tid ~= 0
  local mine = signed[(tid %% #signed) + 1]
  for i, request in ipairs(mine) do
    local headers = {
      ["clipos-machineid"] = request[1],
      ["clipos-version"] = "%(running)s",
      ["rampart-key"] = keys[request[1]],
      ["rampart-auth"] = request[2],
    }
    checks[i] = wrk.format("GET", nil, headers)
  end
  anonymous = wrk.format("GET", nil, {})
  started = now()
  switch_at = started + (tonumber(args[1]) or 1e9)
end

function request()
  if not checked then
    checked = true
    return anonymous
  end
  if switch_at > now() and next_check <= #checks then
    identified = identified + 1
    next_check = next_check + 1
    return checks[next_check - 1]
  end
  if identified_seconds < 0 then identified_seconds = now() - started end
  return anonymous
end
"""
    + LUA[LUA.index("function done(") :]
)


def write_lua(path: Path, machine_ids: Sequence[str], paced: bool = False) -> None:
    ids = ",\n".join(f'  "{m}"' for m in machine_ids)
    path.write_text(
        LUA
        % {
            "machines": len(machine_ids),
            "ids": ids,
            "running": RUNNING,
            "paced": "true" if paced else "false",
        }
    )


REPORTS_LUA = (
    r"""
-- Generated by bench/server.py: one install report from each of %(machines)d machine-ids,
-- thread t (of n) sending those at positions t, t+n, t+2n... Once a thread has had the
-- answers to all its reports it notes when (CLOCK_MONOTONIC) and stops; a connection
-- of a thread with no report left to send meanwhile sends an anonymous version check
-- (answered, never recorded).
"""
    + _LUA_IDS_AND_CLOCK
    + r"""
local threads = {}
local count = 0
function setup(thread)
  thread:set("tid", count)
  count = count + 1
  table.insert(threads, thread)
end

tid = 0
nthreads = 1
started = 0
finished = -1
ok = 0
failed = 0
local mine = {}
local sent = 0
local answered = 0
local anonymous
local body = '{"from": "%(running)s", "to": "%(to)s", "outcome": "success", "error": ""}'
local checked = true
local done_file
function init(args)
  checked = tid ~= 0
  nthreads = tonumber(args[1])
  done_file = args[2]
  for i, id in ipairs(ids) do
    if (i - 1) %% nthreads == tid then
      local headers = {
        ["clipos-machineid"] = id,
        ["clipos-version"] = "%(running)s",
        ["content-type"] = "application/json",
      }
      table.insert(mine, wrk.format("POST", "%(report_path)s", headers, body))
    end
  end
  anonymous = wrk.format("GET", nil, {})
  started = now()
end

function request()
  if not checked then
    checked = true
    return anonymous
  end
  if sent < #mine then
    sent = sent + 1
    return mine[sent]
  end
  return anonymous
end

function response(status, headers, body)
  if body:sub(1, 10) == "version = " then
    return
  end
  answered = answered + 1
  if status == 200 then ok = ok + 1 else failed = failed + 1 end
  if answered == #mine then
    finished = now()
    local f = io.open(done_file, "a")
    f:write(tid, "\n")
    f:close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local first, last, oks, fails = 1e18, 0, 0, 0
  for _, thread in ipairs(threads) do
    first = math.min(first, thread:get("started"))
    last = math.max(last, thread:get("finished"))
    oks = oks + thread:get("ok")
    fails = fails + thread:get("failed")
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH-REPORTS ok=%%d failed=%%d seconds=%%.6f requests=%%d " ..
    "connect=%%d read=%%d write=%%d timeout=%%d " ..
    "p50_us=%%d p99_us=%%d max_us=%%d\n",
    oks, fails, last - first, summary.requests,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
)


@dataclass
class Signers:
    """An Ed25519 identity key per machine (rampart.contracts.identity: a device
    without a TPM), each machine's next request counter, and what signs a check."""

    keys: dict[str, Any]
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def make(cls, machine_ids: Sequence[str]) -> Signers:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return cls({m: ed25519.Ed25519PrivateKey.generate() for m in machine_ids})

    def spki(self, machine_id: str) -> str:
        from cryptography.hazmat.primitives import serialization

        from rampart.contracts import identity

        der = (
            self.keys[machine_id]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return identity.encode_key(der)

    def enrollment(self) -> str:
        """The JSON lines `rampart machine admit --enroll` takes."""
        from cryptography.hazmat.primitives import serialization

        lines = []
        for machine_id, key in self.keys.items():
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            lines.append(json.dumps({"machine_id": machine_id, "public_key": pem.decode()}))
        return "\n".join(lines) + "\n"

    def auth(self, machine_id: str) -> str:
        """The rampart-auth header of `machine_id`'s next version check."""
        from rampart.contracts import identity

        counter = self.counters.get(machine_id, 0) + 1
        self.counters[machine_id] = counter
        base = identity.signature_base(
            "version", OS_NAME, machine_id, RUNNING, counter, "-", None, None, b""
        )
        signature = self.keys[machine_id].sign(base)
        return identity.Auth(counter, "-", None, None, None, signature).render()


def write_signed_lua(
    path: Path, signers: Signers, machine_ids: Sequence[str], threads: int, per_thread: int
) -> None:
    """`per_thread` signed checks for each of `threads` threads, the machines dealt out
    among the threads (each thread's in turn)."""
    lists = []
    for t in range(threads):
        mine = machine_ids[t::threads]
        rows = (
            f'{{"{m}", "{signers.auth(m)}"}}'
            for m in (mine[k % len(mine)] for k in range(per_thread))
        )
        lists.append("  {\n    " + ",\n    ".join(rows) + "\n  }")
    keys = ",\n".join(f'  ["{m}"] = "{signers.spki(m)}"' for m in machine_ids)
    path.write_text(
        SIGNED_LUA
        % {
            "machines": len(machine_ids),
            "signed": ",\n".join(lists),
            "keys": keys,
            "running": RUNNING,
        }
    )


def write_reports_lua(path: Path, machine_ids: Sequence[str]) -> None:
    path.write_text(
        REPORTS_LUA
        % {
            "machines": len(machine_ids),
            "ids": ",\n".join(f'  "{m}"' for m in machine_ids),
            "running": RUNNING,
            "to": "1.0.1",
            "report_path": f"/update/v1/{OS_NAME}/report",
        }
    )


@dataclass
class WrkReports:
    """What wrk measured of a report load (every request, reports and the anonymous
    checks a thread's idle connections sent while its last reports were answered)."""

    ok: int
    failed: int
    seconds: float
    requests: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    wrk_cpu_s: float


def run_wrk_reports(
    args: argparse.Namespace, machine_ids: Sequence[str], port: int, work: Path
) -> WrkReports:
    """Send one report per machine-id with wrk (REPORT_THREADS connections over
    --threads threads); stop wrk once every thread has had all its answers."""
    script, done_file, log = work / "reports.lua", work / "reports.done", work / "wrk.log"
    write_reports_lua(script, machine_ids)
    threads = min(args.threads, REPORT_THREADS)
    argv = [
        _tool("wrk"),
        f"-t{threads}",
        f"-c{REPORT_THREADS}",
        f"-d{REPORT_WRK_SECONDS}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{PATH}",
        "--",
        str(threads),
        str(done_file),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            # wrk runs for its whole -d unless interrupted: SIGINT once all threads are done.
            while process.poll() is None:
                if done_file.exists() and len(done_file.read_text().split()) >= threads:
                    process.send_signal(signal.SIGINT)
                    break
                time.sleep(0.05)
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait(10)
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    match = re.search(r"^BENCH-REPORTS (.*)$", text, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise BenchError(f"wrk (reports) exit code {process.returncode}, no result line:\n{text}")
    values = dict(item.split("=", 1) for item in match.group(1).split())
    return WrkReports(
        ok=int(values["ok"]),
        failed=int(values["failed"]),
        seconds=float(values["seconds"]),
        requests=int(values["requests"]),
        socket_errors=sum(int(values[k]) for k in ("connect", "read", "write", "timeout")),
        p50_ms=int(values["p50_us"]) / 1000,
        p99_ms=int(values["p99_us"]) / 1000,
        max_ms=int(values["max_us"]) / 1000,
        wrk_cpu_s=usage.ru_utime + usage.ru_stime,
    )


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    identified: int
    identified_s: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    wrk_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def checks_per_s(self) -> float:
        return self.identified / self.identified_s if self.identified_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def pause_ms(args: argparse.Namespace) -> int:
    """wrk's delay() per request on each connection so that the offered load is about
    --rate requests/s (0: no pause, as fast as the server answers)."""
    if not args.rate:
        return 0
    return max(1, int(args.connections * 1000 / args.rate))


def _wrk(argv: Sequence[str | Path], log: Path, tag: str) -> tuple[dict[str, str], float]:
    """Run wrk to its end, its output in `log`: the key=value pairs of its line starting
    with `tag`, and the CPU seconds wrk used."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait(10)
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"wrk exit code {process.returncode}:\n{text}")
    match = re.search(rf"^{tag} (.*)$", text, re.MULTILINE)
    if match is None:
        raise BenchError(f"wrk printed no {tag} line:\n{text}")
    values = dict(item.split("=", 1) for item in match.group(1).split())
    return values, usage.ru_utime + usage.ru_stime


def run_wrk(args: argparse.Namespace, script: Path, port: int, log: Path) -> WrkResult:
    phase = max(0.5, args.duration - TAIL_SECONDS)
    argv = [
        _tool("wrk"),
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{PATH}",
        "--",
        f"{phase:.3f}",
        str(pause_ms(args)),
    ]
    values, wrk_cpu = _wrk(argv, log, "BENCH-RESULT")

    def ms(key: str) -> float:
        return float(values[key]) / 1000

    return WrkResult(
        requests=int(values["requests"]),
        duration_s=int(values["duration_us"]) / 1e6,
        identified=int(values["identified"]),
        identified_s=float(values["identified_s"]),
        errors={k: int(values[k]) for k in ("connect", "read", "write", "status", "timeout")},
        p50_ms=ms("p50_us"),
        p90_ms=ms("p90_us"),
        p99_ms=ms("p99_us"),
        p999_ms=ms("p999_us"),
        max_ms=ms("max_us"),
        mean_ms=ms("mean_us"),
        wrk_cpu_s=wrk_cpu,
    )


# --- the targets -----------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    database: str | None
    workers: int | None
    wrk: WrkResult
    server_cpu_s: float = 0.0
    database_cpu_s: float = 0.0
    recorded: int | None = None  # rows added to `checks` by the measured run
    warmup: int = 0
    paced: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return self.wrk.identified

    def targets(self) -> dict[str, bool | None]:
        """Each target: met, not met, or None (not applicable: a paced run's rate is
        the one it was asked for)."""
        return {
            f">= {TARGET_CHECKS_PER_S:g} checks/s": (
                None if self.paced else self.wrk.checks_per_s >= TARGET_CHECKS_PER_S
            ),
            f"p99 < {TARGET_P99_MS:g} ms": self.wrk.p99_ms < TARGET_P99_MS,
            "zero errors": self.wrk.error_count == 0,
            "recorded == completed": self.recorded == self.completed,
        }

    def to_json(self, baseline_rps: float | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target": self.target,
            "database": self.database,
            "workers": self.workers,
            "requests": self.wrk.requests,
            "duration_s": self.wrk.duration_s,
            "requests_per_s": round(self.wrk.rps, 1),
            "latency_ms": {
                "p50": self.wrk.p50_ms,
                "p90": self.wrk.p90_ms,
                "p99": self.wrk.p99_ms,
                "p99.9": self.wrk.p999_ms,
                "max": self.wrk.max_ms,
                "mean": self.wrk.mean_ms,
            },
            "errors": self.wrk.errors,
            "cpu_s": {
                "wrk": round(self.wrk.wrk_cpu_s, 2),
                "server": round(self.server_cpu_s, 2),
                "database": round(self.database_cpu_s, 2),
            },
            "notes": self.notes,
        }
        if baseline_rps:
            data["ratio_to_nginx"] = round(self.wrk.rps / baseline_rps, 3)
        if self.target.startswith("rampart"):
            data.update(
                checks_per_s=round(self.wrk.checks_per_s, 1),
                identified_checks=self.completed,
                recorded=self.recorded,
                warmup_checks=self.warmup,
                targets=self.targets(),
            )
        return data


_COUNT_CHECKS = "SELECT count(*) FROM checks"


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, running: ExitStack) -> None:
        self.args = args
        self.work = work
        self.running = running  # the services started, stopped in reverse order at its end
        self.webroot = work / "webroot"
        self.script = work / "checks.lua"
        self.machine_ids = sorted({secrets.token_hex(16) for _ in range(MACHINES)})
        while len(self.machine_ids) < MACHINES:  # pragma: no cover - a 128-bit collision
            self.machine_ids = sorted({*self.machine_ids, secrets.token_hex(16)})
        self.cluster: services.Cluster | None = None
        self.runs = 0
        self.signers = Signers.make(self.machine_ids) if args.auth else None

    # set-up

    def publish(self) -> None:
        rampart = _rampart()
        keys = self.work / "keys"
        keys.mkdir()
        _run(
            [
                rampart,
                "keygen",
                "--unencrypted",
                "--secret-key",
                keys / "vendor.key",
                "--public-key",
                keys / "vendor.pub",
            ]
        )
        for version in ("1.0.0", "1.0.1"):
            core, efiboot = build_release(rampart, self.work, OS_NAME, version, 0)
            _run(
                [
                    rampart,
                    "publish",
                    "--webroot",
                    self.webroot,
                    "--os",
                    OS_NAME,
                    "--version",
                    version,
                    "--core",
                    core,
                    "--efiboot",
                    efiboot,
                    "--secret-key",
                    keys / "vendor.key",
                ]
            )
        # nginx's workers must read it (and traverse to it) whoever they run as.
        for path in [self.work, *self.webroot.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        write_lua(self.script, self.machine_ids, paced=bool(self.args.rate))

    # nginx

    def nginx(self) -> Row:
        nginx = services.Nginx.static(
            self.work / "nginx",
            self.webroot,
            access_log="combined buffer=256k flush=1s",
            connections=1024,
            timeout=START_TIMEOUT,
        )
        self.running.enter_context(nginx)
        _log(f"nginx on 127.0.0.1:{nginx.port}: wrk for {self.args.duration} s")
        before = tree_cpu(nginx.pid)
        result = run_wrk(self.args, self.script, nginx.port, nginx.state / "wrk.log")
        server_cpu = cpu_used(before, tree_cpu(nginx.pid))
        nginx.stop(signal.SIGQUIT, STOP_TIMEOUT)  # graceful: finish requests, flush the log
        return Row("nginx", None, None, result, server_cpu_s=server_cpu)

    # rampart

    def database(self, kind: str) -> str:
        self.runs += 1
        if kind == "sqlite":
            return f"sqlite:///{self.work / f'bench-{self.runs}.sqlite'}"
        if self.cluster is None:
            _log("starting a private PostgreSQL cluster (rampart.testbed.services)")
            self.cluster = self.running.enter_context(services.Cluster(None, settings={}))
        name = f"bench_{self.runs}"
        return str(self.cluster.create_database(name))

    def count_checks(self, url: str, signed: bool = False) -> int:
        """The rows of `checks` (`signed`: those an admitted key signed)."""
        from sqlalchemy import text

        from rampart.server import db

        query = "SELECT count(*) FROM checks WHERE authenticated" if signed else _COUNT_CHECKS
        engine = db.make_engine(url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(text(query)).scalar() or 0)
        finally:
            engine.dispose()

    def postmaster_cpu(self) -> dict[int, float]:
        if self.cluster is None:
            return {}
        pid = self.cluster.postmaster_pid()
        return tree_cpu(pid) if pid else {}

    def serve(
        self,
        name: str,
        url: str,
        workers: int,
        log: Path,
        env: dict[str, str] | None = None,
        *,
        webroot: Path | None = None,
        options: Sequence[str] = (),
    ) -> services.RampartServe:
        """`rampart serve` on the database `url` (with `env`: another tree's; `webroot`:
        another than the bench's; more `options`), stopped at the end of the run at the
        latest; ready once it answers an anonymous check."""
        return self.running.enter_context(
            services.RampartServe(
                webroot or self.webroot,
                log,
                db=url,
                workers=workers,
                options=[*_one_address_options(env), *options],
                command=[_rampart()],
                env=env,
                ready_path=PATH,
                timeout=START_TIMEOUT,
                name=name,
            )
        )

    def warm_up(
        self,
        service: services.RampartServe,
        url: str,
        name: str,
        notes: list[str],
        signers: Signers | None = None,
    ) -> tuple[int, int]:
        """Every machine checks in once (fills the server's machine and key caches): the
        checks answered 200 and the rows of `checks` then (a note if they differ)."""
        warm = 0
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
        try:
            for machine_id in self.machine_ids:
                headers = {"clipos-machineid": machine_id, "clipos-version": RUNNING}
                if signers is not None:
                    headers["rampart-key"] = signers.spki(machine_id)
                    headers["rampart-auth"] = signers.auth(machine_id)
                conn.request("GET", PATH, headers=headers)
                response = conn.getresponse()
                response.read()
                warm += response.status == 200
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"{name}: warm-up failed: {exc}\n  {service.log_tail()}") from None
        finally:
            conn.close()
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while self.count_checks(url) < warm and time.monotonic() < deadline:
            time.sleep(0.1)
        baseline = self.count_checks(url)
        if baseline != warm:
            notes.append(f"warm-up: {warm} checks answered 200, {baseline} recorded")
        return warm, baseline

    def rampart(self, kind: str, workers: int, signers: Signers | None = None) -> Row:
        """The version check on a fresh database; with `signers`, each check signed by
        its machine's admitted key (enrolled first, as `machine admit --enroll` does)."""
        url = self.database(kind)
        tag = "signed" if signers is not None else "anonymous-key"
        d = self.work / f"rampart-{kind}-{workers}-{tag}"
        d.mkdir()
        name = f"rampart serve ({kind}, {workers} worker{'s' if workers > 1 else ''})"
        script = self.script
        if signers is not None:
            name += ", signed checks"
            enrollment = d / "fleet.jsonl"
            enrollment.write_text(signers.enrollment())
            _run([_rampart(), "machine", "admit", "--enroll", enrollment, "--webroot",
                  self.webroot, "--db", url, "--json"])  # fmt: skip
        service = self.serve(name, url, workers, d / "serve.log")
        port = service.port
        notes: list[str] = []
        warm, baseline = self.warm_up(service, url, name, notes, signers)
        if signers is not None:
            script = d / "signed.lua"
            per_thread = self.args.auth_checks // self.args.threads
            write_signed_lua(script, signers, self.machine_ids, self.args.threads, per_thread)
        _log(f"{name} on 127.0.0.1:{port}: wrk for {self.args.duration} s")
        before, db_before = tree_cpu(service.pid), self.postmaster_cpu()
        result = run_wrk(self.args, script, port, d / "wrk.log")
        server_cpu = cpu_used(before, tree_cpu(service.pid))
        db_cpu = cpu_used(db_before, self.postmaster_cpu())
        stopped = time.monotonic()
        code = service.stop(signal.SIGTERM, STOP_TIMEOUT)
        if code not in (0, -signal.SIGTERM):
            notes.append(f"exit code {code} after SIGTERM")
        notes.append(f"graceful stop took {time.monotonic() - stopped:.2f} s")
        recorded = self.count_checks(url, signed=signers is not None) - baseline
        return Row(
            "rampart" if signers is None else "rampart signed",
            kind,
            workers,
            result,
            server_cpu_s=server_cpu,
            database_cpu_s=db_cpu,
            recorded=recorded,
            warmup=warm,
            paced=bool(self.args.rate),
            notes=notes,
        )

    def run(self) -> list[Row]:
        _log(f"publishing releases into {self.webroot}")
        self.publish()
        if self.args.reports_only or self.args.tuf_only:
            return []
        rows = [self.nginx()] if not self.args.no_nginx else []
        for kind in self.args.databases:
            for workers in self.args.workers:
                rows.append(self.rampart(kind, workers))
                if self.signers is not None:
                    rows.append(self.rampart(kind, workers, self.signers))
        return rows

    def checkins(self) -> list[CheckinRow]:
        """--tuf: today's check-ins against TUF ones, per database and worker count."""
        if not (self.args.tuf or self.args.tuf_only) or self.args.reports_only:
            return []
        bench = CheckinBench(self)
        _log(f"TUF check-ins: a TUF repository in {bench.webroot}")
        bench.prepare()
        rows = []
        for kind in self.args.databases:
            for workers in self.args.workers:
                rows += bench.run(kind, workers)
        return rows

    def reports(self) -> list[ReportRow]:
        if not self.args.reports or self.args.tuf_only:
            return []
        if not self.webroot.exists():
            self.publish()
        bench = ReportBench(self)
        rows = []
        for kind in self.args.databases:
            for workers in self.args.workers:
                if self.args.reference:
                    rows.append(bench.run(kind, workers, self.args.reference))
                rows.append(bench.run(kind, workers))
        return rows


# --- install reports during a rollout ----------------------------------------------------


@dataclass
class ReportRow:
    database: str
    workers: int
    reports: int
    history: int
    seconds: float
    client: str  # what sent the reports: "wrk" or "python" (threads of this script)
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    checks_answered: int
    checks_recorded: int
    worst_lag_s: float
    server_cpu_s: float
    database_cpu_s: float
    client_cpu_s: float

    @property
    def reports_per_s(self) -> float:
        return self.reports / self.seconds if self.seconds else 0.0

    def targets(self) -> dict[str, bool]:
        return {
            f">= {TARGET_REPORTS_PER_S:g} reports/s": self.reports_per_s >= TARGET_REPORTS_PER_S,
            f"checks recorded within {TARGET_RECORD_LAG_S:g} s": (
                self.worst_lag_s <= TARGET_RECORD_LAG_S
                and self.checks_recorded == self.checks_answered
            ),
            "zero errors": self.errors == 0,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "workers": self.workers,
            "reports": self.reports,
            "history_checks": self.history,
            "seconds": round(self.seconds, 3),
            "reports_per_s": round(self.reports_per_s, 1),
            "client": self.client,
            "latency_ms": {
                "p50": round(self.p50_ms, 2),
                "p99": round(self.p99_ms, 2),
                "max": round(self.max_ms, 2),
            },
            "errors": self.errors,
            "checks_answered": self.checks_answered,
            "checks_recorded": self.checks_recorded,
            "worst_record_lag_s": round(self.worst_lag_s, 3),
            "cpu_s": {
                "server": round(self.server_cpu_s, 2),
                "database": round(self.database_cpu_s, 2),
                "client": round(self.client_cpu_s, 2),
            },
            "targets": self.targets(),
        }


def _one_address_options(env: dict[str, str] | None) -> list[str]:
    """Every request of the bench comes from 127.0.0.1: no limit on new machine-ids (for
    a `rampart serve` that has the option)."""
    if "--new-machines-per-hour" in _run([_rampart(), "serve", "--help"], env=env):
        return ["--new-machines-per-hour", "0"]
    return []


def _post_report(conn: http.client.HTTPConnection, machine_id: str) -> int:
    body = json.dumps({"from": RUNNING, "to": "1.0.1", "outcome": "success", "error": ""})
    headers = {
        "clipos-machineid": machine_id,
        "clipos-version": RUNNING,
        "content-type": "application/json",
    }
    conn.request("POST", f"/update/v1/{OS_NAME}/report", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


def _get_check(conn: http.client.HTTPConnection, machine_id: str) -> int:
    conn.request("GET", PATH, headers={"clipos-machineid": machine_id, "clipos-version": RUNNING})
    response = conn.getresponse()
    response.read()
    return response.status


def _in_threads(port: int, jobs: list[str], call: Callable[..., int], threads: int) -> list[Any]:
    """Run call(conn, job) for every job over `threads` keep-alive connections; the
    (status, seconds) of each, in no particular order."""
    import threading

    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    chunks = [jobs[i::threads] for i in range(threads)]

    def worker(chunk: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        try:
            for job in chunk:
                t0 = time.monotonic()
                try:
                    status = call(conn, job)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    status = 0
                mine.append((status, time.monotonic() - t0))
        finally:
            conn.close()
            with lock:
                results.extend(mine)

    pool = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return results


class ReportBench:
    """10,000 reports to a rolling-out version over a large `checks` table."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.args = bench.args

    def fill(self, url: str, machine_ids: list[str], env: dict[str, str] | None) -> int:
        """Create the schema (with the `rampart` under test: the reference has its own
        migrations), add the old checks and the known machines; the highest check id."""
        from sqlalchemy import text

        from rampart.server import db

        _run([_rampart(), "channel", "list", "--webroot", self.bench.webroot, "--db", url], env=env)
        engine = db.make_engine(url)
        check = (
            "INSERT INTO checks (machine_id, os, version, channel, offered, at, address) "
            "VALUES (:machine_id, :os, :version, :channel, :offered, :at, :address)"
        )
        machine = (
            "INSERT INTO machines (machine_id, os, version, first_seen, last_seen, address) "
            "VALUES (:machine_id, :os, :version, :first_seen, :last_seen, :address)"
        )
        try:
            base = time.time() - 30 * 86400
            chunk = 20_000
            with engine.begin() as conn:
                for start in range(0, self.args.history, chunk):
                    rows = [
                        {
                            "machine_id": f"{i:032x}",
                            "os": OS_NAME,
                            "version": RUNNING,
                            "channel": "stable",
                            "offered": "1.0.1" if i % 2 else RUNNING,
                            "at": base + i * 0.001,
                            "address": "192.0.2.1",
                        }
                        for i in range(start, min(self.args.history, start + chunk))
                    ]
                    conn.execute(text(check), rows)
                conn.execute(
                    text(machine),
                    [
                        {
                            "machine_id": m,
                            "os": OS_NAME,
                            "version": RUNNING,
                            "first_seen": base,
                            "last_seen": base,
                            "address": "192.0.2.2",
                        }
                        for m in machine_ids
                    ],
                )
            with engine.connect() as conn:
                return int(
                    conn.execute(text("SELECT coalesce(max(id), 0) FROM checks")).scalar_one()
                )
        finally:
            engine.dispose()

    def run(self, kind: str, workers: int, reference: Path | None = None) -> ReportRow:
        """One target; with `reference` (a source tree, e.g. an older commit's src/),
        the server, the schema and the CLI are that tree's."""
        import threading

        from sqlalchemy import text

        from rampart.server import db

        bench = self.bench
        env = None
        if reference is not None:
            env = dict(os.environ, PYTHONPATH=str(reference))
        url = bench.database(kind)
        count = self.args.reference_reports if reference else self.args.reports
        machine_ids = sorted({secrets.token_hex(16) for _ in range(count)})
        what = f"{kind}, {workers} worker(s){', reference' if reference else ''}"
        _log(f"reports ({what}): {self.args.history} old checks")
        top = self.fill(url, machine_ids, env)
        d = bench.work / f"reports-{kind}-{workers}-{'ref' if reference else 'new'}"
        d.mkdir()
        name = f"rampart serve (reports, {what})"
        service = bench.serve(name, url, workers, d / "serve.log", env)
        port = service.port
        # The webroot's version file names the last release published (1.0.1): the
        # channel goes back to 1.0.0, then 1.0.1 is rolled out.
        common: list[str | Path] = ["--os", OS_NAME, "--webroot", bench.webroot, "--db", url]
        _run(
            [_rampart(), "channel", "set", "stable", "--version", RUNNING, "--force", *common],
            env=env,
        )
        _run(
            [
                _rampart(),
                "channel",
                "rollout",
                "start",
                "stable",
                "--os",
                OS_NAME,
                "--version",
                "1.0.1",
                "--percent",
                "99.99",
                "--failure-threshold",
                "1",
                "--webroot",
                bench.webroot,
                "--db",
                url,
            ],
            env=env,
        )
        time.sleep(2.5)  # the workers see the rollout within a second
        offered = _in_threads(port, machine_ids, _get_check, REPORT_THREADS)
        if any(status != 200 for status, _ in offered):
            raise BenchError(f"{name}: the check-ins before the reports failed")
        engine = db.make_engine(url)
        counted = "SELECT count(*) FROM checks WHERE id > :top"

        def recorded() -> int:
            with engine.connect() as conn:
                return int(conn.execute(text(counted), {"top": top}).scalar() or 0)

        baseline = recorded()
        answered: list[float] = []  # monotonic times of checks answered 200
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def checker() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            n = 0
            while not done.is_set():
                n += 1
                try:
                    if _get_check(conn, machine_ids[n % len(machine_ids)]) == 200:
                        answered.append(time.monotonic())
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                time.sleep(1 / CHECKS_PER_S_DURING_REPORTS)
            conn.close()

        def sampler() -> None:
            while not done.is_set():
                samples.append((time.monotonic(), recorded() - baseline))
                time.sleep(SAMPLE_EVERY)

        helpers = [threading.Thread(target=checker), threading.Thread(target=sampler)]
        before, db_before = tree_cpu(service.pid), bench.postmaster_cpu()
        for thread in helpers:
            thread.start()
        started, client_before = time.monotonic(), time.process_time()
        if self.args.report_client == "wrk":
            sent = run_wrk_reports(self.args, machine_ids, port, d)
            seconds, client_cpu = sent.seconds, sent.wrk_cpu_s
            reports, errors = sent.ok + sent.failed, sent.failed + sent.socket_errors
            p50, p99, top_ms = sent.p50_ms, sent.p99_ms, sent.max_ms
        else:
            results = _in_threads(port, machine_ids, _post_report, REPORT_THREADS)
            seconds = time.monotonic() - started
            client_cpu = time.process_time() - client_before  # with the checker, sampler
            reports, errors = len(results), sum(1 for status, _ in results if status != 200)
            latencies = sorted(t * 1000 for _, t in results)
            p50, p99 = (
                latencies[min(len(latencies) - 1, int(q * len(latencies)))] for q in (0.5, 0.99)
            )
            top_ms = latencies[-1]
        done.set()
        for thread in helpers:
            thread.join()
        server_cpu = cpu_used(before, tree_cpu(service.pid))
        db_cpu = cpu_used(db_before, bench.postmaster_cpu())
        # Then until every answered check is recorded (or FLUSH_TIMEOUT).
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while time.monotonic() < deadline:
            samples.append((time.monotonic(), recorded() - baseline))
            if samples[-1][1] >= len(answered):
                break
            time.sleep(SAMPLE_EVERY)
        final = samples[-1][1]
        engine.dispose()
        service.stop(signal.SIGTERM, STOP_TIMEOUT)
        # The worst lag: at each sample, how long ago the oldest check not yet recorded
        # was answered.
        worst = 0.0
        for at, rec in samples:
            if rec < len(answered):
                worst = max(worst, at - answered[rec])
        if final < len(answered):
            worst = max(worst, FLUSH_TIMEOUT)
        return ReportRow(
            database=kind + (" (reference)" if reference else ""),
            workers=workers,
            reports=reports,
            history=self.args.history,
            seconds=seconds,
            client=self.args.report_client,
            p50_ms=p50,
            p99_ms=p99,
            max_ms=top_ms,
            errors=errors,
            checks_answered=len(answered),
            checks_recorded=final,
            worst_lag_s=worst,
            server_cpu_s=server_cpu,
            database_cpu_s=db_cpu,
            client_cpu_s=client_cpu,
        )


def print_reports(rows: list[ReportRow], out: IO[str]) -> None:
    if not rows:
        return
    print(
        f"\nInstall reports during a rollout ({REPORT_THREADS} connections, sent by "
        f"{rows[0].client}) over "
        f"{rows[0].history} old checks, "
        f"with about {CHECKS_PER_S_DURING_REPORTS:g} checks/s beside them",
        file=out,
    )
    header = (
        f"{'target':<32} {'reports':>7} {'reports/s':>9} {'p50 ms':>7} {'p99 ms':>8} {'max ms':>8} "
        f"{'errors':>6} {'checks':>7} {'recorded':>8} {'worst lag s':>11} "
        f"{'cpu srv/db/client s':>20}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        label = f"rampart {row.database} w={row.workers}"
        print(
            f"{label:<32} {row.reports:7d} {row.reports_per_s:9.0f} {row.p50_ms:7.2f} "
            f"{row.p99_ms:8.2f} {row.max_ms:8.1f} "
            f"{row.errors:6d} {row.checks_answered:7d} {row.checks_recorded:8d} "
            f"{row.worst_lag_s:11.2f} "
            f"{row.server_cpu_s:8.1f}/{row.database_cpu_s:.1f}/{row.client_cpu_s:.1f}",
            file=out,
        )
    for row in rows:
        verdicts = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in row.targets().items())
        print(f"  {row.database} w={row.workers}: {verdicts}", file=out)
        reference = next(
            (
                r
                for r in rows
                if r.database == f"{row.database} (reference)" and r.workers == row.workers
            ),
            None,
        )
        if reference is not None and reference.reports_per_s:
            ratio = row.reports_per_s / reference.reports_per_s
            print(f"    reports/s vs the reference: {ratio:.1f}x", file=out)


# --- TUF check-ins (issue 15): the version check with signed channel metadata ------------

TUF_RATE = 500  # checks/s offered by the paced check-in loads (--tuf-rate)
DOCS = ROOT / "docs" / "server.md"
# Check latencies are kept per thread in a histogram of logarithmic buckets: bucket b
# holds latencies in [e^(b/PER_E), e^((b+1)/PER_E)) microseconds (0.5 % wide), up to
# about 60 s.
PER_E = 200
BUCKETS = 3600
CHECKIN_LOADS = ("today", "tuf", "tuf+nginx")
SETTLE_S = 2.0  # idle seconds before each check-in load
PRIME_S = 3  # seconds of each check-in load, paced, before the measured ones

CHECKINS_LUA = (
    r"""
-- Generated by bench/server.py: check-ins of %(steps)d request(s) each from %(machines)d
-- machine-ids: %(paths_text)s.
-- wrk runs one connection per thread, so this state is one connection's: a check's
-- requests go in turn, each once the previous one is answered, and a check is complete
-- when its last answer is in. Identified checks (the identity headers on each request)
-- for the first args[1] seconds, then anonymous ones (answered, never recorded). Paced
-- (args[2]: ms between a connection's checks), a connection starts its checks on a
-- fixed schedule from a random phase, and a check that starts late counts its latency
-- from when it was due (wrk2's correction of coordinated omission). With a directory of
-- signed checks (bench/auth_paced.py), a connection sends the version checks listed in
-- its file there instead ("machine-id key auth" per line), each once and in order, and
-- anonymous ones past its list.
"""
    + _LUA_IDS_AND_CLOCK
    + r"""
local threads = {}
local count = 0
function setup(thread)
  thread:set("tid", count)
  count = count + 1
  table.insert(threads, thread)
end

tid = 0
identified = 0  -- identified checks started (their first request sent)
completed = 0   -- identified checks completed before the switch to anonymous ones
unexpected = 0  -- answers whose status is not the one expected at their step
latency_n = 0   -- identified checks completed (whenever): their latencies, in h<b>
latency_sum = 0
latency_max = 0
local paths = {%(paths)s}
local expected = {%(expected)s}
local steps = #paths
local checks = {}
local anonymous = {}
local step = 1
local current
local identified_check = false
local check_started = 0
local started, switch_at
local signed_dir = "%(signed_dir)s"
local signed_lines = {}
local signed_next = 1
local period = 0  -- s between two checks of this connection (paced), 0: none
local due = 0     -- when the next check is due (paced)
-- wrk calls request() once on its first thread to check the script, before the run,
-- and never sends that request: it must not count.
local checked = true
function init(args)
  checked = tid ~= 0
  period = (tonumber(args[2]) or 0) / 1000
  for s, path in ipairs(paths) do anonymous[s] = wrk.format("GET", path, {}) end
  if signed_dir ~= "" then
    for line in io.lines(signed_dir .. "/" .. tid .. ".txt") do
      table.insert(signed_lines, line)
    end
  end
  math.randomseed(7919 * tid + 17)
  started = now()
  switch_at = started + (tonumber(args[1]) or 1e9)
  due = started + math.random() * period
end

-- The next signed check of this connection, formatted now; nil past its list.
local function next_signed()
  local line = signed_lines[signed_next]
  if line == nil then return nil end
  signed_next = signed_next + 1
  local id, key, auth = line:match("^(%%S+) (%%S+) (%%S+)$")
  local headers = {
    ["clipos-machineid"] = id,
    ["clipos-version"] = "%(running)s",
    ["rampart-key"] = key,
    ["rampart-auth"] = auth,
  }
  return {wrk.format("GET", paths[1], headers)}
end

-- A machine's requests, formatted on first use: init stays short, so that the threads
-- (started one after the other, each after its init) start together.
local function check_of(i)
  local check = checks[i]
  if check == nil then
    local headers = {["clipos-machineid"] = ids[i], ["clipos-version"] = "%(running)s"}
    check = {}
    for s, path in ipairs(paths) do check[s] = wrk.format("GET", path, headers) end
    checks[i] = check
  end
  return check
end

if %(paced)s then
  function delay()
    if step ~= 1 then return 0 end
    return math.max(0, math.floor((due - now()) * 1000 + 0.5))
  end
end

function request()
  if not checked then
    checked = true
    return anonymous[1]
  end
  if step == 1 then
    check_started = now()
    if period > 0 then
      check_started = math.min(check_started, due)
      due = due + period
    end
    identified_check = switch_at > check_started
    current = anonymous
    if identified_check and signed_dir ~= "" then
      current = next_signed() or anonymous
      identified_check = current ~= anonymous
    elseif identified_check then
      current = check_of(math.random(#ids))
    end
    if identified_check then identified = identified + 1 end
  end
  return current[step]
end

function response(status, headers, body)
  if status ~= expected[step] then unexpected = unexpected + 1 end
  if step < steps then
    step = step + 1
    return
  end
  step = 1
  if not identified_check then return end
  local t = now()
  if t <= switch_at then completed = completed + 1 end
  local us = math.max(1, (t - check_started) * 1e6)
  latency_n = latency_n + 1
  latency_sum = latency_sum + us
  if us > latency_max then latency_max = us end
  local key = "h" .. math.min(%(buckets)d, math.floor(math.log(us) * %(per_e)d))
  _G[key] = (_G[key] or 0) + 1
end

function done(summary, latency, requests)
  local started_n, completed_n, unexpected_n, n, sum, top = 0, 0, 0, 0, 0, 0
  local hist = {}
  for _, thread in ipairs(threads) do
    started_n = started_n + thread:get("identified")
    completed_n = completed_n + thread:get("completed")
    unexpected_n = unexpected_n + thread:get("unexpected")
    n = n + thread:get("latency_n")
    sum = sum + thread:get("latency_sum")
    top = math.max(top, thread:get("latency_max"))
    for b = 0, %(buckets)d do
      local c = thread:get("h" .. b)
      if c then hist[b] = (hist[b] or 0) + c end
    end
  end
  local function percentile(p)
    if n == 0 then return 0 end
    local rank, seen = math.max(1, math.ceil(n * p / 100)), 0
    for b = 0, %(buckets)d do
      seen = seen + (hist[b] or 0)
      if seen >= rank then return math.min(top, math.exp((b + 0.5) / %(per_e)d)) end
    end
    return top
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH-CHECKINS identified=%%d completed=%%d unexpected=%%d latencies=%%d " ..
    "requests=%%d duration_us=%%d connect=%%d read=%%d write=%%d timeout=%%d " ..
    "p50_us=%%.1f p90_us=%%.1f p99_us=%%.1f p999_us=%%.1f max_us=%%.1f mean_us=%%.1f " ..
    "request_p50_us=%%d request_p99_us=%%d\n",
    started_n, completed_n, unexpected_n, n,
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    percentile(50), percentile(90), percentile(99), percentile(99.9), top,
    n > 0 and sum / n or 0,
    latency:percentile(50), latency:percentile(99)))
end
"""
)


def write_checkins_lua(
    path: Path,
    machine_ids: Sequence[str],
    steps: Sequence[tuple[str, int]],
    paced: bool,
    signed_dir: Path | None = None,
) -> None:
    """A check-in of `steps` (path, expected status), in turn on one connection; with
    `signed_dir`, one step, each connection's signed checks read from its file there
    (`<thread number>.txt`, "machine-id key auth" lines: write_signed_lists)."""
    path.write_text(
        CHECKINS_LUA
        % {
            "steps": len(steps),
            "machines": len(machine_ids),
            "paths_text": ", ".join(f"GET {p} ({status})" for p, status in steps),
            "ids": ",\n".join(f'  "{m}"' for m in machine_ids),
            "paths": ", ".join(f'"{p}"' for p, _ in steps),
            "expected": ", ".join(str(status) for _, status in steps),
            "running": RUNNING,
            "paced": "true" if paced else "false",
            "buckets": BUCKETS,
            "per_e": PER_E,
            "signed_dir": "" if signed_dir is None else str(signed_dir),
        }
    )


def write_signed_lists(
    directory: Path, signers: Signers, machine_ids: Sequence[str], connections: int, each: int
) -> None:
    """`each` signed version checks for each of `connections` connections (wrk threads),
    in `directory`/<thread>.txt: the machines dealt out among the connections, each
    connection's in turn, so that a machine's counters reach the server in order.
    Thread 0 is wrk's first, whose first request() is the script check (never sent)."""
    directory.mkdir(parents=True)
    for t in range(connections):
        mine = machine_ids[t::connections]  # connections <= machines: never empty
        lines = []
        for k in range(each):
            machine_id = mine[k % len(mine)]
            lines.append(f"{machine_id} {signers.spki(machine_id)} {signers.auth(machine_id)}\n")
        (directory / f"{t}.txt").write_text("".join(lines))


@dataclass
class CheckinResult:
    """What wrk measured of a check-in load; latencies of whole checks, of identified
    checks (from the first request's sending to the last answer)."""

    steps: int
    identified: int  # identified checks started (each sent its version GET)
    completed: int  # identified checks completed within the identified phase
    phase_s: float  # the identified phase, per connection
    unexpected: int  # answers with another status than expected at their step
    requests: int  # every answer wrk had, over the whole run
    duration_s: float
    socket_errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    request_p50_ms: float  # wrk's histogram: every request, on its own
    request_p99_ms: float
    wrk_cpu_s: float

    @property
    def checks_per_s(self) -> float:
        return self.completed / self.phase_s if self.phase_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        return self.unexpected + sum(self.socket_errors.values())


def run_checkins(
    args: argparse.Namespace, script: Path, port: int, log: Path, rate: int | None
) -> CheckinResult:
    """wrk with one connection per thread (--connections of each) running `script`;
    with `rate`, each connection starts a check every CONNECTIONS/rate s (`rate`
    checks/s offered in all)."""
    phase = max(0.5, args.duration - TAIL_SECONDS)
    period_ms = args.connections * 1000 / rate if rate else 0.0
    argv = [
        _tool("wrk"),
        f"-t{args.connections}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{PATH}",
        "--",
        f"{phase:.3f}",
        f"{period_ms:.3f}",
    ]
    values, wrk_cpu = _wrk(argv, log, "BENCH-CHECKINS")

    def ms(key: str) -> float:
        return float(values[key]) / 1000

    return CheckinResult(
        steps=0,  # set by the caller
        identified=int(values["identified"]),
        completed=int(values["completed"]),
        phase_s=phase,
        unexpected=int(values["unexpected"]),
        requests=int(values["requests"]),
        duration_s=int(values["duration_us"]) / 1e6,
        socket_errors={k: int(values[k]) for k in ("connect", "read", "write", "timeout")},
        p50_ms=ms("p50_us"),
        p90_ms=ms("p90_us"),
        p99_ms=ms("p99_us"),
        p999_ms=ms("p999_us"),
        max_ms=ms("max_us"),
        mean_ms=ms("mean_us"),
        request_p50_ms=ms("request_p50_us"),
        request_p99_ms=ms("request_p99_us"),
        wrk_cpu_s=wrk_cpu,
    )


# What Debian's /etc/nginx/nginx.conf sets around conf.d/*.conf, as
# tests/server/test_nginx_frontend.py has it (the main configuration, with the pid file,
# logs and temporary paths in the state directory, is rampart.testbed.services.Nginx's).
FRONT_HTTP = """\
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    access_log {state}/other-access.log;

{site}
"""


def front_config(
    text: str, *, port: int, app_ports: Sequence[int], webroot: Path, state: Path
) -> str:
    """docs/server.md's nginx configuration (the ```nginx block with `upstream rampart`),
    as tests/server/test_nginx_frontend.py adapts it, but in plain HTTP like the rest of
    this bench: `listen` on a loopback port without `ssl`, the `ssl_*` directives
    dropped, this run's app servers (at most as many as the example has), the webroot's
    paths, the logs in `state`."""
    blocks = [
        b for b in re.findall(r"```nginx\n(.*?)```", text, re.DOTALL) if "upstream rampart" in b
    ]
    if len(blocks) != 1:
        raise BenchError(f"{DOCS}: expected one ```nginx block with `upstream rampart`")
    out: list[str] = []
    done: dict[str, int] = {}
    in_upstream = False
    for line in blocks[0].splitlines():
        words = line.split()
        directive = words[0] if words else ""
        indent = line[: len(line) - len(line.lstrip())]
        if directive == "upstream":
            in_upstream = True
        elif in_upstream and directive == "}":
            in_upstream = False
        if directive.startswith("ssl_"):
            continue
        replacement = {
            "listen": f"listen 127.0.0.1:{port};",
            # /dist/ and the chunk store below it: the documented paths, moved here
            "alias": line.strip().replace("/srv/rampart/webroot/dist", str(webroot / "dist")),
            "root": f"root {webroot};",
            "access_log": f"access_log {state}/access.log;",
            "error_log": f"error_log {state}/error.log;",
        }.get(directive)
        if in_upstream and directive == "server":
            if done.get("server", 0) >= len(app_ports):
                continue  # fewer app servers here than in the example
            replacement = f"server 127.0.0.1:{app_ports[done.get('server', 0)]};"
        if replacement is not None:
            done[directive] = done.get(directive, 0) + 1
            line = indent + replacement
        out.append(line)
    expected = (("server", len(app_ports)), ("listen", 1), ("alias", 2), ("root", 3))
    for directive, times in expected:
        if done.get(directive) != times:
            raise BenchError(f"{DOCS}: the nginx configuration has not {times} {directive}")
    return "\n".join(out) + "\n"


@dataclass
class CheckinRow:
    database: str
    workers: int
    load: str  # CHECKIN_LOADS
    rate: int | None  # checks/s offered (paced), or None (saturating)
    result: CheckinResult
    recorded: int  # rows added to `checks` by the load
    server_cpu_s: float
    nginx_cpu_s: float
    database_cpu_s: float

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "database": self.database,
            "workers": self.workers,
            "load": self.load,
            "requests_per_check": r.steps,
            "offered_checks_per_s": self.rate,
            "checks_per_s": round(r.checks_per_s, 1),
            "requests_per_s": round(r.requests_per_s, 1),
            "check_latency_ms": {
                "p50": round(r.p50_ms, 3),
                "p90": round(r.p90_ms, 3),
                "p99": round(r.p99_ms, 3),
                "p99.9": round(r.p999_ms, 3),
                "max": round(r.max_ms, 3),
                "mean": round(r.mean_ms, 3),
            },
            "request_latency_ms": {"p50": r.request_p50_ms, "p99": r.request_p99_ms},
            "errors": {"unexpected_status": r.unexpected, **r.socket_errors},
            "identified_checks": r.identified,
            "recorded": self.recorded,
            "cpu_s": {
                "server": round(self.server_cpu_s, 2),
                "nginx": round(self.nginx_cpu_s, 2),
                "database": round(self.database_cpu_s, 2),
                "wrk": round(r.wrk_cpu_s, 2),
            },
        }


def checkin_ratios(rows: list[CheckinRow]) -> list[dict[str, Any]]:
    """Per database and worker count, each TUF load against today's: checks/s and p99
    at saturation, p99 at the paced rate."""
    found = []
    for database, workers in dict.fromkeys((r.database, r.workers) for r in rows):
        mine = {
            (r.load, r.rate): r.result
            for r in rows
            if (r.database, r.workers) == (database, workers)
        }
        entry: dict[str, Any] = {"database": database, "workers": workers}
        for load in CHECKIN_LOADS[1:]:
            values: dict[str, float | None] = {}
            for rate in dict.fromkeys(rate for _, rate in mine):
                today, tuf = mine.get(("today", rate)), mine.get((load, rate))
                if today is None or tuf is None:
                    continue
                if rate is None:
                    values["saturated_checks_per_s"] = _ratio(tuf.checks_per_s, today.checks_per_s)
                    values["saturated_p99"] = _ratio(tuf.p99_ms, today.p99_ms)
                else:
                    values["paced_p99"] = _ratio(tuf.p99_ms, today.p99_ms)
                    values["paced_checks_per_s"] = _ratio(tuf.checks_per_s, today.checks_per_s)
            entry[load] = values
        found.append(entry)
    return found


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def front_nginx(
    bench: Bench, app_ports: Sequence[int], webroot: Path, state: Path
) -> services.Nginx:
    """docs/server.md's nginx in front of the apps on `app_ports` (front_config), with
    one worker, stopped at the end of the run at the latest."""
    port = services.free_port()
    site = front_config(
        DOCS.read_text(), port=port, app_ports=app_ports, webroot=webroot, state=state
    )
    nginx = services.Nginx(
        state,
        FRONT_HTTP.format(state=state, site=site),
        port,
        root=webroot,
        tls=False,
        connections=1024,
        check=True,
        timeout=START_TIMEOUT,
    )
    return bench.running.enter_context(nginx)


class CheckinBench:
    """Today's check-in, a TUF check-in, and the TUF check-in behind nginx, against the
    same `rampart serve --tuf-key`, per database and worker count."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.args = bench.args
        self.rate: int = bench.args.tuf_rate
        self.webroot = bench.work / "tuf-webroot"
        self.key = bench.work / "tuf-keys" / "online.key"
        self.root_probe = ""
        self.scripts: dict[tuple[str, bool], Path] = {}

    def prepare(self) -> None:
        """A copy of the bench's webroot with a TUF repository made by the vendor's
        verbs (`rampart tuf keygen`, `init`, `add-release` of both releases), and the
        wrk scripts."""
        bench, rampart = self.bench, _rampart()
        shutil.copytree(bench.webroot, self.webroot)
        keys = self.key.parent
        keys.mkdir()
        for name in ("root", "targets", "online"):
            _run([rampart, "tuf", "keygen", "--no-password", keys / f"{name}.key"])
        _run(
            [
                rampart, "tuf", "init", self.webroot, "--root-key", keys / "root.key",
                "--threshold", "1", "--targets-key", keys / "targets.key",
                "--online-key", self.key,
            ]
        )  # fmt: skip
        for version in ("1.0.0", "1.0.1"):
            _run(
                [
                    rampart, "tuf", "add-release", self.webroot, version, "--os", OS_NAME,
                    "--targets-key", keys / "targets.key", "--online-key", self.key,
                ]
            )  # fmt: skip
        (self.webroot / "heads").mkdir(exist_ok=True)
        for path in [self.webroot, *self.webroot.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        # A device trusting root N asks for N+1 at each check-in: 404 while none is signed.
        newest = max(int(p.name.split(".")[0]) for p in (self.webroot / "tuf").glob("*.root.json"))
        self.root_probe = f"/tuf/{newest + 1}.root.json"
        for load, steps in self.steps().items():
            for paced in (False, True):
                script = bench.work / f"checkins-{load}{'-paced' if paced else ''}.lua"
                write_checkins_lua(script, bench.machine_ids, steps, paced)
                self.scripts[(load, paced)] = script

    def steps(self) -> dict[str, list[tuple[str, int]]]:
        """Each check-in's requests (path, the status expected)."""
        today = [(PATH, 200)]
        return {
            "today": today,
            "tuf": [*today, (self.root_probe, 404), ("/tuf/timestamp.json", 200)],
        }

    def probe(self, port: int, what: str) -> None:
        """Each request of a TUF check-in answered as a device expects it."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"clipos-machineid": self.bench.machine_ids[0], "clipos-version": RUNNING}
        try:
            for path, status in self.steps()["tuf"]:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == status
                if ok and path == PATH:
                    ok = body == b'version = "1.0.1"\n'
                elif ok and status == 200:
                    ok = json.loads(body)["signed"]["_type"] == "timestamp"
                if not ok:
                    raise BenchError(f"{what}: GET {path}: {response.status} {body[:200]!r}")
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            raise BenchError(f"{what}: probe failed: {exc}") from None
        finally:
            conn.close()

    def front(self, app_port: int, state: Path) -> services.Nginx:
        return front_nginx(self.bench, [app_port], self.webroot, state)

    def recorded_since(self, url: str, before: int, expected: int) -> int:
        """Rows of `checks` added since `before`: a check is committed before it is
        answered, so at once; waited for up to FLUSH_TIMEOUT if short of `expected`."""
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while (added := self.bench.count_checks(url) - before) < expected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return added

    def run(self, kind: str, workers: int) -> list[CheckinRow]:
        bench = self.bench
        url = bench.database(kind)
        d = bench.work / f"tuf-{kind}-{workers}"
        d.mkdir()
        name = f"rampart serve --tuf-key ({kind}, {workers} worker{'s' if workers > 1 else ''})"
        options = ["--max-connections-per-address", "0", "--tuf-key", str(self.key)]
        service = bench.serve(
            name, url, workers, d / "serve.log", webroot=self.webroot, options=options
        )
        # The signer's first round signs the channel heads (and a snapshot, a timestamp).
        head = self.webroot / "heads" / OS_NAME / "stable.json"
        deadline = time.monotonic() + START_TIMEOUT
        while not head.exists():
            if time.monotonic() > deadline or not service.running():
                raise BenchError(f"{name}: {head} not signed\n  {service.log_tail()}")
            time.sleep(0.1)
        notes: list[str] = []
        bench.warm_up(service, url, name, notes)
        for note in notes:
            _log(f"{name}: {note}")
        front = self.front(service.port, d / "nginx")
        self.probe(service.port, name)
        self.probe(front.port, f"nginx in front of {name}")
        targets = {"today": service.port, "tuf": service.port, "tuf+nginx": front.port}
        # Priming, not measured: each load for a few seconds at the paced rate, so that
        # none of the measured ones is the first after the start (thread pools started
        # on first use, the machine cache of a worker the warm-up's connection missed).
        priming = argparse.Namespace(**{**vars(self.args), "duration": PRIME_S})
        for load in CHECKIN_LOADS:
            script = self.scripts[(load.removesuffix("+nginx"), True)]
            run_checkins(priming, script, targets[load], d / f"wrk-{load}-priming.log", self.rate)
        rows = []
        for rate in (self.rate, None):
            for load in CHECKIN_LOADS:
                script = self.scripts[(load.removesuffix("+nginx"), rate is not None)]
                offered = f"{rate} checks/s" if rate else "saturating"
                _log(f"{name}: {load} check-ins, {offered}, wrk for {self.args.duration} s")
                before = bench.count_checks(url)
                cpu = tree_cpu(service.pid), tree_cpu(front.pid), bench.postmaster_cpu()
                time.sleep(SETTLE_S)  # the previous load's background work done
                result = run_checkins(
                    self.args, script, targets[load], d / f"wrk-{load}-{rate or 0}.log", rate
                )
                server_cpu = cpu_used(cpu[0], tree_cpu(service.pid))
                nginx_cpu = cpu_used(cpu[1], tree_cpu(front.pid)) if load == "tuf+nginx" else 0.0
                db_cpu = cpu_used(cpu[2], bench.postmaster_cpu())
                result.steps = len(self.steps()[load.removesuffix("+nginx")])
                rows.append(
                    CheckinRow(
                        database=kind,
                        workers=workers,
                        load=load,
                        rate=rate,
                        result=result,
                        recorded=self.recorded_since(url, before, result.identified),
                        server_cpu_s=server_cpu,
                        nginx_cpu_s=nginx_cpu,
                        database_cpu_s=db_cpu,
                    )
                )
        front.stop(signal.SIGQUIT, STOP_TIMEOUT)
        service.stop(signal.SIGTERM, STOP_TIMEOUT)
        return rows


def print_checkins(rows: list[CheckinRow], args: argparse.Namespace, out: IO[str]) -> None:
    if not rows:
        return
    steps = {r.load: r.result.steps for r in rows}
    print(
        f"\nCheck-ins, today's and TUF's: rampart serve --tuf-key (its signer running), "
        f"wrk -t{args.connections} -c{args.connections} (one connection per thread: a "
        f"check's requests in turn on it), {args.duration} s per load, {MACHINES} "
        f"machine-ids; paced at {args.tuf_rate} checks/s, then saturating",
        file=out,
    )
    print(
        f"  today      GET {PATH} with the identity headers ({steps.get('today', 1)} request)\n"
        f"  tuf        today's, then GET /tuf/<N+1>.root.json (404) and GET "
        f"/tuf/timestamp.json ({steps.get('tuf', 3)} requests)\n"
        "  tuf+nginx  tuf through nginx (docs/server.md's front-end configuration, plain "
        "HTTP, one worker): /tuf/ from files, the version GET proxied to rampart",
        file=out,
    )
    header = (
        f"{'target':<16} {'load':<10} {'offered':>8} {'checks/s':>9} {'req/s':>7} "
        f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6} "
        f"{'recorded':>8} {'checks':>7} {'cpu srv/nginx/db/wrk s':>23}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        r = row.result
        label = f"{row.database} w={row.workers}"
        offered = f"{row.rate}/s" if row.rate else "max"
        cpu = (
            f"{row.server_cpu_s:.1f}/{row.nginx_cpu_s:.1f}/{row.database_cpu_s:.1f}/"
            f"{r.wrk_cpu_s:.1f}"
        )
        print(
            f"{label:<16} {row.load:<10} {offered:>8} {r.checks_per_s:9.0f} "
            f"{r.requests_per_s:7.0f} {r.p50_ms:7.2f} {r.p90_ms:7.2f} {r.p99_ms:7.2f} "
            f"{r.max_ms:7.1f} {r.errors:6d} {row.recorded:8d} {r.identified:7d} {cpu:>23}",
            file=out,
        )
    print("\nTUF / today:", file=out)
    for entry in checkin_ratios(rows):
        parts = []
        for load in CHECKIN_LOADS[1:]:
            v = entry[load]

            def x(key: str, v: dict[str, float | None] = v) -> str:
                value = v.get(key)
                return "-" if value is None else f"{value:.2f}x"

            parts.append(
                f"{load}: checks/s {x('saturated_checks_per_s')}, p99 {x('saturated_p99')} "
                f"saturated; p99 {x('paced_p99')} at {args.tuf_rate} checks/s"
            )
        print(f"  {entry['database']} w={entry['workers']}: " + "; ".join(parts), file=out)
    print(
        "\nchecks/s: identified checks completed (last answer in) over the run less its "
        f"last {TAIL_SECONDS:g} s (anonymous check-ins); latency: of whole identified "
        "checks, from the first request's sending to the last answer; errors: answers "
        "with another status than expected (200, 404, 200) and socket errors; recorded: "
        "rows added to `checks`, against checks: identified checks started.",
        file=out,
    )


# --- output ---------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (result.stdout + result.stderr).strip().splitlines()[0]
        return "?"

    found = {
        "wrk": first([_tool("wrk"), "--version"]).split(" [")[0],
        "nginx": first([_tool("nginx"), "-v"]).removeprefix("nginx version: "),
        "python": sys.version.split()[0],
    }
    with contextlib.suppress(services.ServiceError):
        found["postgresql"] = first([str(services.postgres_bindir() / "postgres"), "--version"])
    return found


def signed_ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Per database and worker count: signed checks against unsigned ones (same run)."""
    found = []
    for row in rows:
        if row.target != "rampart signed":
            continue
        plain = next(
            (
                r
                for r in rows
                if r.target == "rampart" and (r.database, r.workers) == (row.database, row.workers)
            ),
            None,
        )
        if plain is None or not plain.wrk.checks_per_s or not plain.wrk.p99_ms:
            continue
        found.append(
            {
                "database": row.database,
                "workers": row.workers,
                "checks_per_s": row.wrk.checks_per_s / plain.wrk.checks_per_s,
                "p99": row.wrk.p99_ms / plain.wrk.p99_ms,
            }
        )
    return found


def print_table(rows: list[Row], args: argparse.Namespace, out: IO[str]) -> None:
    nginx = next((r for r in rows if r.target == "nginx"), None)
    base = nginx.wrk.rps if nginx else None
    cpus = os.cpu_count() or 0
    print(
        f"Version checks: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
        f"{MACHINES} machine-ids, "
        + (f"paced to about {args.rate} requests/s, " if args.rate else "unpaced, ")
        + f"on {cpus} CPUs (wrk, server and database share them)",
        file=out,
    )
    header = (
        f"{'target':<28} {'req/s':>8} {'checks/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'errors':>6} {'recorded':>9} {'completed':>9} {'vs nginx':>8} "
        f"{'cpu srv/db/wrk s':>17}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        label = (
            "nginx (static file)"
            if row.target == "nginx"
            else (f"{row.target} {row.database} w={row.workers}")
        )
        w = row.wrk
        ours = row.target.startswith("rampart")
        checks = f"{w.checks_per_s:9.0f}" if ours else f"{'-':>9}"
        recorded = f"{row.recorded:9d}" if row.recorded is not None else f"{'-':>9}"
        completed = f"{row.completed:9d}" if ours else f"{'-':>9}"
        ratio = f"{w.rps / base:8.2f}" if base else f"{'-':>8}"
        cpu = f"{row.server_cpu_s:.1f}/{row.database_cpu_s:.1f}/{w.wrk_cpu_s:.1f}"
        print(
            f"{label:<28} {w.rps:8.0f} {checks} {w.p50_ms:7.2f} {w.p99_ms:7.2f} "
            f"{w.max_ms:7.1f} {w.error_count:6d} {recorded} {completed} {ratio} {cpu:>17}",
            file=out,
        )
    print(file=out)
    print("Targets (rampart):", file=out)
    for row in rows:
        if not row.target.startswith("rampart"):
            continue
        verdicts = ", ".join(
            f"{name}: {'n/a (paced run)' if ok is None else 'met' if ok else 'NOT met'}"
            for name, ok in row.targets().items()
        )
        print(f"  {row.target} {row.database} w={row.workers}: {verdicts}", file=out)
        errors = {k: v for k, v in row.wrk.errors.items() if v}
        if errors:
            print(f"    errors: {errors}", file=out)
        for note in row.notes:
            print(f"    {note}", file=out)
    for pair in signed_ratios(rows):
        print(
            f"  signed/unsigned {pair['database']} w={pair['workers']}: checks/s "
            f"{pair['checks_per_s']:.2f}x (goal >= 0.5x), p99 {pair['p99']:.2f}x",
            file=out,
        )
    print(
        "\nreq/s: every request wrk completed over the whole run; checks/s: identified "
        f"checks over the run less its last {TAIL_SECONDS:g} s (anonymous requests, not "
        "recorded); latency: wrk's histogram of every request; recorded: rows added to "
        "`checks` (after a SIGTERM stop); completed: identified checks sent by wrk.",
        file=out,
    )


# --- main -------------------------------------------------------------------------------------


def worker_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: a comma-separated list of counts") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: positive worker counts")
    return values


def database_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("sqlite", "postgresql") for v in values):
        raise argparse.ArgumentTypeError(f"{text}: sqlite and/or postgresql")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Load the version check with wrk: rampart serve on SQLite and PostgreSQL "
        "(1 and 2 workers) against nginx serving the static version file."
    )
    parser.add_argument(
        "--duration", type=positive_int, default=10, help="seconds per target (default 10)"
    )
    parser.add_argument(
        "--connections", type=positive_int, default=64, help="wrk connections (default 64)"
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="wrk threads (default 2)")
    parser.add_argument(
        "--auth",
        action="store_true",
        help="also load each server with checks signed by the machines' admitted keys "
        "(Ed25519, as a device without a TPM), and print signed/unsigned ratios",
    )
    parser.add_argument(
        "--auth-checks",
        type=positive_int,
        default=60_000,
        help="signed checks prepared per run, each sent once (default 60000; a thread "
        "that runs out sends anonymous requests, not counted)",
    )
    parser.add_argument(
        "--workers",
        type=worker_list,
        default=[1, 2],
        metavar="N,M",
        help="rampart worker counts to try (default 1,2)",
    )
    parser.add_argument(
        "--rate",
        type=positive_int,
        default=None,
        metavar="R",
        help="offer about R requests/s in all (each connection pauses CONNECTIONS/R s "
        "between requests; default: as fast as the server answers)",
    )
    parser.add_argument(
        "--databases",
        type=database_list,
        default=["sqlite", "postgresql"],
        metavar="DB,DB",
        help="rampart's databases to try: sqlite, postgresql (default both)",
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx baseline")
    parser.add_argument(
        "--reports",
        type=int,
        default=10_000,
        metavar="N",
        help="install reports to send during a rollout, per target (default 10000; 0: skip)",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=200_000,
        metavar="N",
        help="old checks in the table before the reports (default 200000)",
    )
    parser.add_argument("--reports-only", action="store_true", help="skip the version-check load")
    parser.add_argument(
        "--tuf",
        action="store_true",
        help="also measure check-ins with signed channel metadata: today's (the version "
        "GET) against a TUF device's (the version GET, the next root's 404, the "
        "timestamp), direct and with nginx serving tuf/ in front, against rampart serve "
        "--tuf-key; wrk runs one connection per thread (--threads is not used there)",
    )
    parser.add_argument(
        "--tuf-only",
        action="store_true",
        help="only the --tuf check-ins (no version-check table, no reports)",
    )
    parser.add_argument(
        "--tuf-rate",
        type=positive_int,
        default=TUF_RATE,
        metavar="R",
        help=f"checks/s offered by the paced --tuf loads, the same for each (default {TUF_RATE})",
    )
    parser.add_argument(
        "--report-client",
        choices=("wrk", "python"),
        default="wrk",
        help="what sends the reports: wrk (default; a Lua script, one report per machine) "
        "or 16 threads of this script (http.client), which take about 4 times wrk's CPU",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="SRC",
        help="also run the report load, first, against the rampart in this source tree "
        "(e.g. `git archive 692479c src | tar -x -C /tmp/ref`, then /tmp/ref/src)",
    )
    parser.add_argument(
        "--reference-reports",
        type=positive_int,
        default=1000,
        metavar="N",
        help="reports sent to the reference (default 1000: 692479c takes ~0.1 s per report "
        "over 200,000 checks)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs) for a post-mortem"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_PARENT,
        metavar="DIR",
        help="create the temporary work directory here (default /var/tmp); removed at the end",
    )
    return parser


def in_bench_directory(
    args: argparse.Namespace, name: str, body: Callable[[Path, ExitStack], T]
) -> T:
    """common.in_work_directory for this bench and bench/auth_paced.py: a work
    directory `rampart-NAME-bench-*` under --workdir, kept with --keep; Stop(1) on a
    BenchError or a service that failed."""
    errors = (BenchError, services.ServiceError)
    return in_work_directory(args.workdir, f"rampart-{name}-bench-", body, errors, keep=args.keep)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= TAIL_SECONDS:
        print(f"bench: error: --duration must exceed {TAIL_SECONDS:g} s", file=sys.stderr)
        return 1
    if args.connections < args.threads:
        print("bench: error: --connections must be at least --threads", file=sys.stderr)
        return 1

    Result = tuple[dict[str, str], list[Row], list[CheckinRow], list[ReportRow]]

    def run(work: Path, running: ExitStack) -> Result:
        tools = versions()  # BenchError if wrk or nginx is missing
        bench = Bench(args, work, running)
        return tools, bench.run(), bench.checkins(), bench.reports()

    try:
        tools, rows, checkin_rows, report_rows = in_bench_directory(args, "server", run)
    except Stop as stop:
        return stop.code
    if args.json:
        nginx = next((r for r in rows if r.target == "nginx"), None)
        base = nginx.wrk.rps if nginx else None
        report = {
            "wrk": {
                "threads": args.threads,
                "connections": args.connections,
                "duration_s": args.duration,
                "machine_ids": MACHINES,
                "rate": args.rate,
            },
            "cpus": os.cpu_count(),
            "versions": tools,
            "targets": {
                "checks_per_s": TARGET_CHECKS_PER_S,
                "p99_ms": TARGET_P99_MS,
                "errors": 0,
                "recorded_equals_completed": True,
            },
            "results": [r.to_json(base) for r in rows],
            "signed_ratios": signed_ratios(rows),
            "reports": [r.to_json() for r in report_rows],
        }
        if checkin_rows:
            report["checkins"] = {
                "wrk": {
                    "threads": args.connections,
                    "connections": args.connections,
                    "duration_s": args.duration,
                    "machine_ids": MACHINES,
                    "paced_checks_per_s": args.tuf_rate,
                },
                "results": [r.to_json() for r in checkin_rows],
                "ratios_tuf_to_today": checkin_ratios(checkin_rows),
            }
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"versions: {', '.join(f'{k} {v}' for k, v in tools.items())}")
        if rows:
            print_table(rows, args, sys.stdout)
        print_checkins(checkin_rows, args, sys.stdout)
        print_reports(report_rows, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The real server (`rampart serve` as a subprocess) over PostgreSQL, while PostgreSQL
goes away and comes back; and a graceful stop (SIGTERM) in the middle of a load.

Clients keep checking for updates the whole time (a few threads, a bounded number
of requests, each with a timeout). While the database is gone the service must
answer 503 with a one-line body (never a 500, never hang); once it is back the
service must recover by itself within seconds; and the `checks` table must hold
exactly the checks that were answered 200: all of them (the buffer kept during
the outage is written once the database is back, and flushed at a graceful
stop), and none of those answered 503.
"""

from __future__ import annotations

import dataclasses
import http.client
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rampart.testbed import services
from tests.releases import build_payloads

OS = "clipos"
PATH = f"/update/v1/{OS}/version"
RUNNING = "1.0.0"
CLIENTS = 4  # threads
IDS_PER_CLIENT = 8  # the machine-ids each thread cycles through (cached by the server)
FRESH_EVERY = 10  # and every 10th request comes from a machine never seen before
CLIENT_TIMEOUT = 8.0  # seconds: a request taking this long has hung
MAX_SECONDS_PER_REQUEST = 3.0
MAX_REQUESTS = 60_000  # the whole run, all threads
BEFORE_SECONDS = 1.5
DOWN_SECONDS = 4.0
FIRST_503_WITHIN = 2.0  # seconds after the database stopped
ALL_503_AFTER = 1.0  # every answer that started this long after the stop is a 503
RECOVERY_WITHIN = 10.0  # seconds after the database is back: 200s again
STABLE_SECONDS = 1.5  # after recovery, this long of only 200s ends the run
AFTER_MAX_SECONDS = 20.0
QUIET_BEFORE_STOP = 0.5  # seconds: several flush intervals (50 ms)
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 20.0
# Every machine-id of these loads comes from 127.0.0.1: no limit on new ones.
ONE_ADDRESS = ("--new-machines-per-hour", "0")


def _rampart() -> Path:
    beside = Path(sys.executable).parent / "rampart"
    if beside.is_file():
        return beside
    return Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rampart"


def _run(*argv: str | Path) -> None:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stderr}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[services.Cluster]:
    """A private cluster: this test stops and starts it, so it shares it with nobody."""
    with services.Cluster(None) as c:
        yield c


@pytest.fixture(scope="module")
def cli_webroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Releases 1.0.0 and 1.0.1 published with the CLI, as scripts/demo.sh does."""
    work = tmp_path_factory.mktemp("restart-webroot")
    rampart = _rampart()
    _run(
        rampart,
        "keygen",
        "--unencrypted",
        "--secret-key",
        work / "vendor.key",
        "--public-key",
        work / "vendor.pub",
    )
    for version in ("1.0.0", "1.0.1"):
        core, efiboot = build_payloads(work, version, core_size=4096)
        _run(
            rampart,
            "publish",
            "--webroot",
            work / "webroot",
            "--os",
            OS,
            "--version",
            version,
            "--core",
            core,
            "--efiboot",
            efiboot,
            "--secret-key",
            work / "vendor.key",
        )
    return work / "webroot"


# --- the server process ------------------------------------------------------------------


def start_server(webroot: Path, url: str, log: Path, *options: str) -> services.RampartServe:
    """`rampart serve` on the database `url`, ready once it answers an anonymous request
    (answered from the channels, not recorded)."""
    return services.RampartServe(
        webroot,
        log,
        db=url,
        options=options,
        ready_path=PATH,
        timeout=SERVER_START_TIMEOUT,
    )


# --- clients -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    phase: str
    machine_id: str | None
    status: int  # 0: no HTTP answer (connection error, timeout)
    body: str
    started: float  # time.time(), the server's clock too
    elapsed: float
    error: str = ""

    @property
    def ended(self) -> float:
        return self.started + self.elapsed


def probe(
    port: int, machine_id: str | None, phase: str = "", timeout: float = CLIENT_TIMEOUT
) -> Answer:
    headers = (
        {} if machine_id is None else {"clipos-machineid": machine_id, "clipos-version": RUNNING}
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started, t0 = time.time(), time.monotonic()
    status, body, error = 0, "", ""
    try:
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        body = response.read(4096).decode(errors="replace")
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        error = f"{exc.__class__.__name__}: {exc}"
    finally:
        conn.close()
    return Answer(phase, machine_id, status, body, started, time.monotonic() - t0, error)


class Load:
    """CLIENTS threads checking in a loop until stopped, or MAX_REQUESTS in all."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.phase = "before"
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.run_id = secrets.token_hex(4)
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)
        ]

    def _client(self, n: int) -> None:
        ids = [f"{self.run_id}{n:04x}{i:020x}" for i in range(IDS_PER_CLIENT)]
        sent = 0
        while not self.stopping.is_set():
            with self.lock:
                if len(self.answers) >= MAX_REQUESTS:
                    return
            if sent % FRESH_EVERY == FRESH_EVERY - 1:
                machine_id = self.run_id + secrets.token_hex(12)
            else:
                machine_id = ids[sent % IDS_PER_CLIENT]
            phase = self.phase
            answer = probe(self.port, machine_id, phase)
            if self.phase != phase:
                # Began before the phase changed, ended after: it belongs to the transition.
                answer = dataclasses.replace(
                    answer, phase="stopping" if phase == "before" else phase
                )
            sent += 1
            with self.lock:
                self.answers.append(answer)
            if answer.status == 0:
                time.sleep(0.05)  # no busy loop against a dead server

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping.is_set():
            time.sleep(0.05)


def summary(
    answers: list[Answer], stopped_at: float, restarting_at: float, started_at: float
) -> str:
    """A readable timeline: per phase, status counts and latencies."""
    lines = []
    for phase in ("before", "stopping", "down", "starting", "after"):
        group = [a for a in answers if a.phase == phase]
        if not group:
            continue
        counts = Counter(a.status for a in group)
        slowest = max(a.elapsed for a in group)
        lines.append(
            f"{phase:>8}: {len(group)} requests, statuses {dict(sorted(counts.items()))}, "
            f"slowest {slowest * 1000:.0f} ms"
        )
    down = [a for a in answers if stopped_at <= a.started and a.ended <= restarting_at]
    first_503 = next((a.started - stopped_at for a in down if a.status == 503), None)
    late_200 = [a.started - stopped_at for a in down if a.status == 200]
    after = [a for a in answers if a.started >= started_at]
    first_200 = next((a.started - started_at for a in after if a.status == 200), None)
    last_503 = max((a.started - started_at for a in after if a.status == 503), default=None)
    lines.append(
        f"first 503 {_s(first_503)} after the database stopped; 200s during the outage at "
        f"{[round(t, 3) for t in late_200[-10:]]} s (last 10); the database took "
        f"{started_at - restarting_at:.3f} s to start; first 200 {_s(first_200)} "
        f"after it was back; last 503 {_s(last_503)} after it was back"
    )
    errors = Counter(a.error.split(":")[0] for a in answers if a.status == 0)
    if errors:
        lines.append(f"no answer: {dict(errors)}")
    bodies = Counter(a.body for a in answers if a.status not in (200,))
    for body, n in bodies.most_common(3):
        lines.append(f"body x{n}: {body!r}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f} s"


# --- the test -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_outage_gives_503_and_recovers(
    cluster: services.Cluster, cli_webroot: Path, tmp_path: Path, mode: str
) -> None:
    """`fast`: an administrator stops PostgreSQL; `immediate`: it crashes (no checkpoint,
    backends killed mid-transaction, crash recovery at the next start)."""
    url = cluster.create_database(f"restart_{mode}")
    server = start_server(cli_webroot, url, tmp_path / "serve.log", *ONE_ADDRESS)
    try:
        with Load(server.port) as load:
            load.run_for(BEFORE_SECONDS)
            load.phase = "stopping"
            stopped_at = time.time()
            cluster.stop(mode=mode)
            load.phase = "down"
            load.run_for(DOWN_SECONDS)
            load.phase = "starting"
            restarting_at = time.time()
            cluster.start()
            started_at = time.time()
            load.phase = "after"
            # Until the service has answered only 200 for STABLE_SECONDS (bounded).
            deadline = time.monotonic() + AFTER_MAX_SECONDS
            while time.monotonic() < deadline:
                load.run_for(0.25)
                recent = [a for a in load.snapshot() if a.started >= time.time() - STABLE_SECONDS]
                if (
                    time.time() - started_at > STABLE_SECONDS
                    and recent
                    and all(a.status == 200 for a in recent)
                ):
                    break
        answers = load.snapshot()
        # Let the last batch be written before the stop: this test is about the outage;
        # a stop in the middle of a write is test_graceful_stop_under_load's business.
        time.sleep(QUIET_BEFORE_STOP)
        code = server.stop(timeout=SERVER_STOP_TIMEOUT)
    finally:
        if server.running():
            server.kill()
        cluster.start()  # whatever happened, leave it running for the teardown

    report = summary(answers, stopped_at, restarting_at, started_at)
    print("\n" + report)  # shown with pytest -s, and in the failure messages below
    context = f"\n{report}\nserver log:\n{server.log_tail(30)}"

    # uvicorn re-raises the signal once it has shut down gracefully (the lifespan's
    # shutdown ran, and with it the last flush): -SIGTERM is a clean exit here.
    assert code in (0, -signal.SIGTERM), f"rampart serve exited with {code} after SIGTERM{context}"
    assert len(answers) < MAX_REQUESTS, f"the request budget ran out{context}"
    # Never a 500, never anything but 200 and 503, never a hang.
    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {200, 503}, f"unexpected statuses {dict(statuses)}{context}"
    slowest = max(answers, key=lambda a: a.elapsed)
    assert slowest.elapsed < MAX_SECONDS_PER_REQUEST, (
        f"a request took {slowest.elapsed:.2f} s ({slowest.phase}, {slowest.status}){context}"
    )
    for answer in answers:
        if answer.status == 503:
            assert answer.body.endswith("\n") and answer.body.count("\n") == 1, (
                f"503 body is not one line: {answer.body!r}{context}"
            )
            assert len(answer.body) < 200, f"503 body too long: {answer.body!r}"
        else:
            assert answer.body in ('version = "1.0.1"\n',), f"200 body {answer.body!r}{context}"

    # Before the outage: all 200.
    before = [a for a in answers if a.phase == "before"]
    assert before, f"no request before the outage{context}"
    assert all(a.status == 200 for a in before), f"errors before the outage{context}"

    # While the database is gone: 503, soon and then always.
    down = [a for a in answers if stopped_at <= a.started and a.ended <= restarting_at]
    first_503 = next((a for a in down if a.status == 503), None)
    assert first_503 is not None, f"no 503 while the database was down{context}"
    assert first_503.started - stopped_at < FIRST_503_WITHIN, f"503 came late{context}"
    late = [a for a in down if a.started - stopped_at > ALL_503_AFTER and a.status != 503]
    assert not late, (
        f"{len(late)} answers other than 503 more than {ALL_503_AFTER:g} s into the outage, "
        f"statuses {dict(Counter(a.status for a in late))}{context}"
    )

    # Back by itself, soon, and for good.
    after = [a for a in answers if a.started >= started_at]
    first_200 = next((a for a in after if a.status == 200), None)
    assert first_200 is not None, f"no 200 after the database came back{context}"
    recovered = first_200.started - started_at
    assert recovered < RECOVERY_WITHIN, f"recovered only after {recovered:.1f} s{context}"
    relapse = [a for a in after if a.started > first_200.started + 1.0 and a.status != 200]
    assert not relapse, f"{len(relapse)} non-200 answers after recovery{context}"
    tail = [a for a in after if a.started >= answers[-1].started - 1.0]
    assert tail and all(a.status == 200 for a in tail), f"not stable at the end{context}"

    # The checks table: exactly the checks answered 200, each at its own request's time.
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        rows = conn.execute("SELECT machine_id, at FROM checks").fetchall()
    ok = [a for a in answers if a.status == 200]
    refused = {a.machine_id for a in answers if a.status == 503}
    recorded = Counter(str(mid) for mid, _ in rows)
    answered = Counter(str(a.machine_id) for a in ok)
    missing = answered - recorded
    extra = recorded - answered
    assert not missing and not extra, (
        f"{len(rows)} checks recorded for {len(ok)} answered 200: "
        f"{sum(missing.values())} missing, {sum(extra.values())} extra "
        f"(extra from machines refused with 503: "
        f"{sum(n for m, n in extra.items() if m in refused)}){context}"
    )
    assert len(rows) == len(ok)
    # Per machine, each recorded time falls inside one of its 200 answers' request windows
    # (each machine-id is used by one client thread, so its windows never overlap).
    windows: dict[str, list[tuple[float, float]]] = {}
    for a in ok:
        windows.setdefault(str(a.machine_id), []).append((a.started, a.started + a.elapsed))
    outside = [
        (mid, at)
        for mid, at in rows
        if not any(lo - 0.01 <= float(at) <= hi + 0.01 for lo, hi in windows[str(mid)])
    ]
    assert not outside, f"{len(outside)} checks recorded outside any 200 answer{context}"


# --- a graceful stop under load -----------------------------------------------------------

WRK_SECONDS = 6
STOP_AFTER = 3.0  # seconds into the wrk run
WRK_LUA = r"""
local ids = {}
local requests = {}
function init(args)
  math.randomseed(os.time())
  for i = 1, 1000 do
    local id = string.format("%08x%024x", tonumber(args[1], 16), i)
    requests[i] = wrk.format("GET", nil, {["clipos-machineid"] = id, ["clipos-version"] = "1.0.0"})
  end
end
function request()
  return requests[math.random(#requests)]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d status=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout))
end
"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_graceful_stop_under_load_records_every_check(
    cluster: services.Cluster, cli_webroot: Path, tmp_path: Path, database: str
) -> None:
    """SIGTERM while wrk loads the server: every check it answered (200) is in `checks`.

    uvicorn finishes the requests in flight, then the app's shutdown writes the buffer;
    wrk counts the responses it read (connections refused afterwards are its errors).
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.fail("wrk not found: run make setup")
    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'stop.sqlite'}"
    else:
        url = cluster.create_database("graceful_stop")
    server = start_server(cli_webroot, url, tmp_path / "serve.log", *ONE_ADDRESS)
    script = tmp_path / "checks.lua"
    script.write_text(WRK_LUA)
    prefix = secrets.token_hex(4)
    try:
        process = subprocess.Popen(
            [
                wrk,
                "-t2",
                "-c64",
                f"-d{WRK_SECONDS}s",
                "--timeout=5s",
                "-s",
                str(script),
                f"http://127.0.0.1:{server.port}{PATH}",
                "--",
                prefix,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            time.sleep(STOP_AFTER)
            stopping = time.monotonic()
            code = server.stop(timeout=SERVER_STOP_TIMEOUT)
            stop_seconds = time.monotonic() - stopping
            output = process.communicate(timeout=WRK_SECONDS + 30)[0]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    finally:
        if server.running():
            server.kill()
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    assert match is not None, f"wrk printed no result:\n{output}"
    result = {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}
    answered = result["requests"] - result["status"]
    assert code in (0, -signal.SIGTERM), f"exit code {code}\n{server.log_tail(30)}"
    # Checks are answered once committed: on a busy machine with PostgreSQL commits
    # this can be a few hundred a second; the count must still match.
    assert answered > 300, f"too little load to mean anything: {result}"
    from sqlalchemy import text

    from rampart.server import db

    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            recorded = conn.execute(text("SELECT count(*) FROM checks")).scalar()
    finally:
        engine.dispose()
    print(
        f"\n{database}: answered {answered} recorded {recorded} stop {stop_seconds:.2f}s {result}"
    )
    assert recorded == answered, (
        f"{database}: wrk read {answered} answers (2xx) before the stop, {recorded} checks are "
        f"recorded ({answered - int(recorded or 0)} lost); SIGTERM at {STOP_AFTER:g} s, the "
        f"server took {stop_seconds:.2f} s to stop; wrk: {result}\n{server.log_tail(30)}"
    )

"""Signed check-ins per second at p99 < 50 ms, against unsigned ones, in the same run;
and two `rampart serve` instances on one PostgreSQL against one.

    .venv/bin/python bench/auth_paced.py [--rates 500,1000,1500,2000,2500,3000]
                                         [--duration 8] [--connections 64]
                                         [--workers 1,2] [--databases sqlite,postgresql]
                                         [--no-instances] [--json] [--keep]

Debian packages: wrk, nginx, postgresql (`make setup` installs them).

bench/server.py measures the version check at saturation (closed loop: its latencies
are the queue's); the goal of docs/server.md's device identity is a rate: signed
check-ins per second with a p99 under 50 ms, at least half the unsigned rate and at
least 1,500/s. Here every load is paced, on a fixed schedule (bench/server.py's
check-in script: each of --connections connections, one per wrk thread, starts a
check every CONNECTIONS/R s from a random phase; a check that starts late counts its
latency from when it was due, wrk2's correction of coordinated omission), at each
rate of --rates in turn:

- unsigned: the version GET with the identity headers (what the CLIP OS updater
  sends), from 1,000 machine-ids at random;
- signed: the same GET signed by the machine's admitted Ed25519 key (a device
  without a TPM; a TPM quote is verified at the same cost, bench/attest.py): each
  connection sends its own list of signed checks (bench/server.py's
  write_signed_lists), each once, in order.

Per database (a fresh SQLite file, a fresh database of a private PostgreSQL cluster)
and worker count: the machines are enrolled (`rampart machine admit --enroll`), the
server started, every machine checks in once, signed (warm-up), then 3 s of each load
at the first rate (priming, not measured); then each rate, unsigned then signed, each
after 2 idle seconds. A rate is sustained when the checks completed in the identified
phase reach 95 % of it with no error, and p99 < 50 ms. The sweep of a kind stops at
its first rate not sustained.

Instances (PostgreSQL, unless --no-instances): the signed load through docs/server.md's
nginx (plain HTTP, one nginx worker) in front of one `rampart serve` (the first of
--workers workers), then in front of two on the same database, each with as many
workers: "two instances vs one, checks/s at the same p99". On a host of few cores the
two share them: the figure says what a second instance buys there, not on a second
host.

Printed: per target, kind and rate: checks/s, p50, p99, errors, rows recorded
(signed: rows an admitted key signed); then per target the highest sustained rate of
each kind and the ratios signed/unsigned and two/one. Exit code 0 whether or not the
goals are met (a benchmark), 1 if the set-up fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common import Stop, positive_int
from rampart.testbed import services
from server import (
    DEFAULT_PARENT,
    FLUSH_TIMEOUT,
    PATH,
    SETTLE_S,
    STOP_TIMEOUT,
    TAIL_SECONDS,
    TARGET_CHECKS_PER_S,
    TARGET_P99_MS,
    Bench,
    CheckinResult,
    _log,
    _rampart,
    _run,
    database_list,
    front_nginx,
    in_bench_directory,
    run_checkins,
    versions,
    worker_list,
    write_checkins_lua,
    write_signed_lists,
)

RATES = (500, 1000, 1500, 2000, 2500, 3000)
PRIME_S = 3  # seconds of each load at the first rate, before the measured ones
SUSTAINED = 0.95  # of the offered rate, completed within the identified phase
GOAL_RATIO = 0.5  # signed/unsigned


@dataclass
class Point:
    target: str  # "sqlite, 1 worker", "postgresql, 2 instances via nginx", ...
    kind: str  # unsigned, signed
    rate: int
    result: CheckinResult
    recorded: int

    @property
    def sustained(self) -> bool:
        r = self.result
        enough = r.checks_per_s >= SUSTAINED * self.rate
        return r.errors == 0 and enough and r.p99_ms < TARGET_P99_MS

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "target": self.target,
            "kind": self.kind,
            "offered_checks_per_s": self.rate,
            "checks_per_s": round(r.checks_per_s, 1),
            "latency_ms": {"p50": round(r.p50_ms, 3), "p99": round(r.p99_ms, 3)},
            "errors": r.errors,
            "identified_checks": r.identified,
            "recorded": self.recorded,
            "sustained": self.sustained,
        }


def best(points: Sequence[Point], target: str, kind: str) -> int:
    """The highest rate sustained, below the first not sustained (0: none)."""
    found = 0
    mine = [p for p in points if (p.target, p.kind) == (target, kind)]
    for point in sorted(mine, key=lambda p: p.rate):
        if not point.sustained:
            break
        found = point.rate
    return found


class PacedAuth:
    def __init__(self, args: argparse.Namespace, work: Path, running: ExitStack) -> None:
        # bench/server.py's set-up: the releases, the machine-ids, their keys, a cluster.
        server_args = argparse.Namespace(
            auth=True, rate=None, reports_only=False, tuf_only=False, no_nginx=True
        )
        self.bench = Bench(server_args, work, running)
        self.args = args
        self.work = work
        self.points: list[Point] = []
        self.unsigned = work / "unsigned.lua"
        self.lists = 0

    @property
    def signers(self) -> Any:
        assert self.bench.signers is not None
        return self.bench.signers

    def prepare(self) -> None:
        _log(f"publishing releases into {self.bench.webroot}")
        self.bench.publish()
        write_checkins_lua(self.unsigned, self.bench.machine_ids, [(PATH, 200)], paced=True)

    def signed_script(self, rate: int, duration: float) -> Path:
        """A script whose connections each send enough fresh signed checks for `rate`
        over `duration` (and a margin)."""
        self.lists += 1
        directory = self.work / f"signed-{self.lists}"
        each = int(rate * duration / self.args.connections * 1.2) + 10
        write_signed_lists(
            directory, self.signers, self.bench.machine_ids, self.args.connections, each
        )
        script = self.work / f"signed-{self.lists}.lua"
        write_checkins_lua(script, self.bench.machine_ids, [(PATH, 200)], True, directory)
        return script

    def enrolled_database(self, kind: str) -> str:
        url = self.bench.database(kind)
        enrollment = self.work / f"fleet-{self.bench.runs}.jsonl"
        enrollment.write_text(self.signers.enrollment())
        _run([_rampart(), "machine", "admit", "--enroll", enrollment, "--webroot",
              self.bench.webroot, "--db", url, "--json"])  # fmt: skip
        return url

    def recorded(self, url: str, before: int, expected: int, signed: bool) -> int:
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while (added := self.bench.count_checks(url, signed) - before) < expected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return added

    def load(
        self, target: str, kind: str, port: int, url: str, rate: int, log: Path, prime: bool
    ) -> None:
        duration = PRIME_S if prime else self.args.duration
        script = self.unsigned if kind == "unsigned" else self.signed_script(rate, duration)
        args = argparse.Namespace(duration=duration, connections=self.args.connections)
        signed = kind == "signed"
        before = self.bench.count_checks(url, signed)
        if not prime:
            time.sleep(SETTLE_S)
            _log(f"{target}: {kind} checks, {rate}/s offered, wrk for {duration} s")
        result = run_checkins(args, script, port, log, rate)
        if not prime:
            recorded = self.recorded(url, before, result.identified, signed)
            self.points.append(Point(target, kind, rate, result, recorded))

    def sweep(self, target: str, kinds: Sequence[str], port: int, url: str, d: Path) -> None:
        rates = sorted(self.args.rates)
        for kind in kinds:
            self.load(target, kind, port, url, rates[0], d / f"wrk-{kind}-priming.log", True)
        going = list(kinds)
        for rate in rates:
            for kind in list(going):
                self.load(target, kind, port, url, rate, d / f"wrk-{kind}-{rate}.log", False)
                if not self.points[-1].sustained:
                    going.remove(kind)
            if not going:
                break

    def serve(self, name: str, url: str, workers: int, log: Path) -> services.RampartServe:
        service = self.bench.serve(name, url, workers, log)
        self.bench.warm_up(service, url, name, [], self.signers)
        return service

    def servers(self, kind: str, workers: int) -> None:
        url = self.enrolled_database(kind)
        target = f"{kind}, {workers} worker{'s' if workers > 1 else ''}"
        d = self.work / target.replace(", ", "-").replace(" ", "")
        d.mkdir()
        service = self.serve(f"rampart serve ({target})", url, workers, d / "serve.log")
        self.sweep(target, ("unsigned", "signed"), service.port, url, d)
        service.stop(signal.SIGTERM, STOP_TIMEOUT)

    def instances(self, workers: int) -> None:
        """The signed load through nginx: one instance, then two on one database."""
        for count in (1, 2):
            url = self.enrolled_database("postgresql")
            plural = "s" if count > 1 else ""
            target = f"postgresql, {count} instance{plural} of {workers} via nginx"
            d = self.work / f"instances-{count}"
            d.mkdir()
            apps = [
                self.serve(f"rampart serve {n + 1} of {count}", url, workers, d / f"serve-{n}.log")
                for n in range(count)
            ]
            front = front_nginx(self.bench, [a.port for a in apps], self.bench.webroot, d / "nginx")
            self.sweep(target, ("signed",), front.port, url, d)
            front.stop(signal.SIGQUIT, STOP_TIMEOUT)
            for app in apps:
                app.stop(signal.SIGTERM, STOP_TIMEOUT)

    def run(self) -> list[Point]:
        self.prepare()
        for kind in self.args.databases:
            for workers in self.args.workers:
                self.servers(kind, workers)
        if not self.args.no_instances and "postgresql" in self.args.databases:
            self.instances(self.args.workers[0])
        return self.points


def summary(points: Sequence[Point]) -> list[dict[str, Any]]:
    """Per target: the highest sustained rate of each kind, signed/unsigned, and for the
    instances two/one."""
    out = []
    targets = list(dict.fromkeys(p.target for p in points))
    for target in targets:
        row: dict[str, Any] = {"target": target}
        for kind in ("unsigned", "signed"):
            if any(p.target == target and p.kind == kind for p in points):
                row[kind] = best(points, target, kind)
        if row.get("unsigned"):
            row["signed_to_unsigned"] = round(row["signed"] / row["unsigned"], 2)
        out.append(row)
    one = next((r for r in out if " 1 instance " in r["target"]), None)
    two = next((r for r in out if " 2 instances " in r["target"]), None)
    if one and two and one.get("signed"):
        two["two_to_one"] = round(two["signed"] / one["signed"], 2)
    return out


def print_points(points: Sequence[Point], out: IO[str]) -> None:
    out.write(
        f"{'target':<40} {'kind':<9} {'offered':>7} {'checks/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>8} {'errors':>6} {'recorded':>9}\n"
    )
    for p in points:
        r = p.result
        mark = "" if p.sustained else "  (not sustained)"
        out.write(
            f"{p.target:<40} {p.kind:<9} {p.rate:>7} {r.checks_per_s:>9.0f} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>8.2f} {r.errors:>6} {p.recorded:>6}/{r.identified:<6}{mark}\n"
        )
    out.write(
        f"\nhighest rate sustained (checks/s, p99 < {TARGET_P99_MS:g} ms, >= "
        f"{SUSTAINED:.0%} of it completed, no error); goals: signed >= {GOAL_RATIO}x "
        f"unsigned and >= {TARGET_CHECKS_PER_S:g}/s\n"
    )
    for row in summary(points):
        parts = [f"{k} {row[k]}" for k in ("unsigned", "signed") if k in row]
        for ratio in ("signed_to_unsigned", "two_to_one"):
            if ratio in row:
                parts.append(f"{ratio.replace('_', ' ')} {row[ratio]}x")
        out.write(f"  {row['target']}: {', '.join(parts)}\n")


def rate_list(text: str) -> list[int]:
    return sorted(set(worker_list(text)))  # positive integers, comma-separated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Signed against unsigned version checks at paced rates (p99 < 50 ms), "
        "and two rampart serve instances on one PostgreSQL against one."
    )
    parser.add_argument(
        "--rates",
        type=rate_list,
        default=list(RATES),
        metavar="R,R",
        help=f"checks/s offered, in turn (default {','.join(map(str, RATES))})",
    )
    parser.add_argument("--duration", type=positive_int, default=8, help="seconds per load")
    parser.add_argument(
        "--connections", type=positive_int, default=64, help="wrk connections, one per thread"
    )
    parser.add_argument("--workers", type=worker_list, default=[1, 2], metavar="N,M")
    parser.add_argument(
        "--databases", type=database_list, default=["sqlite", "postgresql"], metavar="DB,DB"
    )
    parser.add_argument(
        "--no-instances", action="store_true", help="skip one against two instances"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_PARENT, metavar="DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= TAIL_SECONDS:
        print(f"bench: error: --duration must exceed {TAIL_SECONDS:g} s", file=sys.stderr)
        return 1

    def run(work: Path, running: ExitStack) -> tuple[dict[str, str], list[Point]]:
        return versions(), PacedAuth(args, work, running).run()  # BenchError: no wrk

    try:
        tools, points = in_bench_directory(args, "auth-paced", run)
    except Stop as stop:
        return stop.code
    if args.json:
        report = {
            "connections": args.connections,
            "duration_s": args.duration,
            "cpus": os.cpu_count(),
            "versions": tools,
            "points": [p.to_json() for p in points],
            "summary": summary(points),
        }
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"versions: {', '.join(f'{k} {v}' for k, v in tools.items())}")
        print_points(points, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

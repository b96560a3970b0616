"""The server's cost to keep the TUF timestamp fresh: `refresh_timestamp`, what
`rampart serve --tuf-key` calls (in its process), against `minisign -S` signing a small
file, in one run.

    .venv/bin/python bench/tuf_sign.py [--calls 200] [--runs 3] [--workdir DIR] [--json]

Set-up, in a work directory under /var/tmp (removed at the end): a TUF repository made
with the vendor's tools (rampart.release.tufrepo: a root key, a targets key, one
online Ed25519 key for snapshot, timestamp and channels, encrypted with a password),
the online signer loaded once as the server loads it (contracts.tufrepo.load_signer),
and a minisign key pair without a password (`minisign -G -W`) with a 512-byte file to
sign (about a timestamp's size).

Each run, the two interleaved so that drift hits both alike:
- refresh_timestamp: --calls calls in a row, in this process. Each reads the previous
  timestamp, signs a new version (Ed25519 over canonical JSON), writes it under a
  temporary name, fsyncs it, renames it into place and fsyncs the directory. Reported:
  calls/s, wall ms and CPU ms per call; and the signature alone (Metadata.sign of the
  same timestamp, no file), to show where the time goes;
- minisign -S: --calls / 10 (at least 10) processes, each signing the small file with a
  trusted comment: wall ms and CPU ms (the child's, from wait4) per signature. This is
  the reference tool's whole cost to sign one small file, its start-up included.

The best run counts. The ratio is refresh_timestamp's wall ms over minisign's. Target:
ratio <= 1.0 (re-signing the timestamp costs the server no more than the reference tool
takes to sign a small file). At --tuf-timestamp-expiry S the server refreshes every S/2
seconds: the share of a core that takes is printed for the default (86400 s) and for
4 s. Exit 0 whether the target is met or not (this is a benchmark, not a test), 1 if a
command fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tuf.py has python-tuf's name: run as a script, this directory comes first on
# sys.path and would shadow the `tuf` package. It goes last (a stable sort): `common` is
# still found there.
sys.path.sort(key=lambda entry: Path(entry or ".").resolve() == Path(__file__).resolve().parent)

import argparse
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile, Timestamp

from common import positive_int
from rampart.contracts import tuf
from rampart.contracts import tufrepo as repo
from rampart.release import tufrepo

PASSWORD = b"bench password"
LIFETIME = datetime.timedelta(days=1)
RATIO_TARGET = 1.0
DEFAULT_PARENT = Path("/var/tmp")
SMALL_FILE = 512  # bytes: about a timestamp's size


class BenchError(Exception):
    """A command failed or the set-up is impossible: exit code 1."""


@dataclass
class Timing:
    calls: int
    wall_ms: float  # per call
    cpu_ms: float  # per call

    @property
    def per_second(self) -> float:
        return 1000 / self.wall_ms if self.wall_ms > 0 else float("inf")


@dataclass
class Report:
    calls: int
    runs: int
    minisign: str
    python: str
    refresh: Timing
    sign_only: Timing
    minisign_sign: Timing
    ratio: float
    core_share_default: float  # of one core, at --tuf-timestamp-expiry 86400
    core_share_4s: float  # at --tuf-timestamp-expiry 4

    def met(self) -> bool:
        return self.ratio <= RATIO_TARGET

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("refresh", "sign_only", "minisign_sign"):
            data[key]["per_second"] = round(getattr(self, key).per_second, 1)
        data["target"] = {"ratio_max": RATIO_TARGET, "met": self.met()}
        return data


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_quiet(argv: Sequence[str]) -> str:
    """Run a set-up command; its output. BenchError if it fails."""
    try:
        done = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
    except OSError as exc:
        raise BenchError(f"{argv[0]}: cannot start: {exc.strerror}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"{' '.join(argv)}: exit {done.returncode}: {lines[-1] if lines else ''}")
    return (done.stdout or done.stderr).decode(errors="replace").strip()


def make_repository(work: Path) -> tuple[Path, dict[str, list[Signer]]]:
    """A webroot with a new TUF repository; the online signers by role, as the server
    loads them."""
    keys = work / "keys"
    keys.mkdir()
    public = {}
    for role in ("root", "targets", "online"):
        public[role] = [tufrepo.generate_key(keys / f"{role}.key", PASSWORD)]
    signers: dict[str, list[Signer]] = {
        role: [repo.load_signer(keys / f"{role}.key", PASSWORD)]
        for role in ("root", "targets", "online")
    }
    for role in ("snapshot", "timestamp", tuf.CHANNELS_ROLE):
        signers[role] = signers["online"]
    webroot = work / "webroot"
    webroot.mkdir()
    tufrepo.create(
        webroot,
        tufrepo.Keys(
            public["root"],
            public["targets"],
            public["online"],
            public["online"],
            channels=public["online"],
        ),
        signers,
    )
    return webroot, signers


def time_refresh(webroot: Path, signers: dict[str, list[Signer]], calls: int) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        repo.refresh_timestamp(webroot, signers, lifetime=LIFETIME)
    return _per_call(calls, time.perf_counter() - wall, time.process_time() - cpu)


def time_sign_only(signers: dict[str, list[Signer]], calls: int) -> Timing:
    md = Metadata(
        Timestamp(version=1, expires=repo.expiry(Timestamp.type), snapshot_meta=MetaFile(1))
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for n in range(calls):
        md.signed.version = n + 2
        repo.sign(md, signers[Timestamp.type])
    return _per_call(calls, time.perf_counter() - wall, time.process_time() - cpu)


def time_minisign(minisign: str, secret: Path, data: Path, signature: Path, calls: int) -> Timing:
    argv = [minisign, "-S", "-s", str(secret), "-m", str(data), "-x", str(signature), "-t", "1"]
    wall_total = cpu_total = 0.0
    for _ in range(calls):
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise BenchError(f"{minisign}: cannot start: {exc.strerror}") from None
        _, status, usage = os.wait4(proc.pid, 0)
        wall_total += time.perf_counter() - start
        cpu_total += usage.ru_utime + usage.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            assert proc.stderr is not None
            raise BenchError(
                f"minisign -S: exit {proc.returncode}: {proc.stderr.read().decode().strip()}"
            )
        assert proc.stderr is not None
        proc.stderr.close()
    return _per_call(calls, wall_total, cpu_total)


def _per_call(calls: int, wall: float, cpu: float) -> Timing:
    return Timing(calls, round(wall * 1000 / calls, 4), round(cpu * 1000 / calls, 4))


def benchmark(args: argparse.Namespace, work: Path) -> Report:
    minisign = args.minisign or shutil.which("minisign")
    if minisign is None:
        raise BenchError("minisign not found: run `make setup` or pass --minisign")
    version = run_quiet([minisign, "-v"])
    _log("making a TUF repository and a minisign key pair")
    webroot, signers = make_repository(work)
    secret, public = work / "minisign.key", work / "minisign.pub"
    run_quiet([minisign, "-G", "-W", "-p", str(public), "-s", str(secret)])
    data = work / "small.json"
    data.write_bytes(os.urandom(SMALL_FILE))
    minisign_calls = max(10, args.calls // 10)
    measures: dict[str, Callable[[], Timing]] = {
        "refresh": lambda: time_refresh(webroot, signers, args.calls),
        "sign_only": lambda: time_sign_only(signers, args.calls),
        "minisign_sign": lambda: time_minisign(
            minisign, secret, data, work / "small.sig", minisign_calls
        ),
    }
    best: dict[str, Timing] = {}
    for run in range(1, args.runs + 1):
        for name, measure in measures.items():
            timing = measure()
            _log(
                f"run {run}/{args.runs}: {name}: {timing.wall_ms:.3f} ms each "
                f"({timing.cpu_ms:.3f} ms CPU)"
            )
            if name not in best or timing.wall_ms < best[name].wall_ms:
                best[name] = timing
    refresh = best["refresh"]
    return Report(
        calls=args.calls,
        runs=args.runs,
        minisign=version,
        python=sys.version.split()[0],
        refresh=refresh,
        sign_only=best["sign_only"],
        minisign_sign=best["minisign_sign"],
        ratio=round(refresh.wall_ms / best["minisign_sign"].wall_ms, 3),
        core_share_default=refresh.cpu_ms / 1000 / (86400 / 2),
        core_share_4s=refresh.cpu_ms / 1000 / (4 / 2),
    )


def print_table(report: Report) -> None:
    print(f"best of {report.runs} runs; {report.minisign}, Python {report.python}")
    rows = [("operation", "calls", "per second", "wall ms", "CPU ms")]
    for label, timing in (
        ("refresh_timestamp (sign, write, fsync)", report.refresh),
        ("  of which the signature alone", report.sign_only),
        ("minisign -S, a small file (a process)", report.minisign_sign),
    ):
        rows.append(
            (
                label,
                str(timing.calls),
                f"{timing.per_second:.0f}",
                f"{timing.wall_ms:.3f}",
                f"{timing.cpu_ms:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print(
        f"refresh_timestamp / minisign -S: {report.ratio:.2f} (target <= {RATIO_TARGET}: "
        f"{'met' if report.met() else 'NOT met'})"
    )
    print(
        f"share of one core to keep the timestamp fresh: {report.core_share_default:.2e} at "
        f"--tuf-timestamp-expiry 86400, {report.core_share_4s:.2e} at 4 s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time the server's timestamp refresh against minisign -S, in one run."
    )
    parser.add_argument(
        "--calls", type=positive_int, default=200, help="refreshes per run (default 200)"
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="runs (default 3)")
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_PARENT, metavar="DIR",
        help="create the temporary work directory here (default /var/tmp); removed at the end",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument("--minisign", metavar="PATH", help="minisign binary (default: on PATH)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        work = Path(tempfile.mkdtemp(prefix="rampart-tuf-bench-", dir=args.workdir))
    except OSError as exc:
        print(f"bench: error: {args.workdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        report = benchmark(args, work)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

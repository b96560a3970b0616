"""Sign and verify one large file with rampart and with minisign, in the same run.

    .venv/bin/python bench/sign_verify.py [--size-mib N] [--workdir DIR] [--json]

Both tools run as subprocesses, so both pay process start-up (Python and its
imports for rampart). Each operation runs `--runs` times (3 by default); the
best (lowest) wall time counts, and the highest peak RSS. The file is written
once, fsynced, and read once before the first measurement, so both tools read
it from the page cache (the cache cannot be dropped without root).

Peak RSS comes from os.wait4 on each child. Linux reports a child's ru_maxrss
as at least the RSS of the process that spawned it (the memory it had when the
child called exec), so this script keeps its own memory small: it writes and
reads the file in 1 MiB chunks and makes the rampart key pair in a child
Python process. A child whose reported peak is not above this script's own
peak RSS is shown as "<=" that value: its true peak is at most that.

Targets: rampart/minisign time ratio <= 1.1 for sign and for verify, and a
rampart peak RSS under 64 MiB. The exit code is 0 whether or not they are met
(this is a benchmark, not a test) and 1 if any command fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import hash_header, hash_info, positive_int

VERSION = "1.0.0"
CHUNK = 1 << 20
RATIO_TARGET = 1.1
RSS_TARGET_MIB = 64.0
DEFAULT_PARENT = Path("/var/tmp")

# Runs in a child Python so that importing `cryptography` does not raise this
# process's RSS, which would show up in every child's ru_maxrss (see above).
KEYGEN_SNIPPET = """\
import sys
from pathlib import Path

from rampart import files
from rampart.contracts import signing

key = signing.generate_secret_key()
files.write_new_file(Path(sys.argv[1]), signing.secret_key_to_bytes(key, None), 0o600)
files.write_new_file(Path(sys.argv[2]), key.public_key.to_bytes(), 0o644)
"""


class BenchError(Exception):
    """A command failed or the setup is impossible: exit code 1."""


@dataclass
class Sample:
    seconds: float
    maxrss_kib: int
    floor_kib: int  # this process's own peak RSS when the child was reaped

    @property
    def rss_is_bound(self) -> bool:
        """True if the reported peak may be this process's RSS, not the child's."""
        return self.maxrss_kib <= self.floor_kib


@dataclass
class Measurement:
    samples: list[Sample] = field(default_factory=list)

    @property
    def best_seconds(self) -> float:
        return min(s.seconds for s in self.samples)

    @property
    def peak_kib(self) -> int:
        return max(s.maxrss_kib for s in self.samples)

    @property
    def peak_is_bound(self) -> bool:
        return all(s.rss_is_bound for s in self.samples)


def _mib(kib: int) -> float:
    return kib / 1024


@dataclass
class OperationResult:
    operation: str
    minisign_seconds: float
    rampart_seconds: float
    ratio: float
    rampart_peak_rss_mib: float
    rampart_rss_is_upper_bound: bool
    minisign_peak_rss_mib: float
    minisign_rss_is_upper_bound: bool
    minisign_runs_seconds: list[float]
    rampart_runs_seconds: list[float]

    @classmethod
    def from_measurements(
        cls, operation: str, minisign: Measurement, rampart: Measurement
    ) -> OperationResult:
        best_m, best_r = minisign.best_seconds, rampart.best_seconds
        return cls(
            operation=operation,
            minisign_seconds=round(best_m, 4),
            rampart_seconds=round(best_r, 4),
            ratio=round(best_r / best_m, 3) if best_m > 0 else float("inf"),
            rampart_peak_rss_mib=round(_mib(rampart.peak_kib), 1),
            rampart_rss_is_upper_bound=rampart.peak_is_bound,
            minisign_peak_rss_mib=round(_mib(minisign.peak_kib), 1),
            minisign_rss_is_upper_bound=minisign.peak_is_bound,
            minisign_runs_seconds=[round(s.seconds, 4) for s in minisign.samples],
            rampart_runs_seconds=[round(s.seconds, 4) for s in rampart.samples],
        )


@dataclass
class Report:
    size_mib: int
    runs: int
    minisign: str
    rampart: str
    python: str
    bench_own_peak_rss_mib: float
    operations: list[OperationResult]
    hashes: dict[str, Any]  # common.hash_info: the BLAKE2b used, speeds, CPU flags

    def _op(self, name: str) -> OperationResult:
        return next(op for op in self.operations if op.operation == name)

    @property
    def rampart_peak_rss_mib(self) -> float:
        return max(op.rampart_peak_rss_mib for op in self.operations)

    def targets(self) -> dict[str, float | bool]:
        found: dict[str, float | bool] = {
            "ratio_max": RATIO_TARGET,
            "rampart_rss_max_mib": RSS_TARGET_MIB,
            "sign_ratio_met": self._op("sign").ratio <= RATIO_TARGET,
            "verify_ratio_met": self._op("verify").ratio <= RATIO_TARGET,
            "rampart_rss_met": self.rampart_peak_rss_mib < RSS_TARGET_MIB,
        }
        found["met"] = all(bool(v) for k, v in found.items() if k.endswith("_met"))
        return found

    def verdict(self) -> str:
        t = self.targets()

        def word(key: str) -> str:
            return "met" if t[key] else "NOT met"

        return (
            f"targets {'MET' if t['met'] else 'NOT MET'}: "
            f"sign ratio {self._op('sign').ratio:.2f} <= {RATIO_TARGET} {word('sign_ratio_met')}; "
            f"verify ratio {self._op('verify').ratio:.2f} <= {RATIO_TARGET} "
            f"{word('verify_ratio_met')}; rampart peak RSS {self.rampart_peak_rss_mib:.1f} MiB "
            f"< {RSS_TARGET_MIB:.0f} MiB {word('rampart_rss_met')}"
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rampart_peak_rss_mib"] = self.rampart_peak_rss_mib
        data["targets"] = self.targets()
        return data


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no error output"


def run_measured(argv: Sequence[str], workdir: Path) -> tuple[Sample, str]:
    """Run `argv`; return its wall time, peak RSS (os.wait4) and stdout. BenchError if it fails."""
    out_path = workdir / "child.stdout"
    err_path = workdir / "child.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as exc:
            raise BenchError(f"{argv[0]}: cannot start: {exc.strerror}") from None
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}: {_last_line(err_path)}"
        )
    return Sample(elapsed, usage.ru_maxrss, floor), out_path.read_text(errors="replace")


def run_quiet(argv: Sequence[str]) -> str:
    """Run a set-up command; return its stdout. BenchError if it fails."""
    try:
        done = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
    except OSError as exc:
        raise BenchError(f"{argv[0]}: cannot start: {exc.strerror}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        last = lines[-1] if lines else "no error output"
        raise BenchError(f"{' '.join(argv)} failed with exit code {done.returncode}: {last}")
    return (done.stdout or done.stderr).decode(errors="replace").strip()


def make_random_file(path: Path, size_mib: int) -> None:
    with path.open("xb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(CHUNK))
        handle.flush()
        os.fsync(handle.fileno())


def warm_up(path: Path) -> None:
    """Read the file once so that every measured run reads it from the page cache."""
    buffer = bytearray(CHUNK)
    with path.open("rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def find_rampart(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    beside = Path(sys.executable).parent / "rampart"
    if beside.exists():
        return beside
    found = shutil.which("rampart")
    if found is None:
        raise BenchError("rampart not found: run with .venv/bin/python or pass --rampart")
    return Path(found)


def benchmark(args: argparse.Namespace, workdir: Path) -> Report:
    minisign = args.minisign or shutil.which("minisign")
    if minisign is None:
        raise BenchError("minisign not found: run `make setup` or pass --minisign")
    rampart = str(find_rampart(args.rampart))
    need = args.size_mib * CHUNK + (16 << 20)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise BenchError(f"{workdir}: {free >> 20} MiB free, {need >> 20} MiB needed")

    minisign_version = run_quiet([minisign, "-v"])
    rampart_version = run_quiet([rampart, "--version"])

    data = workdir / "payload.bin"
    _log(f"writing {args.size_mib} MiB of random data to {data}")
    make_random_file(data, args.size_mib)

    _log("generating key pairs (unencrypted)")
    r_sk, r_pk = workdir / "rampart.key", workdir / "rampart.pub"
    m_sk, m_pk = workdir / "minisign.key", workdir / "minisign.pub"
    run_quiet([sys.executable, "-c", KEYGEN_SNIPPET, str(r_sk), str(r_pk)])
    run_quiet([minisign, "-G", "-W", "-p", str(m_pk), "-s", str(m_sk)])

    _log("warm-up read of the file")
    warm_up(data)

    m_sig, r_sig = workdir / "payload.bin.minisig", workdir / "payload.bin.sig"
    commands = {
        "sign": {
            "minisign": [minisign, "-S", "-s", str(m_sk), "-m", str(data), "-x", str(m_sig),
                         "-t", VERSION],
            "rampart": [rampart, "sign", str(data), "--secret-key", str(r_sk),
                        "--version", VERSION, "--signature", str(r_sig)],
        },
        "verify": {
            "minisign": [minisign, "-V", "-p", str(m_pk), "-m", str(data), "-x", str(m_sig)],
            "rampart": [rampart, "verify", str(data), "--public-key", str(r_pk),
                        "--signature", str(r_sig), "--version", VERSION],
        },
    }  # fmt: skip
    results = {op: {tool: Measurement() for tool in tools} for op, tools in commands.items()}
    # Rounds interleave the tools so that drift (thermal, other load) hits both alike.
    for round_number in range(1, args.runs + 1):
        for op, tools in commands.items():
            for tool, argv in tools.items():
                sample, out = run_measured(argv, workdir)
                if op == "verify" and tool == "rampart" and out.strip() != VERSION:
                    raise BenchError(f"rampart verify printed {out.strip()!r}, not {VERSION!r}")
                results[op][tool].samples.append(sample)
                _log(
                    f"round {round_number}/{args.runs}: {tool} {op}: {sample.seconds:.3f} s, "
                    f"peak RSS {_mib(sample.maxrss_kib):.1f} MiB"
                )

    operations = [
        OperationResult.from_measurements(op, tools["minisign"], tools["rampart"])
        for op, tools in results.items()
    ]
    return Report(
        size_mib=args.size_mib,
        runs=args.runs,
        minisign=minisign_version,
        rampart=rampart_version,
        python=sys.version.split()[0],
        bench_own_peak_rss_mib=round(_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1),
        operations=operations,
        hashes=hash_info(sys.executable),
    )


def print_table(report: Report) -> None:
    print(
        f"{report.size_mib} MiB file, best of {report.runs} runs; "
        f"{report.minisign}, {report.rampart} (Python {report.python})"
    )
    print(hash_header(report.hashes))

    def rss(value: float, bound: bool) -> str:
        return f"<={value:.1f}" if bound else f"{value:.1f}"

    rows = [
        (
            "operation",
            "minisign s",
            "rampart s",
            "rampart/minisign",
            "rampart peak RSS MiB",
            "minisign peak RSS MiB",
        )
    ]
    for op in report.operations:
        rows.append(
            (
                op.operation,
                f"{op.minisign_seconds:.3f}",
                f"{op.rampart_seconds:.3f}",
                f"{op.ratio:.2f}",
                rss(op.rampart_peak_rss_mib, op.rampart_rss_is_upper_bound),
                rss(op.minisign_peak_rss_mib, op.minisign_rss_is_upper_bound),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    if any(
        op.rampart_rss_is_upper_bound or op.minisign_rss_is_upper_bound for op in report.operations
    ):
        print(
            "<=: the child's own peak RSS is at most this: Linux reports at least the RSS "
            f"of the spawning process ({report.bench_own_peak_rss_mib:.1f} MiB)."
        )
    print(report.verdict())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time signing and verifying a large file with rampart and with minisign."
    )
    parser.add_argument(
        "--size-mib", type=positive_int, default=1024, help="file size (default 1024)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_PARENT,
        metavar="DIR",
        help="create the temporary work directory here (default /var/tmp); removed at the end",
    )
    parser.add_argument(
        "--runs", type=positive_int, default=3, help="runs per measurement (default 3)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument("--minisign", metavar="PATH", help="minisign binary (default: on PATH)")
    parser.add_argument(
        "--rampart", type=Path, metavar="PATH", help="rampart script (default: beside python)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        workdir = Path(tempfile.mkdtemp(prefix="rampart-bench-", dir=args.workdir))
    except OSError as exc:
        print(f"bench: error: {args.workdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        report = benchmark(args, workdir)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

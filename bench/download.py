"""The download alone: the update client's fetch process against curl, in one run.

    .venv/bin/python bench/download.py [--size-mib 1024] [--runs 5] [--json]

Set-up, in a work directory under /var/tmp (removed at the end): a file of SIZE MiB
of random bytes, served by nginx over HTTPS on 127.0.0.1 with a throwaway CA
(rampart.testbed.services), read once beforehand so that every download is served
from the page cache.

Measured, `--runs` rounds, each in turn:
1. curl: `curl --cacert CA -sSf -o FILE URL` (a process: its start-up counts);
2. rampart: `Fetcher.download` of the same URL into an empty download directory, as
   `rampart update` fetches a payload: as root, in a forked fetch process that runs
   as the `rampart-fetch` user (`make setup` creates it) in its own PID namespace;
   otherwise (not root, or no such user) in this process, and the report says so.
   Rampart's CLI start-up is not counted (bench/update.py times the whole update).
Each downloaded file is checked (its size and first and last MiB) and removed.

Reported: each method's best and median seconds and MB/s, and rampart/curl for both.
Target: rampart/curl <= 1.3 (best of the runs). Exit code 0 whether or not it is met
(a benchmark, not a test), 1 if a download fails or the set-up is impossible.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import positive_int
from rampart.device.fetch import Download, Fetcher
from rampart.device.transport import Limits
from rampart.testbed import services

FETCH_USER = "rampart-fetch"
RATIO_TARGET = 1.3
_MIB = 1 << 20


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _check(path: Path, source: Path) -> None:
    """The download is the served file: same size, same first and last MiB."""
    size = source.stat().st_size
    if path.stat().st_size != size:
        raise SystemExit(f"bench: {path}: {path.stat().st_size} bytes, not {size}")
    with path.open("rb") as got, source.open("rb") as want:
        for offset in (0, max(0, size - _MIB)):
            got.seek(offset)
            want.seek(offset)
            if got.read(_MIB) != want.read(_MIB):
                raise SystemExit(f"bench: {path}: differs from the served file")


def _fetch_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(FETCH_USER)
    except KeyError:
        return None
    return FETCH_USER


def _summary(seconds: list[float], size: int) -> dict[str, Any]:
    best, median = min(seconds), statistics.median(seconds)
    return {
        "best_s": round(best, 3),
        "median_s": round(median, 3),
        "best_mb_s": round(size / best / 1e6),
        "runs_s": [round(s, 3) for s in seconds],
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("bench: curl not found (run make setup)")
    web, pki, download_dir = work / "web", work / "pki", work / "download"
    web.mkdir()
    pki.mkdir()
    served = web / "payload"
    _log(f"writing {args.size_mib} MiB of random data")
    with served.open("wb") as handle:
        for _ in range(args.size_mib):
            handle.write(os.urandom(_MIB))
    ca = services.make_ca(pki, "ca", common_name="Rampart bench CA", valid=services.validity(2))
    cert = services.make_cert(pki, "server", ca, ["localhost"], valid=services.validity(2))
    user = _fetch_user()
    times: dict[str, list[float]] = {"curl": [], "rampart": []}
    with services.Nginx.static(work / "nginx", web, cert) as nginx:
        url = f"{nginx.url}/payload".replace("127.0.0.1", "localhost")
        with served.open("rb") as handle:
            while handle.read(16 * _MIB):
                pass
        for number in range(1, args.runs + 1):
            out = work / "curl.out"
            start = time.perf_counter()
            subprocess.run(
                [curl, "--cacert", str(ca.cert), "-sSf", "-o", str(out), url], check=True
            )
            times["curl"].append(time.perf_counter() - start)
            _check(out, served)
            out.unlink()
            download_dir.mkdir(mode=0o700)
            fetcher = Fetcher(ca.cert, {}, Limits(), user, download_dir)
            start = time.perf_counter()
            fetcher.download([Download(url, download_dir / "payload", served.stat().st_size)])
            times["rampart"].append(time.perf_counter() - start)
            _check(download_dir / "payload", served)
            shutil.rmtree(download_dir)
            _log(
                f"round {number}/{args.runs}: curl {times['curl'][-1]:.3f} s, "
                f"rampart {times['rampart'][-1]:.3f} s"
            )
    size = served.stat().st_size
    result = {
        "size_mib": args.size_mib,
        "runs": args.runs,
        "fetch_process": f"forked, as {user}, own PID namespace" if user else "in-process",
        "curl": _summary(times["curl"], size),
        "rampart": _summary(times["rampart"], size),
    }
    best = min(times["rampart"]) / min(times["curl"])
    median = statistics.median(times["rampart"]) / statistics.median(times["curl"])
    result["ratio_best"] = round(best, 3)
    result["ratio_median"] = round(median, 3)
    result["target_met"] = best <= RATIO_TARGET
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=positive_int, default=1024, help="default 1024")
    parser.add_argument("--runs", type=positive_int, default=5, help="rounds (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    args = parser.parse_args()
    # The fetch user reaches its download directory in it.
    work = services.world_readable_tmp("rampart-download-bench-", Path("/var/tmp"))
    try:
        result = run(args, work)
    except (services.ServiceError, subprocess.CalledProcessError, OSError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"HTTPS download of {args.size_mib} MiB from nginx on loopback, {args.runs} rounds; "
        f"rampart's fetch process: {result['fetch_process']}"
    )
    for name in ("curl", "rampart"):
        row = result[name]
        print(
            f"{name:<8} best {row['best_s']:.3f} s ({row['best_mb_s']} MB/s), "
            f"median {row['median_s']:.3f} s"
        )
    print(
        f"rampart/curl {result['ratio_best']:.2f} best, {result['ratio_median']:.2f} median "
        f"(target <= {RATIO_TARGET} best): {'met' if result['target_met'] else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

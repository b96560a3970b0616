"""Benchmark: dm-verity hash tree build and verification of a 1 GiB image, Rampart's
pure-Python implementation against `veritysetup format` / `veritysetup verify`, in one run.

    .venv/bin/python bench/verity.py [--size-mib 1024] [--runs 3] [--json]

Each tool runs as a child process (both pay their start-up); the best of the runs
counts; peak RSS comes from wait4. The image is read once beforehand so both read
it from the page cache. Exits 1 if a command fails, 0 otherwise (targets are printed,
not enforced: this is a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hash_header, hash_info

PYTHON = sys.executable
RATIO_TARGET = 1.1
BUILD = (
    "import sys, json; from pathlib import Path; from rampart.contracts import verity; "
    "p = verity.build(Path(sys.argv[1]), Path(sys.argv[2]), salt=bytes(32), "
    "uuid='00000000-0000-4000-8000-000000000000'); print(json.dumps(p.to_json()))"
)


def timed(argv: list[str]) -> tuple[float, float, str]:
    """Run argv; return (seconds, peak RSS MiB, stdout)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"bench: {argv[0]} failed ({proc.returncode}): {err.strip()[-300:]}", file=sys.stderr)
        sys.exit(1)
    return seconds, usage.ru_maxrss / 1024, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    veritysetup = shutil.which("veritysetup")
    if veritysetup is None:
        print("bench: veritysetup not found (run make setup)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="rampart-verity-bench-", dir="/var/tmp"))
    try:
        data = work / "data.img"
        print(f"bench: writing {args.size_mib} MiB of random data", file=sys.stderr)
        with data.open("wb") as handle:
            for _ in range(args.size_mib):
                handle.write(os.urandom(1 << 20))
        with data.open("rb") as handle:
            while handle.read(1 << 24):
                pass
        results: dict[str, dict[str, float]] = {}
        root = ""
        for run in range(args.runs):
            for name, argv in (
                (
                    "veritysetup format",
                    [
                        veritysetup,
                        "format",
                        "--salt",
                        "00" * 32,
                        "--uuid",
                        "00000000-0000-4000-8000-000000000000",
                        str(data),
                        str(work / "vs.hash"),
                    ],
                ),
                ("rampart build", [PYTHON, "-c", BUILD, str(data), str(work / "r.hash")]),
            ):
                seconds, rss, out = timed(argv)
                if name == "rampart build":
                    root = json.loads(out)["root_hash"]
                best = results.setdefault(name, {"seconds": seconds, "rss_mib": rss})
                best["seconds"] = min(best["seconds"], seconds)
                best["rss_mib"] = max(best["rss_mib"], rss)
                print(
                    f"bench: round {run + 1}: {name} {seconds:.3f} s, {rss:.1f} MiB",
                    file=sys.stderr,
                )
            if (work / "vs.hash").read_bytes() != (work / "r.hash").read_bytes():
                print("bench: the two hash trees differ", file=sys.stderr)
                return 1
            meta = work / "meta.json"
            meta.write_text(
                json.dumps(
                    {
                        "version": "1.0.0",
                        "root_hash": root,
                        "salt": "00" * 32,
                        "uuid": "00000000-0000-4000-8000-000000000000",
                        "hash_algorithm": "sha256",
                        "data_block_size": 4096,
                        "hash_block_size": 4096,
                        "data_blocks": args.size_mib * 256,
                        "data_size": args.size_mib << 20,
                        "hash_offset": 0,
                        "bundle_size": 0,
                        "bundle_sha256": "",
                    }
                )
            )
            verify_py = (
                "import sys; from pathlib import Path; "
                "from rampart.contracts import coremeta, verity; "
                "m = coremeta.load(Path(sys.argv[3])); "
                "verity.verify(Path(sys.argv[1]), m.verity, Path(sys.argv[2]))"
            )
            for name, argv in (
                (
                    "veritysetup verify",
                    [veritysetup, "verify", str(data), str(work / "vs.hash"), root],
                ),
                (
                    "rampart verify",
                    [PYTHON, "-c", verify_py, str(data), str(work / "r.hash"), str(meta)],
                ),
            ):
                seconds, rss, _ = timed(argv)
                best = results.setdefault(name, {"seconds": seconds, "rss_mib": rss})
                best["seconds"] = min(best["seconds"], seconds)
                best["rss_mib"] = max(best["rss_mib"], rss)
                print(
                    f"bench: round {run + 1}: {name} {seconds:.3f} s, {rss:.1f} MiB",
                    file=sys.stderr,
                )
        build_ratio = results["rampart build"]["seconds"] / results["veritysetup format"]["seconds"]
        verify_ratio = (
            results["rampart verify"]["seconds"] / results["veritysetup verify"]["seconds"]
        )
        rss = max(results["rampart build"]["rss_mib"], results["rampart verify"]["rss_mib"])
        met = build_ratio <= RATIO_TARGET and verify_ratio <= RATIO_TARGET and rss < 64
        hashes = hash_info(PYTHON)
        if args.json:
            json.dump(
                {
                    "size_mib": args.size_mib,
                    "results": results,
                    "build_ratio": build_ratio,
                    "verify_ratio": verify_ratio,
                    "rampart_peak_rss_mib": rss,
                    "targets_met": met,
                    "hashes": hashes,
                },
                sys.stdout,
                indent=2,
            )
            print()
            return 0
        print(f"dm-verity, {args.size_mib} MiB of data, best of {args.runs} (same run)")
        print(hash_header(hashes))
        print(f"{'operation':<20} {'seconds':>8} {'peak RSS MiB':>13}")
        for name, row in results.items():
            print(f"{name:<20} {row['seconds']:>8.3f} {row['rss_mib']:>13.1f}")
        print(
            f"build: rampart/veritysetup {build_ratio:.2f} (target <= {RATIO_TARGET}); verify: "
            f"{verify_ratio:.2f} (target <= {RATIO_TARGET}); rampart peak RSS {rss:.1f} MiB "
            f"(target < 64): {'targets MET' if met else 'targets NOT MET'}"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

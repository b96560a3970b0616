"""Update a device from a large Core over HTTPS: rampart, standard tools and RAUC, in one run.

    .venv/bin/python bench/update.py [--size-mib 1024] [--runs 3] [--json] [--skip-rauc]

Run it as root: the update client forks its fetch process as the `rampart-fetch`
user (`make setup` creates it), nginx serves a root-only work directory and RAUC
mounts its bundle on a loop device. Debian packages: nginx, openssl, curl,
minisign, dbus, and for RAUC rauc, rauc-service and squashfs-tools.

Set-up, in a work directory under /var/tmp (removed at the end):
- a webroot with releases 1.0.0 and 1.0.1 (a Core built by `rampart build core` from
  SIZE MiB of random data, and an unsigned UKI from `rampart build efiboot` with a 20
  MiB initrd, each) published with an unencrypted vendor key, served by nginx
  over HTTPS on 127.0.0.1 with a throwaway CA, as scripts/demo.sh does;
- a device running 1.0.0 on the file slot backend (`[core] backend = "file"`);
- for RAUC: a bundle of the same Core 1.0.1 image (one raw `[image.rootfs]`,
  signed by a certificate of the same throwaway CA), a system.conf with two raw
  file slots and `bootloader=noop`, a private D-Bus system bus (dbus-daemon with
  its own configuration and socket) and `rauc service --override-boot-slot=A` on it.

Measured, `--runs` times each, rounds interleaving the four methods:
1. rampart: the whole `rampart update` (exit code 20). Before each run the device
   is reset (update-ready marker, download directory, new LV and boot entry
   removed), so each run downloads, verifies and writes everything.
2. standard tools, on the same files from the same server: `curl` for the four
   files, `minisign -V` for both payloads, `dd conv=fsync,notrunc` of the Core
   into a slot file created (sparse, like the file backend's new LV) before the
   run, `cp` and `sync` of the efiboot. The time is the sum of the commands' wall
   times.
3. RAUC: `rauc install BUNDLE` through the service into the inactive raw slot
   (re-created sparse before each run). RAUC installs from a local bundle: its
   time includes no download.
Before each measured command this script calls sync(2), so that no method pays
for another's dirty pages; the served files (and the bundle, for RAUC) are read
before each method, so every method reads them from the page cache (a host may
reclaim cached pages between runs). After each method its downloads and new slot
are removed (rampart removes its downloads itself), so that no method starts with
another's files holding the page cache: on a virtual machine whose free memory goes
back to the host, pages that were freed long ago are slow to get again (1 GiB
written into the page cache: 0.2 s with pages freed just before, 2.3 s without).

Peak RSS: VmHWM from /proc/PID/status, polled every 10 ms for the measured
process and each of its descendants (rampart's fetch process is forked, so its
VmHWM counts the pages it shares with its parent), and ru_maxrss from os.wait4,
which on Linux covers the process and the children it reaped, and is at least
this script's own RSS (the memory of the spawning process when the child called
exec). RAUC's work runs in `rauc service`: its VmHWM is reset before each install
(clear_refs) and read after it, and its RssAnon polled during it (RAUC maps the
whole bundle to check its signature, so VmHWM counts the bundle's cached pages).

Also, the limit (issue 17): `curl` writing the efiboot into the ESP and Core into a
fresh sparse slot file, then `sync FILE` (fsync) of each: one network read and one
disk write of the same bytes, nothing verified. While rampart runs, the files of its
download directories are polled (allocated blocks) every 10 ms.

Targets: rampart update <= 1.15x the limit and <= 1.5x the standard tools, faster
than RAUC install, no room taken by Core in the download directory (its peak stays
under half the Core's size), and a peak RSS under 100 MiB (the rampart process and
its fetch processes). The
exit code is 0 whether or not they are met (this is a benchmark, not a test) and
1 if any command fails or the set-up is impossible.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common import build_release, hash_header, hash_info, positive_int, terminate_as_interrupt
from rampart.testbed import services

OS_NAME = "clipos"
OLD, NEW = "1.0.0", "1.0.1"
CHUNK = 1 << 20
LV_MARGIN_MIB = 16  # the Core LV is this much larger than the image
RATIO_TARGET = 1.5  # against the standard tools (issue 16)
LIMIT_TARGET = 1.15  # against curl writing the same bytes + fsync (issue 17)
RSS_TARGET_MIB = 100.0
POLL_SECONDS = 0.01
START_TIMEOUT = 15.0
FETCH_USER = "rampart-fetch"
RAUC_COMPATIBLE = "rampart-bench"
DEFAULT_PARENT = Path("/var/tmp")
EXPECTED_UPDATE_CODE = 20  # rampart update: updated, reboot to use it


class BenchError(Exception):
    """A command failed or the set-up is impossible: exit code 1."""


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _mib(kib: int) -> float:
    return kib / 1024


def _own_peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- running and watching a child ----------------------------------------------------


def _status_fields(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Name", "VmHWM", "RssAnon"):
            found[key] = value.strip()
    return found


def _kib(fields: dict[str, str], key: str) -> int | None:
    value = fields.get(key)
    return int(value.split()[0]) if value else None


def vm_hwm_kib(pid: int) -> int | None:
    """The peak RSS of a live process (None once it is gone or a zombie)."""
    return _kib(_status_fields(pid), "VmHWM")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        with suppress(OSError, ValueError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


class Watcher(threading.Thread):
    """Polls the VmHWM of a process and of its descendants until stopped.

    Also keeps the highest RssAnon seen for the process itself: its anonymous
    memory, without the file pages it maps.
    """

    def __init__(self, pid: int, start: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.start_time = start
        self.stopping = threading.Event()
        self.own_kib: int | None = None
        self.own_anon_kib: int | None = None
        self.child_kib: dict[int, int] = {}
        self.child_names: dict[int, str] = {}
        self.child_spans: dict[int, tuple[float, float]] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            self.poll()
            self.stopping.wait(POLL_SECONDS)

    def poll(self) -> None:
        now = time.perf_counter() - self.start_time
        own = _status_fields(self.pid)
        kib, anon = _kib(own, "VmHWM"), _kib(own, "RssAnon")
        if kib is not None:
            self.own_kib = max(self.own_kib or 0, kib)
        if anon is not None:
            self.own_anon_kib = max(self.own_anon_kib or 0, anon)
        pending = _children(self.pid)
        while pending:
            pid = pending.pop()
            pending += _children(pid)
            fields = _status_fields(pid)
            kib = _kib(fields, "VmHWM")
            if kib is None:
                continue
            self.child_kib[pid] = max(self.child_kib.get(pid, 0), kib)
            self.child_names.setdefault(pid, fields.get("Name", "?"))
            first = self.child_spans.get(pid, (now, now))[0]
            self.child_spans[pid] = (first, now)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.poll()  # the process is a zombie now: only its live descendants remain


class SpaceWatcher(threading.Thread):
    """The most bytes (allocated blocks) the files of `directories` held at once,
    polled every POLL_SECONDS."""

    def __init__(self, directories: list[Path]) -> None:
        super().__init__(daemon=True)
        self.directories = directories
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(POLL_SECONDS):
            used = 0
            for directory in self.directories:
                with suppress(OSError):
                    for entry in os.scandir(directory):
                        with suppress(OSError):
                            used += entry.stat(follow_symlinks=False).st_blocks * 512
            self.peak = max(self.peak, used)

    def stop(self) -> None:
        self.done.set()
        self.join()


@dataclass
class Run:
    """One measured command."""

    seconds: float
    code: int
    maxrss_kib: int  # os.wait4: the process and the children it reaped
    floor_kib: int  # this script's own peak RSS when the child was reaped
    own_hwm_kib: int | None  # polled VmHWM of the process itself
    child_hwm_kib: dict[int, int]  # polled VmHWM of each descendant
    child_names: dict[int, str]
    child_spans: dict[int, tuple[float, float]]  # first and last time each was seen
    lines: list[tuple[float, str]]  # stderr lines, with when they arrived
    stdout: str

    @property
    def peak_kib(self) -> int:
        """The best known peak RSS of the process and its descendants."""
        known = [k for k in [self.own_hwm_kib, *self.child_hwm_kib.values()] if k]
        if self.maxrss_kib > self.floor_kib or not known:
            known.append(self.maxrss_kib)
        return max(known)

    @property
    def peak_is_bound(self) -> bool:
        """True if only wait4's figure is known and it may be this script's RSS."""
        return not self.own_hwm_kib and self.maxrss_kib <= self.floor_kib

    def last_error(self) -> str:
        for _, line in reversed(self.lines):
            if line.strip():
                return line.strip()
        return "no error output"


def _read_lines(stream: IO[bytes], start: float, lines: list[tuple[float, str]]) -> None:
    for raw in stream:
        if len(lines) < 10_000:
            lines.append((time.perf_counter() - start, raw.decode(errors="replace").rstrip()))


def run_measured(
    argv: Sequence[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    ok: Sequence[int] = (0,),
) -> Run:
    """Run `argv`, timing it and watching its memory; BenchError if its exit code is not in `ok`."""
    out_path = workdir / "child.stdout"
    lines: list[tuple[float, str]] = []
    with out_path.open("wb") as out:
        start = time.perf_counter()
        try:
            # Its own process group, so that an interrupted run can kill it and what it forked.
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"{argv[0]}: cannot start: {exc.strerror}") from None
        assert proc.stderr is not None
        reader = threading.Thread(target=_read_lines, args=(proc.stderr, start, lines))
        reader.start()
        watcher = Watcher(proc.pid, start)
        watcher.start()
        try:
            # Wait without reaping, so that the watcher never reads a recycled pid.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except BaseException:  # interrupted: end the command before the clean-up
            watcher.stop()
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(timeout=5)
            raise
        elapsed = time.perf_counter() - start
        watcher.stop()
        _, status, usage = os.wait4(proc.pid, 0)
        reader.join(timeout=10)
        proc.stderr.close()
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    run = Run(
        seconds=elapsed,
        code=code,
        maxrss_kib=usage.ru_maxrss,
        floor_kib=_own_peak_kib(),
        own_hwm_kib=watcher.own_kib,
        child_hwm_kib=watcher.child_kib,
        child_names=watcher.child_names,
        child_spans=watcher.child_spans,
        lines=lines,
        stdout=out_path.read_text(errors="replace"),
    )
    if code not in ok:
        raise BenchError(f"{' '.join(argv)} failed with exit code {code}: {run.last_error()}")
    return run


def run_quiet(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run a set-up command; return its stdout (or stderr if stdout is empty)."""
    try:
        done = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, check=False, env=env
        )
    except OSError as exc:
        raise BenchError(f"{argv[0]}: cannot start: {exc.strerror}") from None
    if done.returncode != 0:
        text = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        last = text[-1] if text else "no error output"
        raise BenchError(f"{' '.join(argv)} failed with exit code {done.returncode}: {last}")
    return (done.stdout or done.stderr).decode(errors="replace").strip()


def first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text else ""


# --- files ---------------------------------------------------------------------------


def warm_up(*paths: Path) -> None:
    """Read files once so that every measured run reads them from the page cache."""
    buffer = bytearray(CHUNK)
    for path in paths:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def make_sparse(path: Path, size: int) -> None:
    """A fresh sparse file of `size` bytes, as the file slot backend creates a new LV."""
    path.unlink(missing_ok=True)
    with path.open("xb") as handle:
        handle.truncate(size)


def reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def same_prefix(cmp: str, image: Path, slot: Path) -> None:
    """BenchError unless `slot` starts with the bytes of `image`."""
    size = image.stat().st_size
    done = subprocess.run(
        [cmp, "-s", "-n", str(size), str(image), str(slot)], stdin=subprocess.DEVNULL, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{slot}: does not start with the Core image {image}")


# --- results -------------------------------------------------------------------------


@dataclass
class Measurement:
    runs: list[Run] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [r.seconds for r in self.runs]

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)


@dataclass
class BaselineRun:
    steps: list[tuple[str, Run]]

    @property
    def seconds(self) -> float:
        return sum(run.seconds for _, run in self.steps)


LIMIT_GROUPS = {
    "curl": "curl x2 (efiboot into the ESP, Core into the slot file)",
    "sync": "sync FILE x2 (fsync)",
}

BASELINE_GROUPS = {
    "curl": "curl x4 (efiboot, .sig, core, .sig)",
    "minisign": "minisign -V x2 (efiboot, core)",
    "dd": "dd bs=4M conv=fsync,notrunc (Core into the slot)",
    "cp": "cp efiboot to the ESP + sync FILE",
}


def _r(value: float, digits: int = 3) -> float:
    return round(value, digits)


def rampart_phases(run: Run) -> list[tuple[str, float]]:
    """Where the time of one `rampart update` went, from its log lines and fetch processes."""

    def at(*prefixes: str) -> float | None:
        for when, line in run.lines:
            text = line.removeprefix("rampart: ")
            if text.startswith(prefixes):
                return when
        return None

    checked = at("update available")
    downloading = at("downloading ")
    slot = at("created ", "renamed ")
    entry = at("installed boot entry")
    spans = sorted(run.child_spans.values(), key=lambda s: s[1] - s[0])
    fetched = spans[-1][1] if spans else None
    if checked is None or downloading is None or slot is None or entry is None:
        return []  # not the log lines this script knows
    phases = [("start-up, configuration, version check", checked)]
    if any(", streamed from the server" in line for _, line in run.lines):
        return [
            *phases,
            ("download + verify efiboot, Core's tree checked, create the LV", slot - checked),
            ("stream Core: verify, write, fsync, read back; install entry", entry - slot),
            ("ready marker, downloads removed, report to the server, exit", run.seconds - entry),
        ]
    if fetched is not None and downloading <= fetched <= slot:
        phases += [
            ("download: 4 files (fetch process, last seen)", fetched - checked),
            ("verify both payloads, create the LV", slot - fetched),
        ]
    else:
        phases.append(("download and verify both payloads, create the LV", slot - checked))
    phases += [
        ("write Core + fsync + verify + read back, install entry", entry - slot),
        ("ready marker, downloads removed, report to the server, exit", run.seconds - entry),
    ]
    return phases


@dataclass
class Report:
    size_mib: int
    efiboot_mib: int
    runs: int
    versions: dict[str, str]
    rampart: Measurement
    baseline: list[BaselineRun]
    limit: list[BaselineRun]  # curl writing the payloads + fsync: the physical limit
    download_peak_bytes: int  # the most the download directories held during rampart runs
    rauc: Measurement | None
    rauc_service_peak_kib: list[int]
    rauc_service_anon_kib: list[int]
    rauc_bundle_format: str
    notes: list[str]
    hashes: dict[str, Any]  # common.hash_info: the BLAKE2b used, speeds, CPU flags

    @property
    def rampart_best(self) -> float:
        return self.rampart.best.seconds

    @property
    def baseline_best(self) -> BaselineRun:
        return min(self.baseline, key=lambda b: b.seconds)

    @property
    def rampart_peak_kib(self) -> int:
        return max(r.peak_kib for r in self.rampart.runs)

    @property
    def rampart_process_kib(self) -> int:
        return max(r.own_hwm_kib or 0 for r in self.rampart.runs)

    @property
    def rampart_fetch_kib(self) -> int:
        return max(max(r.child_hwm_kib.values(), default=0) for r in self.rampart.runs)

    @property
    def rampart_wait4_kib(self) -> int:
        return max(r.maxrss_kib for r in self.rampart.runs)

    @property
    def limit_best(self) -> BaselineRun:
        return min(self.limit, key=lambda b: b.seconds)

    def baseline_steps(self, best: BaselineRun | None = None) -> dict[str, float]:
        """Each group of commands of a baseline: its time in the best run."""
        found: dict[str, float] = {}
        for label, run in (best or self.baseline_best).steps:
            found[label] = found.get(label, 0.0) + run.seconds
        return found

    def baseline_peak(self) -> tuple[int, bool]:
        runs = [run for b in self.baseline for _, run in b.steps]
        top = max(runs, key=lambda r: r.peak_kib)
        return top.peak_kib, all(r.peak_is_bound for r in runs)

    def ratios(self) -> dict[str, float | None]:
        rauc = self.rauc.best.seconds if self.rauc else None
        return {
            "rampart_limit": _r(self.rampart_best / self.limit_best.seconds),
            "rampart_baseline": _r(self.rampart_best / self.baseline_best.seconds),
            "rampart_rauc": None if rauc is None else _r(self.rampart_best / rauc),
        }

    def targets(self) -> dict[str, float | bool | None]:
        ratios = self.ratios()
        rauc_ratio = ratios["rampart_rauc"]
        found: dict[str, float | bool | None] = {
            "limit_ratio_max": LIMIT_TARGET,
            "baseline_ratio_max": RATIO_TARGET,
            "rampart_rss_max_mib": RSS_TARGET_MIB,
            "limit_ratio_met": (ratios["rampart_limit"] or 0) <= LIMIT_TARGET,
            "baseline_ratio_met": (ratios["rampart_baseline"] or 0) <= RATIO_TARGET,
            "no_download_space_met": self.download_peak_bytes < (self.size_mib << 20) // 2,
            "faster_than_rauc_met": None if rauc_ratio is None else rauc_ratio < 1.0,
            "rampart_rss_met": _mib(self.rampart_peak_kib) < RSS_TARGET_MIB,
        }
        found["met"] = all(v is not False for k, v in found.items() if k.endswith("_met"))
        return found

    def to_json(self) -> dict[str, Any]:
        rampart = self.rampart.best
        peak, bound = self.baseline_peak()
        data: dict[str, Any] = {
            "size_mib": self.size_mib,
            "efiboot_mib": self.efiboot_mib,
            "runs": self.runs,
            "versions": self.versions,
            "rampart": {
                "seconds": _r(rampart.seconds),
                "runs_seconds": [_r(s) for s in self.rampart.seconds],
                "peak_rss_mib": _r(_mib(self.rampart_peak_kib), 1),
                "process_vmhwm_mib": _r(_mib(self.rampart_process_kib), 1),
                "fetch_process_vmhwm_mib": _r(_mib(self.rampart_fetch_kib), 1),
                "wait4_maxrss_mib": _r(_mib(self.rampart_wait4_kib), 1),
                "phases_seconds": {k: _r(v) for k, v in rampart_phases(rampart)},
            },
            "baseline": {
                "seconds": _r(self.baseline_best.seconds),
                "runs_seconds": [_r(b.seconds) for b in self.baseline],
                "steps_seconds": {
                    BASELINE_GROUPS[k]: _r(v) for k, v in self.baseline_steps().items()
                },
                "peak_rss_mib": _r(_mib(peak), 1),
                "peak_rss_is_upper_bound": bound,
            },
            "limit": {
                "seconds": _r(self.limit_best.seconds),
                "runs_seconds": [_r(b.seconds) for b in self.limit],
                "steps_seconds": {
                    LIMIT_GROUPS[k]: _r(v) for k, v in self.baseline_steps(self.limit_best).items()
                },
            },
            "download_dir_peak_mib": _r(self.download_peak_bytes / (1 << 20), 1),
            "rauc": None,
            "ratios": self.ratios(),
            "targets": self.targets(),
            "bench_own_peak_rss_mib": _r(_mib(_own_peak_kib()), 1),
            "notes": self.notes,
            "hashes": self.hashes,
        }
        if self.rauc is not None:
            data["rauc"] = {
                "seconds": _r(self.rauc.best.seconds),
                "runs_seconds": [_r(s) for s in self.rauc.seconds],
                "source": "local bundle (no download)",
                "bundle_format": self.rauc_bundle_format,
                "service_peak_rss_mib": _r(_mib(max(self.rauc_service_peak_kib, default=0)), 1),
                "service_peak_anonymous_rss_mib": _r(
                    _mib(max(self.rauc_service_anon_kib, default=0)), 1
                ),
            }
        return data


def print_table(report: Report) -> None:
    v = report.versions
    print(
        f"Update of a {report.size_mib} MiB Core + {report.efiboot_mib} MiB efiboot, "
        f"HTTPS on loopback ({v['nginx']}), best of {report.runs} runs"
    )
    print(
        f"{v['rampart']} (Python {v['python']}), {v['curl']}, {v['minisign']}, "
        f"{v.get('rauc', 'RAUC skipped')}"
    )
    print(hash_header(report.hashes))
    print()

    def rss(kib: int, bound: bool = False) -> str:
        return f"{'<=' if bound else ''}{_mib(kib):.1f}"

    peak, bound = report.baseline_peak()
    rows: list[tuple[str, str, str, str]] = [
        ("method", "best s", "runs s", "peak RSS MiB"),
        (
            "rampart update (download, verify, write)",
            f"{report.rampart_best:.3f}",
            " ".join(f"{s:.2f}" for s in report.rampart.seconds),
            f"{rss(report.rampart_process_kib)} process, "
            f"{rss(report.rampart_fetch_kib)} fetch process",
        ),
        (
            "the limit: curl writing the payloads + fsync",
            f"{report.limit_best.seconds:.3f}",
            " ".join(f"{b.seconds:.2f}" for b in report.limit),
            "",
        ),
    ]
    for key, seconds in report.baseline_steps(report.limit_best).items():
        rows.append((f"  {LIMIT_GROUPS[key]}", f"{seconds:.3f}", "", ""))
    rows += [
        (
            "standard tools (sum of the commands)",
            f"{report.baseline_best.seconds:.3f}",
            " ".join(f"{b.seconds:.2f}" for b in report.baseline),
            f"{rss(peak, bound)} (largest command)",
        ),
    ]
    for key, seconds in report.baseline_steps().items():
        rows.append((f"  {BASELINE_GROUPS[key]}", f"{seconds:.3f}", "", ""))
    if report.rauc is not None:
        rows.append(
            (
                f"RAUC install (local {report.rauc_bundle_format} bundle, no download)",
                f"{report.rauc.best.seconds:.3f}",
                " ".join(f"{s:.2f}" for s in report.rauc.seconds),
                f"{rss(max(report.rauc_service_peak_kib, default=0))} rauc service "
                f"({rss(max(report.rauc_service_anon_kib, default=0))} anonymous)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2])]
        print("  ".join([*cells, row[3]]).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))
    phases = rampart_phases(report.rampart.best)
    if phases:
        print()
        print("rampart update, best run, by phase (from its log lines; fetch process polled):")
        width = max(len(name) for name, _ in phases)
        for name, seconds in phases:
            print(f"  {name.ljust(width)}  {seconds:7.3f} s")
    print()
    print(
        "peak RSS: VmHWM polled every 10 ms in /proc/PID/status (the process, its descendants);\n"
        f"  os.wait4 ru_maxrss of rampart update: {_mib(report.rampart_wait4_kib):.1f} MiB "
        "(the process and the fetch processes it reaped)"
    )
    for note in report.notes:
        print(f"note: {note}")
    print()
    ratios, targets = report.ratios(), report.targets()

    def word(key: str) -> str:
        value = targets[key]
        return "skipped" if value is None else "met" if value else "NOT met"

    rauc_ratio = ratios["rampart_rauc"]
    rauc_part = (
        "rampart/RAUC: skipped"
        if rauc_ratio is None
        else f"rampart/RAUC {rauc_ratio:.2f} (target < 1: {word('faster_than_rauc_met')})"
    )
    print(
        f"download directory: at most {report.download_peak_bytes / (1 << 20):.1f} MiB during "
        f"rampart's runs ({word('no_download_space_met')}: Core takes no room there)"
    )
    print(
        f"rampart/limit {ratios['rampart_limit']:.2f} (target <= {LIMIT_TARGET}: "
        f"{word('limit_ratio_met')}); "
        f"rampart/standard tools {ratios['rampart_baseline']:.2f} "
        f"(target <= {RATIO_TARGET}: {word('baseline_ratio_met')}); {rauc_part}; "
        f"rampart peak RSS {_mib(report.rampart_peak_kib):.1f} MiB "
        f"(target < {RSS_TARGET_MIB:.0f}: {word('rampart_rss_met')})"
    )
    print(f"targets {'MET' if targets['met'] else 'NOT MET'}")


# --- the benchmark -------------------------------------------------------------------


@dataclass
class Tools:
    rampart: str
    nginx: str
    openssl: str
    curl: str
    minisign: str
    dd: str
    cp: str
    sync: str
    cmp: str
    rauc: str | None
    dbus_daemon: str | None


def _which(name: str, hint: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise BenchError(f"{name} not found: {hint}")
    return found


def find_tools(skip_rauc: bool) -> Tools:
    beside = Path(sys.executable).parent / "rampart"
    rampart = str(beside) if beside.exists() else shutil.which("rampart")
    if rampart is None:
        raise BenchError("rampart not found: run with .venv/bin/python")
    setup = "run `make setup`"
    rauc_hint = "apt-get install rauc rauc-service squashfs-tools (or pass --skip-rauc)"
    tools = Tools(
        rampart=rampart,
        nginx=_which("nginx", setup),
        openssl=_which("openssl", setup),
        curl=_which("curl", "apt-get install curl"),
        minisign=_which("minisign", setup),
        dd=_which("dd", "coreutils"),
        cp=_which("cp", "coreutils"),
        sync=_which("sync", "coreutils"),
        cmp=_which("cmp", "diffutils"),
        rauc=None if skip_rauc else _which("rauc", rauc_hint),
        dbus_daemon=None if skip_rauc else _which("dbus-daemon", "apt-get install dbus"),
    )
    if not skip_rauc:
        _which("mksquashfs", rauc_hint)
        if not Path("/dev/loop-control").exists():
            raise BenchError("/dev/loop-control missing: RAUC cannot mount its bundle")
    return tools


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, running: ExitStack) -> None:
        self.args = args
        self.work = workdir
        self.running = running  # the services started, stopped in reverse order at its end
        self.lv_size = (args.size_mib + LV_MARGIN_MIB) * CHUNK
        self.tools = find_tools(args.skip_rauc)
        self.pki = workdir / "pki"
        self.webroot = workdir / "webroot"
        self.dev = workdir / "device"
        self.base = workdir / "baseline"
        self.rauc_dir = workdir / "rauc"
        self.port = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
        self.rauc_env: dict[str, str] = {}
        self.rauc_service_pid = 0
        self.rauc_bundle_format = ""
        self.download_peak = 0  # SpaceWatcher: the download directories during rampart's runs

    # set-up

    def make_pki(self) -> None:
        """A throwaway CA; from it a server certificate and a RAUC signing certificate."""
        valid = services.validity(365)
        ca = services.make_ca(self.pki, "ca", common_name="Rampart bench CA", valid=valid)
        self.server_cert = services.make_cert(
            self.pki, "server", ca, ["localhost", "127.0.0.1"], valid=valid
        )
        services.make_cert(
            self.pki,
            "signer",
            ca,
            usage="signer",
            common_name="Rampart bench RAUC signer",
            valid=valid,
        )

    def publish(self) -> None:
        t = self.tools
        key, pub = self.work / "vendor.key", self.work / "vendor.pub"
        run_quiet(
            [t.rampart, "keygen", "--unencrypted", "--secret-key", str(key), "--public-key",
             str(pub)], env=self.env,
        )  # fmt: skip
        payloads = self.work / "payloads"
        payloads.mkdir()
        for version in (OLD, NEW):
            _log(f"building Core {version} ({self.args.size_mib} MiB of random data) and its UKI")
            core, efiboot = build_release(
                t.rampart, payloads, OS_NAME, version, self.args.size_mib, self.args.efiboot_mib
            )
            _log(f"publishing {OS_NAME} {version}")
            run_quiet(
                [t.rampart, "publish", "--webroot", str(self.webroot), "--os", OS_NAME,
                 "--version", version, "--core", str(core), "--efiboot", str(efiboot),
                 "--secret-key", str(key), "--no-chunks"], env=self.env,
            )  # fmt: skip
            core.unlink()  # the webroot has its copy; keep the disk footprint down
            efiboot.unlink()
        shutil.rmtree(payloads)

    def dist(self, version: str, kind: str) -> Path:
        return self.webroot / "dist" / version / f"{OS_NAME}-{kind}"

    def start_nginx(self) -> None:
        nginx = services.Nginx.static(
            self.work / "nginx", self.webroot, self.server_cert, timeout=START_TIMEOUT
        )
        self.running.enter_context(nginx)
        self.port = nginx.port
        _log(f"nginx serves the webroot on {nginx.url}/")

    def make_device(self) -> None:
        dev = self.dev
        for sub in ("config", "remote", "mainvg", "esp/EFI/Linux"):
            (dev / sub).mkdir(parents=True)
        shutil.copyfile(self.work / "vendor.pub", dev / "config" / "pubkey")
        lv_mib = self.args.size_mib + LV_MARGIN_MIB
        (dev / "config" / "config.toml").write_text(
            f"""os_name = "{OS_NAME}"

[core]
backend = "file"
destination = "{dev / "mainvg"}"
size = "{lv_mib}M"
capacity = "{2 * lv_mib + 16}M"

[efiboot]
destination = "{dev / "esp/EFI/Linux"}"
boot_tries = 3

[identity]
dir = "{dev / "identity"}"
"""
        )
        (dev / "remote" / "remote.toml").write_text(
            f'update_url = "https://localhost:{self.port}/update/v1"\n'
            f'dist_url = "https://localhost:{self.port}/dist"\n'
        )
        shutil.copyfile(self.pki / "ca.pem", dev / "remote" / "rootca.pem")
        (dev / "os-release").write_text(f'NAME="CLIP OS"\nID={OS_NAME}\nVERSION_ID={OLD}\n')
        (dev / "machine-id").write_text(os.urandom(16).hex() + "\n")
        # What the installer would have written: the running Core's LV (its content
        # is not read by an update: left sparse), the state LV and the boot entry.
        make_sparse(dev / "mainvg" / f"core_{OLD}", self.lv_size)
        make_sparse(dev / "mainvg" / "core_state", CHUNK)
        shutil.copyfile(self.dist(OLD, "efiboot"), dev / "esp/EFI/Linux" / f"{OS_NAME}-{OLD}.efi")

    def make_rauc(self) -> None:
        """A bundle of Core 1.0.1, raw file slots, a private system bus, `rauc service`."""
        assert self.tools.rauc is not None and self.tools.dbus_daemon is not None
        r = self.rauc_dir
        content = r / "content"
        (r / "mnt").mkdir(parents=True)
        content.mkdir()
        os.link(self.dist(NEW, "core"), content / "core.img")  # the same bytes, no copy
        (content / "manifest.raucm").write_text(
            f"[update]\ncompatible={RAUC_COMPATIBLE}\nversion={NEW}\n\n"
            "[image.rootfs]\nfilename=core.img\n"
        )
        _log(f"building the RAUC bundle ({self.args.size_mib} MiB Core image, mksquashfs)")
        bundle = r / "bundle.raucb"
        out = run_quiet(
            [self.tools.rauc, "bundle", f"--cert={self.pki / 'signer.pem'}",
             f"--key={self.pki / 'signer.key'}", f"--keyring={self.pki / 'ca.pem'}",
             str(content), str(bundle)], env=self.env,
        )  # fmt: skip
        self.rauc_bundle_format = "plain" if "'plain' format" in out else "default-format"
        (content / "core.img").unlink()
        make_sparse(r / "slotA", self.lv_size)  # the running slot: never written
        make_sparse(r / "slotB", self.lv_size)
        (r / "system.conf").write_text(
            f"""[system]
compatible={RAUC_COMPATIBLE}
bootloader=noop
mountprefix={r / "mnt"}
statusfile={r / "status.raucs"}

[keyring]
path={self.pki / "ca.pem"}

[slot.rootfs.0]
device={r / "slotA"}
type=raw
bootname=A

[slot.rootfs.1]
device={r / "slotB"}
type=raw
bootname=B
"""
        )
        self.start_bus()
        status_argv = [self.tools.rauc, "status", f"--conf={r / 'system.conf'}"]

        def ready() -> bool:
            done = subprocess.run(status_argv, env=self.rauc_env, capture_output=True, check=False)
            return done.returncode == 0

        service = services.Service(
            "rauc service",
            [self.tools.rauc, "service", f"--conf={r / 'system.conf'}", "--override-boot-slot=A"],
            r / "service.log",
            env=self.rauc_env,
            ready=ready,
            timeout=START_TIMEOUT,
        )
        self.running.enter_context(service)
        self.rauc_service_pid = service.pid
        status = run_quiet(status_argv, env=self.rauc_env)
        if "rootfs.0" not in status or "Booted from: rootfs.0" not in status:
            raise BenchError(f"rauc status: unexpected booted slot:\n{status}")

    def start_bus(self) -> None:
        """A private D-Bus system bus: our own policy and socket, not the host's bus."""
        assert self.tools.dbus_daemon is not None
        r = self.rauc_dir
        conf = r / "bus.conf"
        conf.write_text(
            f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={r / "bus.sock"}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"/>
    <allow send_destination="de.pengutronix.rauc"/>
  </policy>
  <policy user="root">
    <allow own="de.pengutronix.rauc"/>
  </policy>
</busconfig>
"""
        )
        bus = r / "bus.sock"

        def ready() -> bool:
            with suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(bus))
                return True
            return False

        daemon = services.Service(
            "dbus-daemon",
            [self.tools.dbus_daemon, f"--config-file={conf}", "--nofork", "--nopidfile"],
            r / "bus.log",
            env=self.env,
            ready=ready,
            timeout=START_TIMEOUT,
        )
        self.running.enter_context(daemon)
        self.rauc_env = {**self.env, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}

    # one measured run of each method

    def run_rampart(self) -> Run:
        dev = self.dev
        (dev / "run" / "update-ready").unlink(missing_ok=True)
        shutil.rmtree(dev / "download", ignore_errors=True)
        (dev / "mainvg" / f"core_{NEW}").unlink(missing_ok=True)
        for entry in (dev / "esp/EFI/Linux").glob(f"{OS_NAME}-{NEW}*"):
            entry.unlink()
        os.sync()
        argv = [
            self.tools.rampart, "update", "-c", str(dev / "config"), "-r", str(dev / "remote"),
            "-t", str(dev / "download"), "--os-release", str(dev / "os-release"),
            "--machine-id", str(dev / "machine-id"), "--run-dir", str(dev / "run"),
        ]  # fmt: skip
        watcher = SpaceWatcher([dev / "download", dev / "download.verified"])
        watcher.start()
        try:
            run = run_measured(argv, self.work, env=self.env, ok=(EXPECTED_UPDATE_CODE,))
        finally:
            watcher.stop()
        self.download_peak = max(self.download_peak, watcher.peak)
        same_prefix(self.tools.cmp, self.dist(NEW, "core"), dev / "mainvg" / f"core_{NEW}")
        if not list((dev / "esp/EFI/Linux").glob(f"{OS_NAME}-{NEW}*.efi")):
            raise BenchError("rampart update: no boot entry for the new version")
        (dev / "mainvg" / f"core_{NEW}").unlink()  # see run_baseline's end
        return run

    def run_baseline(self) -> BaselineRun:
        t, b = self.tools, self.base
        download, esp = b / "download", b / "esp"
        reset_dir(download)
        reset_dir(esp)
        slot = b / f"core_{NEW}"
        make_sparse(slot, self.lv_size)
        os.sync()
        url = f"https://localhost:{self.port}/dist/{NEW}/{OS_NAME}"
        ca, pub = self.pki / "ca.pem", self.work / "vendor.pub"
        files = {k: download / f"{OS_NAME}-{k}" for k in ("efiboot", "core")}
        entry = esp / f"{OS_NAME}-{NEW}.efi"
        commands: list[tuple[str, list[str]]] = []
        for kind in ("efiboot", "core"):
            for suffix in (".sig", ""):
                commands.append(
                    ("curl", [t.curl, "--cacert", str(ca), "-sSf", "-o",
                              f"{files[kind]}{suffix}", f"{url}-{kind}{suffix}"])
                )  # fmt: skip
        for kind in ("efiboot", "core"):
            commands.append(
                ("minisign", [t.minisign, "-V", "-p", str(pub), "-m", str(files[kind]),
                              "-x", f"{files[kind]}.sig"])
            )  # fmt: skip
        commands += [
            ("dd", [t.dd, f"if={files['core']}", f"of={slot}", "bs=4M", "conv=fsync,notrunc",
                    "status=none"]),
            ("cp", [t.cp, str(files["efiboot"]), str(entry)]),
            ("cp", [t.sync, str(entry)]),
        ]  # fmt: skip
        steps = [(label, run_measured(argv, self.work, env=self.env)) for label, argv in commands]
        same_prefix(t.cmp, self.dist(NEW, "core"), slot)
        # Leave nothing in the page cache for the next method: rampart removes its
        # downloads itself, and files left here would keep 2 GiB of page cache while
        # the next rampart run needs new pages (which this host makes slow to get).
        reset_dir(download)
        slot.unlink()
        return BaselineRun(steps)

    def run_limit(self) -> BaselineRun:
        """curl writing the payloads where they go (Core into a fresh sparse slot file),
        then fsync: one network read and one disk write, nothing verified."""
        t, b = self.tools, self.base
        esp = b / "esp"
        reset_dir(esp)
        slot = b / f"core_{NEW}"
        make_sparse(slot, self.lv_size)
        os.sync()
        url = f"https://localhost:{self.port}/dist/{NEW}/{OS_NAME}"
        ca = self.pki / "ca.pem"
        entry = esp / f"{OS_NAME}-{NEW}.efi"
        commands = [
            ("curl", [t.curl, "--cacert", str(ca), "-sSf", "-o", str(entry), f"{url}-efiboot"]),
            ("curl", [t.curl, "--cacert", str(ca), "-sSf", "-o", str(slot), f"{url}-core"]),
            ("sync", [t.sync, str(entry)]),
            ("sync", [t.sync, str(slot)]),
        ]
        steps = [(label, run_measured(argv, self.work, env=self.env)) for label, argv in commands]
        same_prefix(t.cmp, self.dist(NEW, "core"), slot)
        reset_dir(esp)
        slot.unlink()
        return BaselineRun(steps)

    def run_rauc(self) -> tuple[Run, int, int]:
        """One `rauc install`; with the service's peak RSS and peak anonymous RSS."""
        assert self.tools.rauc is not None
        r = self.rauc_dir
        make_sparse(r / "slotB", self.lv_size)
        with suppress(OSError):  # reset the service's peak RSS (VmHWM)
            Path(f"/proc/{self.rauc_service_pid}/clear_refs").write_text("5")
        os.sync()
        argv = [self.tools.rauc, "install", f"--conf={r / 'system.conf'}", str(r / "bundle.raucb")]
        service = Watcher(self.rauc_service_pid, time.perf_counter())
        service.start()
        try:
            run = run_measured(argv, self.work, env=self.rauc_env)
        finally:
            service.stop()
        service_kib = vm_hwm_kib(self.rauc_service_pid) or 0
        same_prefix(self.tools.cmp, self.dist(NEW, "core"), r / "slotB")
        return run, service_kib, service.own_anon_kib or 0

    # the whole

    def versions(self) -> dict[str, str]:
        t = self.tools
        found = {
            "rampart": run_quiet([t.rampart, "--version"], env=self.env),
            "python": sys.version.split()[0],
            "nginx": first_line(run_quiet([t.nginx, "-v"])).removeprefix("nginx version: "),
            "curl": " ".join(first_line(run_quiet([t.curl, "--version"])).split()[:2]),
            "minisign": first_line(run_quiet([t.minisign, "-v"])),
            "openssl": first_line(run_quiet([t.openssl, "version"])),
        }
        if t.rauc is not None:
            found["rauc"] = first_line(run_quiet([t.rauc, "--version"]))
        return found

    def check_space(self) -> None:
        size = self.args.size_mib + self.args.efiboot_mib
        # webroot (2), payload being published (1), one run (download + slot: 2), bundle (1)
        need = (6 * size + 256) * CHUNK
        free = shutil.disk_usage(self.work).free
        if free < need:
            raise BenchError(f"{self.work}: {free >> 20} MiB free, {need >> 20} MiB needed")

    def run(self) -> Report:
        self.check_space()
        load_before = os.getloadavg()[0]
        versions = self.versions()
        _log(f"work directory {self.work}")
        self.make_pki()
        self.publish()
        self.start_nginx()
        self.make_device()
        self.base.mkdir()
        if not self.args.skip_rauc:
            self.make_rauc()
        _log("warm-up read of the served files and the bundle")
        served = [self.dist(NEW, k) for k in ("efiboot", "efiboot.sig", "core", "core.sig")]
        bundle = [] if self.args.skip_rauc else [self.rauc_dir / "bundle.raucb"]
        warm_up(*served, *bundle)

        rampart, baseline, limit = Measurement(), [], []
        rauc = None if self.args.skip_rauc else Measurement()
        service_kib: list[int] = []
        service_anon_kib: list[int] = []
        runs = self.args.runs
        for number in range(1, runs + 1):
            # Read again before each method: a host may reclaim cached pages between
            # runs (this one's DAMON does), and the method after a re-read would be
            # the only one served from the page cache.
            warm_up(*served)
            run = self.run_rampart()
            rampart.runs.append(run)
            _log(
                f"round {number}/{runs}: rampart update {run.seconds:.3f} s, peak RSS "
                f"{_mib(run.own_hwm_kib or 0):.1f} MiB (fetch process "
                f"{_mib(max(run.child_hwm_kib.values(), default=0)):.1f} MiB)"
            )
            warm_up(*served)
            bound = self.run_limit()
            limit.append(bound)
            _log(f"round {number}/{runs}: curl + fsync {bound.seconds:.3f} s")
            warm_up(*served)
            base = self.run_baseline()
            baseline.append(base)
            _log(f"round {number}/{runs}: standard tools {base.seconds:.3f} s")
            if rauc is not None:
                warm_up(*bundle)
                rauc_run, kib, anon = self.run_rauc()
                rauc.runs.append(rauc_run)
                service_kib.append(kib)
                service_anon_kib.append(anon)
                _log(
                    f"round {number}/{runs}: rauc install {rauc_run.seconds:.3f} s, "
                    f"service peak RSS {_mib(kib):.1f} MiB (anonymous {_mib(anon):.1f} MiB)"
                )
        notes = [
            "rampart and curl download from the same nginx over TLS on 127.0.0.1"
            + ("" if rauc is None else "; RAUC installs from a local bundle (no download)"),
            "rampart's new LV, the standard tools' slot file and RAUC's slot B are fresh "
            "sparse files before each run",
            "rampart also reads the written Core back and checks it against the root hash; "
            "dd reads nothing back",
        ]
        load_after = os.getloadavg()[0]
        notes.append(
            f"1-minute load average {load_before:.2f} before the set-up, {load_after:.2f} after "
            f"the runs ({os.cpu_count()} CPUs; other processes skew the times)"
        )
        if rauc is not None:
            notes.append(
                f"RAUC: {self.rauc_bundle_format} bundle (RAUC 1.8's default), its signature "
                "checked over the whole bundle, then the image copied from the mounted squashfs"
                + ("" if device_mapper_works() else "; 'verity' bundles need device-mapper, absent")
            )
            notes.append(
                "RAUC service RSS: the bundle is mmapped to check its signature, so its "
                "VmHWM counts the bundle's page-cache pages; 'anonymous' is RssAnon"
            )
        return Report(
            size_mib=self.args.size_mib,
            efiboot_mib=self.args.efiboot_mib,
            runs=runs,
            versions=versions,
            rampart=rampart,
            baseline=baseline,
            limit=limit,
            download_peak_bytes=self.download_peak,
            rauc=rauc,
            rauc_service_peak_kib=service_kib,
            rauc_service_anon_kib=service_anon_kib,
            rauc_bundle_format=self.rauc_bundle_format,
            notes=notes,
            hashes=hash_info(sys.executable),
        )


def device_mapper_works() -> bool:
    """True if the kernel has device-mapper (RAUC's 'verity' bundle format needs it)."""
    try:
        fd = os.open("/dev/mapper/control", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def _unmount_under(directory: Path) -> None:
    """Unmount anything left mounted below `directory` (a RAUC bundle, after a crash)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(directory) + "/"
    for line in reversed(mounts):
        fields = line.split()
        if len(fields) > 1 and fields[1].startswith(prefix):
            subprocess.run(["umount", "-l", fields[1]], check=False, capture_output=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time a whole device update from a large Core over HTTPS: rampart update, "
        "standard tools (curl, minisign, dd, cp) and RAUC install."
    )
    parser.add_argument(
        "--size-mib", type=positive_int, default=1024, help="Core size in MiB (default 1024)"
    )
    parser.add_argument(
        "--efiboot-mib",
        type=positive_int,
        default=20,
        help="MiB of the UKI's (never booted) initrd; the kernel adds ~8 MiB (default 20)",
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="runs per method (default 3)")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument("--skip-rauc", action="store_true", help="do not measure RAUC")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_PARENT,
        metavar="DIR",
        help="create the temporary work directory here (default /var/tmp); removed at the end",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench: error: run as root (see the module docstring)", file=sys.stderr)
        return 1
    try:
        pwd.getpwnam(FETCH_USER)
    except KeyError:
        print(f"bench: error: user {FETCH_USER} missing: run `make setup`", file=sys.stderr)
        return 1
    try:
        workdir = Path(tempfile.mkdtemp(prefix="rampart-update-bench-", dir=args.workdir))
    except OSError as exc:
        print(f"bench: error: {args.workdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        with terminate_as_interrupt(), ExitStack() as running:
            report = Bench(args, workdir, running).run()
    except (BenchError, services.ServiceError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        _unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

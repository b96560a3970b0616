"""What the TUF trust mode costs a device, against the minisign mode, in one run.

    .venv/bin/python bench/tuf.py [--size-mib 1024] [--runs 3] [--checkin-runs 10]
                                  [--releases 10,100,1000] [--json]

Run it as root, like bench/update.py (whose set-up it reuses): the update client
forks its fetch process as the `rampart-fetch` user (`make setup` creates it), so
every metadata document goes through the unprivileged fetch process, each in its own.
Debian packages: nginx, openssl, curl, minisign.

1. Time (skipped with --skip-update). Releases 1.0.0 and 1.0.1 (a Core of SIZE MiB
   of random data and a UKI, built and published as bench/update.py does), served by
   one nginx over HTTPS with a throwaway CA, with a TUF repository beside them in the
   webroot (Rampart's own tools: a 2-of-3 root, a targets key, one online key for
   snapshot, timestamp and channels; both releases added by
   `release.tufrepo.add_release`; channels stable, beta and dev point at 1.0.1).
   Two devices running 1.0.0 on the file slot backend, identical but for `[trust]`:
   `mode = "minisign"`, and `mode = "tuf"` with the repository's first root pinned in
   its remote directory (root.json) and its `metadata_dir` in the work directory.
   Measured, rounds interleaving the two (the order alternates):
   - the whole `rampart update` of each (exit code 20), `--runs` times. Before each
     run the device is reset (as bench/update.py does) and the TUF device's metadata
     directory emptied: every run fetches the new root's 404, the timestamp, the
     snapshot, targets and channels, what a device also fetches when a release was
     added and its channel moved since its last check-in;
   - the check-in of an up-to-date device (`rampart update` running 1.0.1: exit 0),
     `--checkin-runs` times: minisign; TUF with the metadata of the last check-in
     (nothing changed: the next root's 404 and the timestamp); TUF with an empty
     metadata directory (every document fetched again).
   Reported: best and median seconds, the ratios TUF/minisign, the difference in
   each round (the two ran back to back: less noisy on a busy machine), each phase's
   median (bench/update.py's phases, from the log lines: the modes differ in the
   first, the version check, where the metadata is refreshed), the documents fetched.
2. Bytes (skipped with --skip-metadata). For each count of `--releases`: a repository
   of that many releases with 3 channel heads (the same tools; each release's two
   targets carry realistic lengths, random BLAKE2b-512 and SHA-256 digests and
   Rampart's custom fields, verity parameters included: no payload is written, a
   check-in reads metadata only), and two devices checking in through a TCP relay that
   counts the bytes each way (TLS records, handshakes included; TCP/IP headers not).
   Each check-in is a real `rampart update` of an up-to-date device; nginx's access log
   gives each request's status and body bytes. TUF check-ins: (a) the first one of a
   new device, (b) nothing changed, (c) after one new release, (d) after one channel
   head moved. The minisign device's check-in (the version document) is the reference.
   The times of these check-ins are one run each, through the relay (Python).

Targets: the TUF update <= 1.05x the minisign update (best runs). The exit code is 0
whether or not it is met (this is a benchmark, not a test) and 1 if any command fails
or the set-up is impossible.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file has python-tuf's name: run as a script, its directory comes first on
# sys.path and would shadow the `tuf` package. It goes last (a stable sort): `common`
# and `update` are still found there.
sys.path.sort(key=lambda entry: Path(entry or ".").resolve() == Path(__file__).resolve().parent)

import argparse
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import socket
import statistics
import tempfile
import threading
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, TargetFile, Targets

import update as update_bench
from common import positive_int, terminate_as_interrupt
from rampart.contracts import tuf as tuf_contract
from rampart.contracts import tufrepo as repo
from rampart.contracts import wire
from rampart.contracts.version import parse_version
from rampart.device import fetch, transport
from rampart.errors import RampartError
from rampart.release import tufrepo
from rampart.testbed import services

BenchError = update_bench.BenchError
Run = update_bench.Run
OS_NAME, OLD, NEW = update_bench.OS_NAME, update_bench.OLD, update_bench.NEW
FETCH_USER = update_bench.FETCH_USER
CHANNELS = ("stable", "beta", "dev")
RATIO_TARGET = 1.05
DEFAULT_RELEASES = (10, 100, 1000)
CHUNK = 1 << 16
IDLE_TIMEOUT = 10.0
# A fake release's payloads, as they look in targets: a 1 GiB Core (+ its verity
# tree) and a 28 MiB UKI.
FAKE_CORE_DATA = 1 << 30
FAKE_EFIBOOT = 28 << 20
# nginx's combined log: "GET /uri HTTP/1.1" status body_bytes
LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) (?P<bytes>\d+)')


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _r(value: float, digits: int = 3) -> float:
    return round(value, digits)


def _mib(kib: int) -> float:
    return kib / 1024


# --- what nginx served and what crossed the wire -----------------------------------------


@dataclass(frozen=True)
class Request:
    """One request in nginx's access log."""

    uri: str
    status: int
    body_bytes: int

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "status": self.status, "body_bytes": self.body_bytes}


class AccessLog:
    """nginx's access log, read from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def since_mark(self) -> list[Request]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        found = []
        for line in data.decode(errors="replace").splitlines():
            match = LOG_LINE.search(line)
            if match:
                found.append(Request(match["uri"], int(match["status"]), int(match["bytes"])))
        return found


@dataclass(frozen=True)
class Wire:
    connections: int = 0
    down: int = 0  # server to device
    up: int = 0  # device to server

    def __add__(self, other: Wire) -> Wire:
        return Wire(
            self.connections + other.connections, self.down + other.down, self.up + other.up
        )

    def __sub__(self, other: Wire) -> Wire:
        return Wire(
            self.connections - other.connections, self.down - other.down, self.up - other.up
        )


class Relay:
    """A TCP relay from a loopback port to nginx's, counting the bytes each way: what a
    check-in costs on the wire, TLS records and handshakes included."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = int(self.server.getsockname()[1])
        self.state = threading.Condition()
        self.totals = Wire()
        self.active = 0
        self.stopping = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.acceptor.join()
        self.server.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.state:
                self.active += 1
                self.totals += Wire(connections=1)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with client, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
                back = threading.Thread(target=self._pump, args=(upstream, client, True))
                back.start()
                self._pump(client, upstream, False)
                back.join()
        except OSError:
            pass
        finally:
            with self.state:
                self.active -= 1
                self.state.notify_all()

    def _pump(self, source: socket.socket, sink: socket.socket, down: bool) -> None:
        count = 0
        try:
            while data := source.recv(CHUNK):
                sink.sendall(data)
                count += len(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            with self.state:
                self.totals += Wire(down=count) if down else Wire(up=count)

    def counts(self) -> Wire:
        """The totals once every connection is closed (the fetch processes are gone)."""
        with self.state:
            if not self.state.wait_for(lambda: self.active == 0, IDLE_TIMEOUT):
                raise BenchError(f"relay: connections still open after {IDLE_TIMEOUT} s")
            return self.totals


# --- a TUF repository, written with Rampart's tools ----------------------------------------

Signers = dict[str, list[Signer]]


def make_keys(directory: Path) -> tuple[tufrepo.Keys, Signers]:
    """As tests/tufkit.py: three root keys (threshold 2), a targets key, one online key
    (snapshot, timestamp, channels); unencrypted key files. The signers by role ("root":
    the two that sign)."""
    directory.mkdir(parents=True)
    public: dict[str, list[Any]] = {}
    signers: Signers = {}
    for role, count in (("root", 3), ("targets", 1), ("online", 1)):
        for n in range(count):
            path = directory / f"{role}-{n}.key"
            public.setdefault(role, []).append(tufrepo.generate_key(path, None))
            signers.setdefault(role, []).append(repo.load_signer(path, None))
    keys = tufrepo.Keys(
        root=public["root"],
        targets=public["targets"],
        snapshot=public["online"],
        timestamp=public["online"],
        root_threshold=2,
        channels=public["online"],
    )
    signers["root"] = signers["root"][:2]
    for role in ("snapshot", "timestamp", tuf_contract.CHANNELS_ROLE):
        signers[role] = signers["online"]
    return keys, signers


def release_version(index: int) -> str:
    return f"1.{index}.0"


def fake_targets(version: str) -> dict[str, TargetFile]:
    """The two targets of release `version` as `add_release` writes them, without their
    files: realistic lengths, random digests, Rampart's custom fields."""
    found = {}
    data_blocks = FAKE_CORE_DATA // 4096
    for kind, length in (("efiboot", FAKE_EFIBOOT), ("core", FAKE_CORE_DATA + (9 << 20))):
        path = tuf_contract.payload_target(OS_NAME, parse_version(version), kind)
        core = kind == "core"
        fields = tuf_contract.PayloadFields(
            OS_NAME,
            kind,
            version,
            epoch=1,
            root_hash=os.urandom(32).hex() if core else None,
            hash_offset=FAKE_CORE_DATA if core else None,
            data_blocks=data_blocks if core else None,
        )
        hashes = {"blake2b": os.urandom(64).hex(), "sha256": os.urandom(32).hex()}
        found[path] = TargetFile(length, hashes, path, {"custom": fields.to_custom()})
    return found


@dataclass
class Repository:
    """A TUF repository in `webroot`/tuf and its signers."""

    webroot: Path
    signers: Signers
    releases: int = 0
    heads: dict[str, tuf_contract.ChannelHead] = field(default_factory=dict)

    @classmethod
    def create(cls, webroot: Path, keys: tufrepo.Keys, signers: Signers) -> Repository:
        webroot.mkdir(parents=True, exist_ok=True)
        tufrepo.create(webroot, keys, signers)
        return cls(webroot, signers)

    @property
    def directory(self) -> Path:
        return repo.metadata_dir(self.webroot)

    def root(self) -> bytes:
        return (self.directory / "1.root.json").read_bytes()

    def add_fake_releases(self, count: int) -> None:
        """`count` more releases in one new targets version, then a snapshot and timestamp."""
        md: Metadata[Targets] = repo.latest(self.directory, Targets.type)
        for index in range(self.releases, self.releases + count):
            md.signed.targets.update(fake_targets(release_version(index)))
        self.releases += count
        md.signed.version += 1
        md.signed.expires = repo.expiry(Targets.type)
        repo.sign(md, self.signers[Targets.type])
        repo.write(self.directory, md)
        repo.publish_snapshot(self.webroot, self.signers)

    def point(self, versions: dict[str, str]) -> None:
        """Sign the heads of these channels at these versions (with the others signed
        before), as the server's channels key does; then a snapshot and timestamp."""
        for channel, version in versions.items():
            self.heads[channel] = tuf_contract.ChannelHead(OS_NAME, channel, version)
        repo.sign_channels(self.webroot, self.heads.values(), self.signers)

    def sizes(self) -> dict[str, int]:
        """The size of the latest file of each role."""
        found = {"timestamp": (self.directory / "timestamp.json").stat().st_size}
        for role in ("root", "snapshot", "targets", tuf_contract.CHANNELS_ROLE):
            number = repo.versions(self.directory, role)[-1]
            found[role] = (self.directory / f"{number}.{role}.json").stat().st_size
        return found


def write_version_document(webroot: Path, version: str) -> None:
    path = webroot / "update" / "v1" / OS_NAME / "version"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wire.render_version_document(version))


# --- devices ---------------------------------------------------------------------------------


def trust_config(mode: str, device: Path) -> str:
    text = f'\n[download]\nfetch_user = "{FETCH_USER}"\n\n[trust]\nmode = "{mode}"\n'
    if mode == "tuf":
        text += f'metadata_dir = "{device / "tuf"}"\n'
    return text


def update_argv(rampart: str, dev: Path, os_release: str, run_dir: str) -> list[str]:
    return [
        rampart, "update", "-c", str(dev / "config"), "-r", str(dev / "remote"),
        "-t", str(dev / "download"), "--os-release", str(dev / os_release),
        "--machine-id", str(dev / "machine-id"), "--run-dir", str(dev / run_dir),
    ]  # fmt: skip


def make_checkin_device(
    dev: Path, mode: str, base_url: str, work: Path, root: bytes | None, running: str
) -> None:
    """A device that only checks in (running `running`, its channel's version): its
    configuration, remote configuration (URLs below `base_url`), identity."""
    for sub in ("config", "remote", "slots", "esp"):
        (dev / sub).mkdir(parents=True)
    shutil.copyfile(work / "vendor.pub", dev / "config" / "pubkey")
    (dev / "config" / "config.toml").write_text(
        f'os_name = "{OS_NAME}"\n\n[core]\nbackend = "file"\ndestination = "{dev / "slots"}"\n'
        f'\n[efiboot]\ndestination = "{dev / "esp"}"\n'
        f'\n[identity]\ndir = "{dev / "identity"}"\n' + trust_config(mode, dev)
    )
    (dev / "remote" / "remote.toml").write_text(
        f'update_url = "{base_url}/update/v1"\ndist_url = "{base_url}/dist"\n'
        f'tuf_url = "{base_url}/tuf"\nchannel = "stable"\n'
    )
    shutil.copyfile(work / "pki" / "ca.pem", dev / "remote" / "rootca.pem")
    if root is not None:
        (dev / "remote" / "root.json").write_bytes(root)
    (dev / "os-release").write_text(f"ID={OS_NAME}\nVERSION_ID={running}\n")
    (dev / "machine-id").write_text(os.urandom(16).hex() + "\n")


# --- results ---------------------------------------------------------------------------------


@dataclass
class Timing:
    runs: list[Run] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [r.seconds for r in self.runs]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak_kib(self) -> int:
        return max(r.own_hwm_kib or 0 for r in self.runs)

    @property
    def fetch_peak_kib(self) -> int:
        return max(max(r.child_hwm_kib.values(), default=0) for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "best_seconds": _r(self.best),
            "median_seconds": _r(self.median),
            "runs_seconds": [_r(s) for s in self.seconds],
            "process_vmhwm_mib": _r(_mib(self.peak_kib), 1),
            "fetch_process_vmhwm_mib": _r(_mib(self.fetch_peak_kib), 1),
        }

    def phases(self) -> dict[str, float]:
        """Where the time went, each phase's median over the runs (bench/update.py's
        phases, from the log lines): the version check is where the modes differ."""
        found: dict[str, list[float]] = {}
        for run in self.runs:
            for name, seconds in update_bench.rampart_phases(run):
                found.setdefault(name, []).append(seconds)
        return {name: statistics.median(values) for name, values in found.items()}


@dataclass
class TimeReport:
    size_mib: int
    efiboot_mib: int
    minisign: Timing
    tuf: Timing
    checkin_minisign: Timing
    checkin_tuf_warm: Timing
    checkin_tuf_cold: Timing
    update_requests: list[Request]  # the TUF device's metadata requests in one update
    warm_requests: list[Request]  # ... in one up-to-date check-in, metadata unchanged

    def ratios(self) -> dict[str, float]:
        return {
            "update_best": _r(self.tuf.best / self.minisign.best),
            "update_median": _r(self.tuf.median / self.minisign.median),
            "checkin_warm_best": _r(self.checkin_tuf_warm.best / self.checkin_minisign.best),
            "checkin_cold_best": _r(self.checkin_tuf_cold.best / self.checkin_minisign.best),
        }

    def paired(self) -> list[float]:
        """TUF - minisign in each round (the two ran back to back): what the other
        processes of the machine change between rounds cancels out."""
        return [
            t.seconds - m.seconds for m, t in zip(self.minisign.runs, self.tuf.runs, strict=True)
        ]

    def extra_seconds(self) -> dict[str, float]:
        """What TUF adds, in seconds (medians)."""
        return {
            "update": _r(self.tuf.median - self.minisign.median),
            "update_paired": _r(statistics.median(self.paired())),
            "checkin_warm": _r(self.checkin_tuf_warm.median - self.checkin_minisign.median),
            "checkin_cold": _r(self.checkin_tuf_cold.median - self.checkin_minisign.median),
        }

    @property
    def met(self) -> bool:
        return self.ratios()["update_best"] <= RATIO_TARGET

    def to_json(self) -> dict[str, Any]:
        return {
            "size_mib": self.size_mib,
            "efiboot_mib": self.efiboot_mib,
            "update": {
                mode: {
                    **timing.to_json(),
                    "phases_seconds_median": {k: _r(v) for k, v in timing.phases().items()},
                }
                for mode, timing in (("minisign", self.minisign), ("tuf", self.tuf))
            },
            "checkin_up_to_date": {
                "minisign": self.checkin_minisign.to_json(),
                "tuf_metadata_unchanged": self.checkin_tuf_warm.to_json(),
                "tuf_metadata_dir_empty": self.checkin_tuf_cold.to_json(),
            },
            "ratios": self.ratios(),
            "tuf_extra_seconds_median": self.extra_seconds(),
            "update_paired_differences_seconds": [_r(d) for d in self.paired()],
            "tuf_requests_in_update": [r.to_json() for r in self.update_requests],
            "tuf_requests_in_checkin": [r.to_json() for r in self.warm_requests],
            "target": {"ratio_max": RATIO_TARGET, "met": self.met},
        }


@dataclass
class CheckIn:
    """One check-in: the requests nginx served and the bytes on the wire."""

    label: str
    requests: list[Request]
    wire: Wire
    seconds: float

    @property
    def body_bytes(self) -> int:
        return sum(r.body_bytes for r in self.requests)

    @property
    def metadata_bytes(self) -> int:
        return sum(r.body_bytes for r in self.requests if "/tuf/" in r.uri)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "requests": [r.to_json() for r in self.requests],
            "http_body_bytes": self.body_bytes,
            "tuf_metadata_bytes": self.metadata_bytes,
            "tls_connections": self.wire.connections,
            "tls_bytes_down": self.wire.down,
            "tls_bytes_up": self.wire.up,
            "seconds": _r(self.seconds),
        }


@dataclass
class Scale:
    """The check-ins against a repository of `releases` releases."""

    releases: int
    sizes: dict[str, int]  # the latest file of each role, bytes
    checkins: list[CheckIn]

    def to_json(self) -> dict[str, Any]:
        return {
            "releases": self.releases,
            "channels": len(CHANNELS),
            "repository_file_bytes": self.sizes,
            "checkins": [c.to_json() for c in self.checkins],
        }


@dataclass
class Report:
    versions: dict[str, str]
    runs: int
    checkin_runs: int
    time: TimeReport | None
    scales: list[Scale]
    fetch_credentials: dict[str, Any]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": self.versions,
            "runs": self.runs,
            "checkin_runs": self.checkin_runs,
            "time": None if self.time is None else self.time.to_json(),
            "metadata": [s.to_json() for s in self.scales],
            "metadata_fetch_process": self.fetch_credentials,
            "notes": self.notes,
        }


# --- the benchmark ---------------------------------------------------------------------------


class TufBench(update_bench.Bench):
    """bench/update.py's set-up (PKI, releases, nginx, devices), two devices, one repository."""

    def __init__(self, args: argparse.Namespace, workdir: Path, running: ExitStack) -> None:
        super().__init__(args, workdir, running)
        self.log = AccessLog(workdir / "nginx" / "access.log")
        self.keys: tuple[tufrepo.Keys, Signers] | None = None
        self.devices = {"minisign": workdir / "device-minisign", "tuf": workdir / "device-tuf"}

    def tuf_keys(self) -> tuple[tufrepo.Keys, Signers]:
        if self.keys is None:
            self.keys = make_keys(self.work / "tuf-keys")
        return self.keys

    def keygen(self) -> None:
        """The vendor's minisign key, when no release is published (--skip-update)."""
        update_bench.run_quiet(
            [self.tools.rampart, "keygen", "--unencrypted", "--secret-key",
             str(self.work / "vendor.key"), "--public-key", str(self.work / "vendor.pub")],
            env=self.env,
        )  # fmt: skip

    # part 1: time

    def make_repository(self) -> Repository:
        keys, signers = self.tuf_keys()
        repository = Repository.create(self.webroot, keys, signers)
        for version in (OLD, NEW):
            _log(f"adding {OS_NAME} {version} to the TUF repository (hashing its payloads)")
            tufrepo.add_release(self.webroot, OS_NAME, parse_version(version), signers)
        repository.point({channel: NEW for channel in CHANNELS})
        return repository

    def make_devices(self, root: bytes) -> None:
        for mode, dev in self.devices.items():
            self.dev = dev
            self.make_device()
            with (dev / "config" / "config.toml").open("a") as config:
                config.write(trust_config(mode, dev))
            (dev / "os-release-current").write_text(f"ID={OS_NAME}\nVERSION_ID={NEW}\n")
        tuf_remote = self.devices["tuf"] / "remote"
        base = f"https://localhost:{self.port}"
        with (tuf_remote / "remote.toml").open("a") as remote:
            remote.write(f'tuf_url = "{base}/tuf"\nchannel = "stable"\n')
        (tuf_remote / "root.json").write_bytes(root)

    def run_update(self, mode: str) -> Run:
        """The whole `rampart update` of a reset device (bench/update.py's run)."""
        self.dev = self.devices[mode]
        shutil.rmtree(self.dev / "tuf", ignore_errors=True)
        return self.run_rampart()

    def run_checkin(self, mode: str, cold: bool) -> Run:
        """`rampart update` of an up-to-date device (running 1.0.1): exit code 0."""
        dev = self.devices[mode]
        if cold:
            shutil.rmtree(dev / "tuf", ignore_errors=True)
        os.sync()
        argv = update_argv(self.tools.rampart, dev, "os-release-current", "run-checkin")
        run = update_bench.run_measured(argv, self.work, env=self.env)
        if "up to date" not in run.stdout:
            raise BenchError(f"{' '.join(argv)}: not up to date: {run.stdout.strip()}")
        return run

    def measure_time(self) -> TimeReport:
        modes = ("minisign", "tuf")
        updates = {mode: Timing() for mode in modes}
        runs = self.args.runs
        update_requests: list[Request] = []
        for number in range(1, runs + 1):
            for mode in modes if number % 2 else modes[::-1]:
                self.log.mark()
                run = self.run_update(mode)
                updates[mode].runs.append(run)
                if mode == "tuf":
                    update_requests = [r for r in self.log.since_mark() if "/tuf/" in r.uri]
                _log(f"round {number}/{runs}: rampart update, {mode} mode: {run.seconds:.3f} s")
        checkins = {key: Timing() for key in ("minisign", "tuf-cold", "tuf-warm")}
        order = list(checkins)
        warm_requests: list[Request] = []
        for number in range(1, self.args.checkin_runs + 1):
            for key in order if number % 2 else order[1:] + order[:1]:
                self.log.mark()
                run = self.run_checkin(key.split("-")[0], cold=key == "tuf-cold")
                checkins[key].runs.append(run)
                if key == "tuf-warm":
                    warm_requests = [r for r in self.log.since_mark() if "/tuf/" in r.uri]
            _log(
                f"check-in round {number}/{self.args.checkin_runs}: "
                + ", ".join(f"{k} {v.runs[-1].seconds:.3f} s" for k, v in checkins.items())
            )
        return TimeReport(
            self.args.size_mib,
            self.args.efiboot_mib,
            updates["minisign"],
            updates["tuf"],
            checkins["minisign"],
            checkins["tuf-warm"],
            checkins["tuf-cold"],
            update_requests,
            warm_requests,
        )

    # part 2: bytes

    def fetch_credentials(self, url: str) -> dict[str, Any]:
        """Fetch one metadata document as `rampart update` does (the fetch user, the
        pinned CA): who fetched it. Before the relay starts: no thread is forked."""
        fetcher = fetch.Fetcher(
            self.pki / "ca.pem", {}, transport.Limits(), FETCH_USER, self.work / "probe"
        )
        status, data = fetcher.document(url, 16 << 10)
        if status != 200 or not data:
            raise BenchError(f"{url}: HTTP {status} through the fetch process")
        found = fetcher.last_credentials
        if found.get("uid") in (None, 0):
            raise BenchError(f"{url}: the fetch process ran as uid {found.get('uid')}")
        return {k: found[k] for k in ("uid", "euid", "gid", "cap_eff", "no_new_privs")}

    def checkin(self, relay: Relay, dev: Path, label: str) -> CheckIn:
        before = relay.counts()
        self.log.mark()
        argv = update_argv(self.tools.rampart, dev, "os-release", "run")
        run = update_bench.run_measured(argv, self.work, env=self.env)
        if "up to date" not in run.stdout:
            raise BenchError(f"{' '.join(argv)}: not up to date: {run.stdout.strip()}")
        used = relay.counts() - before
        requests = self.log.since_mark()
        if len(requests) != used.connections:
            raise BenchError(f"{label}: {len(requests)} requests logged, {used.connections} made")
        return CheckIn(label, requests, used, run.seconds)

    def measure_scale(self, relay: Relay, releases: int) -> Scale:
        keys, signers = self.tuf_keys()
        name = f"meta-{releases}"
        _log(f"a repository of {releases} releases and {len(CHANNELS)} channels")
        repository = Repository.create(self.webroot / name, keys, signers)
        repository.add_fake_releases(releases)
        current = release_version(releases - 3)  # stable; beta and dev are newer
        repository.point(
            {channel: release_version(releases - 3 + n) for n, channel in enumerate(CHANNELS)}
        )
        write_version_document(repository.webroot, current)
        base = f"https://localhost:{relay.port}/{name}"
        devices = self.work / name
        make_checkin_device(devices / "minisign", "minisign", base, self.work, None, current)
        tuf_dev = devices / "tuf"
        make_checkin_device(tuf_dev, "tuf", base, self.work, repository.root(), current)
        sizes = repository.sizes()
        checkins = [
            self.checkin(relay, devices / "minisign", "minisign: the version document"),
            self.checkin(relay, tuf_dev, "TUF (a) first check-in of a new device"),
            self.checkin(relay, tuf_dev, "TUF (b) nothing changed"),
        ]
        repository.add_fake_releases(1)
        checkins.append(self.checkin(relay, tuf_dev, "TUF (c) after one new release"))
        repository.point({"beta": release_version(releases)})
        checkins.append(self.checkin(relay, tuf_dev, "TUF (d) after one channel head moved"))
        return Scale(releases, sizes, checkins)

    # the whole

    def versions(self) -> dict[str, str]:
        found = super().versions()
        for package in ("tuf", "securesystemslib"):
            found[f"python-{package}"] = importlib.metadata.version(package)
        return found

    def run_all(self) -> Report:
        args = self.args
        if not args.skip_update:
            self.check_space()
        load_before = os.getloadavg()[0]
        versions = self.versions()
        _log(f"work directory {self.work}")
        self.make_pki()
        if args.skip_update:
            self.keygen()
        else:
            self.publish()
        self.webroot.mkdir(parents=True, exist_ok=True)
        self.start_nginx()
        time_report = None
        notes = [
            f"every device fetches as {FETCH_USER}, one fetch process (and TLS connection) "
            "per document; nginx serves HTTPS on 127.0.0.1",
        ]
        if not args.skip_update:
            repository = self.make_repository()
            self.make_devices(repository.root())
            _log("warm-up read of the served files")
            update_bench.warm_up(*(self.dist(NEW, k) for k in ("efiboot", "efiboot.sig", "core")))
            time_report = self.measure_time()
            notes.append(
                "update runs: the TUF device's metadata directory is emptied before each run "
                "(it fetches what a device fetches after a release and a channel move); it "
                "downloads 2 payloads and no .sig (the phase says 4 files)"
            )
            notes.append(
                f"1-minute load average {load_before:.2f} before the set-up, "
                f"{os.getloadavg()[0]:.2f} after the timed runs ({os.cpu_count()} CPUs; other "
                "processes skew the times)"
            )
        scales = []
        credentials: dict[str, Any] = {}
        if not args.skip_metadata:
            keys, signers = self.tuf_keys()
            probe = Repository.create(self.webroot / "probe", keys, signers)
            url = f"https://localhost:{self.port}/probe/tuf/timestamp.json"
            credentials = self.fetch_credentials(url)
            shutil.rmtree(probe.webroot)
            with Relay(self.port) as relay:
                scales = [self.measure_scale(relay, n) for n in args.releases]
            notes.append(
                "metadata: TLS bytes are TCP payload through the relay (handshakes included, "
                "TCP/IP headers not); body bytes from nginx's access log"
            )
        return Report(
            versions, args.runs, args.checkin_runs, time_report, scales, credentials, notes
        )


# --- the table -------------------------------------------------------------------------------


def _rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        print("  ".join(cells).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))


def _names(requests: list[Request]) -> str:
    return ", ".join(f"{r.name} {r.status} ({r.body_bytes} B)" for r in requests)


def print_time(report: TimeReport, runs: int, checkin_runs: int) -> None:
    print(
        f"1. rampart update of a {report.size_mib} MiB Core + {report.efiboot_mib} MiB efiboot, "
        f"{runs} runs each, interleaved"
    )
    print()

    def row(label: str, timing: Timing) -> tuple[str, ...]:
        return (
            label,
            f"{timing.best:.3f}",
            f"{timing.median:.3f}",
            " ".join(f"{s:.2f}" for s in timing.seconds),
            f"{_mib(timing.peak_kib):.1f}",
        )

    _rows(
        [
            ("", "best s", "median s", "runs s", "peak RSS MiB"),
            row("rampart update, minisign mode", report.minisign),
            row("rampart update, TUF mode", report.tuf),
        ]
    )
    ratios, extra = report.ratios(), report.extra_seconds()
    print(
        f"TUF/minisign: {ratios['update_best']:.3f} (best), {ratios['update_median']:.3f} "
        f"(median), {extra['update']:+.3f} s; target <= {RATIO_TARGET}: "
        f"{'met' if report.met else 'NOT met'}"
    )
    print(
        "TUF - minisign in each round: "
        + " ".join(f"{d:+.2f}" for d in report.paired())
        + f" s (median {extra['update_paired']:+.3f} s, "
        f"{extra['update_paired'] / report.minisign.median:+.1%} of the minisign median)"
    )
    print(f"TUF documents fetched in one update: {_names(report.update_requests)}")
    phases = {mode: t.phases() for mode, t in (("minisign", report.minisign), ("tuf", report.tuf))}
    if all(phases.values()):
        print()
        print("by phase, median of the runs (bench/update.py's phases, from the log lines), s:")
        _rows(
            [
                ("", "minisign", "TUF", "TUF - minisign"),
                *(
                    (name, f"{seconds:.3f}", f"{phases['tuf'].get(name, 0.0):.3f}",
                     f"{phases['tuf'].get(name, 0.0) - seconds:+.3f}")
                    for name, seconds in phases["minisign"].items()
                ),
            ]
        )  # fmt: skip
    print()
    print(f"check-in of an up-to-date device (rampart update, exit 0), {checkin_runs} runs each")
    print()
    _rows(
        [
            ("", "best s", "median s", "runs s", "peak RSS MiB"),
            row("minisign (the version document)", report.checkin_minisign),
            row("TUF, metadata unchanged", report.checkin_tuf_warm),
            row("TUF, metadata directory empty", report.checkin_tuf_cold),
        ]
    )
    print(
        f"TUF/minisign: {ratios['checkin_warm_best']:.2f} unchanged ({extra['checkin_warm']:+.3f}"
        f" s median), {ratios['checkin_cold_best']:.2f} empty ({extra['checkin_cold']:+.3f} s)"
    )
    print(f"TUF documents fetched in an unchanged check-in: {_names(report.warm_requests)}")


def print_scales(scales: list[Scale]) -> None:
    print(
        f"2. bytes per check-in, {len(CHANNELS)} channels (HTTP bodies from nginx's log; "
        "TLS: both directions through a counting relay)"
    )
    print()
    rows: list[tuple[str, ...]] = [
        (
            "releases  check-in",
            "req",
            "body B",
            "of it TUF",
            "TLS down",
            "TLS up",
            "TLS x",
            "time s",
        )
    ]
    for scale in scales:
        reference = scale.checkins[0].wire
        for index, c in enumerate(scale.checkins):
            rows.append(
                (
                    f"{scale.releases if index == 0 else '':>8}  {c.label}",
                    str(len(c.requests)),
                    str(c.body_bytes),
                    str(c.metadata_bytes),
                    str(c.wire.down),
                    str(c.wire.up),
                    f"{(c.wire.down + c.wire.up) / (reference.down + reference.up):.1f}",
                    f"{c.seconds:.3f}",
                )
            )
    _rows(rows)
    print("(TLS x: the check-in's TLS bytes, both ways, over the minisign check-in's)")
    print()
    last = scales[-1]
    print(f"requests of each check-in, {last.releases} releases:")
    for c in last.checkins:
        print(f"  {c.label}: {_names(c.requests)}")
    print()
    roles = list(scales[0].sizes)
    _rows(
        [
            ("releases  latest file, bytes", *roles),
            *((f"{s.releases:>8}", *(str(s.sizes[r]) for r in roles)) for s in scales),
        ]
    )
    if len(scales) > 1:
        first, last = scales[0], scales[-1]
        per_release = (last.sizes["targets"] - first.sizes["targets"]) / (
            last.releases - first.releases
        )
        cap = 5_000_000  # ngclient's UpdaterConfig.targets_max_length
        print(
            f"targets grows by {per_release:.0f} bytes per release: ngclient's cap of {cap} "
            f"bytes is reached at about {cap / per_release:.0f} releases"
        )


def print_report(report: Report) -> None:
    v = report.versions
    print(
        f"{v['rampart']} (Python {v['python']}), python-tuf {v['python-tuf']}, "
        f"securesystemslib {v['python-securesystemslib']}, {v['nginx']}"
    )
    print()
    if report.time is not None:
        print_time(report.time, report.runs, report.checkin_runs)
        print()
    if report.scales:
        print_scales(report.scales)
        print()
        c = report.fetch_credentials
        print(
            f"metadata fetched by uid {c['uid']} (CapEff {c['cap_eff']}, NoNewPrivs "
            f"{c['no_new_privs']})"
        )
    for note in report.notes:
        print(f"note: {note}")
    if report.time is not None:
        print(f"target {'MET' if report.time.met else 'NOT MET'}")


# --- the command -----------------------------------------------------------------------------


def release_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a comma-separated list") from None
    if not counts or min(counts) < 3:
        raise argparse.ArgumentTypeError(f"{text}: each count must be at least 3")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="What the TUF trust mode costs a device: update and check-in times "
        "against the minisign mode, and the metadata bytes per check-in."
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
    parser.add_argument("--runs", type=positive_int, default=3, help="updates per mode (default 3)")
    parser.add_argument(
        "--checkin-runs", type=positive_int, default=10, help="check-ins per kind (default 10)"
    )
    parser.add_argument(
        "--releases",
        type=release_counts,
        default=list(DEFAULT_RELEASES),
        metavar="N,N,...",
        help="repository sizes for the metadata bytes (default 10,100,1000)",
    )
    parser.add_argument("--skip-update", action="store_true", help="measure the bytes only")
    parser.add_argument("--skip-metadata", action="store_true", help="measure the times only")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=update_bench.DEFAULT_PARENT,
        metavar="DIR",
        help="create the temporary work directory here (default /var/tmp); removed at the end",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.skip_rauc = True  # bench/update.py's set-up, without RAUC
    if os.geteuid() != 0:
        print("bench: error: run as root (see the module docstring)", file=sys.stderr)
        return 1
    try:
        pwd.getpwnam(FETCH_USER)
    except KeyError:
        print(f"bench: error: user {FETCH_USER} missing: run `make setup`", file=sys.stderr)
        return 1
    try:
        workdir = Path(tempfile.mkdtemp(prefix="rampart-tuf-bench-", dir=args.workdir))
    except OSError as exc:
        print(f"bench: error: {args.workdir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        with terminate_as_interrupt(), ExitStack() as running:
            report = TufBench(args, workdir, running).run_all()
    except (BenchError, services.ServiceError, RampartError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Incremental updates: bytes, publishing speed and update time, against the content
bound, casync and the full update, in one run.

    sudo .venv/bin/python bench/incremental.py [--runs 3] [--json] [--skip-update]

Run it as root (debootstrap, chroot, the fetch user). Debian packages: debootstrap,
casync, xz-utils, nginx, curl. The fixture (cached in .cache/bench-incremental/, as
tarballs: debootstrap runs once) is three Debian 12 root trees from the mirror apt
uses on this machine:
- `base`: `debootstrap --variant=minbase bookworm`;
- `plus`: the same with `--include=curl,less` (and their dependencies);
- `bump`: `base` with one package upgraded from bookworm-security (BUMP: a security
  fix, the package rebuilt), its .deb fetched by `apt-get download`.
Each tree is made a Core by `rampart build core` (an uncompressed squashfs, its verity
tree appended), versions 1.0.0 (base), 1.0.1 (plus) and 1.0.2 (bump).

Measured, for each pair (base -> plus, base -> bump, and base -> base: no change):
1. the content bound: `xz -9` of a tar of the files of the new tree that are new or
   changed (by content) against the old one;
2. casync's defaults: `casync make` of the old Core into a store, then of the new one:
   the bytes of the chunk files it added (zstd level 3);
3. Rampart's chunk store: the bytes of the chunk files `rampart publish` adds for the
   new release (its default compression, and each alternative in --compressions);
4. Rampart's delta from the old Core (what `rampart publish` signs beside the new
   release): its bytes, and the bytes a device fetches for Core with it (the delta,
   its signature and Core's verity superblock: the tree is computed on the device);
5. unless --skip-update, the update itself (rampart update over HTTPS from nginx on
   loopback, as bench/update.py): a device running the old Core on the file slot
   backend, with the delta (everything published), from chunks (the delta hidden) and
   with the whole Core streamed (the delta and the indexes hidden), `--runs` times
   each, interleaved: the time, the bytes nginx sent (all, and for Core: the UKI's
   excluded), the peak RSS (VmHWM of the process and its fetch processes); then once
   with the delta and once whole from an nginx that sends at most --link-mbit
   (default 100 Mbit/s: a link, not loopback).
Publishing: chunking and indexing (no store) of a 1 GiB image of random data, against
`casync make` of the same image (which also compresses each chunk into its store),
the best of `--runs`.

Targets (issue 17): Core's bytes on the wire <= 1.1x the content bound and fewer than
casync's; update time <= the full update's; peak RSS < 100 MiB; publishing >= 200 MB/s.
The exit code is 0 whether or not they are met, 1 if a step fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import KERNEL, positive_int, terminate_as_interrupt
from rampart.release import chunker
from rampart.release import delta as release_delta
from rampart.testbed import rootfs, services
from update import run_measured

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-incremental"
SUITE = "bookworm"
PLUS = ("curl", "less")
BUMP = "libzstd1"  # bookworm: 1.5.4+dfsg2-5; bookworm-security: 1.5.4+dfsg2-5+deb12u1
OS_NAME = "clipos"
SIGNATURE_BYTES = 300  # a minisign signature file with a version as its trusted comment
VERSIONS = {"base": "1.0.0", "plus": "1.0.1", "bump": "1.0.2"}
BYTES_TARGET = 1.1
PUBLISH_TARGET_MB_S = 200.0
RSS_TARGET_MIB = 100.0
GIB = 1 << 30


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str | Path], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kw)


# --- the fixture ---------------------------------------------------------------------


def _key(name: str) -> str:
    text = json.dumps([SUITE, name, PLUS, BUMP, rootfs.apt_mirror()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tree_tarball(name: str) -> Path:
    """The cached tarball of tree `name`, made if missing (debootstrap: about a minute)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"{name}-{_key(name)}.tar"
    if tarball.exists():
        return tarball
    mirror = rootfs.apt_mirror()
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        tree = Path(work) / "tree"
        if name == "bump":
            extract(tree_tarball("base"), tree)
            _upgrade(tree, BUMP, Path(work))
        else:
            include = [f"--include={','.join(PLUS)}"] if name == "plus" else []
            _log(f"debootstrap {name} from {mirror}")
            _run(["debootstrap", "--variant=minbase", *include, SUITE, tree, mirror])
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (tree / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = tarball.with_suffix(".partial")
        _run(["tar", "-C", tree, "--numeric-owner", "-cf", partial, "."])
        partial.rename(tarball)
    return tarball


def _upgrade(tree: Path, package: str, work: Path) -> None:
    """Install the bookworm-security build of `package` into `tree` (dpkg in a chroot)."""
    policy = _run(["apt-cache", "madison", package]).stdout.decode()
    versions = [line.split("|") for line in policy.splitlines()]
    security = [v[1].strip() for v in versions if "security" in v[2]]
    if not security:
        raise SystemExit(f"no bookworm-security version of {package} in apt's lists")
    _log(f"upgrading {package} to {security[0]} (bookworm-security)")
    _run(["apt-get", "download", f"{package}={security[0]}"], cwd=work)
    deb = next(work.glob(f"{package}_*.deb"))
    shutil.copyfile(deb, tree / "tmp" / deb.name)
    _run(["chroot", tree, "dpkg", "-i", f"/tmp/{deb.name}"])
    (tree / "tmp" / deb.name).unlink()


def extract(tarball: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    _run(["tar", "-C", target, "--numeric-owner", "-xf", tarball])
    return target


def build_core(rampart: str, tree: Path, version: str, out: Path) -> Path:
    _run([rampart, "build", "core", tree, "--version", version, "--out", out])
    return out / f"core-{version}.img"


def content_bound(old: Path, new: Path, work: Path) -> tuple[int, int, int]:
    """(xz -9 of a tar of the new or changed files of `new`, their count, their size)."""
    changed: list[str] = []
    size = 0
    for path in sorted(new.rglob("*")):
        rel = path.relative_to(new)
        if path.is_symlink():
            other = old / rel
            if not other.is_symlink() or other.readlink() != path.readlink():
                changed.append(str(rel))
            continue
        if not path.is_file():
            continue
        other = old / rel
        if other.is_symlink() or not other.is_file() or _digest(other) != _digest(path):
            changed.append(str(rel))
            size += path.stat().st_size
    archive = work / "changed.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in changed:
            tar.add(new / name, arcname=name, recursive=False)
    packed = _run(["xz", "-9", "-c", archive]).stdout
    archive.unlink()
    return len(packed), len(changed), size


def _digest(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def delta_bytes(old: Path, new: Path) -> int:
    """The bytes of the delta `rampart publish` makes of `new` from `old`."""
    metas = [json.loads(p.with_suffix(".json").read_text()) for p in (old, new)]
    indexes = [chunker.make_index(p, None)[0] for p in (old, new)]
    made = release_delta.make(
        old, indexes[0], metas[0]["hash_offset"], new, indexes[1], metas[1]["hash_offset"],
        (bytes.fromhex(metas[0]["root_hash"]), bytes.fromhex(metas[1]["root_hash"])),
    )  # fmt: skip
    return len(made.render())


def store_bytes(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*.cacnk")}


def casync_added(casync: str, old: Path, new: Path, work: Path) -> tuple[int, int]:
    """The bytes and count of the chunk files `casync make` adds for `new` after `old`."""
    store = work / "casync.castr"
    _run([casync, "make", f"--store={store}", work / "old.caibx", old])
    before = store_bytes(store)
    _run([casync, "make", f"--store={store}", work / "new.caibx", new])
    after = store_bytes(store)
    added = {k: v for k, v in after.items() if k not in before}
    shutil.rmtree(store)
    return sum(added.values()), len(added)


def rampart_added(
    old: Path, new: Path, work: Path, compression: str, level: int
) -> tuple[int, int]:
    """The bytes and count of the chunk files Rampart's publishing adds for `new`."""
    store = work / f"rampart-{compression}-{level}.castr"
    chunker.make_index(old, store, compression=compression, level=level)
    _, stats = chunker.make_index(new, store, compression=compression, level=level)
    shutil.rmtree(store)
    return stats.new_bytes, stats.new


@dataclass
class PairResult:
    name: str
    bound: int
    changed_files: int
    changed_bytes: int
    casync: tuple[int, int]
    rampart: dict[str, tuple[int, int]] = field(default_factory=dict)
    delta: int = 0  # bytes of the delta from the old Core
    delta_seconds: float = 0.0  # to make it

    @property
    def delta_on_the_wire(self) -> int:
        """What a device fetches for Core with the delta: the delta, its signature
        (a minisign signature file) and the verity superblock block."""
        return self.delta + SIGNATURE_BYTES + 4096


def measure_pairs(
    rampart: str, casync: str, work: Path, compressions: list[tuple[str, int]]
) -> tuple[list[PairResult], dict[str, Path]]:
    trees = {name: extract(tree_tarball(name), work / "trees" / name) for name in VERSIONS}
    cores = {
        name: build_core(rampart, trees[name], version, work / "cores")
        for name, version in VERSIONS.items()
    }
    results = []
    for new in ("plus", "bump", "base"):
        _log(f"base -> {new}: content bound, casync, rampart")
        bound, count, size = content_bound(trees["base"], trees[new], work)
        result = PairResult(
            f"base -> {new}",
            bound,
            count,
            size,
            casync_added(casync, cores["base"], cores[new], work),
        )
        for method, level in compressions:
            result.rampart[f"{method}:{level}"] = rampart_added(
                cores["base"], cores[new], work, method, level
            )
        started = time.perf_counter()
        result.delta = delta_bytes(cores["base"], cores[new])
        result.delta_seconds = time.perf_counter() - started
        results.append(result)
    for tree in trees.values():
        shutil.rmtree(tree)
    return results, cores


# --- publishing speed ------------------------------------------------------------------


def publish_speed(casync: str, work: Path, runs: int) -> dict[str, float]:
    """Chunking and indexing 1 GiB (no store) against `casync make` of it, best of `runs`."""
    image = work / "random.img"
    with image.open("wb") as out:
        for _ in range(GIB >> 20):
            out.write(os.urandom(1 << 20))
    ours, theirs = [], []
    for _ in range(runs):
        started = time.perf_counter()
        chunker.make_index(image, None)
        ours.append(time.perf_counter() - started)
        store = work / "speed.castr"
        started = time.perf_counter()
        _run([casync, "make", f"--store={store}", work / "speed.caibx", image])
        theirs.append(time.perf_counter() - started)
        shutil.rmtree(store)
    image.unlink()
    return {
        "rampart_seconds": round(min(ours), 3),
        "rampart_mb_s": round(GIB / min(ours) / 1e6, 1),
        "casync_seconds": round(min(theirs), 3),
        "casync_mb_s": round(GIB / min(theirs) / 1e6, 1),
    }


# --- the update ------------------------------------------------------------------------

_BODY_BYTES = re.compile(r'"GET (\S+) HTTP/1.1" (?:200|206) (\d+) ')
MODES = ("delta", "chunks", "full")


class UpdateBench:
    """A webroot with the base and plus releases (published with their chunk indexes)
    served by nginx, and a device running the base Core on the file slot backend."""

    def __init__(self, rampart: str, work: Path, cores: dict[str, Path], stack: ExitStack):
        self.rampart, self.work, self.cores = rampart, work / "update", cores
        self.webroot = self.work / "webroot"
        self.dev = self.work / "device"
        self.pki = self.work / "pki"
        self.pki.mkdir(parents=True)
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        valid = services.validity(30)
        ca = services.make_ca(self.pki, "ca", common_name="Rampart bench CA", valid=valid)
        cert = services.make_cert(self.pki, "server", ca, ["localhost"], valid=valid)
        self.cert = cert
        self.publish()
        nginx = services.Nginx.static(self.work / "nginx", self.webroot, cert)
        self.nginx = stack.enter_context(nginx)
        self.make_device()

    def use_link(self, stack: ExitStack, mbit_s: int) -> None:
        """From now on, the device updates from an nginx that sends each response at
        most `mbit_s` Mbit/s (`limit_rate`): a link, not loopback."""
        state = self.work / f"nginx-{mbit_s}"
        limit = f"        limit_rate {mbit_s * 125_000};\n"
        nginx = services.Nginx.static(state, self.webroot, self.cert, locations=limit)
        self.nginx = stack.enter_context(nginx)
        (self.dev / "remote" / "remote.toml").write_text(
            f'update_url = "{self.nginx.url}/update/v1"\ndist_url = "{self.nginx.url}/dist"\n'
        )

    def publish(self) -> None:
        key, pub = self.work / "vendor.key", self.work / "vendor.pub"
        _run([self.rampart, "keygen", "--unencrypted", "--secret-key", key, "--public-key", pub])
        for name in ("base", "plus"):
            version = VERSIONS[name]
            efiboot = self.work / f"{version}.efi"
            initrd = self.work / "initrd"  # never booted
            initrd.write_bytes(bytes(4096))
            _run(
                [self.rampart, "build", "efiboot", "--kernel", KERNEL, "--initrd", initrd,
                 "--os", OS_NAME, "--version", version, "--core-meta",
                 self.cores[name].with_name(f"core-{version}.json"), "--out", efiboot],
                env=self.env,
            )  # fmt: skip
            _log(f"publishing {version} with its chunks")
            _run(
                [self.rampart, "publish", "--webroot", self.webroot, "--os", OS_NAME,
                 "--version", version, "--core", self.cores[name], "--efiboot", efiboot,
                 "--secret-key", key],
                env=self.env,
            )  # fmt: skip

    def make_device(self) -> None:
        dev = self.dev
        for sub in ("config", "remote", "mainvg", "esp/EFI/Linux"):
            (dev / sub).mkdir(parents=True)
        shutil.copyfile(self.work / "vendor.pub", dev / "config" / "pubkey")
        lv_mib = (self.cores["plus"].stat().st_size >> 20) + 16
        (dev / "config" / "config.toml").write_text(
            f'os_name = "{OS_NAME}"\n\n[core]\nbackend = "file"\n'
            f'destination = "{dev / "mainvg"}"\nsize = "{lv_mib}M"\n'
            f'capacity = "{2 * lv_mib + 16}M"\n\n[efiboot]\n'
            f'destination = "{dev / "esp/EFI/Linux"}"\n'
            f'\n[identity]\ndir = "{dev / "identity"}"\n'
        )
        url = self.nginx.url
        (dev / "remote" / "remote.toml").write_text(
            f'update_url = "{url}/update/v1"\ndist_url = "{url}/dist"\n'
        )
        shutil.copyfile(self.pki / "ca.pem", dev / "remote" / "rootca.pem")
        base = VERSIONS["base"]
        (dev / "os-release").write_text(f"ID={OS_NAME}\nVERSION_ID={base}\n")
        (dev / "machine-id").write_text(os.urandom(16).hex() + "\n")
        running = dev / "mainvg" / f"core_{base}"
        shutil.copyfile(self.cores["base"], running)
        os.truncate(running, lv_mib << 20)
        (dev / "mainvg" / "core_state").write_bytes(bytes(1 << 20))
        shutil.copyfile(
            self.webroot / f"dist/{base}/{OS_NAME}-efiboot",
            dev / "esp/EFI/Linux" / f"{OS_NAME}-{base}.efi",
        )

    def run(self, mode: str) -> tuple[Any, int, int]:
        """One `rampart update` from base to plus, in `mode` (MODES); (its Run, the
        bytes nginx sent, of them those not of the UKI)."""
        dev, new = self.dev, VERSIONS["plus"]
        (dev / "run" / "update-ready").unlink(missing_ok=True)
        shutil.rmtree(dev / "download", ignore_errors=True)
        (dev / "mainvg" / f"core_{new}").unlink(missing_ok=True)
        for entry in (dev / "esp/EFI/Linux").glob(f"{OS_NAME}-{new}*"):
            entry.unlink()
        release = self.webroot / f"dist/{new}"
        hidden = [
            path
            for path in (
                release / f"{OS_NAME}-core.from-{VERSIONS['base']}.delta",
                release / f"{OS_NAME}-core.caibx",
            )[: MODES.index(mode)]
        ]
        for path in hidden:
            path.rename(path.with_name(f".hidden-{path.name}"))
        log = Path(self.nginx.state) / "access.log"
        start = log.stat().st_size if log.exists() else 0
        os.sync()
        argv = [
            self.rampart, "update", "-c", str(dev / "config"), "-r", str(dev / "remote"),
            "-t", str(dev / "download"), "--os-release", str(dev / "os-release"),
            "--machine-id", str(dev / "machine-id"), "--run-dir", str(dev / "run"),
        ]  # fmt: skip
        try:
            measured = run_measured(argv, self.work, env=self.env, ok=(20,))
        finally:
            for path in hidden:
                path.with_name(f".hidden-{path.name}").rename(path)
        with log.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode(errors="replace")
        found = _BODY_BYTES.findall(text)
        sent = sum(int(size) for _, size in found)
        core = sum(int(size) for path, size in found if "-efiboot" not in path)
        written = (dev / "mainvg" / f"core_{new}").read_bytes()[: self.cores["plus"].stat().st_size]
        if written != self.cores["plus"].read_bytes():
            raise SystemExit("rampart update: the new slot does not hold the new Core")
        (dev / "mainvg" / f"core_{new}").unlink()
        return measured, sent, core


def measure_update(
    rampart: str, work: Path, cores: dict[str, Path], runs: int, stack: ExitStack, link: int
) -> dict[str, Any]:
    bench = UpdateBench(rampart, work, cores, stack)
    found: dict[str, list[tuple[float, int, int, int]]] = {mode: [] for mode in MODES}
    for number in range(1, runs + 1):
        for mode in MODES:
            measured, sent, core = bench.run(mode)
            found[mode].append((measured.seconds, sent, measured.peak_kib, core))
            _log(
                f"round {number}/{runs}: {mode} update {measured.seconds:.3f} s, "
                f"{sent} bytes sent ({core} not of the UKI), "
                f"peak RSS {measured.peak_kib / 1024:.1f} MiB"
            )
    best = {mode: min(values) for mode, values in found.items()}
    linked = {}
    if link:
        bench.use_link(stack, link)
        for mode in ("delta", "full"):
            measured, sent, core = bench.run(mode)
            linked[mode] = round(measured.seconds, 3)
            _log(f"over {link} Mbit/s: {mode} update {measured.seconds:.3f} s, {sent} bytes sent")
    return {
        "link_mbit_s": link,
        "link_seconds": linked,
        **{
            mode: {
                "seconds": round(best[mode][0], 3),
                "runs_seconds": [round(v[0], 3) for v in values],
                "bytes_sent": best[mode][1],
                "core_bytes_sent": best[mode][3],
                "peak_rss_mib": round(max(v[2] for v in values) / 1024, 1),
            }
            for mode, values in found.items()
        },
    }


# --- report ----------------------------------------------------------------------------


def report(pairs: list[PairResult], speed: dict[str, float], default: str) -> dict[str, Any]:
    data: dict[str, Any] = {"pairs": [], "publishing": speed}
    met = True
    for pair in pairs:
        ours = pair.delta_on_the_wire
        entry = {
            "pair": pair.name,
            "content_bound_bytes": pair.bound,
            "changed_files": pair.changed_files,
            "changed_bytes": pair.changed_bytes,
            "casync_bytes": pair.casync[0],
            "casync_chunks": pair.casync[1],
            "rampart": {k: {"bytes": v[0], "chunks": v[1]} for k, v in pair.rampart.items()},
            "delta_bytes": pair.delta,
            "delta_seconds": round(pair.delta_seconds, 1),
            "delta_on_the_wire_bytes": ours,
            "rampart_over_bound": round(ours / pair.bound, 3) if pair.bound else None,
            "casync_over_bound": round(pair.casync[0] / pair.bound, 3) if pair.bound else None,
        }
        if pair.name == "base -> plus":
            bytes_met = ours <= BYTES_TARGET * pair.bound and ours < pair.casync[0]
            entry["bytes_met"] = bytes_met
            met = met and bytes_met
        data["pairs"].append(entry)
    data["publishing_met"] = speed["rampart_mb_s"] >= PUBLISH_TARGET_MB_S
    data["met"] = met and data["publishing_met"]
    return data


def print_report(data: dict[str, Any], default: str) -> None:
    print("Incremental update fixture: Debian 12 minbase Cores (uncompressed squashfs)")
    for pair in data["pairs"]:
        print(
            f"{pair['pair']}: {pair['changed_files']} files new or changed "
            f"({pair['changed_bytes']} bytes); content bound (xz -9) {pair['content_bound_bytes']}"
        )
        print(
            f"  casync make (defaults, zstd 3): {pair['casync_bytes']} bytes in "
            f"{pair['casync_chunks']} chunks ({pair['casync_over_bound']}x the bound)"
        )
        for name, value in pair["rampart"].items():
            mark = " (default)" if name == default else ""
            ratio = (
                value["bytes"] / pair["content_bound_bytes"] if pair["content_bound_bytes"] else 0
            )
            print(f"  rampart chunks {name}{mark}: {value['bytes']} bytes in "
                  f"{value['chunks']} chunks ({ratio:.3f}x the bound)")  # fmt: skip
        print(
            f"  rampart delta: {pair['delta_bytes']} bytes (made in {pair['delta_seconds']} s); "
            f"Core on the wire with it {pair['delta_on_the_wire_bytes']} bytes "
            f"({pair['rampart_over_bound']}x the bound)"
        )
    speed = data["publishing"]
    print(
        f"publishing 1 GiB: rampart chunks and indexes at {speed['rampart_mb_s']} MB/s "
        f"({speed['rampart_seconds']} s), casync make {speed['casync_mb_s']} MB/s "
        f"({speed['casync_seconds']} s); "
        f"ratio {speed['casync_seconds'] / speed['rampart_seconds']:.2f}"
    )
    update = data.get("update", {})
    for mode in MODES if update else ():
        value = update[mode]
        print(
            f"update base -> plus, {mode}: {value['seconds']} s (runs {value['runs_seconds']}), "
            f"{value['bytes_sent']} bytes sent ({value['core_bytes_sent']} not of the UKI), "
            f"peak RSS {value['peak_rss_mib']} MiB"
        )
    for mode, seconds in update.get("link_seconds", {}).items():
        print(f"update base -> plus over {update['link_mbit_s']} Mbit/s, {mode}: {seconds} s")
    print(f"targets {'MET' if data['met'] else 'NOT MET'}")


def parse_compressions(text: str) -> list[tuple[str, int]]:
    found = []
    for item in text.split(","):
        method, _, level = item.partition(":")
        found.append((method, int(level)))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-update", action="store_true")
    parser.add_argument(
        "--link-mbit",
        type=int,
        default=100,
        help="also update once with the delta and once whole from an nginx limited to "
        "this rate (0: not)",
    )
    parser.add_argument(
        "--compressions",
        default="xz:6,zstd:19,zstd:3",
        help="the chunk compressions to compare (the first is the default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run it as root (debootstrap, chroot)")
    rampart = str(Path(sys.executable).with_name("rampart"))
    casync = shutil.which("casync")
    if casync is None:
        raise SystemExit("casync is missing: run `make setup`")
    compressions = parse_compressions(args.compressions)
    default = f"{compressions[0][0]}:{compressions[0][1]}"
    with terminate_as_interrupt(), ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="rampart-incremental-bench-", dir="/var/tmp"))
        stack.callback(shutil.rmtree, work, True)
        pairs, cores = measure_pairs(rampart, casync, work, compressions)
        updates = None
        if not args.skip_update:
            updates = measure_update(rampart, work, cores, args.runs, stack, args.link_mbit)
        _log("publishing speed: 1 GiB")
        speed = publish_speed(casync, work, args.runs)
    data = report(pairs, speed, default)
    if updates is not None:
        data["update"] = updates
        data["update_met"] = (
            updates["delta"]["seconds"] <= updates["full"]["seconds"]
            and max(updates[mode]["peak_rss_mib"] for mode in MODES) < RSS_TARGET_MIB
        )
        data["met"] = data["met"] and data["update_met"]
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_report(data, default)
    return 0


if __name__ == "__main__":
    sys.exit(main())

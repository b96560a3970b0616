"""Helpers shared by the benchmark scripts (run as `python bench/NAME.py`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a run like Ctrl-C: services stopped, work directory removed."""

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Stop(Exception):
    """A benchmark ended early (its message printed): the exit code main returns."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def in_work_directory(
    parent: Path,
    prefix: str,
    body: Callable[[Path, ExitStack], T],
    errors: tuple[type[Exception], ...],
    *,
    keep: bool = False,
) -> T:
    """Run `body(work, running)` in a new temporary directory under `parent`, with an
    ExitStack for the services it starts (stopped in reverse order at its end), SIGTERM
    taken as Ctrl-C; the directory removed at the end unless `keep`. One of `errors`
    is printed as one line and Stop(1) raised; an interruption, Stop(130)."""
    try:
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        print(f"bench: error: {parent}: {exc.strerror}", file=sys.stderr)
        raise Stop(1) from None
    try:
        with terminate_as_interrupt(), ExitStack() as running:
            return body(work, running)
    except errors as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        raise Stop(1) from None
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        raise Stop(130) from None
    finally:
        if keep:
            print(f"bench: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def positive_int(text: str) -> int:
    """An argparse type: an integer greater than 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


KERNEL = Path(__file__).resolve().parents[1] / ".cache" / "kernel" / "vmlinuz"
_MIB = 1 << 20


def build_release(
    rampart: str, work: Path, os_name: str, version: str, core_mib: int, initrd_mib: int = 0
) -> tuple[Path, Path]:
    """A real release, as `rampart publish` and the update client accept it:
    (`core-<V>.img`, `<os>-<V>.efi`) in `work`. Core is `rampart build core` of a
    tree holding `core_mib` MiB of random data (a squashfs with its verity tree);
    the EFI binary an unsigned `rampart build efiboot` UKI on the kernel `make setup`
    fetched, whose initrd is `initrd_mib` MiB of random bytes (4 KiB if 0: it is
    never booted)."""
    if not KERNEL.is_file():
        raise SystemExit(f"{KERNEL} is missing: run `make setup`")
    tree = work / f"rootfs-{version}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text(f"ID={os_name}\nVERSION_ID={version}\n")
    with (tree / "payload").open("xb") as handle:
        for _ in range(core_mib):
            handle.write(os.urandom(_MIB))
    initrd = work / f"initrd-{version}"
    initrd.write_bytes(os.urandom(initrd_mib * _MIB or 4096))
    efiboot = work / f"{os_name}-{version}.efi"
    try:
        subprocess.run(
            [rampart, "build", "core", tree, "--version", version, "--out", work],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            [rampart, "build", "efiboot", "--kernel", KERNEL, "--initrd", initrd, "--os", os_name,
             "--version", version, "--core-meta", work / f"core-{version}.json", "--out", efiboot],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        shutil.rmtree(tree)
        initrd.unlink()
    return work / f"core-{version}.img", efiboot


# Measured in a child, so that importing PyNaCl does not raise the RSS of the bench
# itself (sign_verify.py counts it in every child's ru_maxrss).
_SPEEDS = """\
import hashlib, json, time
from rampart.contracts import hashing
block = bytes(range(256)) * 4096  # 1 MiB
def speed(new):
    best = 0.0
    for _ in range(3):
        hasher = new(b"")
        start = time.perf_counter()
        for _ in range(128):
            hasher.update(block)
        hasher.digest()
        best = max(best, 128 * len(block) / (time.perf_counter() - start) / 1e6)
    return round(best)
speeds = {name: speed(new) for name, new in hashing.implementations().items()}
speeds["SHA-256 (hashlib)"] = speed(hashlib.sha256)
print(json.dumps({"chosen": hashing.implementation(), "mb_s": speeds}))
"""
CPU_FLAGS = ("avx2", "avx512f", "avx512vl", "sha_ni", "aes", "vaes")


def hash_info(python: str) -> dict[str, object]:
    """Which BLAKE2b-512 rampart uses on this machine, the speed of each one importable
    here and of SHA-256 (MB/s over 128 MiB in 1 MiB updates, best of 3), the CPU and
    the flags its hashes depend on: what makes a figure comparable across machines."""
    out = subprocess.run([python, "-c", _SPEEDS], check=True, capture_output=True, text=True)
    info: dict[str, object] = json.loads(out.stdout)
    model, flags = "?", set()
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    info["cpu"] = f"{model}, {os.cpu_count()} CPUs"
    info["cpu_flags"] = [flag for flag in CPU_FLAGS if flag in flags]
    return info


def hash_header(info: dict[str, object]) -> str:
    """`hash_info` as two lines for a bench's table."""
    speeds = info["mb_s"]
    assert isinstance(speeds, dict)
    flags = info["cpu_flags"]
    assert isinstance(flags, list)
    listed = ", ".join(f"{name} {mb_s} MB/s" for name, mb_s in speeds.items())
    return (
        f"hashes: BLAKE2b-512 from {info['chosen']}; {listed}\n"
        f"CPU: {info['cpu']}; flags: {' '.join(flags) or 'none of ' + ' '.join(CPU_FLAGS)}"
    )

"""Helpers shared by the benchmark scripts (run as `python bench/NAME.py`)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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

"""Test inputs for the image tests: the Debian kernel fetched by `make setup`, tiny
initramfs archives (newc cpio written here), and a Secure Boot QEMU run."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / ".cache" / "kernel" / "vmlinuz"
BUSYBOX = Path("/bin/busybox")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
MARKER = "RAMPART-BOOT-MARKER-7f3a"

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFCHR = 0o020000
_INODES = itertools.count(1)


def kernel() -> Path:
    """The Debian bzImage; fails (not skips) when absent: `make setup` fetches it."""
    if not KERNEL.is_file():
        pytest.fail(f"{KERNEL} is missing: run make setup (scripts/fetch-kernel.sh)")
    return KERNEL


def _newc(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    ino = next(_INODES)
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc archive of (path, mode, data); mode carries the file type."""
    out = b""
    for name, mode, data in entries:
        rdev = (5, 1) if mode & 0o170000 == _S_IFCHR else (0, 0)
        out += _newc(name, mode, data, rdev)
    out += _newc("TRAILER!!!", 0)
    return out + b"\0" * (-len(out) % 512)


def tiny_initrd(path: Path, payload: bytes = b"rampart test initrd\n") -> Path:
    """An initramfs with one file: enough to be a valid .initrd section."""
    path.write_bytes(cpio([("hello.txt", _S_IFREG | 0o644, payload)]))
    return path


INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t securityfs securityfs /sys/kernel/security
echo "RAMPART-CMDLINE:$(/bin/busybox cat /proc/cmdline)"
echo "RAMPART-LOCKDOWN:$(/bin/busybox cat /sys/kernel/security/lockdown 2>/dev/null)"
echo {MARKER}
/bin/busybox poweroff -f
"""


def busybox_initrd(path: Path) -> Path:
    """An initramfs whose /init (static busybox) prints the marker and powers off."""
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} is missing: run make setup (busybox-static)")
    path.write_bytes(
        cpio(
            [
                ("bin", _S_IFDIR | 0o755, b""),
                ("dev", _S_IFDIR | 0o755, b""),
                ("dev/console", _S_IFCHR | 0o600, b""),
                ("bin/busybox", _S_IFREG | 0o755, BUSYBOX.read_bytes()),
                ("init", _S_IFREG | 0o755, INIT.encode()),
            ]
        )
    )
    return path


@dataclass
class Boot:
    console: str
    seconds: float
    exited: bool  # QEMU stopped by itself (the guest powered off)


def boot(
    work: Path,
    esp: Path,
    vars_file: Path,
    timeout: float,
    stop_on: tuple[str, ...] = (),
) -> Boot:
    """Boot the ESP tree under OVMF (secboot build, SMM, TCG) with a copy of the vars.

    Stops when the guest powers off, when the console shows one of `stop_on`,
    or after `timeout` seconds; QEMU is always killed before returning.
    """
    for tool, path in (("qemu-system-x86_64", None), ("OVMF", OVMF_CODE)):
        if (path is None and shutil.which(tool) is None) or (path and not path.is_file()):
            pytest.fail(f"{tool} is missing: run make setup")
    vars_copy = work / "vars.fd"
    shutil.copyfile(vars_file, vars_copy)
    log = work / "console.log"
    log.write_bytes(b"")
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "q35,smm=on,accel=tcg",
        "-m",
        "768",
        "-global",
        "driver=cfi.pflash01,property=secure,value=on",
        "-drive",
        f"if=pflash,format=raw,unit=0,file={OVMF_CODE},readonly=on",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive",
        f"if=virtio,format=raw,file=fat:rw:{esp}",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{log}",
        "-net",
        "none",
        "-no-reboot",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    exited = False
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                exited = True
                break
            text = log.read_text(errors="replace")
            if any(s in text for s in stop_on):
                time.sleep(0.5)  # let the rest of the line arrive
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    seconds = time.monotonic() - start
    console = log.read_text(errors="replace")
    if exited and proc.returncode not in (0, None) and not console:
        raise AssertionError(f"qemu failed: {err.decode(errors='replace')[-2000:]}")
    return Boot(console, seconds, exited)


def pe_sections(path: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """name -> (vma, virtual size, file offset, raw size, data) read with pefile."""
    import pefile

    pe = pefile.PE(str(path), fast_load=True)
    try:
        out = {}
        for s in pe.sections:
            name = s.Name.rstrip(b"\0").decode()
            out[name] = (
                s.VirtualAddress,
                s.Misc_VirtualSize,
                s.PointerToRawData,
                s.SizeOfRawData,
                s.get_data()[: s.Misc_VirtualSize],
            )
        return out
    finally:
        pe.close()


def objdump_sections(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (size, vma, file offset) as objdump -h prints them."""
    out = subprocess.run(
        ["objdump", "-h", str(path)], check=True, capture_output=True, text=True
    ).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0].isdigit():
            found[parts[1]] = (int(parts[2], 16), int(parts[3], 16), int(parts[5], 16))
    return found


def dump_section(path: Path, name: str, work: Path) -> bytes:
    """A section's bytes as objcopy --dump-section writes them."""
    target = work / f"dump{name}"
    subprocess.run(
        ["objcopy", "--dump-section", f"{name}={target}", str(path), str(work / "scratch.efi")],
        check=True,
        capture_output=True,
    )
    return target.read_bytes()


def sbverify(path: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sbverify", "--cert", str(cert), str(path)], capture_output=True, text=True, check=False
    )


def image_cli(*argv: str | Path) -> tuple[int, str, str]:
    """Run an image verb (`build efiboot ...`) through its own parser, mapping errors to
    exit codes as rampart.cli does; returns (exit code, stdout, stderr)."""
    import argparse
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from rampart.commands.release import add_verbs
    from rampart.errors import RampartError

    parser = argparse.ArgumentParser(prog="rampart")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = verbs.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true")
        return sub

    add_verbs(verb, verbs)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            args = parser.parse_args([str(a) for a in argv])
            code = args.func(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
        except RampartError as exc:
            print(f"rampart: error: {exc}", file=err)
            code = exc.exit_code
    return code, out.getvalue(), err.getvalue()

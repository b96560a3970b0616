"""The testbed's virtual machines: QEMU (TCG) with virtio disks, optional swtpm and
user-mode networking, driven through the serial console.

    machine = Machine(work_dir, firmware=SecureBoot(vars_file),
                      disks=[Disk(overlay(installed, work_dir / "vda.qcow2"), "qcow2")],
                      tpm_state=work_dir / "tpm", network=True)
    with machine:
        machine.start()
        machine.wait_for_shell(300)
        result = machine.shell("rampart status")       # ShellResult(returncode, output)
        machine.check("systemctl is-system-running --wait", timeout=120)
        machine.kill()                                 # power cut
        machine.start()                                # same disks, TPM, console log

Configuration:

- `Firmware` is `SecureBoot(vars_file)` (OVMF's Secure Boot build, read-only
  code in pflash unit 0, the caller's writable variable store in unit 1, machine
  `q35,smm=on`, S3 disabled) or `DirectKernel(kernel, initrd, append)` (SeaBIOS
  loading a kernel directly, as the installer does).
- `Disk(path, format, read_only)`: virtio-blk disks in order, /dev/vda first. QEMU
  is always told the format: it never probes a guest-written raw image.
  `overlay(base, path)` makes a qcow2 overlay so a scenario can start from an
  installed disk without copying it.
- `tpm_state`: a directory holding the TPM's persistent state. A fresh `swtpm` is
  started for each `start()` (it exits when QEMU disconnects) on that directory.
  A TPM made for an empty directory (`swtpm_setup`) has one PCR bank, SHA-256
  (`PCR_BANKS`), as many PCs' TPMs have: swtpm alone would allocate SHA-1, SHA-256,
  SHA-384 and SHA-512, and the firmware, systemd's stub and the kernel would hash
  each measured image (the 23 MB UKI three times) in all four, under TCG: a boot
  reached the kernel about 20 s later on a busy host (66-76 s against 48-56 s).
- `network`: QEMU user-mode networking on a virtio NIC; the guest reaches the
  host's loopback at 10.0.2.2. Without it the machine has no NIC. `forwards`:
  (host port, guest port) pairs, TCP from the host's 127.0.0.1 into the guest.
- `memory` in MiB (default 1024) and `cpus` (default `DEFAULT_CPUS`).
- `cold_reboot`: when True, a reset by the guest is a power cycle: QEMU exits at
  the kernel's reset line (`-no-reboot`) and the next `expect` (or `wait_for_shell`,
  `shell`...) starts it again, as `kill()` then `start()` would (same disks,
  variables and TPM state; a boot clock the test started keeps running). Under
  TCG, OVMF's Secure Boot build takes 35 to 45 s longer to come back from a warm
  reset than from power-on (measured on this 2-core host), and a scenario reboots
  its guest some twenty times. Default False: the reset stays inside QEMU.

Work files, in the work directory given to the constructor (created mode 0700;
it must not be reachable by other users: the console is a root shell):
console.sock and qmp.sock (QEMU's sockets), console.log (everything the guest
printed, across guest reboots and across `start()`s: QEMU appends to it),
qemu.log (QEMU's stderr, appended), swtpm.sock, swtpm.log (swtpm's log and
output, appended).

Lifecycle: `start()` starts swtpm (when configured), then QEMU, connects to the
console before the guest runs (QEMU waits for that connection: no output is
lost), and waits for QEMU's QMP greeting, which it sends only once the machine
is fully set up, so a bad disk or option raises LocalError quoting QEMU's last
error line. Guest reboots stay inside the same QEMU process (the firmware starts
again; swtpm keeps running) unless `cold_reboot` is set. `kill()` is a power cut
(SIGKILL to QEMU, then swtpm is reaped); `shutdown_wait(timeout)` waits for the
guest to power off;
`close()`, leaving the `with` block, garbage collection and interpreter exit all
kill whatever is left.

The probe: with `probe=True`, the machine has a second console, a virtio console
(the guest's /dev/hvc0, port PROBE_PORT_NAME) on probe.sock, logged to probe.log. It
is the testbed's instrument, like a debug probe on a board: the testbed's Core runs
root's shell there (rampart.testbed.rootfs), and nobody logs in on the serial
console. Then `wait_for_shell`, `shell`, `check`, `type_in_shell` and `interact` use
the probe, while `expect`, `send` and `console_log` stay on the serial console
(firmware, kernel, initramfs, login prompt): kernel messages no longer mix into a
command's output. Without it (the default) the shell is on the serial console.

Console: a reader thread keeps everything the guest printed, decoded as UTF-8
(invalid bytes replaced), with carriage returns, ANSI escape sequences and other
control characters (except tab and newline) removed. `expect(pattern, timeout)`
searches from a cursor: text consumed by an earlier match is not matched again;
`start()` and `mark()` move the cursor to the end. Patterns are regular
expressions (a `str` is compiled; `^` needs re.MULTILINE). On timeout it
raises `ConsoleTimeout` (message: the pattern, the timeout, the console's last
lines); if QEMU exits first, `MachineExited`. `expect_any(patterns, timeout)`
returns the index of the pattern matching first in the text, and the match.
`send(text)` types text. `wait_for_shell(timeout)` waits for the root prompt
`PROMPT`, pressing Enter whenever the console has been silent for a few seconds.
`shell(command, timeout)` runs one line in that shell and returns its exit code
and output (kernel messages printed meanwhile may be mixed in); `check(...)`
raises `GuestCommandFailed` when the exit code is not 0. `interact()` attaches
the terminal to the console (for a person; Ctrl-] detaches).

Firmware hang at reset: rarely (once in some hundred guest reboots under TCG, with
OVMF's SMM build and two vCPUs), a guest's reset never reaches the firmware: after
the kernel's "reboot: machine restart" the console stays silent for good. While an
`expect` waits and the console has been silent for `reset_hang_after` seconds
(default `RESET_HANG_SECONDS`; None turns it off) right after that line, the machine
is power-cycled (`kill()` then `start()`: same disks, variables and TPM state, so a
one-shot boot entry the guest set is still pending), with a warning in the log;
`hang_restarts` counts them. The OVMF boot manager prints within seconds of a reset,
so the wait is far above any real boot. The same holds for a guest silent after a
line of systemd-shutdown printed once every file system is unmounted (seen once: it
never finished detaching device-mapper devices), and for a kernel silent before it
started init (seen once: at 2.7 s of its boot, after a panic's reboot on a busy host);
there the power cycle costs what a power cut at that point would: systemd-boot already
spent a one-shot entry or a boot-counting try. `hang_point(text)` says which.

Time factor: a busy host runs a TCG guest slower, and so every wait of the driver
(each `expect` and `wait_for_shell` timeout, hence each `shell` and `check`, the
reset-hang silence, QEMU's and swtpm's start, `shutdown_wait`) is multiplied by
the machine's `time_factor` (default 1). `time_factor(seconds)` derives it from
how long this host took to boot the reference guest (the kernel and a busybox
initramfs, to the marker its /init prints; REFERENCE_BOOT_SECONDS on an idle
2-core host), clamped to [1, MAX_TIME_FACTOR]: the tests measure it once per run
and give it to every machine. A timeout's message shows both values.

Timing: `start()` starts a boot clock (`start_boot_clock(label)` starts it for a
reboot the test caused) and the next `wait_for_shell()` records
`BootTiming(label, seconds)` in `timings`.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import re
import secrets
import select
import socket
import sys
import termios
import threading
import time
import tty
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from rampart import run
from rampart.errors import ConflictError, LocalError, UsageError
from rampart.testbed.rootfs import PROMPT

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"
PCR_BANKS = "sha256"  # the PCR banks of a new TPM (swtpm_setup --pcr-banks)
TPM_STATE_FILE = "tpm2-00.permall"  # what swtpm keeps in its state directory
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")  # no keys enrolled
DEFAULT_MEMORY_MIB = 1024
# Measured under TCG on a 2-core host (QEMU 7.2, whose default for x86 is MTTCG, one
# host thread per vCPU). Alone on an idle host, Debian bookworm's systemd (root in an
# initramfs) reaches the shell in about 9 s with 2 vCPUs against 11 s with 1. But
# `make test` runs two guests at once (scripts/test.sh), whose vCPU threads then share
# the two cores with each other and the tests: two testbed guests booting together
# reached their shell in 63-68 s with 1 vCPU each against 101-106 s with 2, and a
# restart took 92-97 s against 129 s. So one.
DEFAULT_CPUS = 1
REFERENCE_CPUS = 2  # the reference guest's (REFERENCE_BOOT_SECONDS was measured so)
CONSOLE_TAIL_LINES = 30
RESET_HANG_SECONDS = 90.0  # silence after the kernel's reset line: the firmware hung
# The reference guest (DirectKernel: the Debian kernel and a busybox initramfs, 2 vCPUs)
# from start() to the marker its /init prints, on an idle 2-core host (AMD EPYC, QEMU
# 7.2 TCG). Measured as the CPU time QEMU spends on that boot, which a busy host does
# not change (10.9 to 11.3 s in six runs at load 3 to 8, whose wall times were 16 to
# 34 s), about 9 s of it on the first vCPU, which the boot waits for: idle, 10 s.
REFERENCE_BOOT_SECONDS = 10.0
MAX_TIME_FACTOR = 4.0  # beyond this the host is too busy for the tests to mean much
PROBE_PORT_NAME = "org.rampart.probe"  # the probe's virtio port (/sys/class/virtio-ports)

DiskFormat: TypeAlias = Literal["raw", "qcow2"]
_DISK_FORMATS = ("raw", "qcow2")
_START_TIMEOUT = 30.0  # seconds for swtpm and QEMU to set up
_REAP_TIMEOUT = 10.0
_NUDGE_AFTER = 5.0  # wait_for_shell presses Enter after this many silent seconds
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
_MAX_SHELL_LINE = 4000  # the tty keeps at most 4095 characters of a typed-ahead line
_RC_PREFIX = "__rc_"
_RESET_LINE = re.compile(r"reboot: (?:machine restart|Restarting system)\s*\Z")
# The last line is systemd-shutdown's, once it has unmounted every file system: a
# guest that then stays silent hung on its way to the reset (seen once: the third
# round of "Detaching DM devices" never finished), and a power cut loses nothing.
_SHUTDOWN_LINE = re.compile(r"systemd-shutdown\[1\]: [^\n]*\s*\Z")
_UNMOUNTED = "systemd-shutdown[1]: All filesystems unmounted."
_BOOT_LINE = "Linux version"
# The kernel's own start, from its first line to starting init: seconds under TCG. Seen
# once (scenario 5, on a busy host): a kernel silent for good after "VFS: Dquot-cache
# hash table entries" at 2.7 s, its next line normally 0.01 s later.
_KERNEL_LINE = re.compile(r"(?:\A|\n)\[\s*\d+\.\d+\] [^\n]*\s*\Z")
_INIT_LINE = re.compile(r"\] Run \S+ as init process")
_PROMPT = re.compile(re.escape(PROMPT))

# ANSI escape sequences: CSI, OSC (ended by BEL or ST), then any other ESC sequence
# (intermediate bytes and a final byte). Other C0 controls, CR among them, and DEL
# are removed as well; tab and newline stay.
_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[ -/]*[0-~]"
    r"|[\x00-\x08\x0b-\x1f\x7f]"
)
# The start of an escape sequence cut at the end of the data received so far.
_INCOMPLETE_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[ -/]*)")
_MAX_ESCAPE = 256  # longer unfinished sequences are not held back


class ConsoleError(LocalError):
    """Something expected on a machine's serial console did not come."""


class ConsoleTimeout(ConsoleError):
    """`expect` saw no match within its timeout; the message ends with the console's tail."""


class MachineExited(ConsoleError):
    """QEMU exited (or was never started) while a console match was awaited."""


class GuestCommandFailed(LocalError):
    """`check` ran a command in the guest that exited with a non-zero code."""

    def __init__(self, message: str, command: str, returncode: int, output: str) -> None:
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.output = output


@dataclass(frozen=True)
class Disk:
    """A virtio-blk disk: the guest sees the first as /dev/vda, the second /dev/vdb..."""

    path: Path
    format: DiskFormat = "raw"
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.format not in _DISK_FORMATS:
            raise UsageError(f"disk {self.path}: format must be raw or qcow2, not {self.format}")


@dataclass(frozen=True)
class SecureBoot:
    """OVMF's Secure Boot build on q35 with SMM; `vars_file` is the machine's own
    writable copy of a variable store (enrolled keys decide whether Secure Boot is
    enforced). With `kernel` (a signed UKI), OVMF boots it directly (QEMU's -kernel:
    the firmware checks its signature like any other image) instead of the disks."""

    vars_file: Path
    code: Path = OVMF_CODE
    kernel: Path | None = None


@dataclass(frozen=True)
class DirectKernel:
    """SeaBIOS loading `kernel` (and `initrd`) directly, with the command line `append`."""

    kernel: Path
    initrd: Path | None = None
    append: str = "console=ttyS0"


Firmware: TypeAlias = SecureBoot | DirectKernel


@dataclass(frozen=True)
class ShellResult:
    """What `Machine.shell` returns: the exit code and the output (CR removed)."""

    returncode: int
    output: str


@dataclass(frozen=True)
class BootTiming:
    """Seconds from `start()` (label "start") or `start_boot_clock(label)` to the prompt."""

    label: str
    seconds: float


@dataclass(frozen=True)
class WorkFiles:
    """Where a machine's sockets and logs live."""

    console_socket: Path
    console_log: Path
    qmp_socket: Path
    qemu_log: Path
    tpm_socket: Path
    tpm_log: Path
    probe_socket: Path
    probe_log: Path

    @classmethod
    def in_dir(cls, work_dir: Path) -> WorkFiles:
        work_dir = work_dir.absolute()
        return cls(
            console_socket=work_dir / "console.sock",
            console_log=work_dir / "console.log",
            qmp_socket=work_dir / "qmp.sock",
            qemu_log=work_dir / "qemu.log",
            tpm_socket=work_dir / "swtpm.sock",
            tpm_log=work_dir / "swtpm.log",
            probe_socket=work_dir / "probe.sock",
            probe_log=work_dir / "probe.log",
        )

    @property
    def sockets(self) -> tuple[Path, ...]:
        return (self.console_socket, self.qmp_socket, self.tpm_socket, self.probe_socket)


# --- pure helpers ---------------------------------------------------------------------


def _qemu_value(value: str | Path) -> str:
    """A value inside a QEMU key=value option list (a comma is written twice)."""
    return str(value).replace(",", ",,")


def qemu_argv(
    *,
    firmware: Firmware,
    disks: Sequence[Disk],
    files: WorkFiles,
    memory: int = DEFAULT_MEMORY_MIB,
    cpus: int = DEFAULT_CPUS,
    tpm: bool = False,
    network: bool = False,
    name: str = "rampart",
    no_reboot: bool = False,
    probe: bool = False,
    forwards: Sequence[tuple[int, int]] = (),
) -> list[str]:
    """QEMU's command line for a machine (no defaults devices, no display, no monitor
    but QMP on a socket, the serial console on `files.console_socket`); `no_reboot`:
    QEMU exits when the guest resets; `probe`: a virtio console (the guest's
    /dev/hvc0) on `files.probe_socket`; `forwards`: (host port, guest port) pairs,
    TCP from the host's loopback to the guest (user-mode networking)."""
    argv = [QEMU, "-nodefaults", "-no-user-config", "-name", _qemu_value(name)]
    if no_reboot:
        argv.append("-no-reboot")
    if isinstance(firmware, SecureBoot):
        argv += [
            "-machine",
            "q35,smm=on,accel=tcg",
            "-global",
            "driver=cfi.pflash01,property=secure,value=on",
            "-global",
            "ICH9-LPC.disable_s3=1",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={_qemu_value(firmware.code.absolute())}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={_qemu_value(firmware.vars_file.absolute())}",
        ]
        if firmware.kernel is not None:
            argv += ["-kernel", str(firmware.kernel.absolute())]
    else:
        argv += ["-machine", "q35,accel=tcg", "-kernel", str(firmware.kernel.absolute())]
        if firmware.initrd is not None:
            argv += ["-initrd", str(firmware.initrd.absolute())]
        argv += ["-append", firmware.append]
    argv += [
        "-m",
        str(memory),
        "-smp",
        str(cpus),
        "-display",
        "none",
        # wait=on: QEMU starts the guest only once the driver is connected.
        "-chardev",
        f"socket,id=ser0,path={_qemu_value(files.console_socket)},server=on,wait=on,"
        f"logfile={_qemu_value(files.console_log)},logappend=on",
        "-serial",
        "chardev:ser0",
        "-chardev",
        f"socket,id=qmp0,path={_qemu_value(files.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp0,mode=control",
    ]
    for index, disk in enumerate(disks):
        drive = (
            f"if=none,id=disk{index},format={disk.format},file={_qemu_value(disk.path.absolute())}"
        )
        if disk.read_only:
            drive += ",readonly=on"
        argv += ["-drive", drive, "-device", f"virtio-blk-pci,drive=disk{index}"]
    if tpm:
        argv += [
            "-chardev",
            f"socket,id=chrtpm,path={_qemu_value(files.tpm_socket)}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]
    if network:
        netdev = "user,id=net0" + "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards
        )
        argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
    elif forwards:
        raise UsageError("port forwards need the network")
    if probe:
        argv += [
            "-device",
            "virtio-serial-pci,id=probebus",
            "-chardev",
            f"socket,id=probe0,path={_qemu_value(files.probe_socket)},server=on,wait=off,"
            f"logfile={_qemu_value(files.probe_log)},logappend=on",
            "-device",
            f"virtconsole,bus=probebus.0,chardev=probe0,name={PROBE_PORT_NAME}",
        ]
    return argv


def swtpm_setup_argv(state_dir: Path) -> list[str]:
    """swtpm_setup's command line: manufacture a TPM 2.0 in the empty `state_dir`,
    with the PCR banks `PCR_BANKS` (no EK certificate: nothing here asks for one)."""
    if "," in str(state_dir):
        raise LocalError(f"{state_dir}: swtpm cannot take a path with a comma")
    return [
        SWTPM_SETUP,
        "--tpm2",
        "--tpmstate",
        str(state_dir.absolute()),
        "--pcr-banks",
        PCR_BANKS,
    ]


def swtpm_argv(state_dir: Path, files: WorkFiles) -> list[str]:
    """swtpm's command line: a TPM 2.0 on a control socket, ending with its client."""
    for path in (state_dir, files.tpm_socket, files.tpm_log):
        if "," in str(path):
            raise LocalError(f"{path}: swtpm cannot take a path with a comma")
    return [
        SWTPM,
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state_dir.absolute()}",
        "--ctrl",
        f"type=unixio,path={files.tpm_socket},mode=0600",
        "--terminate",
        "--log",
        f"file={files.tpm_log},level=1",
    ]


def time_factor(boot_seconds: float, reference: float = REFERENCE_BOOT_SECONDS) -> float:
    """How many times slower than the reference this host booted the reference guest,
    clamped to [1, MAX_TIME_FACTOR] (rounded to 0.1): what every wait is multiplied by."""
    if not boot_seconds > 0 or not reference > 0:
        raise UsageError(f"a boot time must be positive, not {boot_seconds} / {reference}")
    return round(min(max(boot_seconds / reference, 1.0), MAX_TIME_FACTOR), 1)


def hang_point(text: str) -> str | None:
    """Where a guest whose console ends with `text` and then stays silent has hung:
    "reset" (the kernel's reset line: the firmware never ran), "shutdown" (a line of
    systemd-shutdown after it unmounted every file system), "kernel" (a kernel line
    before the kernel started init: nothing of the system ran yet), or None (silence
    after anything else is no hang)."""
    tail = text[-200:]
    if _RESET_LINE.search(tail):
        return "reset"
    boot = text.rfind(_BOOT_LINE)
    if _SHUTDOWN_LINE.search(tail) and text.rfind(_UNMOUNTED) > boot:
        return "shutdown"
    if boot >= 0 and _KERNEL_LINE.search(tail) and not _INIT_LINE.search(text, boot):
        return "kernel"
    return None


def clean_console(text: str) -> str:
    """`text` without escape sequences, carriage returns and other control characters."""
    return _ESCAPE.sub("", text)


def shell_line(command: str, token: str) -> str:
    """What `shell` types: the command, then an echo of its exit code after a marker."""
    return f'{command}; echo "{_RC_PREFIX}{token}=$?"\n'


def shell_marker(token: str) -> re.Pattern[str]:
    """The marker line's pattern, group 1 the exit code. The echoed input holds `$?`
    there, not digits; the digits must be followed by something (all of them came)."""
    return re.compile(rf"{_RC_PREFIX}{token}=(\d+)(?=\D)")


def shell_output(region: str, token: str) -> str:
    """The output in `region`, the console text from before the command was typed to
    the marker: what follows the (last) echo of the typed line. Line editing wraps a
    long line at the terminal's width: the echo may hold newlines anywhere."""
    wrapped = re.compile("\n*".join(re.escape(c) for c in f'{_RC_PREFIX}{token}=$?"'))
    echo_end = 0
    for echo_end_match in wrapped.finditer(region):
        echo_end = echo_end_match.end()
    newline = region.find("\n", echo_end)
    return "" if newline < 0 else region[newline + 1 :]


def overlay(base: Path, path: Path, *, base_format: DiskFormat = "raw") -> Path:
    """Create `path`, a qcow2 image whose backing file is `base` (absolute: qemu-img
    records it as given), and return it. Writes go to the overlay; `base` must not
    change while it is in use."""
    if not base.is_absolute():
        raise UsageError(f"overlay base {base} must be an absolute path")
    if base_format not in _DISK_FORMATS:
        raise UsageError(f"overlay base {base}: format must be raw or qcow2, not {base_format}")
    if not base.exists():
        raise LocalError(f"overlay base {base} does not exist")
    if path.exists() or path.is_symlink():
        raise ConflictError(f"{path} already exists: not overwritten with an overlay")
    run.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(path)]
    )
    return path


def _describe(pattern: re.Pattern[str]) -> str:
    return f"/{pattern.pattern}/"


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    return re.compile(pattern) if isinstance(pattern, str) else pattern


def _last_error_line(path: Path, offset: int) -> str:
    """The last line a process wrote to `path` after `offset`, but QEMU's info lines."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "no error output"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if ": info: " not in line]
    return lines[-1] if lines else "no error output"


def _read_line(sock: socket.socket) -> bytes:
    """One line from `sock` read a byte at a time (nothing past it is consumed), or
    b"" at the end of the stream."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            return b""
        line += byte
    return line


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _listening(path: Path) -> bool:
    """Whether a Unix stream socket listens on `path` (/proc/net/unix), found without
    connecting to it (swtpm --terminate would exit when that connection closes)."""
    with open("/proc/net/unix") as table:
        next(table)  # Num RefCount Protocol Flags Type St Inode Path
        for line in table:
            fields = line.rstrip("\n").split(maxsplit=7)
            if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return True
    return False


# --- the console buffer ---------------------------------------------------------------


class ConsoleBuffer:
    """The cleaned text of a console and the cursor `expect` searches from.

    `feed` takes raw bytes as they come; a UTF-8 sequence or an escape sequence cut
    at the end of a chunk waits for the next one. Not thread-safe: `Machine` locks.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._chunks: list[str] = []
        self._text = ""
        self.cursor = 0

    def feed(self, data: bytes) -> None:
        text = self._held + self._decoder.decode(data)
        self._held = ""
        floor = max(0, len(text) - _MAX_ESCAPE)
        start = text.find("\x1b", floor)
        while start >= 0:
            if _INCOMPLETE_ESCAPE.fullmatch(text, start):
                text, self._held = text[:start], text[start:]
                break
            start = text.find("\x1b", start + 1)
        if text:
            self._chunks.append(clean_console(text))

    def flush(self) -> None:
        """The end of a stream: whatever is held back is cleaned and kept."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        self._decoder.reset()
        if text:
            self._chunks.append(clean_console(text))

    @property
    def text(self) -> str:
        if self._chunks:
            self._text += "".join(self._chunks)
            self._chunks.clear()
        return self._text

    def mark(self) -> None:
        self.cursor = len(self.text)

    def search(self, patterns: Sequence[re.Pattern[str]]) -> tuple[int, re.Match[str]] | None:
        """The pattern matching earliest after the cursor (the first listed on a tie),
        without consuming it."""
        text = self.text
        best: tuple[int, re.Match[str]] | None = None
        for index, pattern in enumerate(patterns):
            match = pattern.search(text, self.cursor)
            if match is not None and (best is None or match.start() < best[1].start()):
                best = (index, match)
        return best

    def tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        return "\n".join(self.text.rstrip("\n").split("\n")[-lines:])


# --- the machine ------------------------------------------------------------------------


@dataclass
class _Children:
    """The processes of a machine, shared with its finalizer (which must not hold it)."""

    qemu: run.Process | None = None
    swtpm: run.Process | None = None


def _reap(children: _Children) -> None:
    """Kill QEMU at once, then let swtpm end (it exits when QEMU disconnects)."""
    qemu, swtpm = children.qemu, children.swtpm
    if qemu is not None:
        qemu.kill()
        qemu.wait(_REAP_TIMEOUT)
    if swtpm is not None:
        try:
            swtpm.wait(5.0)
        except LocalError:
            log.warning("swtpm (pid %d) still running without QEMU: killed", swtpm.pid)
            swtpm.kill()
            swtpm.wait(_REAP_TIMEOUT)


def _finalize(children: _Children) -> None:
    if any(p is not None and p.poll() is None for p in (children.qemu, children.swtpm)):
        log.warning("a test machine was left running: killed")
    try:
        _reap(children)
    except LocalError as exc:  # pragma: no cover - a process stuck in the kernel
        log.error("%s", exc)


@dataclass
class _Stream:
    """What one of the guest's consoles printed, and when it last did."""

    name: str
    buffer: ConsoleBuffer = field(default_factory=ConsoleBuffer)
    last_output: float = field(default_factory=time.monotonic)


@dataclass
class _Connection:
    """One QEMU run's console socket and its reader thread (and the probe's)."""

    sock: socket.socket
    thread: threading.Thread | None = None
    eof: bool = False
    qmp: socket.socket | None = None  # QMP in command mode: QEMU's events
    probe: socket.socket | None = None
    probe_thread: threading.Thread | None = None

    def shutdown_reason(self) -> str | None:
        """The reason of QEMU's SHUTDOWN event ("guest-reset", "guest-shutdown",
        "host-signal"...), read once QEMU exited; None if it sent none."""
        if self.qmp is None:
            return None
        reason = None
        self.qmp.settimeout(_REAP_TIMEOUT)
        with contextlib.suppress(OSError):
            while line := _read_line(self.qmp):
                with contextlib.suppress(ValueError):
                    message = json.loads(line)
                    if isinstance(message, dict) and message.get("event") == "SHUTDOWN":
                        data = message.get("data")
                        if isinstance(data, dict) and isinstance(data.get("reason"), str):
                            reason = data["reason"]
        return reason


@dataclass
class _BootClock:
    label: str
    started: float = field(default_factory=time.monotonic)


class Machine:
    """A QEMU virtual machine and its serial console; see the module documentation."""

    def __init__(
        self,
        work_dir: Path,
        *,
        firmware: Firmware,
        disks: Sequence[Disk] = (),
        memory: int = DEFAULT_MEMORY_MIB,
        cpus: int = DEFAULT_CPUS,
        tpm_state: Path | None = None,
        network: bool = False,
        name: str = "vm",
        reset_hang_after: float | None = RESET_HANG_SECONDS,
        time_factor: float = 1.0,
        cold_reboot: bool = False,
        probe: bool = False,
        forwards: Sequence[tuple[int, int]] = (),
    ) -> None:
        if memory < 64 or cpus < 1:
            raise UsageError(f"{name}: need at least 64 MiB and 1 CPU, not {memory}/{cpus}")
        if not 1.0 <= time_factor <= MAX_TIME_FACTOR:
            raise UsageError(
                f"{name}: time factor {time_factor} is not in [1, {MAX_TIME_FACTOR:g}]"
            )
        self.work_dir = work_dir.absolute()
        self.files = WorkFiles.in_dir(self.work_dir)
        for sock in self.files.sockets:
            if len(os.fsencode(sock)) > _UNIX_PATH_MAX:
                raise LocalError(f"{sock}: path too long for a Unix socket (work directory)")
        self.firmware = firmware
        self.disks = tuple(disks)
        self.memory = memory
        self.cpus = cpus
        self.tpm_state = tpm_state.absolute() if tpm_state is not None else None
        self.network = network
        self.name = name
        self.reset_hang_after = reset_hang_after
        self.time_factor = time_factor
        self.cold_reboot = cold_reboot
        self.forwards = tuple(forwards)
        self.cold_reboots = 0  # guest resets turned into power cycles
        self.hang_restarts = 0
        self._hung_at = -1  # the console text's length when the last hang was handled
        self._children = _Children()
        self._finalizer = weakref.finalize(self, _finalize, self._children)
        self._cond = threading.Condition()
        self._console = _Stream("console")
        self._buffer = self._console.buffer
        self._probe = _Stream("probe") if probe else None
        self._shell = self._probe or self._console  # where root's shell runs
        self._conn: _Connection | None = None
        self._clock: _BootClock | None = None
        self._timings: list[BootTiming] = []
        self._qemu_log_offset = 0
        self._tap: Callable[[bytes], None] | None = None  # interact(): raw output

    def scaled(self, seconds: float) -> float:
        """`seconds` of an idle host, on this one: times `time_factor`."""
        return seconds * self.time_factor

    def _waited(self, seconds: float) -> str:
        """A timeout as a message shows it: the wait, and what it was scaled from."""
        if self.time_factor == 1.0:
            return f"{seconds:g} s"
        return f"{self.scaled(seconds):.3g} s ({seconds:g} s x time factor {self.time_factor:g})"

    # --- lifecycle ---

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def console_log(self) -> Path:
        return self.files.console_log

    @property
    def running(self) -> bool:
        """Whether QEMU is running (whatever the guest is doing)."""
        qemu = self._children.qemu
        return qemu is not None and qemu.poll() is None

    @property
    def tpm_running(self) -> bool:
        swtpm = self._children.swtpm
        return swtpm is not None and swtpm.poll() is None

    @property
    def timings(self) -> list[BootTiming]:
        return list(self._timings)

    @property
    def qemu_pid(self) -> int | None:
        """The process ID of the last QEMU started (running or not)."""
        qemu = self._children.qemu
        return qemu.pid if qemu is not None else None

    @property
    def swtpm_pid(self) -> int | None:
        """The process ID of the last swtpm started (running or not)."""
        swtpm = self._children.swtpm
        return swtpm.pid if swtpm is not None else None

    def start(self) -> None:
        """Power on: swtpm (when configured), then QEMU; return once QEMU is set up and
        the console connected. The console cursor moves to the end."""
        if self.running:
            raise LocalError(f"{self.name}: already running")
        self._stop()  # what is left of a run that powered off
        self._check_inputs()
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sock in self.files.sockets:
            sock.unlink(missing_ok=True)
        with self._cond:
            self._mark()
        self._clock = _BootClock("start")
        try:
            if self.tpm_state is not None:
                self._start_swtpm(self.tpm_state)
            self._start_qemu()
        except BaseException:
            self._stop()
            raise

    def kill(self) -> None:
        """Power cut: SIGKILL QEMU at once, then reap it and swtpm."""
        if self.running:
            log.info("%s: power cut (QEMU pid %s killed)", self.name, self.qemu_pid)
        self._stop()

    def shutdown_wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for QEMU to exit by itself (the guest powered
        off); True when it did (everything is then reaped)."""
        qemu = self._children.qemu
        if qemu is None:
            return True
        deadline = time.monotonic() + self.scaled(timeout)
        while (code := qemu.poll()) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        log.info("%s: QEMU exited with code %d", self.name, code)
        self._stop()
        return True

    def close(self) -> None:
        """Kill whatever is left (QEMU, swtpm); the machine can be started again."""
        self._stop()

    def _check_inputs(self) -> None:
        firmware = self.firmware
        if isinstance(firmware, SecureBoot):
            needed = [firmware.code, firmware.vars_file]
        else:
            needed = [firmware.kernel] + ([firmware.initrd] if firmware.initrd else [])
        needed += [disk.path for disk in self.disks]
        for path in needed:
            if not path.exists():
                raise LocalError(f"{self.name}: {path} does not exist")

    def _start_swtpm(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (state_dir / TPM_STATE_FILE).exists():
            run.run(swtpm_setup_argv(state_dir), timeout=self.scaled(_START_TIMEOUT))
            log.debug("%s: new TPM in %s (PCR banks %s)", self.name, state_dir, PCR_BANKS)
        offset = _file_size(self.files.tpm_log)
        swtpm = run.spawn(
            swtpm_argv(state_dir, self.files),
            stdout_path=self.files.tpm_log,
            stderr_path=self.files.tpm_log,
        )
        self._children.swtpm = swtpm
        deadline = time.monotonic() + self.scaled(_START_TIMEOUT)
        while not _listening(self.files.tpm_socket):
            code = swtpm.poll()
            if code is not None:
                last = _last_error_line(self.files.tpm_log, offset)
                raise LocalError(f"{self.name}: swtpm exited with code {code} at start: {last}")
            if time.monotonic() >= deadline:
                raise LocalError(
                    f"{self.name}: swtpm not listening after {self._waited(_START_TIMEOUT)}"
                )
            time.sleep(0.02)
        log.debug("%s: swtpm listening (pid %d)", self.name, swtpm.pid)

    def _start_qemu(self) -> None:
        self._qemu_log_offset = _file_size(self.files.qemu_log)
        argv = qemu_argv(
            firmware=self.firmware,
            disks=self.disks,
            files=self.files,
            memory=self.memory,
            cpus=self.cpus,
            tpm=self.tpm_state is not None,
            network=self.network,
            name=self.name,
            no_reboot=self.cold_reboot,
            probe=self._probe is not None,
            forwards=self.forwards,
        )
        qemu = run.spawn(argv, stdout_path=self.files.qemu_log, stderr_path=self.files.qemu_log)
        self._children.qemu = qemu
        deadline = time.monotonic() + self.scaled(_START_TIMEOUT)
        conn = _Connection(self._connect(self.files.console_socket, deadline))
        conn.thread = threading.Thread(
            target=self._read_console,
            args=(conn, conn.sock, self._console),
            name=f"{self.name}-console",
            daemon=True,
        )
        if self._probe is not None:  # wait=off: connected before the guest opens it
            conn.probe = self._connect(self.files.probe_socket, deadline)
            conn.probe_thread = threading.Thread(
                target=self._read_console,
                args=(conn, conn.probe, self._probe),
                name=f"{self.name}-probe",
                daemon=True,
            )
        with self._cond:
            self._conn = conn
            self._console.last_output = time.monotonic()
            if self._probe is not None:
                self._probe.last_output = time.monotonic()
        conn.thread.start()
        if conn.probe_thread is not None:
            conn.probe_thread.start()
        # QEMU greets a QMP client from its main loop, once every device is set up.
        # The connection stays open: in command mode QEMU reports on it why it shut
        # down (the SHUTDOWN event), which tells a guest's reset from its power-off.
        qmp = self._connect(self.files.qmp_socket, deadline)
        conn.qmp = qmp
        qmp.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            greeting = _read_line(qmp)
            if greeting:
                qmp.sendall(b'{"execute": "qmp_capabilities"}\n')
                while (answer := _read_line(qmp)) and b'"return"' not in answer:
                    pass
                greeting = answer
        except TimeoutError:
            raise LocalError(
                f"{self.name}: QEMU not ready after {self._waited(_START_TIMEOUT)}"
            ) from None
        except OSError:  # reset: QEMU is exiting
            greeting = b""
        if not greeting:
            with contextlib.suppress(LocalError):
                qemu.wait(5.0)
            raise self._qemu_failed()
        log.info("%s: QEMU running (pid %d)", self.name, qemu.pid)

    def _qemu_failed(self) -> LocalError:
        qemu = self._children.qemu
        code = qemu.poll() if qemu is not None else None
        how = "failed" if code is None else f"exited with code {code}"
        last = _last_error_line(self.files.qemu_log, self._qemu_log_offset)
        return LocalError(f"{self.name}: QEMU {how} at start: {last}")

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        """Connect to one of QEMU's server sockets, waiting for QEMU to create it."""
        qemu = self._children.qemu
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            except OSError as exc:
                sock.close()
                raise LocalError(f"{self.name}: cannot connect to QEMU's {path}: {exc}") from exc
            if qemu is None or qemu.poll() is not None:
                raise self._qemu_failed()
            if time.monotonic() >= deadline:
                raise LocalError(
                    f"{self.name}: no QEMU socket {path} after {self._waited(_START_TIMEOUT)}"
                )
            time.sleep(0.02)

    def _stop(self) -> None:
        _reap(self._children)
        with self._cond:
            conn = self._conn
        if conn is not None:
            for thread, end in ((conn.thread, conn.sock), (conn.probe_thread, conn.probe)):
                if thread is not None and end is not None:
                    thread.join(_REAP_TIMEOUT)
                    if thread.is_alive():  # pragma: no cover - QEMU is dead: EOF came
                        with contextlib.suppress(OSError):
                            end.shutdown(socket.SHUT_RDWR)
                        thread.join(_REAP_TIMEOUT)
            conn.sock.close()
            for other in (conn.qmp, conn.probe):
                if other is not None:
                    other.close()
            with self._cond:
                conn.eof = True
                self._cond.notify_all()
        for sock in self.files.sockets:
            sock.unlink(missing_ok=True)

    def _read_console(self, conn: _Connection, sock: socket.socket, stream: _Stream) -> None:
        """Keep what `sock` sends in `stream`; the serial console's end is QEMU's."""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if data:
                    stream.buffer.feed(data)
                    stream.last_output = time.monotonic()
                else:
                    stream.buffer.flush()
                    if stream is self._console:
                        conn.eof = True
                self._cond.notify_all()
                tap = self._tap if stream is self._shell else None
            if not data:
                return
            if tap is not None:
                tap(data)

    # --- console ---

    @property
    def console_text(self) -> str:
        """Everything received on the console since the machine was created, cleaned."""
        with self._cond:
            return self._buffer.text

    def tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        with self._cond:
            return self._buffer.tail(lines)

    def mark(self) -> None:
        """Move the cursors to the end (the console's and the probe's): later expects
        see only text still to come."""
        with self._cond:
            self._mark()

    def _mark(self) -> None:
        self._console.buffer.mark()
        if self._probe is not None:
            self._probe.buffer.mark()

    def send(self, text: str) -> None:
        """Type `text` on the serial console (add "\\n" to press Enter)."""
        self._send(text, self._console)

    def type_in_shell(self, text: str) -> None:
        """Type `text` where root's shell runs: the probe, or the serial console."""
        self._send(text, self._shell)

    def _send(self, text: str, stream: _Stream) -> None:
        with self._cond:
            conn = self._conn
            if conn is None or conn.eof:
                raise LocalError(
                    f"{self.name}: cannot type on the {stream.name}: QEMU is not running"
                )
        sock = conn.sock if stream is self._console else conn.probe
        if sock is None:  # pragma: no cover - _start_qemu connects the probe
            raise LocalError(f"{self.name}: the {stream.name} is not connected")
        try:
            sock.sendall(text.encode())
        except OSError as exc:
            raise LocalError(f"{self.name}: cannot type on the {stream.name}: {exc}") from exc

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait up to `timeout` seconds for the regular expression `pattern` after the
        cursor and consume the text up to the end of the match. The match is made on
        the whole console text (`match.string`)."""
        return self._expect([_compile(pattern)], timeout)[1]

    def expect_any(
        self, patterns: Sequence[str | re.Pattern[str]], timeout: float
    ) -> tuple[int, re.Match[str]]:
        """Like `expect` for several patterns: (index of the pattern, match) of the
        match that starts first."""
        if not patterns:
            raise UsageError("expect_any needs at least one pattern")
        return self._expect([_compile(p) for p in patterns], timeout)

    def _expect(
        self,
        patterns: Sequence[re.Pattern[str]],
        timeout: float,
        nudge_after: float | None = None,
        stream: _Stream | None = None,
    ) -> tuple[int, re.Match[str]]:
        """Wait for `patterns` in `stream` (the serial console by default), pressing
        Enter there after `nudge_after` silent seconds; hangs and resets are the serial
        console's."""
        stream = stream or self._console
        started = time.monotonic()
        deadline = started + self.scaled(timeout)
        last_nudge = started
        while True:
            with self._cond:
                found = stream.buffer.search(patterns)
                if found is not None:
                    stream.buffer.cursor = found[1].end()
                    return found
                now = time.monotonic()
                reset = False
                if self._conn is None or self._conn.eof:
                    reset = self._guest_reset()
                    if not reset:
                        raise self._exited(patterns, now - started)
                if now >= deadline:
                    raise ConsoleTimeout(
                        f"{self.name}: no {self._what(patterns)} on the {stream.name} within "
                        f"{self._waited(timeout)}; last lines:\n{self._tails(stream)}"
                    )
                hung = self._reset_hung(now)
                if hung:  # once per reset: the new run may take a while to print
                    self._hung_at = len(self._buffer.text)
                silent = now - max(stream.last_output, last_nudge)
                if reset:
                    pass
                elif not hung and (nudge_after is None or silent < nudge_after):
                    self._cond.wait(min(deadline - now, 0.5))
                    continue
            if reset:
                self._power_cycle_reset()
                continue
            if hung:
                self._power_cycle_hung()
                continue
            last_nudge = time.monotonic()
            log.debug("%s: %s silent for %.0f s: pressing Enter", self.name, stream.name, silent)
            self._send("\n", stream)

    def _tails(self, stream: _Stream) -> str:
        """The last lines of `stream`, and of the serial console when it is another one
        (what the boot was doing). Call with the lock held."""
        if stream is self._console:
            return self._buffer.tail()
        return f"{stream.buffer.tail()}\n--- the serial console:\n{self._buffer.tail()}"

    def _reset_hung(self, now: float) -> bool:
        """Whether the guest reset and the firmware has said nothing since, for longer
        than `reset_hang_after` times the time factor (call with the lock held)."""
        limit = self.reset_hang_after
        if limit is None or now - self._console.last_output < self.scaled(limit):
            return False
        text = self._buffer.text
        if len(text) == self._hung_at:  # power-cycled already: the new run is starting
            return False
        return hang_point(text) is not None

    def _guest_reset(self) -> bool:
        """Whether QEMU exited because the guest reset (its kernel's reboot or panic,
        the firmware's reset) under `cold_reboot`: call with the lock held, once the
        console reached its end."""
        qemu, conn = self._children.qemu, self._conn
        if not self.cold_reboot or qemu is None or conn is None:
            return False
        with contextlib.suppress(LocalError):
            qemu.wait(_REAP_TIMEOUT)
        return qemu.poll() == 0 and conn.shutdown_reason() == "guest-reset"

    def _power_cycle_reset(self) -> None:
        log.info("%s: the guest reset: QEMU exited; powering on again", self.name)
        self.cold_reboots += 1
        clock = self._clock
        self._stop()
        self.start()
        if clock is not None:  # a reboot the test timed: the clock runs on
            self._clock = clock

    def _power_cycle_hung(self) -> None:
        point = hang_point(self._buffer.text)
        where = {
            "kernel": "in the kernel's start, before init",
            "reset": "on its way to the firmware",
            "shutdown": "on its way to the firmware (file systems already unmounted)",
        }
        log.warning(
            "%s: nothing on the console %s after the guest's %s line: it hung %s; "
            "power-cycling the machine",
            self.name,
            self._waited(self.reset_hang_after or 0.0),
            point,
            where.get(point or "", "somewhere"),
        )
        self.hang_restarts += 1
        self.kill()
        self.start()

    @staticmethod
    def _what(patterns: Sequence[re.Pattern[str]]) -> str:
        return " or ".join(_describe(p) for p in patterns)

    def _exited(self, patterns: Sequence[re.Pattern[str]], waited: float) -> MachineExited:
        qemu = self._children.qemu
        code = None
        if qemu is not None:  # the console closes as QEMU exits: let it finish
            with contextlib.suppress(LocalError):
                code = qemu.wait(2.0)
        if qemu is None:
            how = "QEMU is not running"
        elif code is None:
            how = "the console closed"
        elif code < 0:
            how = f"QEMU was killed by signal {-code}"
        elif code == 0:
            how = "QEMU exited (the guest powered off)"
        else:
            last = _last_error_line(self.files.qemu_log, self._qemu_log_offset)
            how = f"QEMU exited with code {code} ({last})"
        return MachineExited(
            f"{self.name}: {how} after {waited:.1f} s of waiting for {self._what(patterns)}; "
            f"last lines:\n{self._tails(self._shell)}"
        )

    # --- the root shell ---

    def start_boot_clock(self, label: str = "reboot") -> None:
        """Start timing a boot (a reboot the test caused): the next `wait_for_shell`
        records how long it took under `label`."""
        self._clock = _BootClock(label)

    def wait_for_shell(self, timeout: float = 300.0) -> None:
        """Wait for the root shell's prompt, pressing Enter when the console has been
        silent for a few seconds (a login prompt may have scrolled by)."""
        self._expect([_PROMPT], timeout, nudge_after=_NUDGE_AFTER, stream=self._shell)
        clock, self._clock = self._clock, None
        if clock is not None:
            seconds = time.monotonic() - clock.started
            self._timings.append(BootTiming(clock.label, seconds))
            log.info("%s: shell after %.1f s (%s)", self.name, seconds, clock.label)

    def shell(self, command: str, timeout: float = 120.0) -> ShellResult:
        """Run one line in the guest's root shell (which must be at its prompt) and
        return its exit code and output. The line must not end the command list
        itself (no trailing `&` or comment)."""
        if "\n" in command or "\r" in command:
            raise UsageError(f"{self.name}: a shell command is one line: {command!r}")
        token = secrets.token_hex(8)
        line = shell_line(command, token)
        if len(line) > _MAX_SHELL_LINE:
            raise UsageError(f"{self.name}: shell command longer than {_MAX_SHELL_LINE} characters")
        with self._cond:
            start = self._shell.buffer.cursor
        self.type_in_shell(line)
        match = self._expect([shell_marker(token)], timeout, stream=self._shell)[1]
        output = shell_output(match.string[start : match.start()], token)
        return ShellResult(int(match.group(1)), output)

    def check(self, command: str, timeout: float = 120.0) -> str:
        """`shell`, raising GuestCommandFailed unless the exit code is 0; the output."""
        result = self.shell(command, timeout)
        if result.returncode != 0:
            raise GuestCommandFailed(
                f"{self.name}: `{command}` exited with code {result.returncode}; output:\n"
                f"{result.output.rstrip()}",
                command,
                result.returncode,
                result.output,
            )
        return result.output

    # --- a person at the console ---

    def interact(self, detach: bytes = b"\x1d") -> None:
        """Attach this terminal to root's shell (the probe, or the serial console) until
        Ctrl-] (`detach`) is typed or QEMU exits: the guest's output goes to stdout
        unfiltered, keys go to the guest."""
        stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
        if not os.isatty(stdin):
            raise LocalError(f"{self.name}: attaching the console needs a terminal on stdin")
        with self._cond:
            conn = self._conn
            if conn is None or conn.eof:
                raise LocalError(f"{self.name}: cannot attach the console: QEMU is not running")
        sys.stdout.flush()

        def show(data: bytes) -> None:
            with contextlib.suppress(OSError):
                while data:
                    data = data[os.write(stdout, data) :]

        saved = termios.tcgetattr(stdin)
        with self._cond:
            self._tap = show
        try:
            tty.setraw(stdin)
            while not conn.eof:
                ready, _, _ = select.select([stdin], [], [], 0.2)
                if not ready:
                    continue
                keys = os.read(stdin, 1024)
                if not keys or detach in keys:
                    keys = keys.split(detach)[0]
                    if keys:
                        self.type_in_shell(keys.decode(errors="replace"))
                    break
                self.type_in_shell(keys.decode(errors="replace"))
        finally:
            with self._cond:
                self._tap = None
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)

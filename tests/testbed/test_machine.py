"""The testbed's machine runner: argv building, console cleaning and shell marker parsing
on the host; then real QEMU runs (marked vm) of the Debian kernel with a busybox
initramfs under SeaBIOS, with swtpm, and of OVMF's Secure Boot build."""

from __future__ import annotations

import difflib
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rampart import run
from rampart.errors import ConflictError, LocalError, UsageError
from rampart.testbed import machine
from rampart.testbed.machine import (
    ConsoleBuffer,
    ConsoleTimeout,
    DirectKernel,
    Disk,
    GuestCommandFailed,
    Machine,
    MachineExited,
    SecureBoot,
    WorkFiles,
    clean_console,
    qemu_argv,
    shell_line,
    shell_marker,
    shell_output,
    swtpm_argv,
)
from rampart.testbed.rootfs import PROMPT
from tests.release.bootkit import BUSYBOX, OVMF_CODE, cpio, kernel

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFCHR = 0o020000
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
TOKEN = "0123abcd"


# --- console text --------------------------------------------------------------------------


def test_clean_console_strips_escapes_and_carriage_returns() -> None:
    raw = (
        "\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: loading\r\n"
        "\x1b[1m\x1b[33m\x1b[40mShell> \x1b[0m\x1b]0;title\x07done\x1b(B\x1b=\x07\x08\x00\r\n"
        "\x1b[?25l\ttab\x7f\n"
    )
    assert clean_console(raw) == "BdsDxe: loading\nShell> done\n\ttab\n"


def test_console_buffer_holds_cut_escape_and_utf8_sequences() -> None:
    buf = ConsoleBuffer()
    for chunk in (b"a\x1b[3", b"1mred\x1b", b"[0m \xc3", b"\xa9t\xc3\xa9\r", b"\n\xff!\x1b]0;x"):
        buf.feed(chunk)
    assert buf.text == "ared \u00e9t\u00e9\n\ufffd!"
    buf.feed(b"y\x1b\\ok")
    assert buf.text.endswith("!ok")
    buf.feed(b"\x1b[")  # the stream ends inside a sequence: what is left is cleaned
    buf.flush()
    assert buf.text.endswith("!ok")


def test_console_buffer_searches_from_the_cursor() -> None:
    buf = ConsoleBuffer()
    buf.feed(b"login: one\r\nlogin: two\r\n")
    first = buf.search([re.compile("login: (\\w+)")])
    assert first is not None and first[1].group(1) == "one"
    buf.cursor = first[1].end()
    index, match = buf.search([re.compile("nothing"), re.compile("login: (\\w+)")]) or (-1, None)
    assert index == 1 and match is not None and match.group(1) == "two"
    # Of several patterns, the one matching earliest in the text wins.
    index, match = buf.search([re.compile("two"), re.compile("login")]) or (-1, None)
    assert index == 1
    buf.mark()
    assert buf.search([re.compile("login")]) is None
    buf.feed(b"\r\n".join(b"line %d" % i for i in range(50)))
    assert buf.tail(3) == "line 47\nline 48\nline 49"


# --- the shell marker ----------------------------------------------------------------------


def test_shell_line_and_marker() -> None:
    line = shell_line("echo hello; false", TOKEN)
    assert line == f'echo hello; false; echo "__rc_{TOKEN}=$?"\n'
    marker = shell_marker(TOKEN)
    assert marker.search(line) is None  # the echoed input cannot match
    assert marker.search("__rc_0123abcd=12") is None  # more digits may come
    match = marker.search("__rc_0123abcd=127\nrampart-guest# ")
    assert match is not None and match.group(1) == "127"
    assert marker.search("__rc_ffffffff=0\n") is None  # another command's marker


def test_shell_output_is_what_follows_the_echoed_line() -> None:
    echoed = f'{PROMPT}echo hello; false; echo "__rc_{TOKEN}=$?"\n'
    assert shell_output(echoed + "hello\n", TOKEN) == "hello\n"
    # A previous prompt, kernel noise, and the line echoed twice (typed ahead while
    # the shell was busy, then redrawn by line editing).
    noisy = f"{PROMPT}\n[    3.1] random: crng init done\n{echoed}{echoed}a\nb\n"
    assert shell_output(noisy, TOKEN) == "a\nb\n"
    assert shell_output(echoed, TOKEN) == ""
    # busybox's line editing wraps the echo at 80 columns (CR CR LF, CRs removed).
    wrapped = f'{PROMPT}printf x; echo "__rc_0123\nabcd=$?"\nx__rc_{TOKEN}=0\n'
    assert shell_output(wrapped[: wrapped.index("__rc_0123abcd=0")], TOKEN) == "x"
    assert shell_output("garbled echo\nout\n", TOKEN) == "out\n"


# --- command lines ---------------------------------------------------------------------


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    return [(argv[i], argv[i + 1]) for i in range(len(argv) - 1) if argv[i].startswith("-")]


def test_qemu_argv_secure_boot_disks_tpm_network(tmp_path: Path) -> None:
    files = WorkFiles.in_dir(tmp_path)
    argv = qemu_argv(
        firmware=SecureBoot(tmp_path / "vars.fd"),
        disks=[Disk(tmp_path / "a.qcow2", "qcow2"), Disk(tmp_path / "b.raw", read_only=True)],
        files=files,
        memory=2048,
        cpus=1,
        tpm=True,
        network=True,
    )
    assert argv[0] == "qemu-system-x86_64"
    pairs = _pairs(argv)
    assert ("-machine", "q35,smm=on,accel=tcg") in pairs
    assert ("-global", "driver=cfi.pflash01,property=secure,value=on") in pairs
    assert ("-global", "ICH9-LPC.disable_s3=1") in pairs
    drives = [value for option, value in pairs if option == "-drive"]
    assert drives == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        f"if=pflash,format=raw,unit=1,file={tmp_path}/vars.fd",
        f"if=none,id=disk0,format=qcow2,file={tmp_path}/a.qcow2",
        f"if=none,id=disk1,format=raw,file={tmp_path}/b.raw,readonly=on",
    ]
    devices = [value for option, value in pairs if option == "-device"]
    assert devices == [
        "virtio-blk-pci,drive=disk0",
        "virtio-blk-pci,drive=disk1",
        "tpm-tis,tpmdev=tpm0",
        "virtio-net-pci,netdev=net0",
    ]
    assert ("-m", "2048") in pairs and ("-smp", "1") in pairs
    assert ("-display", "none") in pairs
    assert ("-netdev", "user,id=net0") in pairs
    assert ("-tpmdev", "emulator,id=tpm0,chardev=chrtpm") in pairs
    chardevs = [value for option, value in pairs if option == "-chardev"]
    assert chardevs == [
        f"socket,id=ser0,path={files.console_socket},server=on,wait=on,"
        f"logfile={files.console_log},logappend=on",
        f"socket,id=qmp0,path={files.qmp_socket},server=on,wait=off",
        f"socket,id=chrtpm,path={files.tpm_socket}",
    ]
    assert ("-serial", "chardev:ser0") in pairs
    assert ("-mon", "chardev=qmp0,mode=control") in pairs
    assert "-nodefaults" in argv
    assert "-no-reboot" not in argv and "-kernel" not in argv
    assert not any("stdio" in a for a in argv)


def test_qemu_argv_no_reboot(tmp_path: Path) -> None:
    files = WorkFiles.in_dir(tmp_path)
    plain = qemu_argv(firmware=DirectKernel(Path("/k/vmlinuz")), disks=[], files=files)
    cold = qemu_argv(
        firmware=DirectKernel(Path("/k/vmlinuz")), disks=[], files=files, no_reboot=True
    )
    assert cold.count("-no-reboot") == 1 and [a for a in cold if a != "-no-reboot"] == plain


def test_qemu_argv_probe_is_a_virtio_console_on_its_own_socket(tmp_path: Path) -> None:
    files = WorkFiles.in_dir(tmp_path)
    plain = qemu_argv(firmware=DirectKernel(Path("/k/vmlinuz")), disks=[], files=files)
    probed = qemu_argv(firmware=DirectKernel(Path("/k/vmlinuz")), disks=[], files=files, probe=True)
    assert probed[: len(plain)] == plain
    assert probed[len(plain) :] == [
        "-device",
        "virtio-serial-pci,id=probebus",
        "-chardev",
        f"socket,id=probe0,path={tmp_path}/probe.sock,server=on,wait=off,"
        f"logfile={tmp_path}/probe.log,logappend=on",
        "-device",
        f"virtconsole,bus=probebus.0,chardev=probe0,name={machine.PROBE_PORT_NAME}",
    ]
    assert files.probe_socket in files.sockets


def test_swtpm_setup_argv_makes_a_sha256_only_tpm(tmp_path: Path) -> None:
    argv = machine.swtpm_setup_argv(tmp_path / "tpm")
    assert argv == [
        "swtpm_setup",
        "--tpm2",
        "--tpmstate",
        str(tmp_path / "tpm"),
        "--pcr-banks",
        "sha256",
    ]
    with pytest.raises(LocalError, match="comma"):
        machine.swtpm_setup_argv(tmp_path / "a,b")


def test_qemu_argv_direct_kernel_without_tpm_or_network(tmp_path: Path) -> None:
    work = tmp_path / "odd,dir"
    argv = qemu_argv(
        firmware=DirectKernel(Path("/k/vmlinuz"), Path("/k/initrd.img"), "console=ttyS0 quiet"),
        disks=[Disk(work / "disk.raw")],
        files=WorkFiles.in_dir(work),
    )
    pairs = _pairs(argv)
    assert ("-machine", "q35,accel=tcg") in pairs
    assert ("-kernel", "/k/vmlinuz") in pairs and ("-initrd", "/k/initrd.img") in pairs
    assert ("-append", "console=ttyS0 quiet") in pairs
    assert ("-m", str(machine.DEFAULT_MEMORY_MIB)) in pairs
    assert ("-smp", str(machine.DEFAULT_CPUS)) in pairs
    # A comma in a path is doubled inside QEMU's key=value lists.
    assert f"if=none,id=disk0,format=raw,file={tmp_path}/odd,,dir/disk.raw" in argv
    for absent in ("-netdev", "-tpmdev", "pflash", "smm=on", "-no-reboot"):
        assert not any(absent in a for a in argv), absent
    no_initrd = qemu_argv(
        firmware=DirectKernel(Path("/k/vmlinuz")), disks=[], files=WorkFiles.in_dir(tmp_path)
    )
    assert "-initrd" not in no_initrd and ("-append", "console=ttyS0") in _pairs(no_initrd)


def test_swtpm_argv(tmp_path: Path) -> None:
    files = WorkFiles.in_dir(tmp_path)
    assert swtpm_argv(tmp_path / "tpm", files) == [
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={tmp_path}/tpm",
        "--ctrl",
        f"type=unixio,path={tmp_path}/swtpm.sock,mode=0600",
        "--terminate",
        "--log",
        f"file={tmp_path}/swtpm.log,level=1",
    ]
    with pytest.raises(LocalError, match="comma"):
        swtpm_argv(tmp_path / "a,b", files)


def test_busy_host_time_factor_is_the_reference_boot_time_ratio_clamped() -> None:
    """A busy host boots the reference guest slower: every wait scales with the ratio,
    never below 1 (a fast host keeps the timeouts) nor above MAX_TIME_FACTOR."""
    reference = machine.REFERENCE_BOOT_SECONDS
    assert machine.time_factor(reference / 3) == 1.0
    assert machine.time_factor(reference) == 1.0
    assert machine.time_factor(reference * 2.34) == 2.3
    assert machine.time_factor(reference * 100) == machine.MAX_TIME_FACTOR
    assert machine.time_factor(30.0, reference=10.0) == 3.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UsageError):
            machine.time_factor(bad)


def test_busy_host_every_wait_of_a_machine_scales(tmp_path: Path) -> None:
    firmware = DirectKernel(tmp_path / "vmlinuz")
    for bad in (0.5, machine.MAX_TIME_FACTOR + 0.1):
        with pytest.raises(UsageError, match="time factor"):
            Machine(tmp_path / "vm", firmware=firmware, time_factor=bad)
    vm = Machine(tmp_path / "vm", firmware=firmware, time_factor=2.5)
    assert vm.scaled(420) == 1050
    # A timeout's message gives the wait and what it was scaled from.
    assert vm._waited(1.5) == "3.75 s (1.5 s x time factor 2.5)"
    assert Machine(tmp_path / "vm", firmware=firmware)._waited(1.5) == "1.5 s"


def test_machine_rejects_bad_settings(tmp_path: Path) -> None:
    firmware = DirectKernel(tmp_path / "vmlinuz")
    with pytest.raises(LocalError, match="too long for a Unix socket"):
        Machine(tmp_path / ("x" * 100), firmware=firmware)
    with pytest.raises(UsageError):
        Machine(tmp_path, firmware=firmware, cpus=0)
    with pytest.raises(UsageError):
        Disk(tmp_path / "d", "vmdk")  # type: ignore[arg-type]
    with Machine(tmp_path / "vm", firmware=firmware) as vm:
        with pytest.raises(LocalError, match="vmlinuz does not exist"):
            vm.start()
        assert not vm.running
        with pytest.raises(MachineExited, match="not running"):
            vm.expect("anything", 5)
        with pytest.raises(UsageError):
            vm.shell("echo a\necho b")


def test_overlay(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 1048576)
    top = machine.overlay(base, tmp_path / "top.qcow2")
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(top)], capture_output=True, text=True, check=True
    ).stdout
    assert f'"backing-filename": "{base}"' in info
    assert '"backing-filename-format": "raw"' in info
    with pytest.raises(ConflictError):
        machine.overlay(base, top)
    with pytest.raises(UsageError, match="absolute"):
        machine.overlay(Path("base.raw"), tmp_path / "other.qcow2")
    with pytest.raises(LocalError, match="does not exist"):
        machine.overlay(tmp_path / "missing.raw", tmp_path / "other.qcow2")


def test_spawn_appends_output_and_reaps(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    out.write_text("before\n")
    proc = run.spawn(["sh", "-c", "echo $0 $HOME_NOT_KEPT; echo err >&2"], stdout_path=out,
                     stderr_path=out, env={"HOME_NOT_KEPT": "x"}, cwd=tmp_path)  # fmt: skip
    assert proc.wait(10) == 0
    assert out.read_text() == "before\nsh x\nerr\n"
    sleeper = run.spawn(["sleep", "30"])
    with pytest.raises(LocalError, match="still running"):
        sleeper.wait(0.1)
    sleeper.kill()
    assert sleeper.wait(10) == -9 and sleeper.poll() == -9
    sleeper.kill()  # reaped: no signal is sent
    with pytest.raises(LocalError, match="command not found"):
        run.spawn(["rampart-no-such-tool"])


# --- virtual machines ----------------------------------------------------------------------

INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
# The only console is the serial one, where the kernel prints too: from here on, on
# every boot, only its emergencies (console log level 1), as a late message split a
# command's output ("tsc: Refined TSC clocksource calibration" among a TPM response's
# bytes, after a first boot and after a cold reboot). The log keeps them all.
echo 1 > /proc/sys/kernel/printk
export PATH=/bin PS1='{PROMPT}'
echo "rampart-test-init: ready"
while true; do setsid cttyhack sh; done
"""

# TPM2_HierarchyChangeAuth(TPM_RH_OWNER, "abcd") with an empty password session: the
# owner password lives in the TPM's persistent state. Response code: bytes 6-9.
CHANGE_OWNER_AUTH = (
    "80 02 00 00 00 21 00 00 01 29 40 00 00 01 00 00 00 09"
    " 40 00 00 09 00 00 00 00 00 00 04 61 62 63 64"
)
TPM_COMMAND = (
    "printf '{}' > /tmp/cmd && exec 3<>/dev/tpm0 && dd if=/tmp/cmd bs=33 count=1 >&3"
    " 2>/dev/null && dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1; exec 3<&-"
).format("".join(f"\\x{byte}" for byte in CHANGE_OWNER_AUTH.split()))


@dataclass
class Bed:
    root: Path
    initrd: Path
    machines: list[Machine] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


def _leftovers(bed: Bed) -> list[str]:
    """qemu or swtpm processes of this module: by the IDs recorded, and by command lines
    naming the module's directory (other sessions may run their own machines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if comm not in ("qemu-system-x86", "swtpm"):
            continue
        if int(entry.name) in bed.pids or str(bed.root) in cmdline:
            found.append(f"{entry.name} {comm}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    for tool in ("qemu-system-x86_64", "swtpm", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run make setup")
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} is missing: run make setup (busybox-static)")
    root = tmp_path_factory.mktemp("vm")
    initrd = root / "initrd.cpio"
    initrd.write_bytes(
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
    state = Bed(root, initrd)
    yield state
    for vm in state.machines:
        vm.close()
    assert _leftovers(state) == []


@pytest.fixture
def new_machine(
    bed: Bed, request: pytest.FixtureRequest, time_factor: float
) -> Iterator[Callable[..., Machine]]:
    """Machines for one test, closed after it; TPM and network are keyword options. Their
    waits are multiplied by the run's time factor (tests/testbed/conftest.py)."""
    made: list[Machine] = []

    def make(*, tpm: bool = False, **options: object) -> Machine:
        work = bed.root / f"{request.node.name}-{len(made)}"
        firmware = options.pop("firmware", None) or DirectKernel(
            kernel(), bed.initrd, "console=ttyS0 panic=-1"
        )
        vm = Machine(
            work / "vm",
            firmware=firmware,  # type: ignore[arg-type]
            tpm_state=work / "tpm" if tpm else None,
            name=request.node.name,
            time_factor=time_factor,
            **options,  # type: ignore[arg-type]
        )
        made.append(vm)
        bed.machines.append(vm)
        return vm

    yield make
    for vm in made:
        vm.close()
        bed.pids.update(pid for pid in (vm.qemu_pid, vm.swtpm_pid) if pid is not None)
    for vm in made:
        for timing in vm.timings:
            print(f"{vm.name}: {timing.label} to prompt in {timing.seconds:.1f} s")


def _boot(vm: Machine) -> None:
    vm.start()
    vm.expect("rampart-test-init: ready", 60)
    vm.wait_for_shell(60)


@pytest.mark.vm
def test_vm_shell_expect_and_timeout(new_machine: Callable[..., Machine]) -> None:
    vm = new_machine()
    _boot(vm)
    assert vm.running and not vm.tpm_running
    assert [t.label for t in vm.timings] == ["start"]
    result = vm.shell("echo hello; false")
    assert result.returncode == 1
    assert "hello\n" in result.output and "__rc_" not in result.output
    assert vm.shell("echo one; echo two").output.endswith("one\ntwo\n")
    assert vm.check("cat /proc/cmdline").strip().endswith("console=ttyS0 panic=-1")
    with pytest.raises(GuestCommandFailed, match="exited with code 3") as failed:
        vm.check("echo why; exit_code() { return 3; }; exit_code")
    assert failed.value.returncode == 3 and "why" in failed.value.output
    assert not vm.shell("ls /sys/class/tpm").output.strip().endswith("tpm0")
    # expect: a timeout names the pattern and shows the console's tail.
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as timeout:
        vm.expect(r"never printed \d+", 1.5)
    factor = vm.time_factor  # the wait is scaled: 1.5 s on an idle host
    assert 1.5 * factor <= time.monotonic() - started < 5 * factor
    message = str(timeout.value)
    assert "/never printed \\d+/" in message and "1.5 s" in message
    assert "hello" in message and PROMPT.strip() in message
    vm.send("echo marker-$((40+2))\n")
    # The number ends at the line end: the console may deliver "marker-4" and "2" apart.
    index, match = vm.expect_any([r"nope", r"marker-(\d+)\r?\n"], 30)
    assert (index, match.group(1)) == (1, "42")
    vm.mark()
    with pytest.raises(ConsoleTimeout):
        vm.expect("marker-42", 0.5)  # consumed, then skipped by mark()


@pytest.mark.vm
def test_vm_interact_on_a_terminal(
    new_machine: Callable[..., Machine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person at a terminal (a pty here): keys reach the guest, its output is shown
    raw, Ctrl-] detaches and the machine keeps running."""
    vm = new_machine(cpus=1)
    _boot(vm)
    master, slave = pty.openpty()
    shown = b""

    def person() -> None:
        nonlocal shown
        deadline = time.monotonic() + 30
        while termios.tcgetattr(slave)[3] & termios.ICANON and time.monotonic() < deadline:
            time.sleep(0.05)  # raw mode is set with TCSAFLUSH: earlier keys are dropped
        os.write(master, b"echo inter$((1+1))active\n")
        while b"inter2active\r\n" not in shown and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                shown += os.read(master, 4096)
        os.write(master, b"\x1d")

    with (
        open(slave, "rb", buffering=0) as keyboard,
        open(os.dup(slave), "wb", buffering=0) as screen,
    ):
        monkeypatch.setattr(sys, "stdin", keyboard)
        monkeypatch.setattr(sys, "stdout", screen)
        thread = threading.Thread(target=person)
        thread.start()
        vm.interact()
        thread.join()
        assert termios.tcgetattr(slave)[3] & termios.ICANON  # cooked again
    os.close(master)
    assert b"inter2active\r\n" in shown  # raw: carriage returns kept
    vm.expect("inter2active", 10)
    assert vm.running
    assert vm.shell("echo still here").output.endswith("still here\n")


@pytest.mark.vm
def test_vm_power_cut_keeps_tpm_state_and_console_log(new_machine: Callable[..., Machine]) -> None:
    vm = new_machine(tpm=True)
    _boot(vm)
    assert vm.tpm_running
    # by exit status: the kernel may print on the same console while `ls` runs
    assert vm.shell("test -e /sys/class/tpm/tpm0 && ! test -e /sys/class/tpm/tpm1").returncode == 0
    first = vm.check(TPM_COMMAND).split()
    assert first[6:10] == ["00", "00", "00", "00"], first  # the owner password is set
    qemu, swtpm = vm.qemu_pid, vm.swtpm_pid
    vm.kill()
    assert not vm.running and not vm.tpm_running
    for pid in (qemu, swtpm):
        assert not Path(f"/proc/{pid}").exists()
    started = time.monotonic()
    with pytest.raises(MachineExited, match="QEMU was killed by signal 9"):
        vm.expect("anything", 30)
    assert time.monotonic() - started < 1
    log_after_first = vm.console_log.read_text(errors="replace")
    assert log_after_first.count("Linux version") == 1

    _boot(vm)
    assert vm.qemu_pid != qemu and vm.swtpm_pid != swtpm
    second = vm.check(TPM_COMMAND).split()
    # TPM_RC_BAD_AUTH (session 1): the empty password no longer authorizes the owner.
    assert second[6:10] == ["00", "00", "09", "a2"], second
    log_text = vm.console_log.read_text(errors="replace")
    assert log_text.startswith(log_after_first) and log_text.count("Linux version") == 2
    assert [t.label for t in vm.timings] == ["start", "start"]


@pytest.mark.vm
def test_vm_guest_reboot_stays_in_qemu(new_machine: Callable[..., Machine]) -> None:
    vm = new_machine(tpm=True)
    _boot(vm)
    qemu, swtpm = vm.qemu_pid, vm.swtpm_pid
    vm.mark()
    vm.start_boot_clock("reboot -f")
    vm.send("reboot -f\n")
    vm.expect("Linux version", 60)
    vm.wait_for_shell(60)
    assert vm.running and vm.tpm_running
    assert (vm.qemu_pid, vm.swtpm_pid) == (qemu, swtpm)
    # by exit status: the kernel may print on the same console while `ls` runs
    assert vm.shell("test -e /sys/class/tpm/tpm0 && ! test -e /sys/class/tpm/tpm1").returncode == 0
    assert vm.console_log.read_text(errors="replace").count("Linux version") == 2
    assert [t.label for t in vm.timings] == ["start", "reboot -f"]


@pytest.mark.vm
def test_vm_cold_reboot_powers_on_again(new_machine: Callable[..., Machine]) -> None:
    """With cold_reboot, the guest's reset ends QEMU and the next expect starts it again
    (a new QEMU and swtpm, the test's boot clock still running); a kernel panic resets
    too; a power-off still ends the machine."""
    vm = new_machine(tpm=True, cold_reboot=True)
    _boot(vm)
    qemu, swtpm = vm.qemu_pid, vm.swtpm_pid
    vm.mark()
    vm.start_boot_clock("reboot -f")
    vm.send("reboot -f\n")
    vm.expect("Linux version", 60)
    vm.wait_for_shell(60)
    assert vm.running and vm.tpm_running and vm.cold_reboots == 1
    assert vm.qemu_pid != qemu and vm.swtpm_pid != swtpm
    # the new boot's late kernel messages stay off the console, as the first boot's do
    assert vm.check("cat /proc/sys/kernel/printk").split()[0] == "1"
    assert vm.shell("test -e /sys/class/tpm/tpm0 && ! test -e /sys/class/tpm/tpm1").returncode == 0
    # a new TPM has one PCR bank: the firmware and the kernel hash what they measure once
    banks = vm.check("ls -d /sys/class/tpm/tpm0/pcr-*").split()
    assert banks == ["/sys/class/tpm/tpm0/pcr-sha256"], banks
    assert [t.label for t in vm.timings] == ["start", "reboot -f"]
    # panic=-1: the kernel resets at once, without the reset line of a reboot
    vm.send("echo c > /proc/sysrq-trigger\n")
    vm.expect("Linux version", 60)
    vm.wait_for_shell(60)
    assert vm.cold_reboots == 2 and vm.hang_restarts == 0
    vm.send("poweroff -f\n")
    with pytest.raises(MachineExited, match="QEMU exited \\(the guest powered off\\)"):
        vm.expect("never printed", 60)
    assert vm.cold_reboots == 2 and not vm.running


_SHUTDOWN_TAIL = """\
[  198.615911] systemd-shutdown[1]: Unmounting file systems.
[  198.631382] systemd-shutdown[1]: All filesystems unmounted.
[  198.652512] systemd-shutdown[1]: Detaching DM devices.
[  198.757315] systemd-shutdown[1]: Could not detach DM /dev/dm-0: Device or resource busy
[  198.763124] systemd-shutdown[1]: Detaching DM devices.
"""


def test_a_guest_silent_after_unmounting_everything_hung_at_shutdown() -> None:
    """Scenario 3 once waited 420 s on a guest whose console ended in systemd-shutdown's
    third "Detaching DM devices." (file systems unmounted, no reset line): that is a hang
    to power-cycle, like silence after the reset line; silence anywhere else is not."""
    boot = "[    0.000000] Linux version 6.1.0-57-amd64\n[    3.8] Run /init as init process\n"
    assert machine.hang_point(boot + _SHUTDOWN_TAIL) == "shutdown"
    assert machine.hang_point(boot + "[   72.99] reboot: machine restart\n") == "reset"
    # before the unmount (processes may take their 90 s to stop), or in a later boot
    before = boot + "[  198.5] systemd-shutdown[1]: Sending SIGTERM to remaining processes...\n"
    assert machine.hang_point(before) is None
    assert machine.hang_point(_SHUTDOWN_TAIL + boot + "[    1.0] systemd-shutdown[1]: x\n") is None
    assert machine.hang_point(boot + _SHUTDOWN_TAIL + "rampart-guest# ") is None


def test_a_kernel_silent_before_starting_init_hung() -> None:
    """Scenario 5 once waited 420 s on a kernel whose console ended 2.7 s into its boot
    ("VFS: Dquot-cache hash table entries", after a panic's reboot on a busy host): a
    hang to power-cycle. Once the kernel started init, a silent kernel line is no hang
    (a long command's output, a quiet system)."""
    boot = "[    0.000000] Linux version 6.1.0-57-amd64\n[    2.642230] vgaarb: loaded\n"
    dquot = "[    2.666622] VFS: Dquot-cache hash table entries: 512 (order 0, 4096 bytes)\n"
    assert machine.hang_point(boot + dquot) == "kernel"
    assert machine.hang_point(boot + dquot.rstrip("\n")) == "kernel"
    started = boot + "[    3.847901] Run /sbin/init as init process\n"
    assert machine.hang_point(started + dquot) is None
    assert machine.hang_point(started + "rampart-guest# ") is None
    assert machine.hang_point(started + boot + dquot) == "kernel"  # the next boot
    assert machine.hang_point(boot + dquot + "BdsDxe: loading Boot0001") is None
    assert machine.hang_point(dquot) is None  # no kernel start seen: not ours to judge


@pytest.mark.vm
def test_vm_reset_hang_power_cycles(
    new_machine: Callable[..., Machine],
) -> None:
    """The guest prints the kernel's reset line and then nothing, as when OVMF hangs at
    a reset: the waiting expect power-cycles the machine and still sees the next boot."""
    vm = new_machine(tpm=True, cpus=1, reset_hang_after=2.0)
    _boot(vm)
    qemu, swtpm = vm.qemu_pid, vm.swtpm_pid
    vm.mark()
    vm.send("echo '[   29.1] reboot: machine 'restart; sleep 1000\n")
    vm.expect("rampart-test-init: ready", 60)
    vm.wait_for_shell(60)
    assert vm.hang_restarts == 1
    assert vm.qemu_pid != qemu and vm.swtpm_pid != swtpm
    assert vm.console_log.read_text(errors="replace").count("Linux version") == 2
    # Silence after anything else is not a hang: no power cycle while it lasts.
    vm.mark()
    vm.send("echo 'reboot: machine restart, said 'twice; sleep 4\n")
    with pytest.raises(ConsoleTimeout):
        vm.expect("never printed", 3.5)
    assert vm.hang_restarts == 1 and vm.running


def _less_repeats(logged: str, seen: str) -> bool:
    """Whether `seen` is `logged` with some characters that repeat the one before them
    removed (QEMU's log writes a retried byte twice)."""
    i = 0
    for char in seen:
        while i < len(logged) and logged[i] != char and i > 0 and logged[i] == logged[i - 1]:
            i += 1
        if i >= len(logged) or logged[i] != char:
            return False
        i += 1
    return all(logged[k] == logged[k - 1] for k in range(max(i, 1), len(logged)))


def test_less_repeats_accepts_only_doubled_bytes() -> None:
    assert _less_repeats("[    0.0000000] a--b..\n\nc", "[    0.000000] a-b.\nc")
    assert _less_repeats("same", "same")
    assert not _less_repeats("0.123", "0.13")  # a byte lost from the log: not a repeat
    assert not _less_repeats("abc", "abcd")  # the socket saw more than was logged
    assert not _less_repeats("abcx", "abc")  # the socket missed the end


@pytest.mark.vm
def test_vm_guest_power_off(new_machine: Callable[..., Machine]) -> None:
    vm = new_machine(tpm=True, cpus=1, memory=512)
    _boot(vm)
    assert not vm.shutdown_wait(0.5)
    vm.send("poweroff -f\n")
    with pytest.raises(MachineExited, match="QEMU exited \\(the guest powered off\\)"):
        vm.expect("never", 60)
    assert vm.shutdown_wait(60)
    assert not vm.running and not vm.tpm_running
    # The driver saw everything from the kernel's first line, as the log file did.
    assert vm.console_text.startswith("[    0.000000] Linux version")
    # QEMU's chardev log is written separately from the socket, and when the socket is
    # full (the serial port writes byte by byte: a few hundred unread bytes fill it, as
    # when the reader is slow on a busy host) QEMU retries the write and logs a byte
    # twice ("0.0000000]" in the log, "0.000000]" on the socket; seen in CI, and in
    # dozens of lines of one boot with both cores busy). The socket's text must be the
    # log's, less such repeats.
    logged = clean_console(vm.console_log.read_bytes().decode(errors="replace"))
    seen = vm.console_text
    diff = "\n".join(
        difflib.unified_diff(
            logged.splitlines(), seen.splitlines(), "console.log", "socket", n=1, lineterm=""
        )
    )
    assert _less_repeats(logged, seen), diff


@pytest.mark.vm
def test_vm_qemu_error_at_start_is_quoted(
    new_machine: Callable[..., Machine], tmp_path: Path
) -> None:
    not_qcow2 = tmp_path / "disk.raw"
    not_qcow2.write_bytes(b"\0" * 65536)
    vm = new_machine(disks=[Disk(not_qcow2, "qcow2")])
    with pytest.raises(LocalError, match=r"QEMU exited with code 1 at start: .*qcow2") as failed:
        vm.start()
    assert "\n" not in str(failed.value)
    assert not vm.running


@pytest.mark.vm
def test_vm_secure_boot_ovmf_starts(new_machine: Callable[..., Machine], tmp_path: Path) -> None:
    for path in (OVMF_CODE, OVMF_VARS):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run make setup (ovmf)")
    vars_file = tmp_path / "vars.fd"
    shutil.copyfile(OVMF_VARS, vars_file)
    empty = tmp_path / "empty.raw"
    with empty.open("wb") as f:
        f.truncate(16 << 20)
    vm = new_machine(firmware=SecureBoot(vars_file), disks=[Disk(empty)], tpm=True)
    vm.start()
    _, seen = vm.expect_any(["BdsDxe", "UEFI"], 60)
    # QEMU writes its log file just after the socket the driver reads: under load the
    # driver can see a line before the file has it (CI: "BdsDx" in the file, SIGKILL
    # before the "e"). The file must catch up while QEMU runs.
    deadline = time.monotonic() + 30
    while seen.group(0) not in vm.console_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the console log never got the firmware's line"
        time.sleep(0.1)
    vm.kill()
    assert not vm.running and not vm.tpm_running
    assert seen.group(0) in vm.console_log.read_text(errors="replace")


ABANDON = """
import sys
from pathlib import Path
from rampart.testbed.machine import DirectKernel, Machine
work, kernel, initrd = map(Path, sys.argv[1:])
vm = Machine(work / "vm", firmware=DirectKernel(kernel, initrd), tpm_state=work / "tpm")
vm.start()
vm.expect("Linux version", 60)
print(vm.qemu_pid, vm.swtpm_pid, flush=True)
"""


@pytest.mark.vm
def test_vm_left_running_is_killed_at_exit(bed: Bed) -> None:
    """A program that forgets to close its machine leaves no process behind."""
    work = bed.root / "abandoned"
    done = subprocess.run(
        [sys.executable, "-c", ABANDON, str(work), str(kernel()), str(bed.initrd)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    bed.pids.update(pids)
    assert "left running: killed" in done.stderr
    assert _leftovers(bed) == []


def test_leftover_scan_sees_processes(tmp_path: Path) -> None:
    """The module's final check finds a swtpm of ours (and then none once it is gone)."""
    state = Bed(tmp_path, tmp_path / "unused")
    files = WorkFiles.in_dir(tmp_path)
    (tmp_path / "tpm").mkdir()
    proc = run.spawn(swtpm_argv(tmp_path / "tpm", files))
    try:
        deadline = time.monotonic() + 10
        while not _leftovers(state) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_leftovers(state)) == 1
    finally:
        proc.kill()
        proc.wait(10)
    assert _leftovers(state) == []

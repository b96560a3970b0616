"""A testbed session: the update server on the host, and guests booted from the
installed disk under Secure Boot with a TPM.

`UpdateServer` publishes the testbed's releases into a webroot of its own and
runs `rampart serve` over HTTPS on the host's loopback (port build.SERVER_PORT,
the certificate of build.make_pki), which the guests reach as UPDATE_HOST.

`Guest` is one machine: a copy-on-write overlay of the installed disk (the
installed image is never written), its own copy of the enrolled OVMF variables
and its own swtpm state, all in its work directory. It boots through OVMF
(Secure Boot enforced) and systemd-boot, and is driven over its serial console and
its probe, where root's shell runs (rampart.testbed.machine): `boot()` and
`reboot()` return the Core the initramfs opened (`reboot()`, like `restart()`, shuts
the guest down and powers it on again: a cold boot reaches the kernel 35-45 s sooner
than a warm reset), `sh()`
runs a command in root's shell, `ensure_shell()` brings a guest in an unknown state
(off, in the middle of a boot) to its shell. Its
`time_factor` multiplies every wait (see rampart.testbed.machine).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rampart import run
from rampart.contracts import signing, wire
from rampart.contracts.version import parse_version
from rampart.errors import LocalError
from rampart.release import webroot
from rampart.testbed import machine, rootfs, services
from rampart.testbed.build import INSTALLED, OS_NAME, SERVER_PORT, Testbed

log = logging.getLogger(__name__)

# Firmware to shell prompt under TCG, with room for a slow CI machine; times the
# guest's time factor on a busy host, as every wait below.
BOOT_TIMEOUT = 420.0
BOOTED = re.compile(
    r"rampart: booting Core (?P<core>\S+) \(dm-verity root hash (?P<hash>[0-9a-f]+)\)"
)
SERVER_START = 60.0
# `systemctl poweroff` to QEMU's exit: about 10 s; systemd gives a stop job 90 s.
SHUTDOWN_TIMEOUT = 150.0


def _rampart(*argv: str) -> list[str]:
    return [sys.executable, "-m", "rampart", *argv]


class UpdateServer:
    """`rampart serve` for the testbed's releases, on 127.0.0.1:SERVER_PORT."""

    def __init__(self, bed: Testbed, work: Path, port: int = SERVER_PORT) -> None:
        self.bed = bed
        self.work = work
        self.port = port
        self.webroot = work / "webroot"
        self.webroot.mkdir(parents=True, exist_ok=True)
        self.log_file = work / "serve.log"
        self._server: services.RampartServe | None = None

    def publish(
        self,
        version: str,
        efiboot: Path | None = None,
        loader: Path | None = None,
        sbvars: Mapping[str, Path] | None = None,
    ) -> None:
        """Publish `version` (again: the same release is accepted as it is) and point the
        default channel at it; with another UKI than the built one (`efiboot`, e.g.
        signed with another db key), a boot loader, Secure Boot variable appends."""
        key = signing.load_secret_key(self.bed.vendor_key, lambda: b"")
        webroot.publish(
            self.webroot,
            OS_NAME,
            parse_version(version),
            self.bed.core(version),
            efiboot or self.bed.efiboot(version),
            key,
            loader=loader,
            sbvars=sbvars,
        )
        # The server's database is the truth about channels once it knows the OS:
        # point its default channel at the new release, as an operator would.
        listed = run.run(_rampart("channel", "list", "--webroot", str(self.webroot), "--json"))
        channels = [c for c in json.loads(listed.stdout) if c.get("os") == OS_NAME]
        channels.sort(key=lambda c: not c.get("is_default"))
        verb = "set" if channels else "create"
        extra = [] if channels else ["--default"]
        name = str(channels[0]["name"]) if channels else "stable"
        run.run(
            _rampart(
                "channel",
                verb,
                name,
                "--webroot",
                str(self.webroot),
                "--os",
                OS_NAME,
                "--version",
                version,
                *extra,
            )
        )

    def ensure_release(self, version: str) -> Path:
        """The directory of `version`'s published release in the webroot, made when it
        is missing without changing what any channel offers (published into a scratch
        webroot, then copied)."""
        release = wire.release_dir(self.webroot, parse_version(version))
        if release.is_dir():
            return release
        scratch = self.work / f"scratch-{version}"
        shutil.rmtree(scratch, ignore_errors=True)
        key = signing.load_secret_key(self.bed.vendor_key, lambda: b"")
        webroot.publish(
            scratch,
            OS_NAME,
            parse_version(version),
            self.bed.core(version),
            self.bed.efiboot(version),
            key,
        )
        shutil.copytree(wire.release_dir(scratch, parse_version(version)), release)
        # Its chunks too, beside those of the releases already there (the same names are
        # the same chunks).
        shutil.copytree(wire.store_dir(scratch), wire.store_dir(self.webroot), dirs_exist_ok=True)
        shutil.rmtree(scratch)
        return release

    def offered(self) -> str | None:
        """The version the default channel of the testbed's OS offers, or None."""
        listed = run.run(_rampart("channel", "list", "--webroot", str(self.webroot), "--json"))
        for channel in json.loads(listed.stdout):
            if channel.get("os") == OS_NAME and channel.get("is_default"):
                return str(channel["version"])
        return None

    def start(self, options: Sequence[str] = ()) -> None:
        """Start `rampart serve -v` with `options` (as --tuf-key ...)."""
        if services.port_open(self.port):
            raise LocalError(f"127.0.0.1:{self.port} is already in use; stop what listens there")
        try:
            self._server = services.RampartServe(
                self.webroot,
                self.log_file,
                tls=services.Cert(self.bed.pki / "server.pem", self.bed.pki / "server.key"),
                options=["-v", *options],
                port=self.port,
                command=_rampart(),
                timeout=SERVER_START,
            )
        except services.ServiceError as exc:
            raise LocalError(f"rampart serve did not start: {exc}") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.close(timeout=20)
            self._server = None

    def restart(self, options: Sequence[str] = ()) -> None:
        """Stop the server and start it again with `options`."""
        self.stop()
        self.start(options)

    def fleet(self) -> dict[str, Any]:
        out = run.run(_rampart("fleet", "--webroot", str(self.webroot), "--json"), timeout=120)
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def fleet_text(self) -> str:
        return run.run(
            _rampart("fleet", "--webroot", str(self.webroot)), timeout=120
        ).stdout.decode()

    def machines(self) -> list[dict[str, Any]]:
        out = run.run(_rampart("machine", "list", "--webroot", str(self.webroot), "--json"))
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def cli(self, *argv: str) -> str:
        """`rampart ARGV --webroot WEBROOT` on the server's database; its output."""
        return run.run(_rampart(*argv, "--webroot", str(self.webroot)), timeout=120).stdout.decode()

    def admit_on_first_use(self) -> None:
        """Admit each guest's identity key when it first signs a check: the testbed's
        network is the operator's own (docs/server.md "Device identity")."""
        self.cli("machine", "admission", "first-use")

    def __enter__(self) -> UpdateServer:
        # The release the disk was installed with is published too, as a vendor's would
        # be: its chunk index lets the guest's first update fetch only what changed.
        self.ensure_release(INSTALLED)
        self.admit_on_first_use()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class Boot:
    core: str  # what the initramfs opened: mainvg/core_<V>
    seconds: float  # from power-on or reboot to the shell prompt


@dataclass
class Guest:
    """One testbed machine, booted from an overlay of the installed disk."""

    bed: Testbed
    work: Path
    memory: int = 1024
    # False: the machine the disk was installed on (a copy of the installer's TPM);
    # True: another machine's TPM, which never sealed anything.
    fresh_tpm: bool = False
    time_factor: float = 1.0  # every wait is multiplied by it (a busy host)
    # Disks after the installed one (/dev/vdb...): files handed to the guest without
    # a network, e.g. the refused UKIs.
    extra_disks: tuple[machine.Disk, ...] = ()
    # False: OVMF's variables without any key enrolled (no PK: Secure Boot is off,
    # the firmware starts any loader, and PCR 7 says so).
    secure_boot: bool = True
    boots: list[Boot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.disk = self.work / "disk.qcow2"
        if not self.disk.exists():
            machine.overlay(self.bed.disk, self.disk)
        self.vars = self.work / "ovmf-vars.fd"
        if not self.vars.exists():
            template = self.bed.ovmf_vars if self.secure_boot else machine.OVMF_VARS_TEMPLATE
            shutil.copyfile(template, self.vars)
        self.tpm = self.work / "tpm"
        if not self.tpm.exists():
            if self.fresh_tpm:
                self.tpm.mkdir(mode=0o700)
            else:
                shutil.copytree(self.bed.tpm_state, self.tpm)
                self.tpm.chmod(0o700)
        self.ssh_port = services.free_port()  # the guest's sshd, for the roles
        self.vm = machine.Machine(
            self.work / "vm",
            disks=[machine.Disk(self.disk, "qcow2"), *self.extra_disks],
            firmware=machine.SecureBoot(self.vars),
            tpm_state=self.tpm,
            network=True,
            memory=self.memory,
            time_factor=self.time_factor,
            cold_reboot=True,  # a reset is a power cycle: OVMF comes back faster
            probe=True,  # root's shell (rootfs.PROBE_TTY); nobody logs in on ttyS0
            forwards=[(self.ssh_port, 22)],
        )

    @property
    def console_log(self) -> Path:
        return self.vm.console_log

    def wait_booted(self, timeout: float = BOOT_TIMEOUT) -> Boot:
        """Wait for the initramfs's line, then the shell; the Core that booted."""
        started = time.monotonic()
        match = self.vm.expect(BOOTED, timeout)
        spent = (time.monotonic() - started) / self.vm.time_factor  # as the timeout counts
        self.vm.wait_for_shell(max(30.0, timeout - spent))
        boot = Boot(match.group("core"), round(time.monotonic() - started, 1))
        self.boots.append(boot)
        log.info("guest booted %s in %.0f s", boot.core, boot.seconds)
        return boot

    def boot(self, timeout: float = BOOT_TIMEOUT) -> Boot:
        self.vm.start()
        return self.wait_booted(timeout)

    def restart(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Shut the guest down cleanly (`systemctl poweroff`) and power it on again; the
        console's cursor is at the new boot. A cold boot, not a warm reset: under TCG a
        reset took 35-45 s longer to reach the kernel than a power-on (OVMF 22-25 s
        instead of 12 s, systemd-boot to the kernel 27-39 s instead of 21 s), and the
        guest sees the same thing: its shutdown, then a boot with the TPM's PCRs reset
        and the EFI variables (a pending one-shot entry) and disk as it left them."""
        self.vm.mark()
        self.vm.type_in_shell("systemctl poweroff\n")
        if not self.vm.shutdown_wait(timeout):
            if machine.hang_point(self.vm.tail(60)) == "shutdown":
                log.warning("guest: its shutdown hung after unmounting everything: power cut")
                self.vm.hang_restarts += 1
                self.vm.kill()
                self.vm.start()
                return
            raise LocalError(
                f"guest: still running {timeout:g} s (x time factor {self.vm.time_factor:g}) "
                f"after `systemctl poweroff`; last lines:\n{self.vm.tail()}"
            )
        self.vm.start()

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> Boot:
        """`restart`, then wait for the boot; the Core that booted."""
        self.restart()
        return self.wait_booted(timeout)

    def ensure_shell(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Bring the guest to its root shell, whatever state an earlier step left it in:
        boot it if it is off; if its shell does not answer (a boot under way, a command
        still running), wait for the prompt, and power-cycle it if none comes. Returns
        what it did ("" when the shell answered at once), for the caller to report."""
        if not self.vm.running:
            self.boot(timeout)
            return "was off: booted it"
        try:
            self.vm.shell("true", 30.0)
            return ""
        except machine.ConsoleError:
            log.warning("guest: its shell does not answer; waiting for the prompt")
        try:
            self.vm.wait_for_shell(timeout)
            self.vm.shell("true", 30.0)
            return "shell did not answer: waited for its prompt"
        except machine.ConsoleError:
            log.warning("guest: no shell prompt: power-cycling it")
        self.power_cut()
        self.boot(timeout)
        return "no shell prompt: power-cycled it"

    def failed_units(self) -> list[str]:
        out = self.sh("systemctl list-units --failed --plain --no-legend --no-pager")
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def sh(self, command: str, timeout: float = 120.0) -> str:
        """Run `command` in the guest; its output. LocalError if it fails."""
        result = self.vm.shell(command, timeout)
        if result.returncode != 0:
            raise LocalError(
                f"guest: `{command}` failed with exit code {result.returncode}: "
                f"{result.output.strip()[-2000:]}"
            )
        return result.output

    def status(self) -> dict[str, Any]:
        text = self.sh("rampart status --json")
        start = text.find("{")
        doc: dict[str, Any] = json.loads(text[start:])
        return doc

    def wait_system_up(self, timeout: float = 300.0) -> str:
        """Wait for systemd to finish starting (health check and mark-good included)."""
        out = self.vm.shell("systemctl is-system-running --wait", timeout).output
        return out.strip().splitlines()[-1] if out.strip() else ""

    def ssh(
        self,
        role: str,
        command: str,
        *,
        user: str | None = None,
        stdin: bytes = b"",
        timeout: float = 300.0,
    ) -> run.Completed:
        """Run `command` in the guest as `role` over SSH (or as `user` with the role's
        key), from the host's OpenSSH client with the role's key
        (build.Testbed.role_key) through the forwarded port; the guest's host key is
        learnt at the first login (<work>/known_hosts). Never raises for the
        command's exit status: the caller reads it."""
        argv = [
            "ssh",
            "-F", "none",
            "-i", str(self.bed.role_key(role)),
            "-p", str(self.ssh_port),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={self.work / 'known_hosts'}",
            "-o", "ConnectTimeout=30",
            f"{user or role}@127.0.0.1",
            command,
        ]  # fmt: skip
        return run.run(argv, input=stdin, check=False, timeout=self.vm.scaled(timeout))

    def run_update_service(self, timeout: float = 900.0) -> int:
        """Start rampart-update.service as the timer would; its exit status."""
        self.vm.shell("systemctl start rampart-update.service", timeout)
        out = self.sh("systemctl show -p ExecMainStatus --value rampart-update.service")
        return int(out.strip().splitlines()[-1])

    def update_journal(self, lines: int = 40) -> str:
        """The last lines rampart-update.service logged in this boot (for a failure message)."""
        unit = "rampart-update.service"
        return self.sh(f"journalctl -b -u {unit} -o cat --no-pager | tail -n {lines}")

    def lvs(self) -> dict[str, str]:
        """LV name -> LV UUID in mainvg."""
        out = self.sh(f"lvs --noheadings -o lv_name,lv_uuid {rootfs.VOLUME_GROUP}")
        rows = [line.split() for line in out.splitlines()]
        return {r[0]: r[1] for r in rows if len(r) == 2}

    def entries(self) -> list[str]:
        out = self.sh(f"ls -1 {rootfs.ESP_DIRECTORY}")
        return sorted(line.strip() for line in out.splitlines() if line.strip().endswith(".efi"))

    def enroll_db(self, cert: Path) -> None:
        """Add `cert` to the firmware's db (the machine must be off): a change of the
        Secure Boot keys, which changes PCR 7."""
        from rampart.release import secureboot

        if self.vm.running:
            raise LocalError("enroll_db: power the guest off first")
        guid = secureboot.KeySet(self.bed.keys).owner_guid()
        run.run(
            [
                *secureboot.virt_fw_vars(),
                "--inplace",
                str(self.vars),
                "--add-db",
                str(guid),
                str(cert),
            ],
            timeout=120,
        )

    def tpm_status(self) -> dict[str, Any]:
        text = self.sh("rampart tpm status --json")
        doc: dict[str, Any] = json.loads(text[text.find("{") :])
        return doc

    def power_cut(self) -> None:
        self.vm.kill()

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def secure_boot_state(guest: Guest) -> int:
    """The SecureBoot EFI variable as the guest sees it (1: enforced)."""
    out = guest.sh(
        "od -An -tu1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
    )
    return int(out.split()[-1])

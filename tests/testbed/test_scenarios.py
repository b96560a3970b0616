"""The testbed scenarios: a real Rampart system, installed by `rampart install`
in a VM, booted by OVMF with Secure Boot enforced and a TPM from swtpm, updated from
`rampart serve` on the host through its systemd service, rebooted, rolled back.

One machine goes through scenarios 1, 8 and 2, 3 to 6, 9, 12 and 7 in order (each
starts where the previous one left it, as a device in the field would); 11 and 15
use another booted from the installed disk (its own TPM, Secure Boot off).
Scenario 10 (new Secure Boot keys) needs no update server and uses a machine of its
own: it is in test_trusted_boot.py, which `make test` runs in its other pytest
process (scripts/test.sh).
Each scenario first checks the state it starts from (`_given`): the guest is brought
to its shell whatever an earlier failure left it in, the update server is made to
offer what the scenario needs, and anything else that differs from what the previous
scenario leaves fails the scenario at once with what differs, naming that scenario.
Every wait is multiplied by the run's time factor (tests/testbed/conftest.py): a busy
host is slower, not wrong. Per-scenario times and the factor go to <work>/timings.json
and the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rampart import run
from rampart.contracts import chunks, wire
from rampart.contracts.version import parse_version
from rampart.testbed import build, machine, rootfs, session
from tests.testbed.kit import (
    CORE,
    UNLOCKED_PASSPHRASE,
    UNLOCKED_TPM,
    boot_next,
    console_login,
    delete_boot_option,
    force_one_shot,
    type_passphrase,
)

pytestmark = pytest.mark.vm

CHECKOUT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)
TIMINGS: dict[str, float] = {}
LV_PATH = "/dev/mainvg/core_{}"
TRIES = rootfs.BOOT_TRIES  # the "+N" of a new boot entry
# Scenario 7's UKIs: the unsigned one through systemd-boot's one-shot entry, the one
# signed by another db key through a firmware boot option (BootNext).
ROGUES = ("unsigned.efi", "other-signed.efi")
ROGUE_ALIGN = 1 << 20  # each at a MiB boundary of the rogue disk
ROGUE_OPTION = "rampart-rogue"  # the firmware boot option's label
ROGUE_LOADER = "EFI/rampart-rogue/other-signed.efi"  # its file, on the ESP
REFUSED = r"(?i:security violation|access denied)"
# What the Core's emergency and rescue units say on the console before they reboot.
NO_SHELL = r"no emergency or rescue shell \(root is locked\): rebooting"


@pytest.fixture(scope="module")
def bed(time_factor: float) -> build.Testbed:
    TIMINGS["time factor"] = time_factor
    started = time.monotonic()
    testbed = build.build(CHECKOUT, time_factor=time_factor)
    TIMINGS["build (or cache)"] = round(time.monotonic() - started, 1)
    return testbed


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("testbed")
    yield path
    (path / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
    log.warning("testbed scenario timings (s): %s", json.dumps(TIMINGS))
    print(f"\ntestbed scenario timings (s): {json.dumps(TIMINGS)}")


@pytest.fixture(scope="module")
def server(bed: build.Testbed, work: Path) -> Iterator[session.UpdateServer]:
    with session.UpdateServer(bed, work / "server") as srv:
        yield srv


@pytest.fixture(scope="module")
def rogue_disk(bed: build.Testbed, work: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A raw disk holding the UKIs scenario 7 has refused; {name: (offset, size)} on it."""
    disk = work / "rogues.raw"
    where: dict[str, tuple[int, int]] = {}
    with disk.open("wb") as out:
        for name in ROGUES:
            data = build.rogue(bed, name).read_bytes()
            where[name] = (out.tell(), len(data))
            out.write(data)
            out.write(bytes(-out.tell() % ROGUE_ALIGN))
    return disk, where


@pytest.fixture(scope="module")
def guest(
    bed: build.Testbed,
    work: Path,
    time_factor: float,
    rogue_disk: tuple[Path, dict[str, tuple[int, int]]],
) -> Iterator[session.Guest]:
    # The refused UKIs reach it on a read-only second disk (/dev/vdb), not from the
    # update server.
    rogues = machine.Disk(rogue_disk[0], "raw", read_only=True)
    with session.Guest(
        bed, work / "guest", time_factor=time_factor, extra_disks=(rogues,)
    ) as guest_:
        yield guest_


def _timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.monotonic() - started, 1)


def _a_new_chunk(server: session.UpdateServer, old: str, new: str) -> Path:
    """The store file of a chunk of `new`'s Core that `old`'s lacks."""

    def ids(version: str) -> tuple[bytes, ...]:
        release = wire.release_dir(server.webroot, parse_version(version))
        path = release / wire.index_name(build.OS_NAME)
        return chunks.parse_index(path.read_bytes(), str(path), 1 << 40).ids

    have = set(ids(old))
    chunk = next(c for c in ids(new) if c not in have)
    return wire.store_dir(server.webroot) / chunks.store_path(chunk)


def _root_hash(bed: build.Testbed, version: str) -> str:
    meta = json.loads(bed.core_meta(version).read_text())
    return str(meta["root_hash"])


def _head_digest(guest: session.Guest, version: str) -> str:
    out = guest.sh(f"head -c 16777216 {LV_PATH.format(version)} | sha256sum")
    return out.split()[0]


def _entries(guest: session.Guest) -> list[str]:
    return guest.entries()


def _given(
    guest: session.Guest,
    scenario: str,
    leaves: str,
    *,
    running: str | None,
    entries: list[str] | None = None,
    lvs: set[str] | None = None,
    settled: bool = True,
) -> dict[str, Any]:
    """Check the state `scenario` starts from, the one `leaves` leaves the guest in, and
    establish what can be: the guest at its shell (booted or power-cycled if an earlier
    failure left it off or stuck), its boot finished. Then the ESP must be mounted, the
    guest must run `running`, hold exactly `entries` and the LVs `lvs`, and (`settled`)
    its boot must have come up without a failed unit; otherwise the scenario fails at
    once, saying what differs. Returns `rampart status`."""
    done = guest.ensure_shell()
    if done:
        log.warning("%s: the guest %s", scenario, done)
    state = guest.wait_system_up()
    problems = []
    if settled and state != "running":
        failed = ", ".join(guest.failed_units()) or "none"
        problems.append(f"its boot is {state!r} (failed units: {failed})")
    esp = rootfs.ESP_MOUNT
    mounted = guest.vm.shell(f"mountpoint -q {esp}").returncode == 0
    if not mounted:
        problems.append(f"the ESP is not mounted on {esp}")
    status = guest.status()
    if running is not None and status["running"] != running:
        problems.append(f"it runs {status['running']}, not {running}")
    if mounted and entries is not None and (have := _entries(guest)) != entries:
        problems.append(f"its boot entries are {have}, not {entries}")
    if lvs is not None and set(have_lvs := guest.lvs()) != lvs:
        problems.append(f"its LVs are {sorted(have_lvs)}, not {sorted(lvs)}")
    if problems:
        pytest.fail(
            f"{scenario} starts where {leaves} leaves the guest, but " + "; ".join(problems),
            pytrace=False,
        )
    return status


# --- 1. boot ---------------------------------------------------------------------------


def test_1_boots_the_verified_core_under_secure_boot(
    guest: session.Guest, bed: build.Testbed, server: session.UpdateServer
) -> None:
    started = time.monotonic()
    booted = guest.boot()
    assert booted.core == CORE.format("1.0.0")
    assert session.secure_boot_state(guest) == 1, "Secure Boot is not enforced in the guest"
    source, fstype, options = guest.sh("findmnt -no SOURCE,FSTYPE,OPTIONS /").split()[:3]
    assert source == "/dev/mapper/verity_core_1.0.0"
    assert fstype == "squashfs"
    assert "ro" in options.split(",")
    verity = guest.sh("veritysetup status verity_core_1.0.0")
    assert re.search(r"type:\s+VERITY", verity)
    assert re.search(rf"root hash:\s+{_root_hash(bed, '1.0.0')}", verity)
    assert guest.vm.shell("touch /usr/rampart-write-test").returncode != 0
    guest.sh("echo kept > /mnt/state/scenario-1 && sync")
    assert guest.wait_system_up() == "running"
    status = guest.status()
    assert status["running"] == "1.0.0"
    assert [s["name"] for s in status["slots"]] == ["core_1.0.0"]
    assert status["slots"][0]["running"] is True
    assert [e["name"] for e in status["entries"]] == ["clipos-1.0.0.efi"]
    cmdline = guest.sh("cat /proc/cmdline").split()
    assert cmdline.count("lockdown=confidentiality") == 1
    assert "rampart.epoch=0" in cmdline
    # Trusted boot: the state partition is LUKS2 with integrity, opened by the
    # TPM with no prompt.
    console = guest.console_log.read_text(errors="replace")
    assert UNLOCKED_TPM in console
    assert "recovery passphrase" not in console
    assert guest.sh("findmnt -no SOURCE /mnt/state").strip() == "/dev/mapper/state"
    crypt = guest.sh("cryptsetup status state")
    assert re.search(r"type:\s+LUKS2", crypt), crypt
    assert re.search(r"integrity:\s+hmac\(sha256\)", crypt), crypt
    tpm_status = guest.tpm_status()
    assert tpm_status["unseals"] is True
    assert tpm_status["sealed_to"] == "sha256:7"
    _the_core_is_hardened(guest, bed)
    _timed("1 boot", started)


def _the_core_is_hardened(guest: session.Guest, bed: build.Testbed) -> None:
    """No interactive root, and the kernel hardening the release's audit recorded."""
    # Every password locked; the serial console's getty refuses root, with the empty
    # password as with any other.
    assert guest.sh("passwd --status root").split()[1] == "L"
    assert not console_login(guest, "root", "")
    assert not console_login(guest, "root", "root")
    # The running kernel and sysctl settings are what the audit of the built release
    # found: every sysctl and command-line recommendation met or covered, the gaps
    # only in the Debian kernel's configuration.
    audit = guest.vm.shell("rampart hardening check --running --json")
    running = json.loads(audit.output)["findings"]
    built = json.loads(bed.hardening_report("1.0.0").read_text())["findings"]
    status = {f"{f['kind']}:{f['name']}": f["status"] for f in running}
    assert status == {f"{f['kind']}:{f['name']}": f["status"] for f in built}
    gaps = [key for key, found in status.items() if found == "gap"]
    assert audit.returncode == (5 if gaps else 0), audit
    assert all(key.startswith("kconfig:") for key in gaps), gaps
    assert {f["kind"] for f in running if f["status"] == "met"} == {"kconfig", "cmdline", "sysctl"}
    sysctl = guest.sh("cat /proc/sys/kernel/kptr_restrict /proc/sys/kernel/yama/ptrace_scope")
    assert sysctl.split() == ["2", "2"]
    # Every service the Core loads is scored within its goal (exposure.toml), the
    # Rampart units among them.
    scored = guest.vm.shell("rampart hardening exposure --json")
    units = {unit["unit"]: unit for unit in json.loads(scored.output)["units"]}
    for unit in units.values():
        log.info("exposure: %s %s (goal %s)", unit["unit"], unit["exposure"], unit["goal"])
    assert scored.returncode == 0, [u for u in units.values() if u["status"] != "met"]
    for name in (
        "rampart-update.service",
        "rampart-mark-good.service",
        "rampart-bootloader.service",
        "rampart-health.service",
        "rampart-state-layout.service",
        "rampart-machine-id-commit.service",
        "serial-getty@ttyS0.service",
    ):
        assert units[name]["status"] == "met", units[name]
    assert "getty@tty1.service" not in units and "rc-local.service" not in units
    assert guest.sh("cat /sys/kernel/security/lockdown").split() == [
        "none",
        "integrity",
        "[confidentiality]",
    ]


# --- 2. update through the service, reboot ------------------------------------------------


def test_8_and_2_after_a_power_cut_while_writing_core_the_update_completes_and_boots(
    guest: session.Guest, server: session.UpdateServer
) -> None:
    """Scenario 8: the power is cut while the update writes Core; the next boot runs
    1.0.0 with no new boot entry. Scenario 2: the next update, through the service,
    completes, and the reboot runs 1.0.1. (8 had a machine of its own; here it costs
    one boot, not three.)"""
    started = time.monotonic()
    _given(guest, "scenario 2", "scenario 1", running="1.0.0", entries=["clipos-1.0.0.efi"])
    guest.sh("echo kept > /mnt/state/scenario-2 && sync")
    server.publish("1.0.1")
    guest.sh("systemctl start --no-block rampart-update.service")
    # Follow this boot's journal and return at the line itself (a process substitution:
    # the shell does not wait for journalctl), so that the power is cut while Core is
    # being written, not after a polling interval.
    guest.sh(
        "grep -q -m1 'writing Core' <(journalctl -b -u rampart-update.service -f -n all -o cat)",
        timeout=600,
    )
    guest.power_cut()
    assert guest.boot().core == CORE.format("1.0.0")
    assert guest.wait_system_up() == "running", guest.failed_units()
    assert _entries(guest) == ["clipos-1.0.0.efi"]
    assert "core_1.0.0" in guest.lvs()
    _timed("8 power cut", started)
    started = time.monotonic()
    assert guest.run_update_service() == 20, guest.update_journal(400)  # reboot to use it
    assert _entries(guest) == ["clipos-1.0.0.efi", f"clipos-1.0.1+{TRIES}.efi"]
    assert set(guest.lvs()) == {"core_1.0.0", "core_1.0.1", "core_state"}
    journal = guest.sh("journalctl -b -u rampart-update.service -o cat --no-pager")
    assert "Core 1.0.1 written and verified" in journal
    # Incremental: the installed 1.0.0 is published with its chunk index, so only the
    # chunks 1.0.1 changed were fetched; the rest were read from the running Core's LV.
    assert "rebuilt from chunks" in journal, journal
    assert re.search(r"\d+ of \d+ chunks of Core 1\.0\.1 are here", journal), journal
    booted = guest.reboot()
    assert booted.core == CORE.format("1.0.1")
    assert guest.wait_system_up() == "running"
    assert guest.status()["running"] == "1.0.1"
    # The health check passed: rampart mark-good removed the counter.
    assert _entries(guest) == ["clipos-1.0.0.efi", "clipos-1.0.1.efi"]
    assert guest.sh("cat /mnt/state/scenario-2").strip() == "kept"
    assert guest.run_update_service() == 0  # up to date; the check-in tells the server
    machine_id = guest.sh("cat /etc/machine-id").strip()
    rows = {row["machine_id"]: row for row in server.machines()}
    assert rows[machine_id]["version"] == "1.0.1"
    fleet = server.fleet()
    assert any(row["version"] == "1.0.1" and row["machines"] == 1 for row in fleet["versions"]), (
        fleet
    )
    _timed("2 update and reboot", started)


# --- 3. A/B rotation ---------------------------------------------------------------------


def test_3_the_next_update_overwrites_the_older_slot(
    guest: session.Guest, server: session.UpdateServer
) -> None:
    started = time.monotonic()
    _given(
        guest,
        "scenario 3",
        "scenario 2",
        running="1.0.1",
        entries=["clipos-1.0.0.efi", "clipos-1.0.1.efi"],
        lvs={"core_1.0.0", "core_1.0.1", "core_state"},
    )
    before = guest.lvs()
    server.publish("1.0.2")  # with a delta from 1.0.1, the channel's previous release
    # The delta and a chunk tampered on the server: the delta is refused before anything
    # is written, the chunk detected while rebuilding, and Core streamed whole instead.
    release = wire.release_dir(server.webroot, parse_version("1.0.2"))
    delta = release / wire.delta_name(build.OS_NAME, parse_version("1.0.1"))
    chunk = _a_new_chunk(server, "1.0.1", "1.0.2")
    genuine = {path: path.read_bytes() for path in (delta, chunk)}
    for path in genuine:
        path.chmod(0o644)
    delta.write_bytes(genuine[delta][:-1] + bytes([genuine[delta][-1] ^ 1]))
    chunk.write_bytes(chunks.compress(b"tampered" * 4096, "xz", 6))
    _audit_reads_and_changes_nothing(guest)
    # The admin role points the device at the server's other name and starts the
    # update there, through its sudo rules.
    url = f"https://{rootfs.MIRROR_HOST}:{build.SERVER_PORT}"
    switched = guest.ssh(
        "admin", f"sudo rampart remote set --update-url {url}/update/v1 --dist-url {url}/dist"
    )
    assert switched.returncode == 0, switched
    try:
        started_update = guest.ssh(
            "admin", "sudo systemctl start rampart-update.service", timeout=900
        )
        assert started_update.returncode == 0, started_update
        status = guest.sh("systemctl show -p ExecMainStatus --value rampart-update.service")
        assert status.strip().splitlines()[-1] == "20"
    finally:
        for path, data in genuine.items():
            path.write_bytes(data)
    shown = json.loads(guest.ssh("audit", "sudo rampart remote show --json").stdout)
    assert shown["update_url"] == f"{url}/update/v1"
    journal = guest.update_journal(400)
    assert "delta refused" in journal, journal
    assert "incremental update failed" in journal and "streamed from the server" in journal
    after = guest.lvs()
    assert "core_1.0.0" not in after
    assert after["core_1.0.2"] == before["core_1.0.0"], "1.0.2 was not written into 1.0.0's LV"
    assert after["core_1.0.1"] == before["core_1.0.1"]
    assert _entries(guest) == ["clipos-1.0.1.efi", f"clipos-1.0.2+{TRIES}.efi"]
    booted = guest.reboot()
    assert booted.core == CORE.format("1.0.2")
    assert guest.wait_system_up() == "running"
    assert _entries(guest) == ["clipos-1.0.1.efi", "clipos-1.0.2.efi"]
    _timed("3 A/B rotation", started)


def _audit_reads_and_changes_nothing(guest: session.Guest) -> None:
    """The audit role over SSH: the journal, the update's and the TPM's status and the
    remote configuration, and every change it tries refused; no root and no password
    login over SSH."""
    for command in (
        "journalctl -b -u rampart-update.service --no-pager -n 5",
        "sudo rampart status --json",
        "sudo rampart tpm status --json",
        "sudo rampart remote show",
    ):
        done = guest.ssh("audit", command)
        assert done.returncode == 0, (command, done)
    assert json.loads(guest.ssh("audit", "sudo rampart status --json").stdout)["running"]
    # sudo refuses what no rule allows at once ("Sorry, user audit is not allowed to
    # execute ..."), without asking for a password.
    not_allowed = b"is not allowed to execute"
    for command in (
        "sudo -n systemctl start rampart-update.service",
        "sudo -n rampart remote set --channel beta",
        "sudo -n rampart boot-once 1.0.0",
        "sudo -n rampart tpm reseal",
        "sudo -n systemctl reboot",
        "sudo -n journalctl --rotate",
        "sudo -n bash -c id",
    ):
        done = guest.ssh("audit", command)
        assert done.returncode != 0 and not_allowed in done.stderr, (command, done)
    for command in ("echo x > /etc/rampart/remote.toml", "journalctl --rotate"):
        done = guest.ssh("audit", command)
        assert done.returncode != 0, (command, done)
    # The admin role's rules are exact: no other option, no shell.
    for command in (
        "sudo -n rampart remote set -r /tmp --channel beta",
        "sudo -n rampart boot-once -c /tmp 1.0.0",
        "sudo -n bash -c id",
    ):
        done = guest.ssh("admin", command)
        assert done.returncode != 0 and not_allowed in done.stderr, (command, done)
    # No root, no password, no keyboard-interactive login.
    root = guest.ssh("admin", "true", user="root")  # the admin's key, for root
    assert root.returncode == 255 and b"Permission denied" in root.stderr, root
    for method in ("password", "keyboard-interactive"):
        done = run.run(
            ["ssh", "-F", "none", "-p", str(guest.ssh_port), "-o", "BatchMode=yes",
             "-o", "PubkeyAuthentication=no", "-o", f"PreferredAuthentications={method}",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "admin@127.0.0.1", "true"],
            check=False,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 255 and b"Permission denied (publickey)" in done.stderr, done
    # sudo logged each command, refused or run, with who asked (test_rootfs's
    # test_a_refused_sudo_command_is_logged: it did not log a refusal before).
    log_lines = guest.sh("journalctl -b _COMM=sudo -o cat --no-pager")
    refused = r"audit : command not allowed ; .*COMMAND=/usr/bin/systemctl start"
    assert re.search(refused, log_lines), log_lines[-3000:]


# --- 4. manual rollback ------------------------------------------------------------------


def test_4_a_one_shot_boot_runs_the_older_version_and_updates_spare_it(
    guest: session.Guest, server: session.UpdateServer
) -> None:
    started = time.monotonic()
    _given(
        guest,
        "scenario 4",
        "scenario 3",
        running="1.0.2",
        entries=["clipos-1.0.1.efi", "clipos-1.0.2.efi"],
        lvs={"core_1.0.1", "core_1.0.2", "core_state"},
    )
    server.publish("1.0.2")  # offered, as scenario 3 left the server
    assert "clipos-1.0.1.efi" in guest.sh("rampart boot-once 1.0.1")
    booted = guest.reboot()
    assert booted.core == CORE.format("1.0.1")
    assert guest.wait_system_up() == "running"
    assert guest.status()["running"] == "1.0.1"
    lvs = guest.lvs()
    digest = _head_digest(guest, "1.0.1")
    # The server still offers 1.0.2: the update goes into 1.0.2's LV, never the running one,
    # made by the delta from 1.0.1 (the running Core) that scenario 3 published.
    assert guest.run_update_service() == 20
    assert "made by a delta" in guest.update_journal(400)
    assert guest.lvs() == lvs
    assert _head_digest(guest, "1.0.1") == digest
    assert _entries(guest) == ["clipos-1.0.1.efi", f"clipos-1.0.2+{TRIES}.efi"]
    _timed("4 manual rollback", started)


def test_emergency_mode_reboots_instead_of_waiting_at_a_locked_shell(
    guest: session.Guest,
) -> None:
    """A boot that lands in emergency mode (asked for here; on a device, a unit its
    boot needs failed) has no shell to give: root is locked, so sulogin could only wait
    for Enter at a console nobody watches, and the machine stayed there (it did before
    the Core's no-shell.conf). It says so on the console and reboots by itself, here
    into the default entry, the newest: scenario 4's update."""
    started = time.monotonic()
    _given(
        guest,
        "the emergency scenario",
        "scenario 4",
        running="1.0.1",
        entries=["clipos-1.0.1.efi", f"clipos-1.0.2+{TRIES}.efi"],
        lvs={"core_1.0.1", "core_1.0.2", "core_state"},
    )
    guest.vm.mark()
    guest.vm.type_in_shell("systemctl --no-block emergency\n")
    guest.vm.expect(NO_SHELL, session.SHUTDOWN_TIMEOUT)
    booted = guest.wait_booted()
    assert booted.core == CORE.format("1.0.2")
    assert guest.wait_system_up() == "running"
    _timed("emergency mode reboots", started)


# --- 6. tampering (before 5: the tampered slot is the one 5's update then rewrites) ----


def test_5_a_flipped_byte_in_the_inactive_core_stops_its_boot_at_verity(
    guest: session.Guest,
) -> None:
    started = time.monotonic()
    _given(
        guest,
        "the tampering scenario",
        "the emergency scenario",
        running="1.0.2",
        entries=["clipos-1.0.1.efi", "clipos-1.0.2.efi"],
        lvs={"core_1.0.1", "core_1.0.2", "core_state"},
    )
    lv = LV_PATH.format("1.0.1")
    guest.sh(
        "python3 -c \"import os; f=os.open('" + lv + "', os.O_RDWR); "
        'b=os.pread(f, 1, 1000); os.pwrite(f, bytes([b[0] ^ 0x01]), 1000); os.fsync(f)"'
    )
    guest.sh("rampart boot-once 1.0.1")
    guest.restart()
    line = guest.vm.expect(r"rampart: cannot open Core \S+ with dm-verity[^\n]*\n", 300)
    assert CORE.format("1.0.1") in line.group(0)
    assert "does not match the root hash" in line.group(0)
    booted = guest.wait_booted()  # panic=10: reboot, and the one-shot is spent
    assert booted.core == CORE.format("1.0.2")
    _timed("5 tampered Core", started)


# --- 5. automatic rollback ----------------------------------------------------------------


def test_6_a_version_that_fails_its_health_check_falls_back_by_itself(
    guest: session.Guest, server: session.UpdateServer
) -> None:
    started = time.monotonic()
    _given(
        guest,
        "the automatic rollback scenario",
        "the tampering scenario",
        running="1.0.2",
        entries=["clipos-1.0.1.efi", "clipos-1.0.2.efi"],
        lvs={"core_1.0.1", "core_1.0.2", "core_state"},
    )
    server.publish(build.BROKEN)
    assert guest.run_update_service() == 20
    assert _entries(guest) == ["clipos-1.0.2.efi", f"clipos-1.0.3+{TRIES}.efi"]
    guest.restart()
    cores: list[str] = []
    while not cores or cores[-1] == CORE.format(build.BROKEN):
        assert len(cores) <= rootfs.BOOT_TRIES, f"no fallback after {cores}"
        cores.append(guest.vm.expect(session.BOOTED, session.BOOT_TIMEOUT).group("core"))
    assert cores == [CORE.format(build.BROKEN)] * rootfs.BOOT_TRIES + [CORE.format("1.0.2")]
    guest.vm.wait_for_shell(session.BOOT_TIMEOUT)
    # The fallback boot comes up whole: the ESP mounted, mark-good done (the fault of
    # a busy host: the ESP's device came after its timeout and the boot was degraded).
    state = guest.wait_system_up()
    assert state == "running", f"the fallback boot is {state}: failed {guest.failed_units()}"
    assert guest.status()["running"] == "1.0.2"
    assert _entries(guest) == ["clipos-1.0.2.efi", f"clipos-1.0.3+0-{TRIES}.efi"]
    # 1.0.3 is not bootable any more: the rollback counter rises to 1.0.2's epoch.
    assert guest.tpm_status()["rollback_counter"] == build.EPOCHS["1.0.2"]
    console = guest.console_log.read_text(errors="replace")
    assert console.count("this version is broken on purpose") >= rootfs.BOOT_TRIES
    # The next check refuses the version that failed, and says so to the server.
    assert guest.run_update_service() == 4
    failures = server.fleet()["recent_failures"]
    assert any(
        f["to_version"] == build.BROKEN and "failed to boot" in f["error"] for f in failures
    ), failures
    _timed("6 automatic rollback", started)


# --- trusted boot ---------------------------------------------------------------------------


def test_9_an_old_signed_version_written_back_offline_does_not_boot(
    guest: session.Guest, server: session.UpdateServer
) -> None:
    """Scenario 4: 1.0.2 (epoch 2) is good, 1.0.1 (epoch 1) was replaced by 1.0.3. The
    attacker writes 1.0.1's validly signed Core and EFI binary back with direct disk
    access (here: root in the guest writing the LV and the ESP, then a power cycle)."""
    started = time.monotonic()
    _given(
        guest,
        "the offline rollback scenario",
        "the automatic rollback scenario",
        running="1.0.2",
        lvs={"core_1.0.2", f"core_{build.BROKEN}", "core_state"},
        settled=False,
    )
    counter = guest.tpm_status()["rollback_counter"]
    if counter != build.EPOCHS["1.0.2"]:
        pytest.fail(
            f"the offline rollback scenario needs the rollback counter at 1.0.2's epoch "
            f"{build.EPOCHS['1.0.2']}, as the automatic rollback scenario's mark-good leaves "
            f"it; it is {counter}",
            pytrace=False,
        )
    server.ensure_release("1.0.1")  # published by scenario 2
    esp = rootfs.ESP_DIRECTORY
    base = f"https://{rootfs.UPDATE_HOST}:{build.SERVER_PORT}/dist/1.0.1/clipos"
    old_lv = LV_PATH.format("1.0.1")
    guest.sh(f"lvrename {rootfs.VOLUME_GROUP} core_{build.BROKEN} core_1.0.1")
    guest.sh(
        'python3 -c "import shutil, ssl, urllib.request; '
        "c=ssl.create_default_context(cafile='/etc/rampart/rootca.pem'); "
        f"shutil.copyfileobj(urllib.request.urlopen('{base}-core', context=c), "
        f"open('{old_lv}', 'wb'), 1 << 20); "
        f"open('{esp}/clipos-1.0.1.efi', 'wb').write("
        f"urllib.request.urlopen('{base}-efiboot', context=c).read())\"",
        timeout=600,
    )
    guest.sh(f"rm -f {esp}/clipos-{build.BROKEN}+0-{TRIES}.efi && sync")
    force_one_shot(guest, "clipos-1.0.1.efi")
    guest.restart()
    line = guest.vm.expect(r"rampart: Core \S+ has security epoch[^\n]*\n", 300).group(0)
    assert CORE.format("1.0.1") in line
    assert f"epoch {build.EPOCHS['1.0.1']}, below the TPM's rollback counter {counter}" in line
    booted = guest.wait_booted()  # panic=10 reboots; the one-shot is spent
    assert booted.core == CORE.format("1.0.2")
    _timed("9 offline rollback", started)


# --- 12. TUF: a root rotation, a revoked release key, a frozen server ------------------------

TUF_CHANNEL = "lts"  # the channel the device follows in TUF mode, held at 1.0.2
# Seconds a timestamp of the server lives (times the run's time factor): it is re-signed
# at half its life, so a check-in always finds at least half of it left, far more than a
# check-in takes even on a slow, busy host; the freeze waits it out.
TUF_EXPIRY = 40


def _tuf(password: Path, *argv: str) -> dict[str, Any]:
    """`rampart tuf ARGV --json` on the host, the keys' password in `password`."""
    out = run.run(
        [sys.executable, "-m", "rampart", "tuf", *argv, "--password-file", str(password), "--json"],
        timeout=300,
    )
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def _server_cli(server: session.UpdateServer, *argv: str) -> None:
    run.run([sys.executable, "-m", "rampart", *argv, "--webroot", str(server.webroot)])


def _pin_root(guest: session.Guest, server: session.UpdateServer) -> None:
    """Put root 1 where `rampart install` would have written it (/etc/rampart/root.json),
    fetched by the guest from the server and checked against the host's copy, and make
    the device follow TUF_CHANNEL."""
    root = server.webroot / "tuf" / "1.root.json"
    url = f"https://{rootfs.UPDATE_HOST}:{build.SERVER_PORT}/tuf/1.root.json"
    guest.sh(
        'python3 -c "import ssl, urllib.request; '
        "c=ssl.create_default_context(cafile='/etc/rampart/rootca.pem'); "
        "open('/etc/rampart/root.json', 'wb')"
        f".write(urllib.request.urlopen('{url}', context=c).read())\""
    )
    digest = guest.sh("sha256sum /etc/rampart/root.json").split()[0]
    assert digest == hashlib.sha256(root.read_bytes()).hexdigest()
    guest.sh(f"echo 'channel = \"{TUF_CHANNEL}\"' >> /etc/rampart/remote.toml && sync")


def _trust(guest: session.Guest) -> dict[str, Any]:
    state: dict[str, Any] = guest.status()["trust"]
    return state


def _forge_targets(
    server: session.UpdateServer, stolen: Path, online: Path, password: bytes
) -> None:
    """What a thief holding the stolen targets key and the server's online keys does:
    a new targets version signed by the stolen key, a snapshot and a timestamp naming it."""
    from rampart.contracts import tufrepo

    directory = tufrepo.metadata_dir(server.webroot)
    signer = [tufrepo.load_signer(online, password)]
    with tufrepo.locked(server.webroot):
        targets = tufrepo.latest(directory, "targets")
        targets.signed.version += 1
        tufrepo.sign(targets, [tufrepo.load_signer(stolen, password)])
        tufrepo.write(directory, targets)
        tufrepo.publish_snapshot(
            server.webroot, {"snapshot": signer, "timestamp": signer, "channels": signer}
        )


def test_12_tuf_a_root_rotation_a_revoked_release_key_and_a_frozen_server(
    guest: session.Guest, server: session.UpdateServer, work: Path, time_factor: float
) -> None:
    """The device moves to TUF mode, follows a root rotation with the fleet, refuses what
    a stolen and revoked release key signs, and reports a freeze when its server stops
    re-signing the timestamp: nothing reinstalled, nothing written to its slots."""
    started = time.monotonic()
    status = _given(
        guest,
        "scenario 12",
        "the offline rollback scenario",
        running="1.0.2",
        settled=False,
    )
    # The vendor's ceremony: a 2-of-3 root, a release key, an online key for the server.
    keys = work / "tuf-keys"
    keys.mkdir()
    password = keys / "password"
    password.write_text("testbed tuf keys\n")
    password.chmod(0o600)
    key = {
        n: str(keys / f"{n}.key") for n in ("a", "b", "c", "d", "targets", "targets-2", "online")
    }
    ids = {n: _tuf(password, "keygen", path)["keyid"] for n, path in key.items()}
    webroot = str(server.webroot)
    _tuf(
        password, "init", webroot, "--root-key", key["a"], "--root-key", key["b"],
        "--root-key", key["c"], "--threshold", "2", "--targets-key", key["targets"],
        "--online-key", key["online"],
    )  # fmt: skip
    for version in ("1.0.0", "1.0.1", "1.0.2"):
        server.ensure_release(version)
        _tuf(password, "add-release", webroot, version, "--os", rootfs.DEFAULT_OS_NAME,
             "--targets-key", key["targets"], "--online-key", key["online"])  # fmt: skip
    # The server holds the online key; the device's channel is held at 1.0.2.
    machine_id = status["machine_id"]
    _server_cli(server, "channel", "create", TUF_CHANNEL, "--os", rootfs.DEFAULT_OS_NAME,
                "--version", "1.0.2")  # fmt: skip
    _server_cli(server, "machine", "assign", machine_id, "--os", rootfs.DEFAULT_OS_NAME,
                "--channel", TUF_CHANNEL)  # fmt: skip
    expiry = round(TUF_EXPIRY * time_factor)
    tuf_options = ["--tuf-key", key["online"], "--tuf-password-file", str(password),
                   "--tuf-timestamp-expiry", str(expiry), "--tuf-interval", "1"]  # fmt: skip
    server.restart(tuf_options)
    _pin_root(guest, server)
    before = (guest.lvs(), _entries(guest))

    # TUF mode: up to date, root 1, a fresh timestamp.
    assert guest.run_update_service() == 0, guest.update_journal()
    trust = _trust(guest)
    assert (trust["mode"], trust["root_version"], trust["expired"]) == ("auto", 1, False)

    # 1. The root keys rotate (a -> d, signed by two old and two new keys): the device
    # fetches root 2 at its next check.
    _tuf(password, "key", "rotate", webroot, "root", ids["a"], key["d"],
         "--key", key["a"], "--key", key["b"], "--key", key["c"], "--key", key["d"])  # fmt: skip
    assert guest.run_update_service() == 0, guest.update_journal()
    assert _trust(guest)["root_version"] == 2

    # 2. The release key is stolen; the vendor revokes it (root 3). What the thief then
    # signs with it, served by a server whose online keys it also holds, is refused.
    _tuf(password, "key", "rotate", webroot, "targets", ids["targets"], key["targets-2"],
         "--key", key["b"], "--key", key["c"], "--key", key["d"], "--key", key["targets-2"],
         "--key", key["online"])  # fmt: skip
    _forge_targets(server, Path(key["targets"]), Path(key["online"]), b"testbed tuf keys")
    assert guest.run_update_service() == 11
    journal = guest.update_journal()
    assert "threshold" in journal, journal
    assert _trust(guest)["root_version"] == 3
    # The vendor signs its targets again with the new key: the device is content.
    _tuf(password, "add-release", webroot, build.BROKEN, "--os", rootfs.DEFAULT_OS_NAME,
         "--targets-key", key["targets-2"], "--online-key", key["online"])  # fmt: skip
    assert guest.run_update_service() == 0, guest.update_journal()

    # 3. The server stops re-signing (its signer stuck: here the repository's lock is
    # held) and keeps serving the last timestamp: once it expires, the device refuses to
    # trust it and says so to the server.
    from rampart.contracts import tufrepo

    with tufrepo.locked(server.webroot):
        time.sleep(expiry + 2)
        assert guest.run_update_service() == 13, guest.update_journal()
    assert "indefinite freeze" in guest.update_journal()
    failures = server.fleet()["recent_failures"]
    assert any("indefinite freeze" in f["error"] for f in failures), failures
    assert (guest.lvs(), _entries(guest)) == before
    server.restart()
    _timed("12 TUF", started)


# --- 7. the firmware refuses a UKI it cannot verify ----------------------------------------


def _rogue_to_esp(
    guest: session.Guest, where: dict[str, tuple[int, int]], name: str, target: str
) -> None:
    offset, size = where[name]
    guest.sh(
        f"mkdir -p {Path(target).parent} && python3 -c \"f = open('/dev/vdb', 'rb'); "
        f"f.seek({offset}); open('{target}', 'wb').write(f.read({size}))\""
    )
    assert guest.sh(f"stat -c %s {target}").strip() == str(size)


def test_7_the_firmware_refuses_a_uki_it_cannot_verify(
    guest: session.Guest, rogue_disk: tuple[Path, dict[str, tuple[int, int]]]
) -> None:
    """An attacker with root in the guest puts an unsigned UKI on the ESP and makes it
    systemd-boot's one-shot entry, and one signed by a db key the firmware does not
    trust and makes it the firmware's next boot option (BootNext). OVMF (Secure Boot
    enforced) refuses both at the next power-on, one after the other; with nothing
    left to start it stops, and the power-on after that boots the default entry."""
    started = time.monotonic()
    status = _given(guest, "scenario 7", "scenario 12", running="1.0.2", settled=False)
    defaults = [e["version"] for e in status["entries"] if e["default"]]
    assert len(defaults) == 1, f"no default boot entry to come back to: {status['entries']}"
    where = rogue_disk[1]
    entry = f"clipos-{build.ROGUE}.efi"
    one_shot = f"{rootfs.ESP_DIRECTORY}/{entry}"
    _rogue_to_esp(guest, where, "unsigned.efi", one_shot)
    option = f"{rootfs.ESP_MOUNT}/{ROGUE_LOADER}"
    _rogue_to_esp(guest, where, "other-signed.efi", option)
    number = boot_next(guest, ROGUE_OPTION, ROGUE_LOADER)
    force_one_shot(guest, entry)
    guest.restart()
    option_line = rf"BdsDxe: (failed to load|starting) Boot\w+ \"{ROGUE_OPTION}\"[^\n]*\n"
    line = guest.vm.expect(option_line, 300).group(0)
    assert re.search(REFUSED, line), f"the firmware started other-signed.efi: {line}"
    index, match = guest.vm.expect_any(
        [rf"Error loading \\EFI\\Linux\\{re.escape(entry)}: ({REFUSED})", session.BOOTED],
        session.BOOT_TIMEOUT,
    )
    assert index == 0, f"the firmware started unsigned.efi: {match.group(0)}"
    guest.power_cut()
    booted = guest.boot()  # the one-shot and BootNext are spent: the default entry boots
    assert booted.core == CORE.format(defaults[0])
    delete_boot_option(guest, number)
    guest.sh(f"rm -r {one_shot} {Path(option).parent} && sync")
    _timed("7 refused UKIs", started)


# --- 11 and 15. another machine: its own TPM, then the fleet's admission and attestation ---

OTHER_MID = "0b" * 16  # the second machine's machine-id (its disk is a copy of the first's)
OTHER_MID_FILE = "/run/rampart-other-machine-id"


def _row(server: session.UpdateServer, mid: str) -> dict[str, Any] | None:
    rows = [m for m in server.fleet()["last_seen"] if m["machine_id"] == mid]
    return rows[0] if rows else None


def test_11_and_15_another_machine_needs_the_passphrase_counts_once_admitted_not_known_good(
    bed: build.Testbed,
    guest: session.Guest,
    server: session.UpdateServer,
    work: Path,
    time_factor: float,
) -> None:
    """Another machine booted from the installed disk: its own (fresh) TPM, and Secure
    Boot off (OVMF's variables without keys). Scenario 11: its TPM cannot load the
    sealed key; a wrong passphrase stops the boot, the right one opens the state.
    Scenario 15: it signs its checks and reports with its TPM key: pending, they do not
    count; admitted, they do, and its attested PCR 7 is not the fleet's known-good
    value, which the scenarios' machine (Secure Boot on) attests; a channel that
    requires attestation keeps it where it is. One machine for both: a boot saved."""
    started = time.monotonic()
    _given(guest, "scenario 15", "scenario 7", running=None, settled=False)
    mid = guest.sh("cat /etc/machine-id").strip()
    # The scenarios' machine signed every check since scenario 2 (admitted on first
    # use), each with a TPM quote of PCR 7 and the nonce of the previous answer.
    seen = _row(server, mid)
    assert seen is not None and (seen["authenticated"], seen["key"]) == (True, "tpm"), (
        f"scenario 15 starts where scenarios 12 and 7 leave the machine, attested: {seen}"
    )
    assert seen["attested_at"] is not None, seen
    server.cli("machine", "admission", "operator")
    server.cli("attestation", "known-good", "learn", mid, "--os", build.OS_NAME)
    assert _row(server, mid)["pcr7_good"] is True  # type: ignore[index]
    # The second machine keeps the version it was installed with: a channel of its own.
    server.cli("channel", "create", "kept", "--os", build.OS_NAME, "--version", build.INSTALLED)
    server.cli("machine", "assign", OTHER_MID, "--os", build.OS_NAME, "--channel", "kept")
    before = server.fleet()["counts"]

    with session.Guest(
        bed, work / "guest-other", fresh_tpm=True, secure_boot=False, time_factor=time_factor
    ) as other:
        booted = time.monotonic()
        other.vm.start()
        reason = type_passphrase(other, "not-the-passphrase")
        assert "cannot load the sealed state key" in reason, reason
        other.vm.expect(
            r"rampart: the recovery passphrase does not open the state partition "
            r"mainvg/core_state\n",
            120,
        )
        type_passphrase(other, bed.recovery_passphrase)  # panic=10: the next boot
        other.vm.expect(UNLOCKED_PASSPHRASE, 120)
        assert other.wait_booted().core == CORE.format(build.INSTALLED)
        assert other.tpm_status()["unseals"] is False
        _timed("11 another TPM", booted)
        assert session.secure_boot_state(other) == 0
        other.sh(f"echo {OTHER_MID} > {OTHER_MID_FILE}")

        def update(*options: str) -> int:
            command = f"rampart update --machine-id {OTHER_MID_FILE} {' '.join(options)}"
            return other.vm.shell(command, 600).returncode

        # Pending: its check and its failure report are stored, anonymous, uncounted.
        assert update() == 0
        keys = json.loads(server.cli("machine", "keys", OTHER_MID, "--json"))
        assert [(k["state"], k["kind"]) for k in keys] == [("pending", "tpm")], keys
        assert update("--run-dir", "/proc/rampart") != 0  # fails at once, and reports it
        after = server.fleet()["counts"]  # a count of nothing is left out
        counted = ("machines", "reports_failure", "anonymous_reports")
        assert [after.get(k, 0) - before.get(k, 0) for k in counted] == [0, 0, 1], (
            before,
            after,
        )
        seen = _row(server, OTHER_MID)
        assert seen is None or seen["authenticated"] is False, seen

        # Admitted: it counts, attested (its first check's answer held a nonce), with a
        # PCR 7 that is not known good; the channel that requires attestation keeps it.
        server.cli("machine", "admit", OTHER_MID)
        time.sleep(1.5)  # the server's caches follow within a second
        assert update() == 0
        seen = _row(server, OTHER_MID)
        assert seen is not None and (seen["authenticated"], seen["key"]) == (True, "tpm"), seen
        assert seen["attested_at"] is not None and seen["pcr7_good"] is False, seen
        assert server.fleet()["counts"].get("machines", 0) == before.get("machines", 0) + 1
        line = server.cli("fleet").split(f"  {OTHER_MID} ")[1].splitlines()[0]
        assert "tpm key, PCR 7 unknown" in line, line
        server.cli("channel", "set", "kept", "--os", build.OS_NAME, "--version", "1.0.1")
        server.cli("channel", "attestation", "kept", "--os", build.OS_NAME, "on")
        kept = [c for c in server.fleet()["channels"] if c["name"] == "kept"]
        assert [c["version"] for c in kept] == ["1.0.1"], kept
        time.sleep(1.5)
        assert update() == 0  # withheld: told its own version, nothing installed
        assert other.lvs().keys() == {f"core_{build.INSTALLED}", "core_state"}
    server.cli("machine", "admission", "first-use")
    _timed("15 authenticated fleet", started)

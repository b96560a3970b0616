"""The systemd units shipped in the package pass systemd's own checker.

`verify_units` runs `systemd-analyze verify` on unit files as they are installed,
with the directory that holds them (and their drop-ins, in <unit>.d/) searched before
the host's own units, and fails on anything it says about them: a syntax error (a
broken section header, a line that is no assignment), an unknown section or key
(a misspelt directive is only a warning to systemd, which ignores it: here it is a
failure), a value systemd cannot parse, a missing ExecStart=, a dependency on a unit
that does not exist (Requires=, Wants=, ... against the host's systemd units: the
same Debian systemd as the device's).

What it cannot check here, and where that is checked instead:
- that the programs the units run exist: /usr/bin/rampart and the like are in the
  device image, not on this host. systemd-analyze says "Command ... is not
  executable" for each of them; those lines are expected, and required (they show
  the check got that far for each unit), and nothing else is (the VM tests run
  systemd-analyze verify inside the built tree, where the programs are:
  tests/testbed/test_rootfs.py);
- Documentation=: --man=no, the host has no manual pages for rampart(1);
- what only a boot shows: users and groups (User=, DynamicUser=), the sandboxing
  directives' effect, Condition*=, and ordering against units made at boot by
  generators (e.g. efi.mount from the fstab).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import pytest

SHIPPED = resources.files("rampart") / "data" / "systemd"
DEVICE_UNITS = (
    "rampart-update.service",
    "rampart-update.timer",
    "rampart-mark-good.service",
    "rampart-bootloader.service",
)
TUF_UNITS = ("rampart-tuf-timestamp.service", "rampart-tuf-timestamp.timer")
EXEC_KEYS = frozenset(
    {
        "ExecCondition",
        "ExecStartPre",
        "ExecStart",
        "ExecStartPost",
        "ExecReload",
        "ExecStop",
        "ExecStopPost",
    }
)
# A note about the host's kernel (no BPF firewalling for IPAddressDeny=), not the unit.
HOST_NOTES = ("Unit configured to use BPF",)


def programs(text: str) -> list[str]:
    """The programs a unit file's Exec*= lines run (their prefixes -@:+! dropped)."""
    found = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in EXEC_KEYS and value.strip():
            found.append(value.split()[0].lstrip("-@:+!"))
    return found


def verify_units(directory: Path, names: Sequence[str]) -> list[str]:
    """What `systemd-analyze verify` finds wrong with the units `names` (unit files in
    `directory`, or instances of templates, whose drop-ins are in `directory`), one line
    each; [] when it finds nothing. See the module's docstring for what it leaves out."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed (Debian's systemd package)")
    expected = set()
    for path in sorted(directory.rglob("*")):
        unit = path.name if path.parent == directory else path.parent.name.removesuffix(".d")
        if path.is_file():
            for program in programs(path.read_text()):
                if not Path(program).exists():  # the device image has it, the host not
                    expected.add(
                        f"{unit}: Command {program} is not executable: No such file or directory"
                    )
    targets = [str(directory / n) if (directory / n).is_file() else n for n in names]
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *targets],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"},  # ":": then the host's
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    lines = done.stderr.splitlines()
    ours = (str(directory), *names)
    problems = [
        line
        for line in lines
        if line not in expected
        and any(name in line for name in ours)
        and not any(note in line for note in HOST_NOTES)
    ]
    problems += [f"not checked this far: {line}" for line in sorted(expected - set(lines))]
    if not problems:
        assert done.returncode == (1 if expected else 0), done.stderr
    return problems


def shipped(directory: Path) -> list[str]:
    """Every unit of rampart/data/systemd, copied into `directory`: their names."""
    names = []
    for entry in sorted(SHIPPED.iterdir(), key=lambda e: e.name):
        (directory / entry.name).write_text(entry.read_text())
        names.append(entry.name)
    return names


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    names = shipped(tmp_path)
    assert {*DEVICE_UNITS, "rampart-server.service", *TUF_UNITS} <= set(names)
    assert verify_units(tmp_path, names) == []


@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        ("[Service]\n", "[Service\n", "Invalid section header"),
        ("[Service]\n", "[Servcie]\n", "Unknown section 'Servcie'"),
        ("TimeoutStartSec=", "TimeoutStrtSec=", "Unknown key 'TimeoutStrtSec'"),
        ("Type=oneshot\n", "Type=oneshoot\n", "Failed to parse service type"),
        ("Nice=10\n", "Nice=100\n", "Nice priority out of range"),
        ("Wants=network-online.target\n", "Requires=no-such.target\n", "no-such.target"),
        ("RestrictNamespaces=pid\n", "RestrictNamespaces=pdi\n", "namespace type string"),
    ],
)
def test_verify_finds_a_planted_fault(tmp_path: Path, old: str, new: str, said: str) -> None:
    """Each fault in a broken copy of rampart-update.service is found, so that the check
    is known not to pass vacuously."""
    names = shipped(tmp_path)
    unit = tmp_path / "rampart-update.service"
    text = unit.read_text()
    assert text.count(old) == 1
    unit.write_text(text.replace(old, new))
    problems = verify_units(tmp_path, names)
    assert any(said in line for line in problems), problems


def test_update_service_treats_updated_and_pending_as_success() -> None:
    text = (resources.files("rampart") / "data/systemd/rampart-update.service").read_text()
    assert "SuccessExitStatus=20 21" in text
    assert "ConditionPathExists=!/run/rampart/update-ready" in text


def test_update_service_allows_the_fetch_pid_namespace_and_no_other() -> None:
    """The fetch process is PID 1 of a new PID namespace (unshare, then setns back):
    the unit must allow exactly that namespace type, and CAP_SYS_ADMIN and CAP_KILL."""
    text = (resources.files("rampart") / "data/systemd/rampart-update.service").read_text()
    settings = [line.split("=", 1) for line in text.splitlines() if "=" in line]
    restrict = [value for key, value in settings if key == "RestrictNamespaces"]
    assert restrict == ["pid"]
    caps = next(value for key, value in settings if key == "CapabilityBoundingSet").split()
    assert {"CAP_SYS_ADMIN", "CAP_KILL"} <= set(caps)


def test_sysusers_declares_the_fetch_user() -> None:
    text = (resources.files("rampart") / "data/sysusers.d/rampart.conf").read_text()
    assert "u rampart-fetch " in text


def _unit_values(text: str, section: str, key: str) -> list[str]:
    """Every value of `key` in `section` (space-separated lists split)."""
    values: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line.partition("=")[0].strip() == key:
            values += line.partition("=")[2].split()
    return values


def _microseconds(span: str) -> int:
    """A systemd time span in microseconds, as systemd itself parses it."""
    out = subprocess.run(
        ["systemd-analyze", "timespan", span], capture_output=True, text=True, check=True
    ).stdout
    return int(next(line for line in out.splitlines() if "μs:" in line).split()[-1])


def test_slow_boot_loses_esp_unless_mark_good_is_ordered_after_its_mount() -> None:
    """The slow boot's fault: the ESP (mounted `nofail`, so not before local-fs.target)
    came late or not at all, mark-good ran without it, failed, and the boot ended
    `degraded` with the entry unblessed. mark-good must start after the ESP's mount,
    wherever the device mounts it (the ESP places the unit may write), then wait for
    the directory itself, within its own start timeout."""
    text = (resources.files("rampart") / "data/systemd/rampart-mark-good.service").read_text()
    places = [p.lstrip("-") for p in _unit_values(text, "Service", "ReadWritePaths")]
    esp_places = [p for p in places if p in ("/efi", "/boot", "/mnt/efiboot")]
    assert esp_places == ["/efi", "/boot", "/mnt/efiboot"], places
    mounts = subprocess.run(
        ["systemd-escape", "--path", "--suffix=mount", *esp_places],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    after = _unit_values(text, "Unit", "After")
    assert set(mounts) <= set(after), after
    assert "boot-complete.target" in after
    # Ordering only: a device whose ESP is elsewhere does not need these mounts.
    for key in ("Requires", "Wants", "BindsTo", "Requisite"):
        assert not set(mounts) & set(_unit_values(text, "Unit", key)), key
    (exec_start,) = [v for v in text.splitlines() if v.startswith("ExecStart=")]
    argv = exec_start.partition("=")[2].split()
    assert argv[:2] == ["/usr/bin/rampart", "mark-good"], argv
    wait = float(argv[argv.index("--wait-esp") + 1])
    assert wait >= 120, "the wait must outlast a slow boot's late ESP"
    (timeout,) = _unit_values(text, "Service", "TimeoutStartSec")
    assert _microseconds(timeout) > wait * 1e6 + 60e6, "the unit's timeout must cover the wait"


@pytest.mark.parametrize("unit", ["rampart-update.service", "rampart-bootloader.service"])
def test_db_append_read_only_efivars_in_the_unit_s_sandbox(unit: str) -> None:
    """Found by testbed scenario 14: the update applies a release's db append before
    its UKI (a rotation in one release), and in rampart-update.service's sandbox
    efivarfs was read-only (ProtectSystem=strict, ProtectKernelTunables): EROFS. Each
    unit that writes db or dbx must list efivarfs as writable and keep the capability
    that clears the variables' immutable flag."""
    text = (resources.files("rampart") / f"data/systemd/{unit}").read_text()
    places = [p.lstrip("-") for p in _unit_values(text, "Service", "ReadWritePaths")]
    assert "/sys/firmware/efi/efivars" in places, places
    caps = _unit_values(text, "Service", "CapabilityBoundingSet")
    assert "CAP_LINUX_IMMUTABLE" in caps, caps

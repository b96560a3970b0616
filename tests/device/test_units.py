"""The systemd units shipped in the package pass systemd's own checker."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

UNITS = ("rampart-update.service", "rampart-update.timer", "rampart-mark-good.service")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    data = resources.files("rampart") / "data" / "systemd"
    for name in UNITS:
        text = (data / name).read_text()
        # Point ExecStart at a binary that exists here, as the check requires.
        (tmp_path / name).write_text(text.replace("/usr/bin/rampart", shutil.which("true") or ""))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [
        line
        for line in proc.stderr.splitlines()
        if "rampart" in line and "Unit configured to use BPF" not in line
    ]
    assert proc.returncode == 0 and not problems, proc.stderr


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

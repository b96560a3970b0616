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

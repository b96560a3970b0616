"""The systemd unit for `rampart serve` passes systemd's checker and its security
review, and ends the whole process group with the service."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

UNIT = "rampart-server.service"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 (best) to 10; "OK" below 4.0


def _unit(tmp_path: Path) -> Path:
    text = (resources.files("rampart") / "data" / "systemd" / UNIT).read_text()
    path = tmp_path / UNIT
    # Point ExecStart at a binary that exists here, as the check requires.
    path.write_text(text.replace("/usr/bin/rampart", shutil.which("true") or ""))
    return path


def test_server_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(_unit(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in proc.stderr.splitlines() if "rampart" in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_server_unit_is_sandboxed(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(_unit(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert match is not None, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_sigkill_of_the_supervisor_ends_the_whole_group_under_systemd() -> None:
    """uvicorn's workers outlived a SIGKILL of their supervisor: the unit ends every
    process of its control group when its main process dies, and restarts."""
    text = (resources.files("rampart") / "data" / "systemd" / UNIT).read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["KillMode"] == "control-group"
    assert settings["Restart"] == "on-failure"
    assert settings["ExecStart"].startswith("/usr/bin/rampart serve ")

"""Exposure goals (rampart.contracts.exposure, `rampart hardening exposure`): the data
file, systemd-analyze's output, and each Rampart unit as shipped, scored offline by
the real systemd-analyze, within its goal. The Core's running services are scored in
the guest (tests/testbed/test_scenarios.py, scenario 1)."""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest

from rampart.contracts import exposure
from rampart.errors import FormatError
from rampart.testbed import rootfs
from tests.conftest import assert_offline_exposure_within_goal, run_cli

TABLE = """\
UNIT                                 EXPOSURE PREDICATE HAPPY
emergency.service                         2.4 OK        :-)
systemd-journald.service                  4.3 OK        :-)
getty@tty1.service                        9.6 UNSAFE    :-{
"""
DETAIL = """\
✗ UMask=                 Files created by service are world-readable by default     0.1

→ Overall exposure level for rampart-update.service: 4.8 OK 🙂
"""
GOALS = """\
format = 1
[[unit]]
name = "rampart-update.service"
goal = 3.6
why = "root, device-mapper"
[[unit]]
name = "emergency.service"
goal = 2.6
why = "no shell, a reboot"
[[unit]]
name = "systemd-journald.service"
goal = 4.0
why = "systemd's"
[[unit]]
name = "rampart-server.service"
goal = 2.0
why = "not in a Core"
"""


def test_the_shipped_goals_load_each_with_its_reason() -> None:
    goals = exposure.load()
    names = [goal.unit for goal in goals]
    assert len(names) == len(set(names))
    assert all(goal.why and 0 <= goal.goal <= 10 for goal in goals)
    # Every Rampart unit, of the device and the server, has a goal.
    for directory in ("systemd", "testbed"):
        for unit in (resources.files("rampart") / "data" / directory).iterdir():
            if unit.name.endswith(".service"):
                assert unit.name in names, unit.name
    # Rampart's own aim at 2.0; those above say why in their reason (checked by eye).
    above = sorted(g.unit for g in goals if g.unit.startswith("rampart-") and g.goal > 2.0)
    assert above == [
        "rampart-gateway.service",
        "rampart-machine-id-commit.service",
        "rampart-state-layout.service",
        "rampart-update.service",
    ]


def test_scores_come_from_the_table_and_the_overall_lines() -> None:
    assert exposure.parse_scores(TABLE + DETAIL) == {
        "emergency.service": 2.4,
        "systemd-journald.service": 4.3,
        "getty@tty1.service": 9.6,
        "rampart-update.service": 4.8,
    }
    with pytest.raises(FormatError, match="no exposure level"):
        exposure.parse_scores("Unit foo.service not found.\n")


def test_each_unit_is_met_over_without_a_goal_or_absent() -> None:
    scores = exposure.evaluate(exposure.load(GOALS), exposure.parse_scores(TABLE + DETAIL))
    assert [(s.unit, s.status) for s in scores] == [
        ("rampart-update.service", "over"),
        ("emergency.service", "met"),
        ("systemd-journald.service", "over"),
        ("rampart-server.service", "absent"),
        ("getty@tty1.service", "no goal"),
    ]
    doc = exposure.report(scores)
    assert doc["counts"] == {"met": 1, "over": 2, "no goal": 1, "absent": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("format = 2\n", "format = 2"),
        ('format = 1\n[[unit]]\nname = "x.socket"\ngoal = 1\nwhy = "y"\n', "not a service"),
        ('format = 1\n[[unit]]\nname = "x.service"\ngoal = 11\nwhy = "y"\n', "not an exposure"),
        ('format = 1\n[[unit]]\nname = "x.service"\ngoal = true\nwhy = "y"\n', "not an exposure"),
        ('format = 1\n[[unit]]\nname = "x.service"\ngoal = 1\n', "no why"),
        ('format = 1\n[[unit]]\nname = "x.service"\ngoal = 1\nwhy = "y"\nmax = 2\n', "'max'"),
        ("format = 1\nunits = 1\n", "unknown key 'units'"),
        (
            'format = 1\n[[unit]]\nname = "x.service"\ngoal = 1\nwhy = "y"\n'
            '[[unit]]\nname = "x.service"\ngoal = 2\nwhy = "z"\n',
            "listed twice",
        ),
    ],
)
def test_a_malformed_goals_file_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=re.escape(message)):
        exposure.load(text, "goals.toml")


def test_the_command_exits_5_above_a_goal_or_without_one(tmp_path: Path) -> None:
    saved = tmp_path / "scores.txt"
    saved.write_text(TABLE)
    done = run_cli("hardening", "exposure", "--scores", saved)
    assert done.code == 5, done
    assert "no goal  getty@tty1.service" in done.err
    assert "met      emergency.service" in done.out
    saved.write_text(TABLE.replace("getty@tty1.service", "rescue.service").replace("9.6", "2.5"))
    done = run_cli("hardening", "exposure", "--scores", saved, "--json")
    assert done.code == 0, done
    doc = json.loads(done.out)
    assert doc["counts"]["over"] == 0 and doc["counts"]["no goal"] == 0
    saved.write_text("nothing\n")
    done = run_cli("hardening", "exposure", "--scores", saved)
    assert done.code == 10 and "no exposure level" in done.err


def _unit_text(directory: str, name: str) -> str:
    text = (resources.files("rampart") / "data" / directory / name).read_text()
    return rootfs.testbed_unit(name) if directory == "testbed" else text


@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("systemd", "rampart-update.service"),
        ("systemd", "rampart-mark-good.service"),
        ("systemd", "rampart-bootloader.service"),
        ("systemd", "rampart-server.service"),
        ("systemd", "rampart-tuf-timestamp.service"),
        ("systemd", "rampart-ssh-hostkey.service"),
        ("testbed", "rampart-health.service"),
        ("testbed", "rampart-state-layout.service"),
        ("testbed", "rampart-machine-id-commit.service"),
    ],
)
def test_each_rampart_unit_as_shipped_scores_within_its_goal(
    tmp_path: Path, directory: str, name: str
) -> None:
    """systemd-analyze's offline score of the unit file (the running one, in the
    guest, differs by a tenth or two: it sees the real machine)."""
    path = tmp_path / name
    binary = shutil.which("true") or "/bin/true"  # --offline checks ExecStart= exists
    text = re.sub(
        r"^(ExecStart=[-+!]*)\S+", rf"\g<1>{binary}", _unit_text(directory, name), flags=re.M
    )
    path.write_text(text)
    assert_offline_exposure_within_goal(name, path)


@pytest.mark.parametrize("name", rootfs.NO_SHELL_UNITS)
def test_the_core_s_emergency_and_rescue_units_score_within_their_goals(
    tmp_path: Path, name: str
) -> None:
    """systemd's own unit (this machine's systemd is the Core's, 252) with the Core's
    drop-in, offline."""
    units = tmp_path / "lib/systemd/system"
    (units / f"{name}.d").mkdir(parents=True)
    shutil.copy(f"/lib/systemd/system/{name}", units)
    dropin = units / f"{name}.d" / rootfs.NO_SHELL_DROPIN
    dropin.write_text(_unit_text("hardening", "no-shell.conf"))
    assert_offline_exposure_within_goal(name, tmp_path)

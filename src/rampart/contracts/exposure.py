"""How confined a Core's services are: `systemd-analyze security` scores each service
unit's exposure from 0.0 (confined) to 10.0 (unconfined); the data file
rampart/data/hardening/exposure.toml sets a goal for each service a Rampart Core runs,
with the reason for it (docs/formats.md "Exposure goals"). `rampart hardening
exposure` compares the two.

Each unit is one of:

- `met`: scored at or below its goal;
- `over`: scored above its goal;
- `no goal`: running on the machine but not in the data file (a service nobody
  reviewed: a failure too);
- `absent`: in the data file, not loaded on the machine (not a failure: a Core
  without the gateway has no strongSwan).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rampart.contracts.hardening import FORMAT, data_document
from rampart.errors import FormatError

MET, OVER, NO_GOAL, ABSENT = "met", "over", "no goal", "absent"
FAILING = (OVER, NO_GOAL)
_UNIT = re.compile(r"[A-Za-z0-9_.@:-]{1,200}\.service")
# A line of `systemd-analyze security`'s table: UNIT EXPOSURE PREDICATE HAPPY.
_ROW = re.compile(r"(?P<unit>\S+\.service)\s+(?P<exposure>\d+\.\d+)\s+(?P<predicate>[A-Z]+)\b")
_OVERALL = re.compile(r"Overall exposure level for (?P<unit>\S+\.service): (?P<exposure>\d+\.\d+)")


@dataclass(frozen=True)
class Goal:
    unit: str
    goal: float
    why: str


@dataclass(frozen=True)
class Score:
    unit: str
    exposure: float | None  # None: absent
    goal: float | None  # None: no goal
    status: str
    why: str

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "exposure": self.exposure,
            "goal": self.goal,
            "status": self.status,
            "why": self.why,
        }


def load(text: str | None = None, source: str = "exposure.toml") -> list[Goal]:
    """The goals of `text` (the shipped data file without it). FormatError, naming
    the entry, for a malformed one."""
    doc = data_document("exposure.toml", text, source, {"format", "unit"})
    entries = doc.get("unit", [])
    if not isinstance(entries, list):
        raise FormatError(f"{source}: unit must be an array of tables ([[unit]])")
    goals: list[Goal] = []
    for i, entry in enumerate(entries):
        goal = _goal(entry, f"{source}: unit #{i + 1}")
        if any(g.unit == goal.unit for g in goals):
            raise FormatError(f"{source}: unit #{i + 1} ({goal.unit}): listed twice")
        goals.append(goal)
    return goals


def _goal(entry: Any, where: str) -> Goal:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: not a table")
    extra = set(entry) - {"name", "goal", "why"}
    if extra:
        raise FormatError(f"{where}: unknown key {sorted(extra)[0]!r}")
    name, goal, why = entry.get("name"), entry.get("goal"), entry.get("why")
    if not isinstance(name, str) or not _UNIT.fullmatch(name):
        raise FormatError(f"{where}: name {name!r} is not a service unit")
    where = f"{where} ({name})"
    if isinstance(goal, bool) or not isinstance(goal, int | float) or not 0 <= goal <= 10:
        raise FormatError(f"{where}: goal {goal!r} is not an exposure (0.0 to 10.0)")
    if not isinstance(why, str) or not why.strip():
        raise FormatError(f"{where}: no why (the reason for the goal)")
    return Goal(name, float(goal), " ".join(why.split()))


def parse_scores(text: str) -> dict[str, float]:
    """unit -> exposure from `systemd-analyze security`'s output: the table it prints
    without a unit (UNIT EXPOSURE PREDICATE HAPPY) and the "Overall exposure level"
    line it prints for each unit given. FormatError when there is neither."""
    scores: dict[str, float] = {}
    for line in text.splitlines():
        match = _ROW.match(line.strip()) or _OVERALL.search(line)
        if match is not None:
            scores[match["unit"]] = float(match["exposure"])
    if not scores:
        raise FormatError("systemd-analyze security: no exposure level in its output")
    return scores


def evaluate(goals: Sequence[Goal], scores: Mapping[str, float]) -> list[Score]:
    """One Score per unit scored or with a goal: the data file's order, then the units
    without a goal by name."""
    out: list[Score] = []
    for goal in goals:
        exposure = scores.get(goal.unit)
        status = ABSENT if exposure is None else MET if exposure <= goal.goal else OVER
        out.append(Score(goal.unit, exposure, goal.goal, status, goal.why))
    known = {goal.unit for goal in goals}
    for unit in sorted(set(scores) - known):
        out.append(Score(unit, scores[unit], None, NO_GOAL, ""))
    return out


def report(scores: Sequence[Score]) -> dict[str, Any]:
    """The JSON document of `rampart hardening exposure --json`."""
    return {
        "format": FORMAT,
        "counts": {s: sum(x.status == s for x in scores) for s in (MET, OVER, NO_GOAL, ABSENT)},
        "units": [score.to_json() for score in scores],
    }

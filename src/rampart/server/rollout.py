"""Channel resolution and staged rollouts: pure functions, no I/O.

A channel points at a version. A newer version can be rolled out to p % of the
channel's machines: a machine is in the rollout when its stable bucket for
(machine-id, rollout version) is below p. The bucket depends only on those two
values, so raising p keeps every machine that was already offered the update
(monotonic), and the split is the same on every server and every run
(deterministic). A paused or halted rollout is offered to nobody: machines
that installed it keep it (the client never downgrades), the others stay on
the channel's version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

BUCKETS = 10_000  # 0.01 % resolution


class RolloutState(StrEnum):
    NONE = "none"
    ACTIVE = "active"
    PAUSED = "paused"  # by an administrator
    HALTED = "halted"  # by itself: too many failures reported


@dataclass(frozen=True)
class ChannelState:
    os: str
    name: str
    version: str | None
    rollout_version: str | None = None
    rollout_percent: float = 0.0
    rollout_state: RolloutState = RolloutState.NONE
    default: bool = False


def bucket(machine_id: str, version: str) -> int:
    """A stable number in [0, BUCKETS) for this machine and version."""
    digest = hashlib.sha256(f"{machine_id}\x00{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_rollout(machine_id: str, version: str, percent: float) -> bool:
    return bucket(machine_id, version) < round(percent * BUCKETS / 100)


def offer(channel: ChannelState, machine_id: str | None) -> str | None:
    """The version to announce to `machine_id` (None: an anonymous request)."""
    if (
        machine_id is not None
        and channel.rollout_version is not None
        and channel.rollout_state == RolloutState.ACTIVE
        and in_rollout(machine_id, channel.rollout_version, channel.rollout_percent)
    ):
        return channel.rollout_version
    return channel.version


def should_halt(reports: int, failures: int, threshold: float, min_reports: int) -> bool:
    """True when the failure rate among machines that reported crosses `threshold`."""
    return reports >= min_reports and failures / reports > threshold

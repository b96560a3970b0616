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

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

# The bucket rule and the rollout states are the channel contract a device shares.
from rampart.contracts.tuf import BUCKETS, RolloutState, bucket, in_rollout

__all__ = ["BUCKETS", "ChannelState", "RolloutState", "bucket", "in_rollout", "offer"]


@dataclass(frozen=True)
class ChannelState:
    os: str
    name: str
    version: str | None
    rollout_version: str | None = None
    rollout_percent: float = 0.0
    rollout_state: RolloutState = RolloutState.NONE
    default: bool = False
    require_attestation: bool = False  # offer updates to attested machines only


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


DEFAULT_MIN_FAILING = 5


def should_halt(
    reports: int,
    failures: int,
    threshold: float,
    min_reports: int,
    min_failing: int = DEFAULT_MIN_FAILING,
) -> bool:
    """True when at least `min_reports` machines reported, at least `min_failing` of them
    failed, and their failure rate crosses `threshold` (counts of distinct machines,
    each by its latest counted report)."""
    return reports >= min_reports and failures >= min_failing and failures / reports > threshold


DEFAULT_NEW_MACHINES_PER_HOUR = 60


def address_key(address: str | None) -> str:
    """The unit a client address is limited by: the address (IPv4), its /64 (IPv6:
    one host usually holds a whole /64)."""
    if address is None:
        return "?"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class NewMachineLimit:
    """How many machine-ids never seen before each client address may introduce: a
    token bucket of `per_hour` tokens per address (IPv6: per /64), refilled evenly over
    the hour; 0 disables the limit. Time is an argument; one instance per worker."""

    def __init__(self, per_hour: int, max_addresses: int = 100_000) -> None:
        self.per_hour = per_hour
        self.max_addresses = max_addresses
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def admit(self, address: str | None, now: float) -> bool:
        if self.per_hour <= 0:
            return True
        key = address_key(address)
        tokens, at = self.buckets.pop(key, (float(self.per_hour), now))
        tokens = min(float(self.per_hour), tokens + max(0.0, now - at) * self.per_hour / 3600)
        admitted = tokens >= 1
        self.buckets[key] = (tokens - 1 if admitted else tokens, now)
        if len(self.buckets) > self.max_addresses:
            self.buckets.popitem(last=False)
        return admitted

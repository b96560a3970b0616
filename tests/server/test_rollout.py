"""Channel resolution and staged rollouts (pure)."""

from __future__ import annotations

import secrets

from rampart.server.rollout import (
    ChannelState,
    NewMachineLimit,
    RolloutState,
    bucket,
    in_rollout,
    offer,
    should_halt,
)

MACHINES = [f"{n:032x}" for n in range(10_000)]
RANDOM_MACHINES = [secrets.token_hex(16) for _ in range(10_000)]


def share(machines: list[str], version: str, percent: float) -> float:
    return sum(in_rollout(m, version, percent) for m in machines) / len(machines) * 100


def test_a_25_percent_rollout_reaches_25_percent_of_10000_machines() -> None:
    for machines in (MACHINES, RANDOM_MACHINES):
        assert 23 <= share(machines, "1.0.1", 25) <= 27


def test_rollout_is_deterministic() -> None:
    first = [in_rollout(m, "1.0.1", 25) for m in MACHINES]
    assert first == [in_rollout(m, "1.0.1", 25) for m in MACHINES]
    assert bucket(MACHINES[7], "1.0.1") == bucket(MACHINES[7], "1.0.1")


def test_raising_the_percentage_never_takes_the_update_away() -> None:
    previous: set[str] = set()
    for percent in (0, 1, 5, 10, 25, 50, 75, 99, 100):
        offered = {m for m in MACHINES if in_rollout(m, "2.0.0", percent)}
        assert previous <= offered
        previous = offered
    assert len(previous) == len(MACHINES)
    assert not any(in_rollout(m, "2.0.0", 0) for m in MACHINES)


def test_each_version_draws_a_different_sample() -> None:
    a = {m for m in MACHINES if in_rollout(m, "1.0.1", 10)}
    b = {m for m in MACHINES if in_rollout(m, "1.0.2", 10)}
    assert a != b


def test_offer_follows_the_rollout_state() -> None:
    chosen = next(m for m in MACHINES if in_rollout(m, "1.0.1", 50))
    other = next(m for m in MACHINES if not in_rollout(m, "1.0.1", 50))
    active = ChannelState("clipos", "stable", "1.0.0", "1.0.1", 50, RolloutState.ACTIVE)
    assert offer(active, chosen) == "1.0.1"
    assert offer(active, other) == "1.0.0"
    assert offer(active, None) == "1.0.0"  # anonymous requests get the channel's version
    for state in (RolloutState.PAUSED, RolloutState.HALTED):
        stopped = ChannelState("clipos", "stable", "1.0.0", "1.0.1", 50, state)
        assert offer(stopped, chosen) == "1.0.0"


def test_halt_needs_enough_reports_and_a_failure_rate_over_the_threshold() -> None:
    assert not should_halt(4, 4, 0.2, 5, 1)
    assert not should_halt(10, 2, 0.2, 5, 1)
    assert should_halt(10, 3, 0.2, 5, 1)


def test_halt_needs_a_minimum_of_distinct_failing_machines() -> None:
    assert not should_halt(5, 4, 0.2, 5)  # 80 % failed, but only 4 machines (default 5)
    assert should_halt(5, 5, 0.2, 5)
    assert should_halt(20, 5, 0.2, 5)
    assert not should_halt(25, 5, 0.2, 5)  # 5 of 25 is not over 20 %


def test_new_machine_ids_are_limited_per_address_and_ipv6_per_64() -> None:
    limit = NewMachineLimit(per_hour=3)
    assert [limit.admit("192.0.2.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.admit("192.0.2.2", 0.0)  # another address has its own budget
    assert limit.admit("::ffff:192.0.2.2", 0.0)  # the same IPv4 host, mapped
    assert limit.admit("192.0.2.2", 0.0)
    assert not limit.admit("::ffff:192.0.2.2", 0.0)  # its budget of 3 is spent
    assert [limit.admit(f"2001:db8::{n:x}", 0.0) for n in range(4)] == [True] * 3 + [False]
    assert limit.admit("2001:db8:0:1::1", 0.0)  # another /64
    assert not limit.admit("192.0.2.1", 1199.0)  # refilled evenly: 1 per 1200 s
    assert limit.admit("192.0.2.1", 1201.0)
    assert NewMachineLimit(per_hour=0).admit("192.0.2.1", 0.0)  # 0: no limit

"""The version check's caches: channels and machine assignments, kept in memory and
dropped within `ttl` seconds of any administrative change (the database's generation
counter), and the budget of new machine-ids per client address."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from starlette.concurrency import run_in_threadpool

from rampart.server.devices import Devices
from rampart.server.rollout import DEFAULT_NEW_MACHINES_PER_HOUR, ChannelState, NewMachineLimit
from rampart.server.store import Store


class TooManyNewMachines(Exception):
    """A client address introduced more new machine-ids than its budget: answer 429."""


class Fleet:
    """Channel and assignment caches, invalidated by the database's generation counter."""

    def __init__(
        self,
        store: Store,
        ttl: float = 1.0,
        max_machines: int = 200_000,
        new_machines_per_hour: int = DEFAULT_NEW_MACHINES_PER_HOUR,
        devices: Devices | None = None,
    ) -> None:
        self.store = store
        self.devices = devices  # its caches follow the same generation
        self.newcomers = NewMachineLimit(new_machines_per_hour)
        self.ttl = ttl
        self.max_machines = max_machines
        self.generation = -1
        self.checked_at = 0.0
        self.channels: dict[tuple[str, str], ChannelState] = {}
        self.defaults: dict[str, ChannelState] = {}
        self.assignments: OrderedDict[str, str | None] = OrderedDict()
        self.lock = asyncio.Lock()

    async def refresh(self) -> None:
        now = time.monotonic()
        if now - self.checked_at < self.ttl:
            return
        if self.lock.locked() and self.generation >= 0:
            return  # another request is refreshing: answer from the current cache meanwhile
        async with self.lock:
            if time.monotonic() - self.checked_at < self.ttl:
                return
            generation = await run_in_threadpool(self.store.generation)
            if generation != self.generation:
                channels = await run_in_threadpool(self.store.channels)
                self.channels = {(c.os, c.name): c for c in channels}
                self.defaults = {c.os: c for c in channels if c.default}
                self.assignments.clear()
                self.generation = generation
            if self.devices is not None:
                await self.devices.sync(generation)
            self.checked_at = time.monotonic()

    async def channel_for(
        self, os_name: str, machine_id: str | None, address: str | None = None
    ) -> ChannelState | None:
        """The machine's channel; TooManyNewMachines for a machine-id never seen before
        from an address over its budget (minted machine-ids must not flood rollouts)."""
        await self.refresh()
        if machine_id is not None:
            if machine_id in self.assignments:
                name = self.assignments[machine_id]
                self.assignments.move_to_end(machine_id)
            else:
                known, name = await run_in_threadpool(self.store.assignment, machine_id)
                if not known and not self.newcomers.admit(address, time.monotonic()):
                    raise TooManyNewMachines
                self.assignments[machine_id] = name
                if len(self.assignments) > self.max_machines:
                    self.assignments.popitem(last=False)
            if name is not None and (os_name, name) in self.channels:
                return self.channels[(os_name, name)]
        return self.defaults.get(os_name)

    def known_os(self, os_name: str) -> bool:
        return os_name in self.defaults

"""The per-app objects that the routes reach: the settings, and one ServerState kept on
`app.state.server`, handed to a route by the `Server` dependency.

One process may hold several apps (the tests do), so nothing here is a module global:
each app builds its own ServerState, whose lifespan runs the background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request

from rampart.server import guard
from rampart.server.audit import Actor
from rampart.server.devices import Devices
from rampart.server.fleet import Fleet
from rampart.server.recorder import Recorder, prune_checks
from rampart.server.rollout import DEFAULT_NEW_MACHINES_PER_HOUR
from rampart.server.signer import RepositorySigner, TufSettings
from rampart.server.store import DEFAULT_CHECK_RETENTION_DAYS, Check, Report, Store

# How long the event loop's thread may hold the interpreter before the database threads
# get it (Python's default: 5 ms). Each statement of a recording transaction waits for
# it once: with 5 ms, a transaction of five round trips held its rows' locks for up to
# 25 ms more, and two workers on PostgreSQL queued behind each other (signed check-ins,
# 1,250/s: p99 331 ms; with 1 ms, 1,500/s: p99 34 ms, bench/auth_paced.py).
SWITCH_INTERVAL = 0.001

log = logging.getLogger(__name__)


@dataclass
class Settings:
    webroot: Path
    flush_interval: float = 0.05  # while the database cannot be written: probe interval
    cache_ttl: float = 1.0
    new_machines_per_hour: int = DEFAULT_NEW_MACHINES_PER_HOUR  # per address; 0: no limit
    check_retention_days: float = DEFAULT_CHECK_RETENTION_DAYS
    prune_every: float = 3600.0
    tuf: TufSettings | None = None  # the online keys (--tuf-key); None: no signing


@dataclass
class ServerState:
    """What one app's routes share: the store, the caches, the two recorders and the
    TUF signer (with --tuf-key)."""

    store: Store
    settings: Settings
    fleet: Fleet
    checks: Recorder[Check]
    reports: Recorder[Report]
    devices: Devices
    signer: RepositorySigner | None = None

    @classmethod
    def build(cls, store: Store, settings: Settings) -> ServerState:
        devices = Devices(store)
        fleet = Fleet(
            store,
            settings.cache_ttl,
            new_machines_per_hour=settings.new_machines_per_hour,
            devices=devices,
        )
        checks = Recorder(store, settings.flush_interval, store.record_checks)
        # Reports too are committed in batches: one commit (and, with PostgreSQL, one turn
        # of the rollout's tally lock) for all the reports that arrived meanwhile.
        reports: Recorder[Report] = Recorder(
            store, settings.flush_interval, lambda batch: _write_reports(store, batch)
        )
        signer = None
        if settings.tuf is not None:
            signer = RepositorySigner(settings.webroot, store, settings.tuf)
        return cls(store, settings, fleet, checks, reports, devices, signer)

    @property
    def webroot(self) -> Path:
        return self.settings.webroot

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: the recorders, the pruner and the signer run while it
        serves."""
        settings = self.settings
        checks_task = asyncio.create_task(self.checks.run())
        reports_task = asyncio.create_task(self.reports.run())
        pruner = asyncio.create_task(
            prune_checks(self.store, settings.check_retention_days, settings.prune_every)
        )
        signer_task = asyncio.create_task(self.signer.run()) if self.signer else None
        # What start-up made (modules, the app, the caches) stays: out of the garbage
        # collector's sight, a full collection no longer walks it. Unfrozen, each took
        # 70-98 ms every 4 s under 750 checks/s, and made the p99 (bench/auth_paced.py).
        gc.collect()
        gc.freeze()
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            yield
        finally:
            pruner.cancel()
            if self.signer is not None and signer_task is not None:
                self.signer.stop()  # a round in progress completes: no half-signed repository
                await signer_task
            # No cancel: a batch being written must commit before the process exits.
            self.checks.close()
            self.reports.close()
            await checks_task
            await reports_task
            with contextlib.suppress(asyncio.CancelledError):
                await pruner
            # an app in a longer process (tests) leaves the interpreter as it found it
            gc.unfreeze()
            sys.setswitchinterval(switch_interval)


def _write_reports(store: Store, batch: list[Report]) -> set[int]:
    refused: set[int] = set()
    for name in store.record_reports(batch, refused):
        log.warning("rollout on channel %s halted: failure rate over threshold", name)
    return refused


def state_of(request: Request) -> ServerState:
    """The app's ServerState."""
    server: ServerState = request.app.state.server
    return server


async def server_state(request: Request) -> ServerState:
    """The dependency: the app's ServerState (async, so no thread-pool hop). The
    version check calls state_of itself: solving a dependency costs it about a third
    more time in the framework."""
    return state_of(request)


Server = Annotated[ServerState, Depends(server_state)]


async def require_admin(request: Request) -> None:
    # The guard (rampart.server.guard) authenticates every administrative request
    # before its body is read; this only refuses a route it did not guard.
    if not guard.admitted(request.scope):
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})


async def actor_of(request: Request) -> Actor:
    """The dependency: who makes this administrative request, for the audit trail (the
    token the guard admitted, and the client's address)."""
    found = guard.holder(request.scope)
    if found is None:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    address = request.client.host if request.client else None
    return Actor(found.via, found.name, found.role, address)


By = Annotated[Actor, Depends(actor_of)]

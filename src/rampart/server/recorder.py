"""Recording checks and reports before they are answered, and pruning old checks.

Concurrent rows are written together, in one transaction per batch, by a background
task; a row is answered 200 only once it is committed. If the database cannot be
written, rows get 503 (Unavailable) and the recorder recovers by itself when a probe
write succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from rampart.server.store import Check, Report, Store

log = logging.getLogger(__name__)
Row = TypeVar("Row", Check, Report)

MAX_BUFFER = 200_000
BATCH = 2_000  # rows per transaction


class Unavailable(Exception):
    """The database cannot be reached: answer 503."""


class Replayed(Exception):
    """A signed row whose counter another request took first: answer 401."""


class Recorder(Generic[Row]):
    """Writes each check (or report) before it is answered. Rows that arrive while a batch
    is being written wait for the next one, so a busy server writes many per transaction
    (BATCH at most) and an idle one writes each at once. A row answered 200 is
    committed: a SIGKILL loses none."""

    def __init__(
        self, store: Store, interval: float, write: Callable[[list[Row]], set[int]]
    ) -> None:
        self.store = store
        # One transaction for them all; the positions of the rows refused as replays.
        self.write: Callable[[list[Row]], set[int]] = write
        self.interval = interval  # while the database cannot be written: probe this often
        self.pending: list[tuple[Row, asyncio.Future[None]]] = []
        self.down = False
        self.recorded = 0
        self.stopping = False
        self.wake = asyncio.Event()
        self.writing = asyncio.Lock()  # one writer at a time

    async def record(self, row: Row) -> None:
        """Return once `row` is committed; Unavailable if it cannot be."""
        if self.down or self.stopping or len(self.pending) >= MAX_BUFFER:
            raise Unavailable
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((row, future))
        self.wake.set()
        await future

    async def flush(self) -> None:
        """Write what is pending, BATCH rows per transaction, until nothing is (a failed
        write fails every pending check: they are answered 503, not kept)."""
        async with self.writing:
            while self.pending:
                batch = self.pending[:BATCH]
                del self.pending[:BATCH]
                await self._write(batch)

    async def _write(self, batch: list[tuple[Row, asyncio.Future[None]]]) -> None:
        try:
            refused = await run_in_threadpool(self.write, [c for c, _ in batch])
        except (IntegrityError, DataError) as exc:  # rows that can never be written
            log.error("the database refused %d rows: %s", len(batch), str(exc).splitlines()[0])
            if len(batch) > 1:  # write the others; only the refused rows get 503
                for one in batch:
                    await self._write([one])
            else:
                _settle(batch, Unavailable())
            return
        except SQLAlchemyError as exc:  # unreachable, read-only, restarting: 503
            if not self.down:
                log.error("database unavailable, answering 503: %s", str(exc).splitlines()[0])
            self.down = True
            pending, self.pending = self.pending, []
            _settle(batch + pending, Unavailable())
            return
        self.recorded += len(batch) - len(refused)
        _settle([row for i, row in enumerate(batch) if i in refused], Replayed())
        _settle(batch, None)

    async def _probe(self) -> None:
        try:
            await run_in_threadpool(self.store.probe_write)
        except SQLAlchemyError:
            return
        log.warning("database back; recording again")
        self.down = False

    async def run(self) -> None:
        """Write checks as they come until close(); while the database cannot be
        written, probe it every `interval` instead."""
        while not self.stopping:
            if self.down:
                await self._probe()
                if self.down:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), self.interval)
                    self.wake.clear()
                continue
            await self.wake.wait()
            self.wake.clear()
            await self.flush()
        await self.flush()

    def close(self) -> None:
        self.stopping = True
        self.wake.set()


def _settle(batch: list[tuple[Any, asyncio.Future[None]]], error: Exception | None) -> None:
    for _, future in batch:
        if not future.done():  # a request that was cancelled meanwhile
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


async def prune_checks(store: Store, retention_days: float, every: float) -> None:
    """Delete checks older than the retention, every `every` seconds (cancelled at stop)."""
    while True:
        try:
            deleted = await run_in_threadpool(
                store.prune_checks, time.time() - retention_days * 86400
            )
            if deleted:
                log.info("pruned %d checks older than %g days", deleted, retention_days)
        except SQLAlchemyError as exc:
            log.error("cannot prune old checks: %s", str(exc).splitlines()[0])
        await asyncio.sleep(every)

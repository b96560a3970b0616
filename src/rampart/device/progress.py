"""Progress for long work: a bar on a terminal, nothing (log lines instead) otherwise."""

from __future__ import annotations

import time
from typing import TextIO


class Bar:
    """A one-line progress bar, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO, label: str = "") -> None:
        self.stream = stream
        self.label = label
        self.last = 0.0

    def update(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if now - self.last < 0.1 and not finished:
            return
        self.last = now
        mib = done / (1 << 20)
        if total:
            share = min(1.0, done / total)
            filled = int(share * 30)
            text = f"{self.label}[{'#' * filled}{'.' * (30 - filled)}] {share:4.0%} {mib:8.1f} MiB"
        else:
            text = f"{self.label}{mib:8.1f} MiB"
        self.stream.write("\r" + text + ("\n" if finished else ""))
        self.stream.flush()

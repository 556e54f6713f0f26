"""A live one-line progress bar on stderr, redrawn a few times a second while a run lasts.

    rate 4/s  [########------------]  41/100  10.2s  4.0 req/s  312 tok/s  in flight 3  err 0

Off when stderr is not a terminal (unless forced), so logs and CI output stay clean.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from clients.bench.metrics import RequestResult

WIDTH = 20


class Progress:
    """Counts finished requests; `run()` redraws until cancelled, `close()` ends the line."""

    def __init__(self, label: str, total: int | None, duration: float | None,
                 enabled: bool | None = None, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.enabled = self.out.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.duration = duration
        self.started = time.perf_counter()
        self.sent = self.done = self.errors = self.tokens = 0

    def on_send(self) -> None:
        self.sent += 1

    def on_done(self, result: RequestResult) -> None:
        self.done += 1
        self.errors += not result.success
        self.tokens += result.output_tokens

    def fraction(self, elapsed: float) -> float:
        """Progress towards whichever limit comes first: requests or duration."""
        parts = []
        if self.total:
            parts.append(self.done / self.total)
        if self.duration:
            parts.append(elapsed / self.duration)
        return min(max(parts, default=0.0), 1.0)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        filled = round(self.fraction(elapsed) * WIDTH)
        total = f"/{self.total}" if self.total else ""
        return (f"{self.label}  [{'#' * filled}{'-' * (WIDTH - filled)}]  {self.done}{total}  "
                f"{elapsed:.1f}s  {self.done / elapsed:.1f} req/s  {self.tokens / elapsed:.0f} "
                f"tok/s  in flight {self.sent - self.done}  err {self.errors}")

    def draw(self) -> None:
        if self.enabled:
            self.out.write("\r\033[K" + self.line())
            self.out.flush()

    async def run(self, period: float = 0.25) -> None:
        while True:
            self.draw()
            await asyncio.sleep(period)

    def close(self) -> None:
        if self.enabled:
            self.draw()
            self.out.write("\n")
            self.out.flush()

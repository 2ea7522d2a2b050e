"""Progress of a long step as log lines with a rate and an ETA, at most one every ``EVERY_S`` seconds.

Through ``logging``, not a progress bar, so the same lines reach a terminal, a log file and Prefect's UI.
"""

from __future__ import annotations

import logging
import time

EVERY_S = 10.0
"""Seconds between two progress lines (tests set it to 0)."""


class Progress:
    """``update(n)`` after each piece of work; logs ``label: done/total unit, rate, ETA`` when due."""

    def __init__(self, label: str, total: int, unit: str, log: logging.Logger, every_s: float | None = None):
        self.label, self.total, self.unit, self.log = label, total, unit, log
        self.every_s = EVERY_S if every_s is None else every_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.label}: {self.done}/{self.total} {self.unit}, {_rate(rate)} {_short(self.unit)}/s, "
                f"ETA {_duration(eta)}")


def _short(unit: str) -> str:
    return {"sequences": "seq", "requests": "req"}.get(unit, unit)


def _rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

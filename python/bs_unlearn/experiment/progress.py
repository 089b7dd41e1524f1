"""Progress lines and stage timings of a pipeline run."""

from __future__ import annotations

import time
from collections.abc import Callable

# Every stage reports through a ``say(line)`` callable: one line per stage or probe record.
Say = Callable[[str], None]


def quiet(message: str) -> None:
    """A ``say`` that prints nothing."""
    del message


class Laps:
    """Seconds per stage, each lap from the end of the previous one (``laps("finetune")``), and the total since
    ``started`` (a ``time.perf_counter()`` value; default: now)."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started
        self._last = self.started
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now
        return self.seconds[name]

    def with_total(self) -> dict[str, float]:
        """The laps so far and ``total``: seconds since ``started``."""
        return {**self.seconds, "total": round(time.perf_counter() - self.started, 1)}

"""The one way this package retries: through an outage, until a deadline, backing off.

Only what is safe to repeat is retried: a ``TransientError`` by default (the ledger's
statements and the SQS calls are idempotent by key), or the errors a caller names for its
own idempotent call (an event-log read moves its cursor only when it succeeds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from dagster_taskiq.core.errors import TransientError
from dagster_taskiq.core.observability import module_logger

T = TypeVar("T")

log = module_logger(__name__)


class Backoff:
    """Exponential waits from ``first`` to ``cap`` seconds; ``reset`` after a success."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.next = first

    def wait(self, stop: threading.Event | None = None) -> float:
        """Sleep the next wait (cut short when ``stop`` is set); returns what was waited."""
        delay = self.next
        if stop is None:
            time.sleep(delay)
        else:
            stop.wait(delay)
        self.next = min(self.next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.next = self.first


def retry_while_unreachable(
    action: Callable[[], T],
    deadline: float,
    *,
    errors: tuple[type[Exception], ...] = (TransientError,),
    what: str = "SQS or the ledger",
) -> T:
    """Retry ``action`` through an outage (``errors``), until ``deadline`` (monotonic); the
    last error is raised when the next wait would pass it."""
    backoff = Backoff(0.5, 5.0)
    while True:
        try:
            return action()
        except errors as e:
            if time.monotonic() + backoff.next > deadline:
                raise
            log.warning("%s unreachable; retrying in %.1f s: %s", what, backoff.next, e)
            backoff.wait()

"""The attempt an op is running under, for ops with side effects outside Dagster.

Execution is at-least-once: a step whose worker died runs again. An op that writes
somewhere else can use the fencing token to make its write idempotent, e.g. keep the
highest token seen per idempotency key and ignore writes from lower ones.

Dagster-free, and None outside a taskiq worker (in tests, ``execute_in_process``...).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepAttempt:
    idempotency_key: str
    run_id: str
    step_key: str
    attempt: int
    fencing_token: int
    worker_id: str
    delivery: int


_current: StepAttempt | None = None


def current_attempt() -> StepAttempt | None:
    """The attempt this step process is executing, or None outside a taskiq worker."""
    return _current


def set_current_attempt(attempt: StepAttempt | None) -> None:
    global _current  # noqa: PLW0603 - one step at a time per process, by design
    _current = attempt

"""The worker-count scaling policy, as a pure function.

The scaler Lambda and the local worker pool both call :func:`decide`. It reads no clock
and keeps no state: the caller passes ``now``, the current count and the recommendations
returned last time, so the same inputs always give the same decision and the policy can
be tested without AWS. Stdlib only, to keep the Lambda bundle small.

The policy scales out at once and scales in slowly: the count only drops to the highest
recommendation made inside the stabilization window, so a backlog that comes and goes
faster than the window does not start and stop Fargate tasks, which are slow to start,
on every evaluation.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass


class Reason(enum.StrEnum):
    """Why :func:`decide` chose its count; the value goes into logs and metric dimensions."""

    SCALE_OUT = "scale_out"
    SCALE_FROM_ZERO = "scale_from_zero"
    SCALE_IN = "scale_in"
    HOLD = "hold"
    STABILIZING = "stabilizing"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class ScalingConfig:
    """The operator's bounds and targets; invalid settings fail here, at start-up."""

    min_workers: int = 0
    max_workers: int = 10
    target_backlog_per_worker: int = 5
    steps_per_worker: int = 1
    scale_in_stabilization_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.min_workers < 0:
            raise ValueError(f"min_workers must be 0 or more, got {self.min_workers}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be 1 or more, got {self.max_workers}")
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) must not exceed max_workers ({self.max_workers})"
            )
        if self.target_backlog_per_worker < 1:
            raise ValueError(
                f"target_backlog_per_worker must be 1 or more, got {self.target_backlog_per_worker}"
            )
        if self.steps_per_worker < 1:
            raise ValueError(f"steps_per_worker must be 1 or more, got {self.steps_per_worker}")
        window = self.scale_in_stabilization_seconds
        if math.isnan(window) or window < 0:
            raise ValueError(f"scale_in_stabilization_seconds must be 0 or more, got {window}")


@dataclass(frozen=True)
class QueueSignals:
    """One reading of the queue and the ledger; a signal that could not be read is None.

    Counts are never negative; a negative one is a bug in the reader, so it raises.
    """

    visible: int | None
    delayed: int | None
    in_flight: int | None
    live_leases: int | None

    def __post_init__(self) -> None:
        for name, value in _named(self):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value}")


def _named(signals: QueueSignals) -> tuple[tuple[str, int | None], ...]:
    """Each signal with the name the messages use."""
    return (
        ("visible", signals.visible),
        ("delayed", signals.delayed),
        ("in flight", signals.in_flight),
        ("live leases", signals.live_leases),
    )


@dataclass(frozen=True)
class Recommendation:
    """The count one evaluation recommended, kept so later ones can honour the window."""

    at: float
    workers: int


@dataclass(frozen=True)
class Decision:
    """What to set the worker count to, why, and the history to pass to the next call."""

    desired: int
    current: int
    recommendation: int | None
    busy_workers: int | None
    reason: Reason
    detail: str
    history: tuple[Recommendation, ...]

    @property
    def changed(self) -> bool:
        """Whether the caller has to update the worker service."""
        return self.desired != self.current


def _ceil_div(numerator: int, denominator: int) -> int:
    """Integer ceiling division: exact for any count, unlike ``math.ceil(a / b)``."""
    return -(-numerator // denominator)


def _seconds(value: float) -> str:
    """Seconds for a log line: ``120``, ``0.5``."""
    return f"{value:.1f}".removesuffix(".0")


def _in_window(
    history: Sequence[Recommendation], *, now: float, window: float
) -> tuple[Recommendation, ...]:
    """The recommendations still inside the window, oldest first.

    Entries from the future (a clock that stepped back) are dropped: they would otherwise
    hold the count up for longer than the window.
    """
    kept = (r for r in history if now - window <= r.at <= now)
    return tuple(sorted(kept, key=lambda r: r.at))


def decide(
    signals: QueueSignals,
    *,
    current: int,
    config: ScalingConfig,
    history: Sequence[Recommendation],
    now: float,
) -> Decision:
    """The worker count to set now.

    The recommendation is enough workers for the backlog (visible, delayed and in-flight
    messages, ``target_backlog_per_worker`` each) and never fewer than the workers busy
    with leased steps, clamped into ``[min_workers, max_workers]``. Any message gives a
    recommendation of at least 1, so the first message wakes a service that is at zero.

    A recommendation above ``current`` is applied at once. Below it, the count only
    drops to the highest recommendation in the window (this one included), so it never
    drops below the busy workers either. A ``current`` outside the bounds is brought
    inside them: below ``min_workers`` the recommendation is above it, and above
    ``max_workers`` every recommendation in the window is capped at ``max_workers``.

    If any signal is None nothing changes, not even the clamping: a count chosen on half
    the facts could stop busy workers.
    """
    if current < 0:
        raise ValueError(f"current must be 0 or more, got {current}")
    window = config.scale_in_stabilization_seconds
    kept = _in_window(history, now=now, window=window)

    live_leases = signals.live_leases
    busy = None if live_leases is None else _ceil_div(live_leases, config.steps_per_worker)
    visible, delayed, in_flight = signals.visible, signals.delayed, signals.in_flight
    if visible is None or delayed is None or in_flight is None or busy is None:
        unreadable = [name for name, value in _named(signals) if value is None]
        return Decision(
            desired=current,
            current=current,
            recommendation=None,
            busy_workers=busy,
            reason=Reason.UNREADABLE,
            detail=f"could not read {', '.join(unreadable)}; keeping {current} workers",
            history=kept,
        )

    backlog = visible + delayed + in_flight
    raw = max(_ceil_div(backlog, config.target_backlog_per_worker), busy)
    recommendation = min(max(raw, config.min_workers), config.max_workers)
    new_history = (*kept, Recommendation(at=now, workers=recommendation))

    facts = (
        f"backlog {backlog} (visible {visible}, delayed {delayed}, in flight {in_flight}), "
        f"{busy} busy; {config.target_backlog_per_worker} per worker -> {recommendation} workers"
    )
    if raw < config.min_workers:
        facts += f" (raised to min_workers {config.min_workers})"
    elif raw > config.max_workers:
        facts += f" (capped at max_workers {config.max_workers}, {raw} wanted)"

    if recommendation > current:
        desired = recommendation
        if current == 0:
            reason, action = Reason.SCALE_FROM_ZERO, f"scaling from zero to {desired}"
        else:
            reason, action = Reason.SCALE_OUT, f"scaling out from {current} to {desired}"
    else:
        # Entries recorded under an older, higher max_workers must not hold the count up.
        target = min(max(r.workers for r in new_history), config.max_workers)
        if target < current:
            desired, reason = target, Reason.SCALE_IN
            if current > config.max_workers:
                action = (
                    f"scaling in from {current}, above max_workers {config.max_workers}, "
                    f"to {desired}"
                )
            else:
                action = (
                    f"scaling in from {current} to {desired}, "
                    f"the highest recommendation in the {_seconds(window)} s window"
                )
        elif recommendation < current:
            desired, reason = current, Reason.STABILIZING
            # The latest entry that holds the count up is the last one to leave the window.
            holder = next(r for r in reversed(new_history) if r.workers >= current)
            action = (
                f"holding {current}: {holder.workers} recommended "
                f"{_seconds(now - holder.at)} s ago is still in the {_seconds(window)} s window"
            )
        else:
            desired, reason, action = current, Reason.HOLD, f"holding {current}"

    return Decision(
        desired=desired,
        current=current,
        recommendation=recommendation,
        busy_workers=busy,
        reason=reason,
        detail=f"{facts}; {action}",
        history=new_history,
    )

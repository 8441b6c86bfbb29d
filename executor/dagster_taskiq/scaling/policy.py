"""The worker-count scaling policy, as a pure function.

The scaler Lambda, the local worker pool and the scaling simulator all call :func:`decide`.
It reads no clock and keeps no state: the caller passes ``now``, the current count and the
recommendations returned last time, so the same inputs always give the same decision and
the policy can be tested without AWS. Stdlib only, to keep the Lambda bundle small.

The policy scales out at once and scales in slowly: the count only drops to the highest
recommendation made inside the stabilization window, so a backlog that comes and goes
faster than the window does not start and stop Fargate tasks, which are slow to start,
on every evaluation. The workers running leased steps are a floor of the current decision
only: scale-in protection already keeps a busy task alive, so keeping the floor in the
window would only keep each task that was busy during a burst idle for the whole window.

The backlog includes the steps the running runs will launch next (``expected``): counted
once the steps they wait on are due to end within a worker's start time, a Fargate start
overlaps the steps still running instead of following them.
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
    """The operator's bounds and targets; invalid settings fail here, at start-up.

    ``target_wait_seconds``, when set, states the target as the longest a step should wait:
    once the queue's typical step duration is known, each worker is given the steps its
    slots finish in that time on top of the ones they run (:func:`per_worker`), in place of
    ``target_backlog_per_worker``. ``scale_out_lead_seconds`` is about a worker's start
    time: expected steps count once the steps they wait on are due to end within it.
    """

    min_workers: int = 0
    max_workers: int = 10
    target_backlog_per_worker: int = 5
    steps_per_worker: int = 1
    # About a worker's start time: an idle worker kept longer than a new one takes to start
    # costs more than starting one when work comes back (busy workers are protected anyway).
    scale_in_stabilization_seconds: float = 60.0
    target_wait_seconds: float | None = None
    scale_out_lead_seconds: float = 60.0

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
        wait = self.target_wait_seconds
        if wait is not None and (math.isnan(wait) or wait < 0):
            raise ValueError(f"target_wait_seconds must be 0 or more, got {wait}")
        lead = self.scale_out_lead_seconds
        if math.isnan(lead) or lead < 0:
            raise ValueError(f"scale_out_lead_seconds must be 0 or more, got {lead}")


@dataclass(frozen=True)
class QueueSignals:
    """One reading of the queue and the ledger; a signal that could not be read is None.

    ``expected`` is the steps the running runs will launch soon (see :func:`expected_soon`),
    0 when unknown: it only brings workers earlier. ``step_seconds`` is the typical step
    duration on these queues, None until the ledger has finished steps to say.

    Counts are never negative; a negative one is a bug in the reader, so it raises.
    """

    visible: int | None
    delayed: int | None
    in_flight: int | None
    live_leases: int | None
    expected: int = 0
    step_seconds: float | None = None

    def __post_init__(self) -> None:
        for name, value in (*_named(self), ("expected", self.expected)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value}")
        seconds = self.step_seconds
        if seconds is not None and not seconds > 0:
            raise ValueError(f"step_seconds must be more than 0, got {seconds}")


def _named(signals: QueueSignals) -> tuple[tuple[str, int | None], ...]:
    """Each signal that must be readable, with the name the messages use."""
    return (
        ("visible", signals.visible),
        ("delayed", signals.delayed),
        ("in flight", signals.in_flight),
        ("live leases", signals.live_leases),
    )


@dataclass(frozen=True)
class ExpectedSteps:
    """Steps one run will launch once the steps it is running end (from its plan), and how
    long ago the last of the steps they wait on was launched."""

    steps: int
    waiting_seconds: float


def expected_soon(
    expected: Sequence[ExpectedSteps], *, step_seconds: float | None, lead_seconds: float
) -> int:
    """The expected steps due within ``lead_seconds``: those whose run has waited at least
    the typical step duration less the lead. With no duration known yet, all of them:
    a worker started early costs less than a fan-out waiting for a cold start."""
    if step_seconds is None:
        return sum(e.steps for e in expected)
    due_after = step_seconds - lead_seconds
    return sum(e.steps for e in expected if e.waiting_seconds >= due_after)


def per_worker(config: ScalingConfig, step_seconds: float | None) -> float:
    """The backlog one worker is given: ``target_backlog_per_worker``, or, with a wait
    target and a known step duration, its slots plus what they finish within the target."""
    wait = config.target_wait_seconds
    if wait is None or step_seconds is None:
        return float(config.target_backlog_per_worker)
    return config.steps_per_worker * (1 + wait / step_seconds)


@dataclass(frozen=True)
class Recommendation:
    """The count one evaluation recommended for the backlog, kept so later ones can honour
    the window. The busy workers are not in it: they are a floor of each decision."""

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


def _workers_for(backlog: int, each: float) -> int:
    """Workers for ``backlog`` at ``each`` per worker; exact when ``each`` is whole."""
    if each.is_integer():
        return _ceil_div(backlog, int(each))
    # A hair below the quotient, so a float a hair above a whole number adds no worker.
    return math.ceil(backlog / each - 1e-9)


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


def _facts(
    signals: QueueSignals,
    config: ScalingConfig,
    *,
    backlog: int,
    busy: int,
    each: float,
    raw: int,
    recommendation: int,
) -> str:
    """The decision's inputs, for its log line."""
    parts = f"visible {signals.visible}, delayed {signals.delayed}, in flight {signals.in_flight}"
    if signals.expected:
        parts += f", expected {signals.expected}"
    target = f"{_seconds(each)} per worker"
    if config.target_wait_seconds is not None and signals.step_seconds is not None:
        target += (
            f" ({_seconds(config.target_wait_seconds)} s wait target, "
            f"{_seconds(signals.step_seconds)} s steps)"
        )
    facts = f"backlog {backlog} ({parts}), {busy} busy; {target} -> {recommendation} workers"
    if raw < config.min_workers:
        facts += f" (raised to min_workers {config.min_workers})"
    elif raw > config.max_workers:
        facts += f" (capped at max_workers {config.max_workers}, {raw} wanted)"
    if busy > recommendation:
        floor = min(busy, config.max_workers)
        facts += f"; {floor} busy workers are the floor"
        if busy > config.max_workers:
            facts += f" (capped at max_workers {config.max_workers}, {busy} wanted)"
    return facts


def decide(
    signals: QueueSignals,
    *,
    current: int,
    config: ScalingConfig,
    history: Sequence[Recommendation],
    now: float,
) -> Decision:
    """The worker count to set now.

    The recommendation is enough workers for the backlog (visible, delayed, in-flight and
    expected messages, :func:`per_worker` each), clamped into ``[min_workers,
    max_workers]``. Any message gives a recommendation of at least 1, so the first message
    (or the first expected step) wakes a service that is at zero. The workers busy with
    leased steps are a floor of this decision (capped at ``max_workers``), not of the
    recommendation kept in the history.

    A count above ``current`` is applied at once. Below it, the count only drops to the
    highest recommendation in the window (this one included) or to the busy workers,
    whichever is higher. A ``current`` outside the bounds is brought inside them: below
    ``min_workers`` the recommendation is above it, and above ``max_workers`` every
    recommendation in the window is capped at ``max_workers``.

    If a queue or lease signal is None nothing changes, not even the clamping: a count
    chosen on half the facts could stop busy workers.
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

    backlog = visible + delayed + in_flight + signals.expected
    each = per_worker(config, signals.step_seconds)
    raw = _workers_for(backlog, each)
    recommendation = min(max(raw, config.min_workers), config.max_workers)
    floor = min(busy, config.max_workers)
    wanted = max(recommendation, floor)
    new_history = (*kept, Recommendation(at=now, workers=recommendation))
    facts = _facts(
        signals,
        config,
        backlog=backlog,
        busy=busy,
        each=each,
        raw=raw,
        recommendation=recommendation,
    )

    if wanted > current:
        desired = wanted
        if current == 0:
            reason, action = Reason.SCALE_FROM_ZERO, f"scaling from zero to {desired}"
        else:
            reason, action = Reason.SCALE_OUT, f"scaling out from {current} to {desired}"
    else:
        # Entries recorded under an older, higher max_workers must not hold the count up.
        highest = min(max(r.workers for r in new_history), config.max_workers)
        target = max(highest, floor)
        if target < current:
            desired, reason = target, Reason.SCALE_IN
            if current > config.max_workers:
                action = (
                    f"scaling in from {current}, above max_workers {config.max_workers}, "
                    f"to {desired}"
                )
            elif floor > highest:
                action = f"scaling in from {current} to {desired}, the busy workers"
            else:
                action = (
                    f"scaling in from {current} to {desired}, "
                    f"the highest recommendation in the {_seconds(window)} s window"
                )
        elif wanted < current:
            desired, reason = current, Reason.STABILIZING
            # The latest entry that holds the count up is the last one to leave the window
            # (the busy floor is below current here, so an entry does).
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

"""The scaling policy: one test per rule, then properties over arbitrary inputs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dagster_taskiq.scaling.policy import (
    Decision,
    ExpectedSteps,
    QueueSignals,
    Reason,
    Recommendation,
    ScalingConfig,
    decide,
    expected_soon,
    per_worker,
)

NOW = 1_700_000_000.0
# min 0, max 10, 5 per worker, 1 step per worker; the window set apart from its default (60 s)
# so that the rules below read in round numbers.
CONFIG = ScalingConfig(scale_in_stabilization_seconds=300)


def signals(  # noqa: PLR0917 (one argument per signal, as QueueSignals takes them)
    visible: int | None = 0,
    delayed: int | None = 0,
    in_flight: int | None = 0,
    live_leases: int | None = 0,
    expected: int = 0,
    step_seconds: float | None = None,
) -> QueueSignals:
    return QueueSignals(
        visible=visible,
        delayed=delayed,
        in_flight=in_flight,
        live_leases=live_leases,
        expected=expected,
        step_seconds=step_seconds,
    )


def run(
    queue: QueueSignals,
    current: int,
    *,
    config: ScalingConfig = CONFIG,
    history: Sequence[Recommendation] = (),
    now: float = NOW,
) -> Decision:
    return decide(queue, current=current, config=config, history=history, now=now)


# -- scaling out -------------------------------------------------------------------------


def test_scales_out_at_once() -> None:
    decision = run(signals(visible=20, in_flight=3, live_leases=2), 1)

    assert decision.desired == 5
    assert decision.recommendation == 5
    assert decision.busy_workers == 2
    assert decision.reason is Reason.SCALE_OUT
    assert decision.detail == (
        "backlog 23 (visible 20, delayed 0, in flight 3), 2 busy; "
        "5 per worker -> 5 workers; scaling out from 1 to 5"
    )


def test_scale_out_ignores_a_lower_history() -> None:
    history = [Recommendation(NOW - 60, 1), Recommendation(NOW - 30, 2)]

    decision = run(signals(visible=40), 2, history=history)

    assert (decision.desired, decision.reason) == (8, Reason.SCALE_OUT)


def test_first_visible_message_scales_from_zero() -> None:
    decision = run(signals(visible=1), 0)

    assert decision.desired == 1
    assert decision.reason is Reason.SCALE_FROM_ZERO
    assert decision.detail.endswith("; scaling from zero to 1")


def test_delayed_messages_count() -> None:
    assert run(signals(delayed=1), 0).desired == 1
    assert run(signals(visible=4, delayed=7), 0).desired == 3


def test_in_flight_messages_count() -> None:
    assert run(signals(in_flight=1), 0).desired == 1
    decision = run(signals(in_flight=10), 2)
    assert (decision.desired, decision.recommendation, decision.reason) == (2, 2, Reason.HOLD)


def test_never_below_busy_workers_even_with_no_backlog() -> None:
    config = ScalingConfig(steps_per_worker=2)

    decision = run(signals(live_leases=7), 6, config=config)

    assert decision.busy_workers == 4
    # The busy workers are a floor of this decision, not part of the recommendation.
    assert decision.recommendation == 0
    assert decision.history == (Recommendation(NOW, 0),)
    assert (decision.desired, decision.reason) == (4, Reason.SCALE_IN)
    assert decision.detail == (
        "backlog 0 (visible 0, delayed 0, in flight 0), 4 busy; 5 per worker -> 0 workers; "
        "4 busy workers are the floor; scaling in from 6 to 4, the busy workers"
    )


def test_the_busy_floor_is_not_kept_in_the_window() -> None:
    # Eight workers busy, little backlog: eight are kept while they are busy...
    busy = run(signals(in_flight=8, live_leases=8), 8)
    assert (busy.desired, busy.recommendation, busy.reason) == (8, 2, Reason.HOLD)

    # ...and once their steps end the count drops to what the window recommended, at once:
    # scale-in protection kept them alive while they were busy, not the window.
    idle = run(signals(), 8, history=busy.history, now=NOW + 20)
    assert (idle.desired, idle.reason) == (2, Reason.SCALE_IN)
    assert idle.detail.endswith("the highest recommendation in the 300 s window")


def test_the_busy_floor_holds_while_the_window_has_passed() -> None:
    history = [Recommendation(NOW - 400, 9)]

    decision = run(signals(live_leases=3), 9, history=history)

    assert (decision.desired, decision.reason) == (3, Reason.SCALE_IN)


def test_busy_workers_still_capped_at_max() -> None:
    decision = run(signals(live_leases=50), 10)

    assert decision.busy_workers == 50
    assert (decision.desired, decision.reason) == (10, Reason.HOLD)
    assert "(capped at max_workers 10, 50 wanted)" in decision.detail


# -- scaling in --------------------------------------------------------------------------


def test_holds_while_a_higher_recommendation_is_inside_the_window() -> None:
    decision = run(signals(), 6, history=[Recommendation(NOW - 299, 6)])

    assert decision.desired == 6
    assert decision.recommendation == 0
    assert decision.reason is Reason.STABILIZING
    assert not decision.changed


def test_window_boundary_is_inclusive() -> None:
    decision = run(signals(), 6, history=[Recommendation(NOW - 300, 6)])

    assert (decision.desired, decision.reason) == (6, Reason.STABILIZING)


def test_scales_in_once_the_window_has_passed() -> None:
    decision = run(signals(), 6, history=[Recommendation(NOW - 301, 6)])

    assert decision.desired == 0
    assert decision.reason is Reason.SCALE_IN
    assert decision.history == (Recommendation(NOW, 0),)


def test_scales_in_only_to_the_highest_recommendation_in_the_window() -> None:
    history = [
        Recommendation(NOW - 400, 9),  # outside the window: ignored
        Recommendation(NOW - 200, 3),
        Recommendation(NOW - 100, 2),
    ]

    decision = run(signals(visible=5), 6, history=history)

    assert decision.recommendation == 1
    assert (decision.desired, decision.reason) == (3, Reason.SCALE_IN)
    assert decision.detail.endswith(
        "; scaling in from 6 to 3, the highest recommendation in the 300 s window"
    )


def test_stabilizing_names_the_recommendation_that_holds_the_count() -> None:
    history = [Recommendation(NOW - 250, 5), Recommendation(NOW - 120, 4)]

    decision = run(signals(visible=3), 4, history=history)

    assert decision.reason is Reason.STABILIZING
    assert decision.desired == 4
    assert decision.detail == (
        "backlog 3 (visible 3, delayed 0, in flight 0), 0 busy; 5 per worker -> 1 workers; "
        "holding 4: 4 recommended 120 s ago is still in the 300 s window"
    )


def test_hold_when_the_recommendation_equals_current() -> None:
    decision = run(signals(visible=15), 3, history=[Recommendation(NOW - 60, 3)])

    assert (decision.desired, decision.reason) == (3, Reason.HOLD)
    assert decision.detail.endswith("; holding 3")


def test_zero_window_scales_in_at_once() -> None:
    config = ScalingConfig(scale_in_stabilization_seconds=0)

    decision = run(signals(), 6, config=config, history=[Recommendation(NOW - 0.5, 6)])

    assert (decision.desired, decision.reason) == (0, Reason.SCALE_IN)


# -- bounds ------------------------------------------------------------------------------


def test_recommendation_clamped_to_min() -> None:
    config = ScalingConfig(min_workers=2)

    decision = run(signals(), 2, config=config)

    assert decision.recommendation == 2
    assert (decision.desired, decision.reason) == (2, Reason.HOLD)
    assert "-> 2 workers (raised to min_workers 2)" in decision.detail


def test_recommendation_clamped_to_max() -> None:
    decision = run(signals(visible=1000), 3)

    assert decision.recommendation == 10
    assert (decision.desired, decision.reason) == (10, Reason.SCALE_OUT)


def test_current_above_max_goes_down_to_max_at_once() -> None:
    # A recommendation made under an older, higher max_workers does not hold it up.
    history = [Recommendation(NOW - 60, 15)]

    decision = run(signals(visible=1000), 15, history=history)

    assert (decision.desired, decision.reason) == (10, Reason.SCALE_IN)
    assert decision.detail.endswith("; scaling in from 15, above max_workers 10, to 10")


def test_current_above_max_still_honours_the_window_below_max() -> None:
    history = [Recommendation(NOW - 60, 7)]

    decision = run(signals(), 15, history=history)

    assert (decision.desired, decision.reason) == (7, Reason.SCALE_IN)


@pytest.mark.parametrize(
    ("current", "reason"), [(0, Reason.SCALE_FROM_ZERO), (1, Reason.SCALE_OUT)]
)
def test_current_below_min_goes_up_to_min_at_once(current: int, reason: Reason) -> None:
    config = ScalingConfig(min_workers=3)

    decision = run(signals(), current, config=config)

    assert (decision.desired, decision.reason) == (3, reason)


# -- unreadable signals ------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["visible", "delayed", "in_flight", "live_leases"])
def test_unreadable_signal_keeps_the_count(missing: str) -> None:
    readable: dict[str, Any] = {"visible": 1000, "delayed": 0, "in_flight": 0, "live_leases": 40}
    queue = QueueSignals(**{**readable, missing: None})
    history = [Recommendation(NOW - 400, 9), Recommendation(NOW - 100, 3)]

    # 15 is above max_workers: not even clamped while a signal is missing.
    decision = run(queue, 15, history=history)

    assert decision.desired == 15
    assert decision.reason is Reason.UNREADABLE
    assert decision.recommendation is None
    assert not decision.changed
    assert decision.history == (Recommendation(NOW - 100, 3),)
    assert decision.busy_workers == (None if missing == "live_leases" else 40)
    name = missing.replace("_", " ")
    assert decision.detail == f"could not read {name}; keeping 15 workers"


def test_every_signal_unreadable() -> None:
    decision = run(QueueSignals(None, None, None, None), 0)

    assert (decision.desired, decision.reason) == (0, Reason.UNREADABLE)
    assert decision.detail == (
        "could not read visible, delayed, in flight, live leases; keeping 0 workers"
    )


# -- history -----------------------------------------------------------------------------


def test_history_is_pruned_sorted_and_extended() -> None:
    history = [
        Recommendation(NOW - 100, 2),
        Recommendation(NOW + 5, 9),  # from the future: dropped
        Recommendation(NOW - 400, 8),  # outside the window: dropped
        Recommendation(NOW - 200, 1),
    ]

    decision = run(signals(visible=6), 2, history=history)

    assert decision.history == (
        Recommendation(NOW - 200, 1),
        Recommendation(NOW - 100, 2),
        Recommendation(NOW, 2),
    )


def test_returned_history_carries_the_window_to_the_next_call() -> None:
    high = run(signals(visible=30), 1)
    assert (high.desired, high.history) == (6, (Recommendation(NOW, 6),))

    low = run(signals(), high.desired, history=high.history, now=NOW + 120)
    assert (low.desired, low.reason) == (6, Reason.STABILIZING)
    assert low.history == (Recommendation(NOW, 6), Recommendation(NOW + 120, 0))

    later = run(signals(), low.desired, history=low.history, now=NOW + 301)
    assert (later.desired, later.reason) == (0, Reason.SCALE_IN)
    assert later.history == (Recommendation(NOW + 120, 0), Recommendation(NOW + 301, 0))


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_workers": -1}, "min_workers must be 0 or more"),
        ({"max_workers": 0}, "max_workers must be 1 or more"),
        ({"min_workers": 4, "max_workers": 3}, r"min_workers \(4\) must not exceed"),
        ({"target_backlog_per_worker": 0}, "target_backlog_per_worker must be 1 or more"),
        ({"steps_per_worker": 0}, "steps_per_worker must be 1 or more"),
        ({"scale_in_stabilization_seconds": -1.0}, "scale_in_stabilization_seconds"),
        ({"scale_in_stabilization_seconds": float("nan")}, "scale_in_stabilization_seconds"),
    ],
)
def test_invalid_config_raises(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScalingConfig(**kwargs)  # type: ignore[arg-type]


def test_min_equal_to_max_is_valid() -> None:
    assert ScalingConfig(min_workers=3, max_workers=3).max_workers == 3


def test_negative_signal_raises() -> None:
    with pytest.raises(ValueError, match="in flight must be 0 or more, got -1"):
        signals(in_flight=-1)


def test_negative_current_raises() -> None:
    with pytest.raises(ValueError, match="current must be 0 or more"):
        run(signals(), -1)


def test_changed() -> None:
    assert run(signals(visible=10), 1).changed
    assert not run(signals(visible=10), 2).changed


# -- properties --------------------------------------------------------------------------


@st.composite
def configs(draw: st.DrawFn) -> ScalingConfig:
    max_workers = draw(st.integers(1, 50))
    return ScalingConfig(
        min_workers=draw(st.integers(0, max_workers)),
        max_workers=max_workers,
        target_backlog_per_worker=draw(st.integers(1, 20)),
        steps_per_worker=draw(st.integers(1, 8)),
        scale_in_stabilization_seconds=draw(st.floats(0, 3600, allow_nan=False)),
    )


counts = st.none() | st.integers(0, 10_000)
queue_signals = st.builds(QueueSignals, counts, counts, counts, counts)
histories = st.lists(
    st.builds(Recommendation, st.floats(NOW - 7200, NOW + 600), st.integers(0, 60)),
    max_size=20,
)


@settings(deadline=None, database=None)
@given(
    config=configs(),
    queue=queue_signals,
    current=st.integers(0, 60),
    history=histories,
    now=st.floats(NOW - 600, NOW + 600),
)
def test_decision_invariants(
    config: ScalingConfig,
    queue: QueueSignals,
    current: int,
    history: list[Recommendation],
    now: float,
) -> None:
    decision = run(queue, current, config=config, history=history, now=now)
    window = config.scale_in_stabilization_seconds

    assert decision.current == current
    assert decision.changed == (decision.desired != current)
    assert all(now - window <= r.at <= now for r in decision.history)
    assert [r.at for r in decision.history] == sorted(r.at for r in decision.history)

    if decision.reason is Reason.UNREADABLE:
        assert None in (queue.visible, queue.delayed, queue.in_flight, queue.live_leases)
        assert decision.desired == current
        assert decision.recommendation is None
        assert len(decision.history) == sum(now - window <= r.at <= now for r in history)
        return

    assert queue.visible is not None
    assert queue.live_leases is not None
    busy = decision.busy_workers
    assert busy is not None
    assert busy * config.steps_per_worker >= queue.live_leases
    assert (busy - 1) * config.steps_per_worker < max(queue.live_leases, 1)
    assert config.min_workers <= decision.desired <= config.max_workers
    assert decision.desired >= min(busy, config.max_workers)
    if current == 0 and queue.visible >= 1:
        assert decision.desired >= 1
    assert decision.recommendation is not None
    assert decision.history[-1] == Recommendation(now, decision.recommendation)
    if decision.desired > current:
        assert decision.reason in (Reason.SCALE_OUT, Reason.SCALE_FROM_ZERO)
    elif decision.desired < current:
        assert decision.reason is Reason.SCALE_IN
    else:
        assert decision.reason in (Reason.HOLD, Reason.STABILIZING)


@dataclass
class Simulation:
    """The caller's loop: evaluate every 60 s, feed back the desired count and history."""

    config: ScalingConfig
    current: int
    history: tuple[Recommendation, ...] = ()
    now: float = NOW

    def step(self, queue: QueueSignals) -> Decision:
        decision = run(queue, self.current, config=self.config, history=self.history, now=self.now)
        self.current, self.history = decision.desired, decision.history
        self.now += 60
        return decision


@settings(deadline=None, database=None)
@given(
    data=st.data(),
    high_steps=st.integers(1, 5),
    low_steps=st.integers(1, 5),
    offset=st.integers(0, 9),
    high=st.integers(1, 500),
    low=st.integers(0, 500),
    live_leases=st.integers(0, 40),
)
def test_no_oscillation_while_the_backlog_comes_and_goes_within_the_window(
    *,
    data: st.DataObject,
    high_steps: int,
    low_steps: int,
    offset: int,
    high: int,
    low: int,
    live_leases: int,
) -> None:
    period = high_steps + low_steps
    config = data.draw(configs().filter(lambda c: c.scale_in_stabilization_seconds > period * 60))
    low = min(low, high - 1)
    sim = Simulation(config, current=config.min_workers)

    desired = []
    for i in range(60):
        backlog = high if (i + offset) % period < high_steps else low
        desired.append(sim.step(signals(visible=backlog, live_leases=live_leases)).desired)

    assert desired == sorted(desired), desired
    # Once the high backlog has been seen, the count stays at what it called for.
    peak = run(signals(visible=high, live_leases=live_leases), 0, config=config).desired
    first_high = next(i for i in range(60) if (i + offset) % period < high_steps)
    assert desired[first_high:] == [peak] * (60 - first_high), desired


def test_no_oscillation_example() -> None:
    # A backlog back every four minutes, with a window of five.
    sim = Simulation(CONFIG, current=0)

    desired = [sim.step(signals(visible=20 if i % 4 < 2 else 0)).desired for i in range(20)]

    assert desired == [4] * 20


def test_the_default_window_is_about_a_workers_start() -> None:
    # A backlog back within a minute keeps its workers; one back later starts them again,
    # which costs about what keeping them idle for the minute did.
    config = ScalingConfig()
    assert config.scale_in_stabilization_seconds == 60
    within = Simulation(config, current=0)
    within_desired = [
        within.step(signals(visible=20 if i % 2 == 0 else 0)).desired for i in range(6)
    ]
    assert within_desired == [4] * 6
    later = Simulation(config, current=0)
    later_desired = [later.step(signals(visible=20 if i % 3 == 0 else 0)).desired for i in range(6)]
    assert later_desired == [4, 4, 0, 4, 4, 0]


@settings(deadline=None, database=None)
@given(
    config=configs(),
    busy_steps=st.integers(1, 10),
    backlog=st.integers(1, 500),
    live_leases=st.integers(0, 40),
)
def test_idle_for_longer_than_the_window_ends_at_min_workers(
    config: ScalingConfig, busy_steps: int, backlog: int, live_leases: int
) -> None:
    window = config.scale_in_stabilization_seconds
    sim = Simulation(config, current=config.min_workers)
    busy = [sim.step(signals(visible=backlog, live_leases=live_leases)) for _ in range(busy_steps)]
    peak = busy[-1].desired
    assert peak == max(d.desired for d in busy)
    # What the window holds: the recommendations for the backlog. The busy workers were a
    # floor of each decision only; they are idle now.
    held = busy[-1].recommendation
    assert held is not None and held <= peak
    last_busy_at = sim.now - 60

    for index in range(int(window // 60) + 2):
        at = sim.now
        decision = sim.step(signals())
        # The same comparison as the policy's, so float rounding agrees at the boundary.
        if at - window <= last_busy_at:
            if index == 0 and held < peak:
                assert (decision.desired, decision.reason) == (held, Reason.SCALE_IN)
            else:
                assert (decision.desired, decision.reason) == (
                    held,
                    Reason.HOLD if held == config.min_workers else Reason.STABILIZING,
                )
        else:
            assert decision.desired == config.min_workers

    assert sim.current == config.min_workers
    assert sim.history[-1] == Recommendation(sim.now - 60, config.min_workers)


def test_module_imports_no_heavy_dependencies() -> None:
    code = (
        "import dagster_taskiq.scaling.policy, sys\n"
        "print([m for m in sys.modules"
        " if m.split('.')[0] in ('dagster', 'boto3', 'botocore', 'sqlalchemy')])"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == "[]"


# -- expected steps and the wait target ----------------------------------------------------


def test_expected_steps_count_as_backlog() -> None:
    decision = run(signals(expected=12), 0)

    assert (decision.desired, decision.reason) == (3, Reason.SCALE_FROM_ZERO)
    assert decision.detail == (
        "backlog 12 (visible 0, delayed 0, in flight 0, expected 12), 0 busy; "
        "5 per worker -> 3 workers; scaling from zero to 3"
    )


def test_expected_steps_are_kept_in_the_window() -> None:
    ahead = run(signals(in_flight=1, live_leases=1, expected=20), 1)
    assert (ahead.desired, ahead.recommendation) == (5, 5)

    # The fan-out is queued now: the workers started for it are not taken away.
    launched = run(signals(visible=20, live_leases=0), 5, history=ahead.history, now=NOW + 20)
    assert (launched.desired, launched.reason) == (5, Reason.STABILIZING)


@pytest.mark.parametrize(
    ("step_seconds", "due"),
    [
        (None, 25),  # no duration known yet: every expected step counts
        (100.0, 20),  # due after 40 s of waiting: the runs waiting 50 and 45 s
        (30.0, 25),  # shorter than the lead: due at once
        (200.0, 0),
    ],
)
def test_expected_soon_counts_the_steps_due_within_the_lead(
    step_seconds: float | None, due: int
) -> None:
    expected = [ExpectedSteps(5, 10.0), ExpectedSteps(12, 50.0), ExpectedSteps(8, 45.0)]
    assert expected_soon(expected, step_seconds=step_seconds, lead_seconds=60) == due


def test_a_wait_target_gives_each_worker_what_its_slots_finish_in_time() -> None:
    config = ScalingConfig(steps_per_worker=2, target_wait_seconds=60)

    # 30 s steps: two running and four more finished within 60 s, six per worker.
    assert per_worker(config, 30.0) == 6
    decision = run(signals(visible=30, step_seconds=30.0), 1, config=config)
    assert (decision.desired, decision.reason) == (5, Reason.SCALE_OUT)
    assert "; 6 per worker (60 s wait target, 30 s steps) -> 5 workers;" in decision.detail

    # Five-minute steps: no step waits behind another, one per slot.
    assert per_worker(config, 300.0) == pytest.approx(2.4)
    assert run(signals(visible=12, step_seconds=300.0), 0, config=config).desired == 5

    # Durations unknown: the backlog target.
    assert per_worker(config, None) == 5
    assert run(signals(visible=12), 0, config=config).desired == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_wait_seconds": -1.0}, "target_wait_seconds must be 0 or more"),
        ({"target_wait_seconds": float("nan")}, "target_wait_seconds"),
        ({"scale_out_lead_seconds": -1.0}, "scale_out_lead_seconds must be 0 or more"),
    ],
)
def test_invalid_outlook_config_raises(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScalingConfig(**kwargs)  # type: ignore[arg-type]


def test_invalid_outlook_signals_raise() -> None:
    with pytest.raises(ValueError, match="expected must be 0 or more, got -1"):
        signals(expected=-1)
    with pytest.raises(ValueError, match="step_seconds must be more than 0"):
        signals(step_seconds=0.0)


# -- never below the busy workers --------------------------------------------------------------


outlook_signals = st.builds(
    QueueSignals,
    counts,
    counts,
    counts,
    counts,
    expected=st.integers(0, 2_000),
    step_seconds=st.none() | st.floats(0.1, 3_600),
)


@st.composite
def outlook_configs(draw: st.DrawFn) -> ScalingConfig:
    base = draw(configs())
    return ScalingConfig(
        min_workers=base.min_workers,
        max_workers=base.max_workers,
        target_backlog_per_worker=base.target_backlog_per_worker,
        steps_per_worker=base.steps_per_worker,
        scale_in_stabilization_seconds=base.scale_in_stabilization_seconds,
        target_wait_seconds=draw(st.none() | st.floats(0, 3_600)),
        scale_out_lead_seconds=draw(st.floats(0, 600)),
    )


@settings(deadline=None, database=None)
@given(
    config=outlook_configs(),
    readings=st.lists(outlook_signals, min_size=1, max_size=30),
    gaps=st.lists(st.floats(0, 400), min_size=30, max_size=30),
    start=st.integers(0, 60),
)
def test_the_policy_never_scales_below_the_busy_workers(
    config: ScalingConfig,
    readings: list[QueueSignals],
    gaps: list[float],
    start: int,
) -> None:
    """Over any run of evaluations, each carrying the history on: the count never drops
    below the workers busy with leased steps (capped at max_workers), and what the window
    keeps is the recommendation for the backlog alone, never the busy floor."""
    history: tuple[Recommendation, ...] = ()
    current, now = start, NOW
    for reading, gap in zip(readings, gaps, strict=False):
        decision = decide(reading, current=current, config=config, history=history, now=now)
        if decision.reason is not Reason.UNREADABLE:
            assert reading.live_leases is not None and decision.busy_workers is not None
            busy = -(-reading.live_leases // config.steps_per_worker)
            assert decision.busy_workers == busy
            assert decision.desired >= min(busy, config.max_workers)
            backlog = (
                (reading.visible or 0)
                + (reading.delayed or 0)
                + (reading.in_flight or 0)
                + reading.expected
            )
            each = per_worker(config, reading.step_seconds)
            recommendation = decision.recommendation
            assert recommendation is not None
            assert config.min_workers <= recommendation <= config.max_workers
            # Enough workers for the backlog (unless capped), and none more (unless raised).
            if recommendation < config.max_workers:
                assert recommendation * each >= backlog * (1 - 1e-9)
            if recommendation > max(config.min_workers, 1):
                assert (recommendation - 1) * each < backlog
            # The window keeps the backlog's recommendation, never the busy floor.
            assert decision.history[-1] == Recommendation(now, recommendation)
        current, history = decision.desired, decision.history
        now += gap

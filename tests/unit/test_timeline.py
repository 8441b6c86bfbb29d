"""``benchmarks.timeline`` places a run's time from its events' timestamps."""

from __future__ import annotations

import pytest
from dagster import DagsterEventType as T

from benchmarks.timeline import Event, phases


def test_phases_of_two_slots_running_three_steps() -> None:
    # Slot 1 runs a then c; slot 2 runs b. Times in seconds from the call.
    events = [
        Event(0.10, T.STEP_WORKER_STARTED, "a"),
        Event(0.12, T.STEP_START, "a"),
        Event(0.11, T.STEP_WORKER_STARTED, "b"),
        Event(0.14, T.STEP_START, "b"),
        Event(1.12, T.STEP_OUTPUT, "a"),
        Event(1.13, T.STEP_SUCCESS, "a"),
        Event(1.15, T.STEP_WORKER_STARTED, "c"),
        Event(1.17, T.STEP_START, "c"),
        Event(1.20, T.STEP_SUCCESS, "b"),  # no output: its ending is the success alone
        Event(2.17, T.STEP_OUTPUT, "c"),
        Event(2.19, T.STEP_SUCCESS, "c"),
        Event(2.25, T.RUN_SUCCESS, None),
    ]
    found = phases(events, called=0.0, returned=2.30)
    assert found["run start (called to first step started)"] == pytest.approx([0.12])
    assert found["step preamble (worker started to step start)"] == pytest.approx(
        [0.02, 0.03, 0.02]
    )
    assert found["step ending (first output to success)"] == pytest.approx([0.01, 0.0, 0.02])
    assert found["hand-over (success to next start)"] == pytest.approx([0.04])
    assert found["run end (last success to returned)"] == pytest.approx([0.11])

"""What the load runner records once a second, and the picture draws."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    queue_visible: int | None
    queue_in_flight: int | None
    desired_workers: int | None
    running_workers: int | None
    live_leases: int | None
    steps_finished: int | None  # since the load began
    runs_submitted: int
    runs_finished: int

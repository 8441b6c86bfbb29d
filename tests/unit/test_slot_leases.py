"""A slot acts on a lease's change only while its process runs that lease's step: the
ending of a step is recorded while the process already runs the next one."""

from __future__ import annotations

from typing import Any

from dagster_taskiq.worker.heartbeat import Lease, LeaseState
from dagster_taskiq.worker.supervisor import Slot


class FakeProcess:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def kill(self) -> None:
        self.calls.append("kill")

    def interrupt(self) -> None:
        self.calls.append("interrupt")


class FakeSettings:
    cancel_grace = 60.0


class FakeWorker:
    settings = FakeSettings()


def _slot(process: FakeProcess) -> Slot:
    slot = Slot(0, FakeWorker())  # type: ignore[arg-type]
    slot.process = process  # type: ignore[assignment]
    return slot


def _lease(slot: Slot, key: str) -> Lease:
    queue: Any = None
    return Lease(key, 1, queue, "handle", 60, on_change=slot.on_lease_change)


def test_a_lost_lease_kills_the_step_it_belongs_to() -> None:
    process = FakeProcess()
    slot = _slot(process)
    slot.lease = lease = _lease(slot, "run:a:0")
    assert lease.move_to(LeaseState.LOST)
    assert process.calls == ["kill"]


def test_a_lease_whose_step_ended_leaves_the_next_step_alone() -> None:
    process = FakeProcess()
    slot = _slot(process)
    ended = _lease(slot, "run:a:0")
    slot.lease = _lease(slot, "run:b:0")  # the process runs the next step now
    assert ended.move_to(LeaseState.LOST)
    cancelled = _lease(slot, "run:c:0")
    assert cancelled.move_to(LeaseState.CANCEL_REQUESTED)
    assert process.calls == []

"""A step's ending is recorded once its slot has handed the next step over, or after a
short wait when there is none: the recording never delays a hand-over, and never waits
long for one."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dagster_taskiq.worker import supervisor
from dagster_taskiq.worker.config import STEP_PROCESS_SPAWN, WorkerSettings
from dagster_taskiq.worker.supervisor import Slot, Worker


class Recorded:
    def __init__(self) -> None:
        self.finished = threading.Event()
        self.leases_ended: list[object] = []

    def finish(self) -> None:
        self.finished.set()


class FakeHeartbeat:
    def remove(self, lease: object) -> None:
        pass


class FakeProtection:
    def __init__(self, recorded: Recorded) -> None:
        self.recorded = recorded

    def step_finished(self) -> None:
        self.recorded.leases_ended.append(1)


def _recording_worker(recorded: Recorded) -> Worker:
    settings = WorkerSettings(
        queue_urls=("q",), database_url="", code_locations=(), step_process_start=STEP_PROCESS_SPAWN
    )
    unused: Any = None  # _record talks to neither
    return Worker(
        settings,
        queues={"q": unused},
        ledger=unused,
        heartbeat=FakeHeartbeat(),  # type: ignore[arg-type]
        protection=FakeProtection(recorded),  # type: ignore[arg-type]
    )


def _record_in_background(
    worker: Worker, recorded: Recorded, hand_over: threading.Event
) -> threading.Thread:
    lease: Any = object()
    thread = threading.Thread(target=worker._record, args=(lease, recorded.finish, hand_over))
    thread.start()
    return thread


def test_the_ending_waits_for_the_hand_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "HAND_OVER_FIRST_SECONDS", 30.0)
    recorded, hand_over = Recorded(), threading.Event()
    thread = _record_in_background(_recording_worker(recorded), recorded, hand_over)
    assert not recorded.finished.wait(0.2), "recorded before the next step was handed over"
    hand_over.set()
    thread.join(5)
    assert recorded.finished.is_set() and recorded.leases_ended == [1]


def test_without_a_hand_over_the_ending_is_recorded_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "HAND_OVER_FIRST_SECONDS", 0.3)
    recorded = Recorded()
    started = time.monotonic()
    _record_in_background(_recording_worker(recorded), recorded, threading.Event()).join(5)
    assert recorded.finished.is_set() and recorded.leases_ended == [1]
    assert 0.3 <= time.monotonic() - started < 5


class IdleProcess:
    alive = True
    steps_run = 0

    def stop(self) -> None:
        pass


class NoStepWorker:
    """Handles every message without starting a step (a duplicate, a rejected one)."""

    class settings:  # stands in for WorkerSettings
        max_steps_per_process = 100
        cancel_grace = 60.0

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.handled: list[object] = []

    def handle(self, slot: Slot, received: object) -> None:
        self.handled.append(received)

    def slot_idle(self, slot: Slot) -> None:
        pass


def test_a_message_that_starts_no_step_lets_the_last_ending_be_recorded() -> None:
    worker = NoStepWorker()
    slot = Slot(0, worker)  # type: ignore[arg-type]
    slot.process = IdleProcess()  # type: ignore[assignment]
    slot.hand_over = last_ending = threading.Event()
    slot.inbox.put("a duplicate delivery")  # type: ignore[arg-type]
    slot.inbox.put(None)
    slot._loop()
    assert worker.handled == ["a duplicate delivery"]
    assert last_ending.is_set()

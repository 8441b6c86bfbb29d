"""The step handler answers a health-check round from one read of the run's ledger rows."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from dagster_taskiq.core.ledger import Status, StepRecord
from dagster_taskiq.core.routing import QueueRoute, Routing
from dagster_taskiq.executor import step_handler
from dagster_taskiq.executor.step_handler import LaunchSettings, SqsStepHandler


def _record(key: str, status: Status = Status.RUNNING) -> StepRecord:
    return StepRecord(
        idempotency_key=key,
        run_id="run",
        step_key=key,
        attempt=0,
        queue_url=None,
        status=status,
        worker_id="w",
        fencing_token=1,
        lease_expires_at=None,
        lease_live=True,
        deliveries=1,
        duplicates_suppressed=0,
        payload_hash="h",
        error=None,
        enqueued_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
        age_seconds=0.0,
    )


class FakeLedger:
    def __init__(self, records: list[StepRecord]) -> None:
        self.records = {r.idempotency_key: r for r in records}
        self.for_run_calls = 0
        self.get_calls = 0

    def for_run(self, run_id: str) -> list[StepRecord]:
        self.for_run_calls += 1
        return [r for r in self.records.values() if r.run_id == run_id]

    def get(self, key: str) -> StepRecord | None:
        self.get_calls += 1
        return self.records.get(key)


def _handler(ledger: FakeLedger) -> SqsStepHandler:
    settings = LaunchSettings(
        lease_seconds=300,
        idempotency_key_ttl=60,
        max_message_bytes=1000,
        signing_key=None,
        pickup_timeout=None,
    )
    routing = Routing({"default": QueueRoute("default", "https://sqs/default")})
    return SqsStepHandler(
        queues={},
        routing=routing,
        ledger=ledger,  # type: ignore[arg-type]
        settings=settings,
    )


def test_one_read_serves_a_round(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = FakeLedger([_record(f"k{i}") for i in range(100)])
    handler = _handler(ledger)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    for i in range(100):
        record = handler._health_record(f"k{i}", "run")
        assert record is not None and record.idempotency_key == f"k{i}"
    assert (ledger.for_run_calls, ledger.get_calls) == (1, 0)

    # A step launched after the snapshot is read on its own, never judged missing.
    ledger.records["late"] = _record("late")
    assert handler._health_record("late", "run") is not None
    assert (ledger.for_run_calls, ledger.get_calls) == (1, 1)

    # The next round reads again and sees what moved.
    ledger.records["k0"] = _record("k0", Status.DEAD_LETTERED)
    clock[0] += step_handler.HEALTH_SNAPSHOT_SECONDS + 1
    record = handler._health_record("k0", "run")
    assert record is not None and record.status is Status.DEAD_LETTERED
    assert ledger.for_run_calls == 2


def test_a_round_longer_than_the_snapshot_s_age_is_served_by_one_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = FakeLedger([_record(f"k{i}") for i in range(100)])
    handler = _handler(ledger)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    handler.pass_ended()  # the executor drives passes

    for i in range(100):  # a slow round: well past the snapshot's age
        clock[0] += step_handler.HEALTH_SNAPSHOT_SECONDS / 10
        assert handler._health_record(f"k{i}", "run") is not None
    assert ledger.for_run_calls == 1

    handler.pass_ended()  # the next round, in a later pass, reads again
    assert handler._health_record("k0", "run") is not None
    assert ledger.for_run_calls == 2


def test_steps_ended_in_the_ledger_are_checked_against_one_read_of_the_run_s_endings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run worker behind its workers: the ledger shows 100 steps ended whose endings
    # Dagster has not consumed yet, so it asks about each of them every round.
    def ended(step_key: str, status: Status) -> StepRecord:
        return replace(_record(step_key, status), idempotency_key=f"run:{step_key}:0")

    # The last one never wrote an ending.
    ended_steps = [ended(f"k{i}", Status.SUCCEEDED) for i in range(100)]
    ledger = FakeLedger([*ended_steps, ended("lost", Status.FAILED)])
    handler = _handler(ledger)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    reads = {"run": 0, "step": 0}

    def run_endings(instance: object, run_id: str) -> dict[str, int]:
        reads["run"] += 1
        return {f"k{i}": 1 for i in range(100)}

    def attempt_outcome(instance: object, run_id: str, step_key: str, attempt: int) -> None:
        reads["step"] += 1

    monkeypatch.setattr(step_handler, "run_endings", run_endings)
    monkeypatch.setattr(step_handler, "attempt_outcome", attempt_outcome)

    def check(key: str) -> bool:
        context = SimpleNamespace(
            instance=None,
            execute_step_args=SimpleNamespace(
                run_id="run", step_keys_to_execute=[key], known_state=None
            ),
        )
        return handler._check_health(context).is_healthy  # type: ignore[arg-type]

    handler.pass_ended()
    assert all(check(f"k{i}") for i in range(100))
    assert not check("lost"), "a step whose ending is not in the event log is unhealthy"
    # One read of the run's endings for the round; the step it did not show, read alone.
    assert reads == {"run": 1, "step": 1}

    handler.pass_ended()  # the next round reads them again
    clock[0] += step_handler.HEALTH_SNAPSHOT_SECONDS + 1
    assert check("k0") and reads["run"] == 2

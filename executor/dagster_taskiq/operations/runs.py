"""``dagster-taskiq runs show RUN_ID``: every step attempt of a run, from the ledger and
from Dagster's event log side by side.

The ledger says what the workers did (state, worker, deliveries, fencing token, lease,
duplicates suppressed, error); the event log says what Dagster believes. When the two
disagree, that is where to look. The ledger part needs only the database; the event-log
part needs the Dagster instance (``DAGSTER_HOME``) and is left out, saying why, without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dagster_taskiq.core.ledger import Ledger, StepRecord
from dagster_taskiq.operations.ledger_reads import Rejection, rejections_for

# The Dagster events that tell a step attempt's story, by the name shown for them.
STEP_EVENTS = {
    "STEP_WORKER_STARTING": "queued",
    "STEP_WORKER_STARTED": "worker started",
    "STEP_START": "started",
    "STEP_RESTARTED": "restarted",
    "STEP_SUCCESS": "succeeded",
    "STEP_FAILURE": "failed",
    "STEP_UP_FOR_RETRY": "up for retry",
    "STEP_SKIPPED": "skipped",
    "ENGINE_EVENT": "engine event",
}
# The events that settle an attempt, for its outcome.
OUTCOMES = {"STEP_SUCCESS", "STEP_FAILURE", "STEP_UP_FOR_RETRY", "STEP_SKIPPED"}


@dataclass
class EventLogAttempt:
    """What Dagster's event log says of one attempt of one step."""

    events: list[str] = field(default_factory=list)  # in order, by their STEP_EVENTS names
    outcome: str | None = None  # the settling event, or the latest if none settled it
    error: str | None = None
    engine_messages: list[str] = field(default_factory=list)


@dataclass
class AttemptView:
    step_key: str
    attempt: int  # 0-based, as in the idempotency key
    idempotency_key: str | None = None
    queue: str | None = None
    ledger_status: str | None = None  # None: the ledger has no row for it
    worker_id: str | None = None
    deliveries: int | None = None
    fencing_token: int | None = None
    lease: str | None = None  # "live, 20 s left" / "expired 5 s ago"
    lease_expires_at: str | None = None
    duplicates_suppressed: int | None = None
    error: str | None = None
    enqueued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    rejections: list[Rejection] = field(default_factory=list)
    event_log: EventLogAttempt | None = None


@dataclass
class RunReport:
    run_id: str
    attempts: list[AttemptView]
    dagster_status: str | None = None
    # None when the event log was read; otherwise why it could not be.
    event_log_unavailable: str | None = None
    errors: list[str] = field(default_factory=list)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _lease(record: StepRecord) -> str | None:
    if record.lease_expires_at is None:
        return None
    # The database's now, from the row: age_seconds is now - enqueued_at.
    now = record.enqueued_at + timedelta(seconds=record.age_seconds)
    left = (record.lease_expires_at - now).total_seconds()
    if left > 0:
        return f"live, {left:.0f} s left" if record.lease_live else f"{left:.0f} s left"
    return f"expired {-left:.0f} s ago"


def attempt_from_record(record: StepRecord) -> AttemptView:
    return AttemptView(
        step_key=record.step_key,
        attempt=record.attempt,
        idempotency_key=record.idempotency_key,
        queue=record.queue_url.rsplit("/", 1)[-1] if record.queue_url else None,
        ledger_status=record.status.value,
        worker_id=record.worker_id,
        deliveries=record.deliveries,
        fencing_token=record.fencing_token,
        lease=_lease(record),
        lease_expires_at=_iso(record.lease_expires_at),
        duplicates_suppressed=record.duplicates_suppressed,
        error=record.error,
        enqueued_at=_iso(record.enqueued_at),
        started_at=_iso(record.started_at),
        finished_at=_iso(record.finished_at),
    )


def run_report(ledger: Ledger | None, run_id: str, dagster_home: str | None) -> RunReport:
    report = RunReport(run_id=run_id, attempts=[])
    views: dict[tuple[str, int], AttemptView] = {}
    if ledger is None:
        report.errors.append("ledger: no database URL (set DAGSTER_TASKIQ_DATABASE_URL)")
    else:
        try:
            for record in ledger.for_run(run_id):
                views[(record.step_key, record.attempt)] = attempt_from_record(record)
            for rejection in rejections_for(ledger, run_id=run_id):
                key = rejection.idempotency_key or ""
                step_key, _, attempt = key[len(run_id) + 1 :].rpartition(":")
                view = views.get((step_key, int(attempt))) if attempt.isdigit() else None
                if view is None and step_key and attempt.isdigit():
                    view = views.setdefault(
                        (step_key, int(attempt)),
                        AttemptView(step_key=step_key, attempt=int(attempt), idempotency_key=key),
                    )
                if view is not None:
                    view.rejections.append(rejection)
        except Exception as e:  # any failure of the ledger leaves the event log to show
            report.errors.append(f"ledger: {type(e).__name__}: {e}")
    if not dagster_home:
        report.event_log_unavailable = "DAGSTER_HOME is not set: no Dagster instance to read"
    else:
        try:
            status, attempts = read_event_log(dagster_home, run_id)
        except Exception as e:  # the instance's storage may be down or misconfigured
            report.event_log_unavailable = f"the Dagster instance could not be read: {e}"
        else:
            report.dagster_status = status
            for (logged_step, logged_attempt), logged in attempts.items():
                view = views.setdefault(
                    (logged_step, logged_attempt),
                    AttemptView(step_key=logged_step, attempt=logged_attempt),
                )
                view.event_log = logged
    report.attempts = sorted(views.values(), key=_order)
    return report


def _order(view: AttemptView) -> tuple[str, str, int]:
    return (view.enqueued_at or "~", view.step_key, view.attempt)


def read_event_log(
    dagster_home: str, run_id: str
) -> tuple[str | None, dict[tuple[str, int], EventLogAttempt]]:
    """The run's status and, per (step key, attempt), what its events say. An attempt ends
    at STEP_UP_FOR_RETRY: the events after it belong to the next attempt."""
    from dagster import DagsterInstance

    with DagsterInstance.from_config(dagster_home) as instance:
        run = instance.get_run_by_id(run_id)
        if run is None:
            raise LookupError(f"the Dagster instance has no run {run_id}")
        entries = instance.all_logs(run_id)
    current: dict[str, int] = {}
    attempts: dict[tuple[str, int], EventLogAttempt] = {}
    for entry in entries:
        event = entry.dagster_event
        if event is None or not event.step_key or event.event_type_value not in STEP_EVENTS:
            continue
        number = current.get(event.step_key, 0)
        logged = attempts.setdefault((event.step_key, number), EventLogAttempt())
        name = STEP_EVENTS[event.event_type_value]
        if event.event_type_value == "ENGINE_EVENT":
            logged.engine_messages.append(event.message or "")
            continue
        logged.events.append(name)
        if event.event_type_value in OUTCOMES or logged.outcome not in _settled():
            logged.outcome = name
        if event.event_type_value in ("STEP_FAILURE", "STEP_UP_FOR_RETRY"):
            data = event.event_specific_data
            error = getattr(data, "error", None)
            if error is not None:
                logged.error = _root_cause(error)
        if event.event_type_value == "STEP_UP_FOR_RETRY":
            current[event.step_key] = number + 1
    return run.status.value, attempts


def _root_cause(error: Any) -> str:
    """The innermost error's message: the op's own, under Dagster's wrappers (a retry
    request, a step execution error)."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return str(error.message).strip()


def _settled() -> set[str]:
    return {STEP_EVENTS[name] for name in OUTCOMES}

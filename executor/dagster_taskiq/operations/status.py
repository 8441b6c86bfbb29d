"""``dagster-taskiq status``: the state of every worker pool, its queues and the ledger.

Each part is read on its own and a part that cannot be read says why instead of failing
the rest: during an incident the database may be down while SQS answers, or the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.exc import SQLAlchemyError

from dagster_taskiq.core.errors import LedgerUnavailable, QueueUnavailable
from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.operations.ledger_reads import (
    QueueLedgerRow,
    RejectionCount,
    RunSteps,
    ScalingDecisionView,
    last_scaling_decision,
    ledger_tables_exist,
    queue_summary,
    rejections_since,
    runs_in_flight,
)
from dagster_taskiq.operations.target import LocalPoolState, PoolTarget, Target

# SQS publishes ApproximateAgeOfOldestMessage to CloudWatch once a minute, for active queues.
OLDEST_AGE_METRIC = "ApproximateAgeOfOldestMessage"
OLDEST_AGE_LOOKBACK = timedelta(minutes=15)
REJECTIONS_WINDOW_SECONDS = 3600
SOURCE_CLOUDWATCH = "cloudwatch"
SOURCE_LEDGER = "ledger"

ReadErrors = (
    LedgerUnavailable,
    QueueUnavailable,
    SQLAlchemyError,
    ClientError,
    BotoCoreError,
    OSError,
)


@dataclass
class QueueStatus:
    role: str  # "queue", "lane" (a priority lane) or "dlq"
    url: str
    visible: int | None = None
    delayed: int | None = None
    in_flight: int | None = None
    # How long the oldest message has waited, and where that came from: CloudWatch's
    # AWS/SQS metric, or the oldest ENQUEUED ledger row on this queue where CloudWatch has
    # no datapoint (the local emulator publishes no metrics).
    oldest_age_seconds: float | None = None
    oldest_age_source: str | None = None
    live_leases: int | None = None
    dlq_url: str | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def depth(self) -> int | None:
        if self.visible is None:
            return None
        return self.visible + (self.delayed or 0) + (self.in_flight or 0)


@dataclass
class WorkersStatus:
    source: str  # "ecs <cluster>/<service>" or "local pool <name>"
    desired: int | None = None
    running: int | None = None
    pending: int | None = None
    workers: list[str] = field(default_factory=list)  # local: the running processes
    events: list[str] = field(default_factory=list)  # ECS service events, newest first
    last_decision: ScalingDecisionView | None = None
    error: str | None = None


@dataclass
class PoolStatus:
    name: str
    queues: list[QueueStatus]
    workers: WorkersStatus


@dataclass
class StatusReport:
    target: str
    kind: str
    collected_at: str
    pools: list[PoolStatus]
    ledger: dict[str, int] = field(default_factory=dict)  # rows by state
    live_leases: int | None = None
    rejected_last_hour: list[RejectionCount] = field(default_factory=list)
    runs_in_flight: list[RunSteps] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def dlq_depth(self) -> int:
        return sum(q.depth or 0 for p in self.pools for q in p.queues if q.role == "dlq")


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def collect_status(target: Target, ledger: Ledger | None) -> StatusReport:
    report = StatusReport(
        target=target.description,
        kind=target.kind,
        collected_at=datetime.now(UTC).isoformat(timespec="seconds"),
        pools=[],
    )
    by_queue: dict[str | None, list[QueueLedgerRow]] = {}
    if ledger is None:
        report.errors.append("ledger: no database URL (set DAGSTER_TASKIQ_DATABASE_URL)")
    else:
        try:
            if ledger_tables_exist(ledger):
                for row in queue_summary(ledger):
                    by_queue.setdefault(row.queue_url, []).append(row)
                report.rejected_last_hour = rejections_since(ledger, REJECTIONS_WINDOW_SECONDS)
                report.runs_in_flight = runs_in_flight(ledger)
            else:
                report.errors.append("ledger: its tables do not exist yet (no step launched)")
            totals = dict.fromkeys([s.value for s in Status], 0)
            for rows in by_queue.values():
                for row in rows:
                    totals[row.status] = totals.get(row.status, 0) + row.rows
            report.ledger = totals
            report.live_leases = sum(r.live_leases for rows in by_queue.values() for r in rows)
        except ReadErrors as e:
            # Unreadable: no counts at all rather than zeros, which would read as an answer.
            report.errors.append(f"ledger: {_error(e)}")
            ledger = None  # the per-pool reads would only repeat the error
    local_states = {state.name: state for state in target.local_pools()}
    for pool in target.pools:
        queues = _pool_queues(target, pool, by_queue, have_ledger=ledger is not None)
        workers = _workers(target, pool, local_states, ledger)
        report.pools.append(PoolStatus(name=pool.name, queues=queues, workers=workers))
        report.errors.extend(f"{q.name}: {q.error}" for q in queues if q.error)
        if workers.error:
            report.errors.append(f"workers of {pool.name}: {workers.error}")
    return report


def _pool_queues(
    target: Target,
    pool: PoolTarget,
    by_queue: dict[str | None, list[QueueLedgerRow]],
    *,
    have_ledger: bool,
) -> list[QueueStatus]:
    queues: list[QueueStatus] = []
    dlqs: list[str] = []
    for index, url in enumerate(pool.queue_urls):
        status = QueueStatus(role="queue" if index == 0 else "lane", url=url)
        attributes = _read_depth(target, status)
        status.dlq_url = target.dead_letter_queue(url, attributes)
        if status.dlq_url and status.dlq_url not in dlqs:
            dlqs.append(status.dlq_url)
        rows = by_queue.get(url, [])
        if have_ledger:
            status.live_leases = sum(r.live_leases for r in rows)
        _oldest_age(target, status, rows, have_ledger=have_ledger)
        queues.append(status)
    for url in [*dlqs, *(d for d in pool.dlq_urls if d not in dlqs)]:
        status = QueueStatus(role="dlq", url=url)
        _read_depth(target, status)
        if target.kind == "aws":
            status.oldest_age_seconds = _cloudwatch_oldest_age(target, status.name)
            if status.oldest_age_seconds is not None:
                status.oldest_age_source = SOURCE_CLOUDWATCH
        queues.append(status)
    return queues


def _read_depth(target: Target, status: QueueStatus) -> dict[str, str]:
    try:
        attributes = SqsQueue(status.url, client=target.sqs).attributes()
    except QueueUnavailable as e:
        status.error = str(e)
        return {}
    status.visible = int(attributes.get("ApproximateNumberOfMessages", 0))
    status.delayed = int(attributes.get("ApproximateNumberOfMessagesDelayed", 0))
    status.in_flight = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
    return attributes


def _oldest_age(
    target: Target, status: QueueStatus, rows: list[QueueLedgerRow], *, have_ledger: bool
) -> None:
    if target.kind == "aws":
        age = _cloudwatch_oldest_age(target, status.name)
        if age is not None:
            status.oldest_age_seconds, status.oldest_age_source = age, SOURCE_CLOUDWATCH
            return
    if have_ledger:
        ages = [r.oldest_enqueued_seconds for r in rows if r.oldest_enqueued_seconds is not None]
        status.oldest_age_seconds = max(ages) if ages else None
        status.oldest_age_source = SOURCE_LEDGER


def _cloudwatch_oldest_age(target: Target, queue_name: str) -> float | None:
    """The latest datapoint of AWS/SQS ApproximateAgeOfOldestMessage, or None when
    CloudWatch has none (an idle queue) or cannot be read."""
    now = datetime.now(UTC)
    try:
        found = target.client("cloudwatch").get_metric_statistics(
            Namespace="AWS/SQS",
            MetricName=OLDEST_AGE_METRIC,
            Dimensions=[{"Name": "QueueName", "Value": queue_name}],
            StartTime=now - OLDEST_AGE_LOOKBACK,
            EndTime=now,
            Period=60,
            Statistics=["Maximum"],
        )
    except (ClientError, BotoCoreError):
        return None
    points: list[dict[str, Any]] = found.get("Datapoints", [])
    if not points:
        return None
    latest = max(points, key=lambda point: point["Timestamp"])
    return float(latest["Maximum"])


def _workers(
    target: Target,
    pool: PoolTarget,
    local_states: dict[str, LocalPoolState],
    ledger: Ledger | None,
) -> WorkersStatus:
    if target.kind == "local":
        state = local_states.get(pool.name)
        workers = WorkersStatus(source=f"local pool {pool.name}")
        if state is None:
            workers.desired, workers.running = 0, 0
            return workers
        workers.desired = state.desired
        workers.workers = [w.name for w in state.workers if w.running]
        workers.running = len(workers.workers)
        service = state.scaler_service
    else:
        if not (target.ecs_cluster and pool.ecs_service):
            return WorkersStatus(
                source="ecs",
                error="no ECS service named (set DAGSTER_TASKIQ_ECS_CLUSTER and "
                "DAGSTER_TASKIQ_ECS_SERVICE from the stack's outputs)",
            )
        workers = WorkersStatus(source=f"ecs {target.ecs_cluster}/{pool.ecs_service}")
        _describe_service(target, pool.ecs_service, workers)
        # The name the scaler Lambda records its decisions under (EcsWorkerService.name).
        service = f"{target.ecs_cluster}/{pool.ecs_service}"
    if service and ledger is not None:
        try:
            workers.last_decision = last_scaling_decision(ledger, service)
        except ReadErrors as e:
            workers.error = f"last scaling decision unreadable: {_error(e)}"
    return workers


def _describe_service(target: Target, service: str, workers: WorkersStatus) -> None:
    try:
        found = target.ecs.describe_services(cluster=target.ecs_cluster or "", services=[service])
    except (ClientError, BotoCoreError) as e:
        workers.error = f"describe_services failed: {_error(e)}"
        return
    services = found.get("services", [])
    if not services:
        failures = [f.get("reason", "") for f in found.get("failures", [])]
        workers.error = f"ECS service not found ({', '.join(failures) or 'no answer'})"
        return
    described = services[0]
    workers.desired = int(described.get("desiredCount", 0))
    workers.running = int(described.get("runningCount", 0))
    workers.pending = int(described.get("pendingCount", 0))
    workers.events = [
        f"{event['createdAt']:%Y-%m-%d %H:%M:%S} {event.get('message', '')}"
        if isinstance(event.get("createdAt"), datetime)
        else str(event.get("message", ""))
        for event in described.get("events", [])[:3]
    ]

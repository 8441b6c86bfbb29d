"""The scaler: read the signals, apply the scaling policy, set the worker count.

Dagster-free; the scaler Lambda and the local stack run the same ``Scaler``, only the
``WorkerService`` differs (an ECS service in AWS, a pool of local processes on a laptop).
The recent recommendations live in PostgreSQL next to the ledger, so the scale-in
stabilization window survives Lambda cold starts, and their timestamps come from the
database clock like everything else. An evaluation holds a lock in that database: a
scheduled and a triggered invocation may run at once (the trigger is never throttled by
the schedule), but their evaluations of one service never overlap.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa
from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.core.errors import (
    ConfigurationError,
    LedgerUnavailable,
    QueueUnavailable,
    WorkerServiceUnavailable,
)
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.observability import MetricUnit, emit_metric, module_logger
from dagster_taskiq.core.schema import SchemaStatus, require_usable
from dagster_taskiq.core.settings import (
    ENV_DATABASE_PASSWORD,
    ENV_DATABASE_SECRET_ARN,
    ENV_DATABASE_URL,
    ENV_DATABASE_USER,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_QUEUE_URL,
    ENV_REGION,
    database_url,
)
from dagster_taskiq.core.sqs import SqsQueue, sqs_queues
from dagster_taskiq.scaling.outlook import OutlookStore
from dagster_taskiq.scaling.policy import (
    Decision,
    QueueSignals,
    Recommendation,
    ScalingConfig,
    decide,
    expected_soon,
)

if TYPE_CHECKING:
    from mypy_boto3_ecs.client import ECSClient

log = module_logger(__name__)

history_metadata = sa.MetaData()
scaling_history = sa.Table(
    "dagster_taskiq_scaling_history",
    history_metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("service", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),  # database epoch seconds
    sa.Column("recommendation", sa.Integer),
    sa.Column("current", sa.Integer, nullable=False),
    sa.Column("desired", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Index("ix_dagster_taskiq_scaling_history_service_at", "service", "at"),
)

# Decisions older than this are deleted as new ones are written.
KEEP_HISTORY_SECONDS = 86_400
# The first key of the evaluation lock (pg_advisory_xact_lock(int, int)); the second is the
# service's name hashed by PostgreSQL. Seeded with the module's first-release name: two
# releases running side by side during a deploy must take the same lock.
EVALUATION_LOCK_CLASS = int.from_bytes(
    hashlib.sha256(b"dagster_taskiq.scaler").digest()[:4], "big", signed=True
)
# An evaluation takes well under a second; one that waited this long for another is dropped.
EVALUATION_LOCK_TIMEOUT_MS = 10_000
# How long the typical step duration read from the ledger is used before it is read again.
STEP_SECONDS_REFRESH = 300.0


class WorkerService(Protocol):
    """What the scaler sets: an ECS service, or the local worker pool."""

    name: str

    def desired_count(self) -> int: ...

    def set_desired_count(self, count: int) -> None: ...


class EcsWorkerService:
    """The Fargate worker service. The scaler owns desiredCount; the template sets none."""

    def __init__(self, client: ECSClient, *, cluster: str, service: str) -> None:
        self._client = client
        self._cluster = cluster
        self._service = service
        self.name = f"{cluster}/{service}"

    def _describe(self) -> dict[str, Any]:
        try:
            found = self._client.describe_services(cluster=self._cluster, services=[self._service])
        except (ClientError, BotoCoreError) as e:
            raise WorkerServiceUnavailable(f"describe_services on {self.name} failed: {e}") from e
        services = found.get("services", [])
        if not services:
            raise WorkerServiceUnavailable(f"ECS service {self.name} not found")
        return dict(services[0])

    def desired_count(self) -> int:
        return int(self._describe()["desiredCount"])

    def running_count(self) -> int:
        return int(self._describe()["runningCount"])

    def set_desired_count(self, count: int) -> None:
        try:
            self._client.update_service(
                cluster=self._cluster, service=self._service, desiredCount=count
            )
        except (ClientError, BotoCoreError) as e:
            raise WorkerServiceUnavailable(f"update_service on {self.name} failed: {e}") from e


class HistoryStore:
    """Recent recommendations per service, in the ledger's database."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    @contextlib.contextmanager
    def exclusive(self, service: str) -> Iterator[None]:
        """Hold ``service``'s evaluation lock until the block ends. Raises LedgerUnavailable
        when the database cannot be reached, and a DBAPIError when another evaluation held
        the lock for longer than EVALUATION_LOCK_TIMEOUT_MS."""
        with self._ledger.transaction() as conn:
            conn.execute(sa.text(f"SET LOCAL lock_timeout = {EVALUATION_LOCK_TIMEOUT_MS}"))
            conn.execute(
                sa.select(
                    sa.func.pg_advisory_xact_lock(
                        sa.literal(EVALUATION_LOCK_CLASS, sa.Integer), sa.func.hashtext(service)
                    )
                )
            )
            yield

    def load(self, service: str, window_seconds: float) -> tuple[float, list[Recommendation]]:
        """The database's now (epoch seconds) and the recommendations inside the window."""
        now_epoch = sa.func.extract("epoch", sa.func.now())
        with self._ledger.transaction() as conn:
            now = float(conn.execute(sa.select(now_epoch)).scalar_one())
            rows = conn.execute(
                sa.select(scaling_history.c.at, scaling_history.c.recommendation)
                .where(
                    scaling_history.c.service == service,
                    scaling_history.c.at >= now - window_seconds,
                    scaling_history.c.recommendation.is_not(None),
                )
                .order_by(scaling_history.c.at)
            ).all()
        return now, [Recommendation(at=r.at, workers=r.recommendation) for r in rows]

    def save(self, service: str, now: float, decision: Decision) -> None:
        with self._ledger.transaction() as conn:
            conn.execute(
                scaling_history.insert().values(
                    service=service,
                    at=now,
                    recommendation=decision.recommendation,
                    current=decision.current,
                    desired=decision.desired,
                    reason=decision.reason.value,
                    detail=decision.detail,
                )
            )
            conn.execute(
                sa.delete(scaling_history).where(
                    scaling_history.c.service == service,
                    scaling_history.c.at < now - KEEP_HISTORY_SECONDS,
                )
            )

    def decisions(self, service: str, limit: int = 1000) -> Sequence[sa.Row[Any]]:
        with self._ledger.transaction() as conn:
            return conn.execute(
                sa.select(scaling_history)
                .where(scaling_history.c.service == service)
                .order_by(scaling_history.c.id.desc())
                .limit(limit)
            ).all()


@dataclass(frozen=True)
class Evaluation:
    decision: Decision
    signals: QueueSignals
    applied: bool  # the service's count was changed


class Scaler:
    """Sizes one worker service from the queues it serves.

    A worker pool may read several queues (its step queue and a high-priority lane): the
    backlog is the sum of their depths, and the busy workers the live leases on any of them.
    """

    def __init__(
        self,
        *,
        queues: Sequence[SqsQueue],
        ledger: Ledger,
        service: WorkerService,
        config: ScalingConfig,
        history: HistoryStore | None = None,
        outlook: OutlookStore | None = None,
    ) -> None:
        urls = [queue.url for queue in queues]
        if not urls:
            raise ValueError("The scaler needs at least one queue")
        if len(set(urls)) != len(urls):
            raise ValueError(f"The scaler's queues must differ, got {urls}")
        self.queues = tuple(queues)
        self.ledger = ledger
        self.service = service
        self.config = config
        self.history = history or HistoryStore(ledger)
        self.outlook = outlook or OutlookStore(ledger)
        self._step_seconds: tuple[float, float | None] | None = None  # (read at, value)
        self._schema_current = False

    def ensure_schema(self) -> bool:
        """Whether the ledger is at this release's schema, so the scaler can read it.

        The scaler never changes the schema (its Lambda carries no migrations): the first
        worker or run of a release upgrades it, and a new deployment's first run creates
        it before it launches a step. Until then nothing is evaluated and the count holds.
        A schema newer than this release knows raises SchemaMismatch, loudly.
        """
        if not self._schema_current:
            state = self.ledger.schema_state()
            if state.status is SchemaStatus.NEWER:
                require_usable(state, component="scaler")
            self._schema_current = state.status is SchemaStatus.CURRENT
            if not self._schema_current:
                log.warning(
                    "The ledger has %s; the scaler holds the worker count until a worker "
                    "or a run of this release upgrades it (or `dagster-taskiq ledger "
                    "upgrade`).",
                    state.describe(),
                )
        return self._schema_current

    def step_seconds(self) -> float | None:
        """The typical step duration on the pool's queues, read again every few minutes."""
        now = time.monotonic()
        if self._step_seconds is None or now - self._step_seconds[0] >= STEP_SECONDS_REFRESH:
            urls = [queue.url for queue in self.queues]
            self._step_seconds = (now, self.outlook.mean_step_seconds(urls))
        return self._step_seconds[1]

    def read_signals(self) -> QueueSignals:
        """Each signal separately, summed over the queues: a signal that cannot be read on
        every queue is None, and the policy holds."""
        visible = delayed = in_flight = live = None
        try:
            depths = [queue.depth() for queue in self.queues]
            visible = sum(depth.visible for depth in depths)
            delayed = sum(depth.delayed for depth in depths)
            in_flight = sum(depth.in_flight for depth in depths)
        except QueueUnavailable as e:
            log.warning("Queue depth unreadable: %s", e)
        try:
            live = sum(self.ledger.live_leases(queue.url) for queue in self.queues)
        except LedgerUnavailable as e:
            log.warning("Live leases unreadable: %s", e)
        # Expected steps only bring workers earlier: unreadable, they count as none.
        expected, step_seconds = 0, None
        try:
            step_seconds = self.step_seconds()
            expected = expected_soon(
                self.outlook.expected([queue.url for queue in self.queues]),
                step_seconds=step_seconds,
                lead_seconds=self.config.scale_out_lead_seconds,
            )
        except LedgerUnavailable as e:
            log.warning("Expected steps unreadable; counting none: %s", e)
        return QueueSignals(
            visible=visible,
            delayed=delayed,
            in_flight=in_flight,
            live_leases=live,
            expected=expected,
            step_seconds=step_seconds,
        )

    def evaluate(self) -> Evaluation | None:
        """One evaluation, under the service's lock. None when the worker service itself
        cannot be read, the ledger's schema is not this release's yet, or another
        evaluation held the lock for too long."""
        try:
            if not self.ensure_schema():
                return None
        except LedgerUnavailable as e:
            log.warning("Ledger schema unreadable; evaluating all the same: %s", e)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.history.exclusive(self.service.name))
            except LedgerUnavailable as e:
                # The signals will say so too, and the policy then holds the count.
                log.warning("Evaluation lock unavailable; evaluating without it: %s", e)
            except sa.exc.DBAPIError as e:
                log.warning(
                    "Another evaluation of %s held it up; skipped: %s", self.service.name, e
                )
                return None
            return self._evaluate()

    def _evaluate(self) -> Evaluation | None:
        signals = self.read_signals()
        try:
            current = self.service.desired_count()
        except WorkerServiceUnavailable as e:
            log.error("Worker service unreadable; nothing decided: %s", e)
            emit_metric("ScalerErrors", 1, service=self.service.name)
            return None
        window = self.config.scale_in_stabilization_seconds
        try:
            now, history = self.history.load(self.service.name, window)
        except LedgerUnavailable as e:
            log.warning("Scaling history unreadable: %s", e)
            # Without history the window cannot be honoured: hold, whatever the signals say.
            signals = QueueSignals(None, None, None, None)
            now, history = 0.0, []
        decision = decide(signals, current=current, config=self.config, history=history, now=now)
        applied = False
        if decision.changed:
            try:
                self.service.set_desired_count(decision.desired)
                applied = True
            except WorkerServiceUnavailable as e:
                log.error("Could not apply the decision: %s", e)
                emit_metric("ScalerErrors", 1, service=self.service.name)
        if decision.recommendation is not None:
            try:
                self.history.save(self.service.name, now, decision)
            except LedgerUnavailable as e:
                log.warning("Could not record the decision: %s", e)
        self._emit(decision, signals)
        return Evaluation(decision=decision, signals=signals, applied=applied)

    def _emit(self, decision: Decision, signals: QueueSignals) -> None:
        service = self.service.name
        emit_metric("DesiredWorkers", decision.desired, service=service)
        if None not in (signals.visible, signals.delayed, signals.in_flight):
            backlog = (signals.visible or 0) + (signals.delayed or 0) + (signals.in_flight or 0)
            emit_metric("Backlog", backlog, service=service)
            emit_metric(
                "BacklogPerWorker",
                backlog / max(decision.desired, 1),
                MetricUnit.Count,
                service=service,
            )
        emit_metric("ScalingDecisions", 1, service=service, reason=decision.reason.value)
        emit_metric("ExpectedSteps", signals.expected, service=service)
        # 1 while the pool is held at its cap: on a big day the cap decides the waits.
        at_max = decision.desired >= self.config.max_workers
        emit_metric("AtMaxWorkers", 1 if at_max else 0, service=service)


TRIGGER_SOURCE = "dagster-taskiq.executor"


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, got {raw!r}") from None


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name)
    if not value:
        raise ConfigurationError(f"The scaler needs {name}")
    return value


def _queue_urls(raw: str) -> tuple[str, ...]:
    urls = tuple(part.strip() for part in raw.split(","))
    if not all(urls):
        raise ConfigurationError(
            f"{ENV_QUEUE_URL} must be one or more comma-separated queue URLs, got {raw!r}"
        )
    if len(set(urls)) != len(urls):
        raise ConfigurationError(f"{ENV_QUEUE_URL} names a queue twice: {raw!r}")
    return urls


@dataclass(frozen=True)
class ScalerSettings:
    """The scaler Lambda's configuration, from its environment.

    ``DAGSTER_TASKIQ_QUEUE_URL`` names the queues of one worker pool, comma-separated: its
    step queue first, then its high-priority lane if it has one.
    """

    queue_urls: tuple[str, ...]
    database_url: str
    cluster: str
    service: str
    config: ScalingConfig
    evaluations_per_invocation: int = 3
    # The queues' and the service's region (else the Lambda's own, AWS_REGION).
    region: str | None = None
    # What database_url needs to complete the URL's credentials: the password (or the
    # database secret's ARN) and user, as the environment names them. Read when built.
    credentials: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ScalerSettings:
        evaluations = _int(environ, "DAGSTER_TASKIQ_SCALER_EVALUATIONS", 3)
        target_wait = environ.get("DAGSTER_TASKIQ_TARGET_WAIT_SECONDS") or None
        if not 1 <= evaluations <= 12:
            raise ConfigurationError("DAGSTER_TASKIQ_SCALER_EVALUATIONS must be 1 to 12")
        try:
            config = ScalingConfig(
                min_workers=_int(environ, "DAGSTER_TASKIQ_MIN_WORKERS", 0),
                max_workers=_int(environ, "DAGSTER_TASKIQ_MAX_WORKERS", 10),
                target_backlog_per_worker=_int(environ, "DAGSTER_TASKIQ_TARGET_BACKLOG", 5),
                steps_per_worker=_int(environ, "DAGSTER_TASKIQ_STEPS_PER_WORKER", 1),
                scale_in_stabilization_seconds=_int(
                    environ, "DAGSTER_TASKIQ_SCALE_IN_STABILIZATION_SECONDS", 60
                ),
                target_wait_seconds=(
                    None
                    if target_wait is None
                    else _int(environ, "DAGSTER_TASKIQ_TARGET_WAIT_SECONDS", 0)
                ),
                scale_out_lead_seconds=_int(environ, "DAGSTER_TASKIQ_SCALE_OUT_LEAD_SECONDS", 60),
            )
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
        return cls(
            queue_urls=_queue_urls(_required(environ, ENV_QUEUE_URL)),
            # Its password, if not in it, is resolved when the scaler is built.
            database_url=_required(environ, ENV_DATABASE_URL),
            cluster=_required(environ, ENV_ECS_CLUSTER),
            service=_required(environ, ENV_ECS_SERVICE),
            config=config,
            evaluations_per_invocation=evaluations,
            region=environ.get(ENV_REGION) or None,
            credentials={
                name: environ[name]
                for name in (ENV_DATABASE_USER, ENV_DATABASE_PASSWORD, ENV_DATABASE_SECRET_ARN)
                if environ.get(name)
            },
        )


def build_scaler(settings: ScalerSettings, *, ecs_client: ECSClient | None = None) -> Scaler:
    import boto3

    url = database_url(settings.database_url, settings.credentials) or settings.database_url
    ledger = Ledger(url, pool_size=1)
    service = EcsWorkerService(
        ecs_client or boto3.client("ecs", region_name=settings.region),
        cluster=settings.cluster,
        service=settings.service,
    )
    scaler = Scaler(
        queues=sqs_queues(settings.queue_urls, region=settings.region),
        ledger=ledger,
        service=service,
        config=settings.config,
    )
    try:
        scaler.ensure_schema()  # a newer schema fails the cold start, loudly
    except LedgerUnavailable as e:
        log.warning("Ledger unreachable at start; each evaluation checks again: %s", e)
    return scaler

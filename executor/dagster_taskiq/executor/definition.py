"""``taskiq_executor``: Dagster's step-delegating executor with the SQS step handler."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagster import (
    DagsterError,
    DagsterEvent,
    Enum,
    EnumValue,
    Field,
    IntSource,
    Map,
    Noneable,
    Shape,
    StringSource,
    executor,
)
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.event_api import EventLogCursor
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.step_dependency_config import (
    StepDependencyConfig,
    get_step_dependency_config_field,
)
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.base import Executor
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating import StepDelegatingExecutor
from dagster._core.instance import DagsterInstance

from dagster_taskiq.core.errors import ConfigurationError, LedgerUnavailable, QueueUnavailable
from dagster_taskiq.core.health import DEFAULT_DEAD_LETTER_TIMEOUT
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.migrations import ensure_schema
from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.core.retry import retry_while_unreachable
from dagster_taskiq.core.routing import (
    DEFAULT_PRIORITY_THRESHOLD,
    DEFAULT_QUEUE,
    PRIORITY_TAG,
    QUEUE_TAG,
    RUN_PRIORITY_TAG,
    QueueRoute,
    Routing,
)
from dagster_taskiq.core.settings import (
    DEFAULT_IDEMPOTENCY_KEY_TTL,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RECEIVE_COUNT,
    DEFAULT_MESSAGE_RETENTION,
    DEFAULT_REGION,
    DEFAULT_VISIBILITY_TIMEOUT,
    ENV_DATABASE_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_ENDPOINT_URL,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_REGION,
    ENV_SCALER_FUNCTION,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    database_url,
    env_or,
    signing_key,
)
from dagster_taskiq.core.sqs import SqsQueue, sqs_client
from dagster_taskiq.executor.event_wait import (
    FALLBACK_POLL_SECONDS,
    SAFETY_READ_SECONDS,
    RunEventWaiter,
    listen_connector,
)
from dagster_taskiq.executor.expected_steps import RunOutlook
from dagster_taskiq.executor.instance_storage import instance_postgres_url
from dagster_taskiq.executor.step_handler import (
    DAGSTER_STORAGE_OUTAGES,
    LaunchSettings,
    SqsStepHandler,
)
from dagster_taskiq.patches import pooled_event_log, remember_run_stats_columns, require
from dagster_taskiq.scaling.outlook import OutlookStore
from dagster_taskiq.scaling.scaler import EcsWorkerService
from dagster_taskiq.scaling.trigger import ScaleOutTrigger

if TYPE_CHECKING:
    from dagster._core.execution.context.system import PlanOrchestrationContext
    from dagster._core.execution.plan.active import ActiveExecution
    from dagster._core.execution.plan.plan import ExecutionPlan
    from dagster._core.execution.plan.state import KnownExecutionState
    from dagster._core.execution.plan.step import ExecutionStep
    from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
    from mypy_boto3_sqs.client import SQSClient

log = module_logger(__name__)

ACTIVE_POLL_INTERVAL = 0.02  # seconds between event-log reads while events arrive
ACTIVE_POLL_WINDOW = 1.0  # ... that is, within this long of the last event read
# Listening for events, a pass of Dagster's loop (interrupts, health checks) at least
# this often; the event log is read only when a read is due (see ``event_wait``).
LOOP_TICK_SECONDS = 1.0

TASKIQ_EXECUTOR_CONFIG = {
    "queue_url": Field(
        StringSource,
        is_required=False,
        description=f"URL of the SQS queue steps are sent to. Default: ${ENV_QUEUE_URL}.",
    ),
    "priority_queue_url": Field(
        StringSource,
        is_required=False,
        description="The default queue's priority lane: steps whose priority reaches "
        f"`priority_threshold` are sent there. Default: ${ENV_PRIORITY_QUEUE_URL}; unset: none.",
    ),
    "queues": Field(
        Map(  # type: ignore[no-untyped-call]
            str,
            Shape(  # type: ignore[no-untyped-call]
                {
                    "url": Field(StringSource, description="URL of the SQS queue."),
                    "priority_url": Field(
                        StringSource,
                        is_required=False,
                        description="Its priority lane, if it has one.",
                    ),
                    "scaler_function": Field(
                        StringSource,
                        is_required=False,
                        description="The scaler Lambda of the worker pool on this queue.",
                    ),
                    "ecs_service": Field(
                        StringSource,
                        is_required=False,
                        description="The worker service on this queue (in `ecs_cluster`).",
                    ),
                }
            ),
            key_label_name="queue_name",
        ),
        default_value={},
        description=f"Named queues, for the `{QUEUE_TAG}` op or job tag. The queue named "
        f"`{DEFAULT_QUEUE}` is `queue_url` unless given here.",
    ),
    "priority_threshold": Field(
        int,
        default_value=DEFAULT_PRIORITY_THRESHOLD,
        description=f"A step whose priority (`{PRIORITY_TAG}` on the op plus "
        f"`{RUN_PRIORITY_TAG}` on the run; Dagster's `dagster/priority` where they are "
        "absent) is at least this goes to its queue's priority lane, if it has one.",
    ),
    "fifo_message_group": Field(
        Enum("FifoMessageGroup", [EnumValue("run"), EnumValue("step")]),
        default_value="run",
        description="On a FIFO queue (URL ending in .fifo), the message group: `run` delivers "
        "a run's steps in launch order and holds the rest of a run back while one is being "
        "received; `step` lets a run's steps run in parallel. Deduplication is by "
        "idempotency key either way.",
    ),
    "aws_region": Field(
        StringSource,
        is_required=False,
        description=f"AWS region of the queue. Default: ${ENV_REGION}, $AWS_REGION, "
        f"or {DEFAULT_REGION}.",
    ),
    "endpoint_url": Field(
        StringSource,
        is_required=False,
        description=f"SQS endpoint override, for an emulator. Default: ${ENV_ENDPOINT_URL}.",
    ),
    "database_url": Field(
        StringSource,
        is_required=False,
        description="PostgreSQL URL of the ledger. Default: "
        f"${ENV_DATABASE_URL}, else the database of the instance's dagster-postgres storage.",
    ),
    "visibility_timeout": Field(
        IntSource,
        default_value=DEFAULT_VISIBILITY_TIMEOUT,
        description="Lease of a worker on a step, in seconds. A step whose worker died is "
        "taken over by another worker after at most this long.",
    ),
    "message_retention": Field(
        IntSource,
        default_value=DEFAULT_MESSAGE_RETENTION,
        description="Expected message retention of the queue; checked at run start. A step "
        "that no worker holds fails once its message is this old: SQS has deleted it.",
    ),
    "max_receive_count": Field(
        IntSource,
        default_value=DEFAULT_MAX_RECEIVE_COUNT,
        description="Expected deliveries before the queue moves a message to its DLQ; "
        "checked at run start against the queue's redrive policy.",
    ),
    "idempotency_key_ttl": Field(
        IntSource,
        default_value=DEFAULT_IDEMPOTENCY_KEY_TTL,
        description="Seconds the ledger keeps a finished step's record.",
    ),
    "signing_key": Field(
        StringSource,
        is_required=False,
        description=f"HMAC key to sign messages with. Default: ${ENV_SIGNING_KEY}.",
    ),
    "signing_key_secret_arn": Field(
        StringSource,
        is_required=False,
        description="Secrets Manager secret holding the HMAC key (the stack's "
        "SigningKeySecretArn output), read once per process instead of `signing_key`. "
        f"Default: ${ENV_SIGNING_KEY_SECRET_ARN}.",
    ),
    "max_message_bytes": Field(
        IntSource,
        default_value=DEFAULT_MAX_MESSAGE_BYTES,
        description="Largest message to send; a larger step fails at launch.",
    ),
    "poll_interval": Field(
        float,
        default_value=0.1,
        description="Seconds between reads of the event log while no event arrives; "
        f"within {ACTIVE_POLL_WINDOW:g} s of the last event it is read every "
        f"{ACTIVE_POLL_INTERVAL:g} s. Each dependency level of a run waits up to this long.",
    ),
    "listen_for_events": Field(
        bool,
        default_value=True,
        description="With dagster-postgres storage, wait for the run's events on its "
        "notifications (LISTEN) and read the event log when one comes, at least every "
        f"{SAFETY_READ_SECONDS:g} s, and every {FALLBACK_POLL_SECONDS:g} s while the "
        "notifications cannot be trusted (a reconnect, a restart). False: read it every "
        "`poll_interval`.",
    ),
    "batch_launches": Field(
        bool,
        default_value=True,
        description="Send the steps Dagster makes ready together in batches: "
        "SendMessageBatch, one ledger insert and one event-log write for them all. A send "
        "that fails is recorded in the ledger and the step fails its next health check. "
        "False: each step is sent on its own as Dagster launches it.",
    ),
    "health_check_interval": Field(
        IntSource,
        default_value=10,
        description="Seconds between health checks of in-flight steps against the ledger.",
    ),
    "pickup_timeout": Field(
        Noneable(IntSource),
        default_value=None,
        description="Fail a step that no worker picked up within this many seconds (or "
        "took again this long after its worker stopped heartbeating).",
    ),
    "dead_letter_timeout": Field(
        IntSource,
        default_value=DEFAULT_DEAD_LETTER_TIMEOUT,
        description="Seconds the DLQ processor is given to mark a step whose message used "
        "its last delivery (after the lease expired and the next receive moved it to the "
        "DLQ). Past them the executor fails the step as presumed dead-lettered, saying to "
        "check the DLQ processor; the processor confirms it and alerts when it comes.",
    ),
    "unreachable_retry_seconds": Field(
        IntSource,
        default_value=60,
        description="How long the run start and each step launch keep retrying while SQS "
        "or the ledger is unreachable (a database restart, a network blip) before they "
        "fail. Re-sending a step is safe: a duplicate is suppressed.",
    ),
    "scaler_function": Field(
        StringSource,
        is_required=False,
        description="Name or ARN of the scaler Lambda to invoke when steps are queued and no "
        f"worker runs (scale from zero). Default: ${ENV_SCALER_FUNCTION}; unset = off.",
    ),
    "ecs_cluster": Field(
        StringSource,
        is_required=False,
        description=f"ECS cluster of the worker service. Default: ${ENV_ECS_CLUSTER}.",
    ),
    "ecs_service": Field(
        StringSource,
        is_required=False,
        description="Worker service: the scaler is invoked only when it runs no task. "
        f"Default: ${ENV_ECS_SERVICE}; unset = invoke without checking.",
    ),
    "scale_out_debounce": Field(
        IntSource,
        default_value=30,
        description="Seconds between two scaler invocations of one run; a check that found "
        "workers wanted does not count.",
    ),
    "retries": get_retries_config(),  # type: ignore[no-untyped-call]
    "max_concurrent": Field(
        IntSource,
        is_required=False,
        description="Most steps of one run in flight at once. Default: no limit.",
    ),
    "tag_concurrency_limits": get_tag_concurrency_limits_config(),  # type: ignore[no-untyped-call]
    "step_dependency_config": get_step_dependency_config_field(),  # type: ignore[no-untyped-call]
}


class TaskiqExecutor(StepDelegatingExecutor):
    """Dagster's step-delegating executor, riding out a database restart.

    The run worker reads the event log every ``poll_interval``; Dagster's loop fails the
    run on the first read that meets a dropped connection (a restart, a failover).
    Here a failed read is retried for ``unreachable_retry_seconds``: the cursor only moves
    on success, so no event is skipped.

    With an ``outlook``, each pass of the loop records the steps the run will launch next,
    for the scaler (see ``dagster_taskiq.executor.expected_steps``).

    With ``listen_for_events``, the run's events are waited for on dagster-postgres'
    notifications rather than polled (see ``dagster_taskiq.executor.event_wait``); with a step
    handler that batches, the launches of each pass are sent together.
    """

    def __init__(
        self,
        *args: Any,
        unreachable_retry_seconds: float,
        outlook: RunOutlook | None = None,
        listen_for_events: bool = False,
        **kwargs: Any,
    ) -> None:
        require("step_delegating_loop")  # see _sleep_seconds
        self._last_events_at = 0.0
        super().__init__(*args, **kwargs)
        self._unreachable_retry_seconds = unreachable_retry_seconds
        self._outlook = outlook
        self._active: ActiveExecution | None = None
        self._listen_for_events = listen_for_events
        self._waiter: RunEventWaiter | None = None
        self._known_state: KnownExecutionState | None = None  # of this pass (see below)

    # -- The one place this executor relies on the shape of Dagster's loop. --------------
    # StepDelegatingExecutor.execute runs passes of: read the run's events (``_pop_events``,
    # while steps are in flight), health checks, ``launch_step`` for each ready step, then
    # ``time.sleep(self._sleep_seconds)``. Reading ``_sleep_seconds`` is thus the one call
    # between a pass's launches and the next pass's read, and it is where this executor
    # (1) sends the launches the pass put aside, as a batch, (2) ends the pass's health
    # snapshot and (3) waits for the run's next event (a notification, or a read falling
    # due), after which the sleep is 0.
    # Overriding the loop instead would mean copying it. tests/unit/test_dagster_loop.py
    # fails if Dagster's loop changes this shape.
    @property
    def _sleep_seconds(self) -> float:
        self._known_state = None
        handler = self._step_handler
        if isinstance(handler, SqsStepHandler):
            handler.flush_launches()
            handler.pass_ended()
        waiter = self._waiter
        active = self._active
        if waiter is not None and active is not None and active.has_in_flight_steps:
            waiter.wait(LOOP_TICK_SECONDS)
            return 0.0
        # Polling, or nothing in flight (steps waiting on a retry delay or a concurrency
        # slot): no event to wait for. While events arrive (steps are finishing: the next
        # ones wait for the read) read every ACTIVE_POLL_INTERVAL; a run whose steps are
        # all busy for a while is read every ``poll_interval``.
        if time.monotonic() - self._last_events_at < ACTIVE_POLL_WINDOW:
            return min(self._idle_sleep_seconds, ACTIVE_POLL_INTERVAL)
        return self._idle_sleep_seconds

    @_sleep_seconds.setter
    def _sleep_seconds(self, seconds: float) -> None:
        self._idle_sleep_seconds = seconds

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[DagsterEvent]:
        # The run's reads and status changes no longer reflect the runs table each time
        # (kept on the instance: a yes stays true).
        remember_run_stats_columns(plan_context.instance.run_storage)
        # Read every 0.02 s, the event log would otherwise cost a new connection a read.
        if self._outlook is not None:
            self._outlook.start(plan_context.run_id, plan_context.dagster_run.tags)
        connect = listen_connector(plan_context.instance.event_log_storage)
        if self._listen_for_events and connect is not None:
            self._waiter = RunEventWaiter(connect, plan_context.run_id)
        try:
            with pooled_event_log(plan_context.instance):
                yield from super().execute(plan_context, execution_plan)
        finally:
            self._active = None
            if self._waiter is not None:
                self._waiter.close()
                self._waiter = None
            if isinstance(self._step_handler, SqsStepHandler):
                self._step_handler.close_launches()
            if self._outlook is not None:
                self._outlook.close()

    def _get_step_handler_context(
        self,
        plan_context: PlanOrchestrationContext,
        steps: Sequence[ExecutionStep],
        active_execution: ActiveExecution,
    ) -> StepHandlerContext:
        # Dagster's loop hands its ActiveExecution to this call only: kept for the outlook.
        self._active = active_execution
        # Dagster builds the run's known state afresh for every step it launches or checks,
        # checking each output the run has produced: with N steps in flight, N² (a health
        # round of a 10,000-step fan-out took minutes). It changes only where the loop
        # handles events and skips steps, after its read of events and before its health
        # checks and launches: one is built per pass, after the read.
        if self._known_state is None:
            self._known_state = active_execution.get_known_state()
        return super()._get_step_handler_context(
            plan_context, steps, _KnownStateOf(self._known_state)
        )

    def _pop_events(
        self, instance: DagsterInstance, run_id: str, seen_storage_ids: set[int]
    ) -> Sequence[DagsterEvent]:
        # What the loop does next (handle events, skip steps) may change the known state.
        self._known_state = None
        if self._outlook is not None and self._active is not None:
            self._outlook.observe(self._active)
        waiter = self._waiter
        if waiter is not None:
            if not waiter.read_due():
                return []  # no notification for the run, and no read due otherwise
            # An event notified at or below the last id read that no read returned
            # committed after a later one was read: read again from just before it.
            read_up_to = (
                EventLogCursor.parse(self._event_cursor).storage_id() if self._event_cursor else 0
            )
            late = [
                storage_id
                for storage_id in waiter.take_notified()
                if storage_id <= read_up_to and storage_id not in seen_storage_ids
            ]
            if late:
                self._event_cursor = EventLogCursor.from_storage_id(min(late) - 1).to_string()
        events = retry_while_unreachable(
            lambda: super(TaskiqExecutor, self)._pop_events(instance, run_id, seen_storage_ids),
            time.monotonic() + self._unreachable_retry_seconds,
            errors=DAGSTER_STORAGE_OUTAGES,
            what="The event log",
        )
        if events:
            self._last_events_at = time.monotonic()
            if waiter is not None:
                waiter.found_events()
        return events


class _KnownStateOf:
    """What Dagster's ``_get_step_handler_context`` asks of its ActiveExecution: the known
    state, here one already built."""

    def __init__(self, known_state: KnownExecutionState) -> None:
        self._known_state = known_state

    def get_known_state(self) -> KnownExecutionState:
        return self._known_state


class TaskiqExecutorConfigError(DagsterError):
    """A wrong or missing setting, raised at run start; Dagster fails the run with it."""


@dataclass(frozen=True)
class ExecutorSettings:
    routing: Routing
    region: str
    endpoint_url: str | None
    database_url: str
    launch: LaunchSettings
    message_retention: int
    max_receive_count: int
    ecs_cluster: str | None = None
    scale_out_debounce: int = 30

    @classmethod
    def resolve(
        cls, config: dict[str, Any], instance: DagsterInstance, *, read_signing_key: bool = True
    ) -> ExecutorSettings:
        """``read_signing_key=False`` leaves the key out (``doctor`` checks it on its own, so
        that an unreadable key does not hide the other settings)."""
        url = database_url(config.get("database_url"), os.environ)
        url = url or instance_postgres_url(instance)
        if not url:
            raise ConfigurationError(
                "taskiq_executor has no ledger database: set `database_url` in the executor "
                f"config or {ENV_DATABASE_URL}, or use dagster-postgres instance storage "
                "(the ledger then lives in the same database)."
            )
        region = env_or(config.get("aws_region"), ENV_REGION) or env_or(None, "AWS_REGION")
        return cls(
            routing=_routing(config),
            region=region or DEFAULT_REGION,
            endpoint_url=env_or(config.get("endpoint_url"), ENV_ENDPOINT_URL),
            database_url=url,
            launch=LaunchSettings(
                lease_seconds=config["visibility_timeout"],
                idempotency_key_ttl=config["idempotency_key_ttl"],
                max_message_bytes=config["max_message_bytes"],
                signing_key=signing_key(
                    env_or(config.get("signing_key"), ENV_SIGNING_KEY),
                    env_or(config.get("signing_key_secret_arn"), ENV_SIGNING_KEY_SECRET_ARN),
                )
                if read_signing_key
                else None,
                pickup_timeout=config.get("pickup_timeout"),
                retry_seconds=config["unreachable_retry_seconds"],
                max_receive_count=config["max_receive_count"],
                message_retention=config["message_retention"],
                dead_letter_timeout=config["dead_letter_timeout"],
            ),
            message_retention=config["message_retention"],
            max_receive_count=config["max_receive_count"],
            ecs_cluster=env_or(config.get("ecs_cluster"), ENV_ECS_CLUSTER),
            scale_out_debounce=config["scale_out_debounce"],
        )


def _routing(config: dict[str, Any]) -> Routing:
    """The named queues: ``queue_url`` (and its lane) is the one named ``default``."""
    named: dict[str, dict[str, Any]] = {k: dict(v) for k, v in config.get("queues", {}).items()}
    queue_url = env_or(config.get("queue_url"), ENV_QUEUE_URL)
    given = named.get(DEFAULT_QUEUE)
    if given is None:
        if not queue_url:
            raise ConfigurationError(
                "taskiq_executor has no queue URL: set `queue_url` in the executor config "
                f"(a string or {{env: VAR}}), the environment variable {ENV_QUEUE_URL}, or "
                f"a queue named `{DEFAULT_QUEUE}` under `queues`."
            )
        given = {
            "url": queue_url,
            "priority_url": env_or(config.get("priority_queue_url"), ENV_PRIORITY_QUEUE_URL),
        }
    elif config.get("queue_url") and config["queue_url"] != given["url"]:
        raise ConfigurationError(
            f"taskiq_executor has two default queues: `queue_url` ({config['queue_url']}) and "
            f"`queues.{DEFAULT_QUEUE}.url` ({given['url']}). Set one of them."
        )
    # The top-level scaler settings are the default queue's worker pool's.
    given["scaler_function"] = given.get("scaler_function") or env_or(
        config.get("scaler_function"), ENV_SCALER_FUNCTION
    )
    given["ecs_service"] = given.get("ecs_service") or env_or(
        config.get("ecs_service"), ENV_ECS_SERVICE
    )
    named[DEFAULT_QUEUE] = given
    routes = {}
    for name, entry in named.items():
        if not name.strip():
            raise ConfigurationError("taskiq_executor: a queue under `queues` has an empty name.")
        for field in ("url", "priority_url"):
            value = entry.get(field)
            if value is not None and not value.startswith(("https://", "http://")):
                raise ConfigurationError(
                    f"taskiq_executor: queue {name!r} has {field} {value!r}, which is not an "
                    "SQS queue URL (https://sqs.<region>.amazonaws.com/<account>/<name>)."
                )
        lane = entry.get("priority_url")
        if lane is not None and lane.endswith(".fifo") != entry["url"].endswith(".fifo"):
            raise ConfigurationError(
                f"taskiq_executor: queue {name!r} and its priority lane must both be FIFO "
                "queues or both standard queues."
            )
        routes[name] = QueueRoute(
            name=name,
            url=entry["url"],
            priority_url=lane,
            scaler_function=entry.get("scaler_function"),
            ecs_service=entry.get("ecs_service"),
        )
    return Routing(
        routes=routes,
        priority_threshold=config.get("priority_threshold", DEFAULT_PRIORITY_THRESHOLD),
        fifo_group=config.get("fifo_message_group", "run"),
    )


@functools.cache
def _shared_ledger(database_url: str) -> Ledger:
    # One connection pool per database for every run this process executes.
    return Ledger(database_url)


@functools.cache
def _shared_sqs_client(region: str, endpoint_url: str | None) -> SQSClient:
    return sqs_client(region=region, endpoint_url=endpoint_url)


def connect(settings: ExecutorSettings) -> tuple[dict[str, SqsQueue], Ledger]:
    """Reach the ledger and every queue now, so a wrong setting fails the run at start;
    an outage shorter than ``unreachable_retry_seconds`` is ridden out. Returns the
    queues by URL."""
    deadline = time.monotonic() + settings.launch.retry_seconds
    ledger = _shared_ledger(settings.database_url)
    try:
        retry_while_unreachable(lambda: ensure_schema(ledger, component="run worker"), deadline)
    except LedgerUnavailable as e:
        raise ConfigurationError(
            f"taskiq_executor cannot reach its ledger. {e}. Check `database_url` "
            f"(or {ENV_DATABASE_URL}) and that the database accepts connections."
        ) from e
    client = _shared_sqs_client(settings.region, settings.endpoint_url)
    queues: dict[str, SqsQueue] = {}
    for route in settings.routing.routes.values():
        for url in route.urls:
            if url in queues:
                continue
            queue = SqsQueue(url, client=client)
            try:
                attributes = retry_while_unreachable(queue.attributes, deadline)
            except QueueUnavailable as e:
                where = "`queue_url`" if route.name == DEFAULT_QUEUE else f"`queues.{route.name}`"
                raise ConfigurationError(
                    f"taskiq_executor cannot reach its queue {route.name!r}: {e}. Check {where}, "
                    "`aws_region` and `endpoint_url`, and that this process may call "
                    "sqs:GetQueueAttributes on it."
                ) from e
            _warn_on_queue_mismatch(settings, url, attributes)
            queues[url] = queue
    return queues, ledger


def scale_out_triggers(settings: ExecutorSettings) -> dict[str, ScaleOutTrigger]:
    """The scale-from-zero trigger of each queue (and lane) whose pool names a scaler."""
    triggers: dict[str, ScaleOutTrigger] = {}
    by_function: dict[tuple[str, str | None], ScaleOutTrigger] = {}
    for route in settings.routing.routes.values():
        if not route.scaler_function:
            continue
        key = (route.scaler_function, route.ecs_service)
        if key not in by_function:
            by_function[key] = _trigger(settings, route.scaler_function, route.ecs_service)
        for url in route.urls:
            triggers[url] = by_function[key]
    return triggers


def _trigger(settings: ExecutorSettings, function: str, ecs_service: str | None) -> ScaleOutTrigger:
    import boto3

    service = None
    if settings.ecs_cluster and ecs_service:
        ecs = boto3.client("ecs", region_name=settings.region)
        service = EcsWorkerService(ecs, cluster=settings.ecs_cluster, service=ecs_service)
    return ScaleOutTrigger(
        function_name=function,
        lambda_client=boto3.client("lambda", region_name=settings.region),
        service=service,
        debounce_seconds=settings.scale_out_debounce,
    )


@dataclass(frozen=True)
class QueueMismatch:
    """A way a queue differs from what the executor config expects of it."""

    detail: str
    fix: str


def queue_mismatches(
    settings: ExecutorSettings, url: str, attributes: dict[str, str]
) -> list[QueueMismatch]:
    """What the run start warns about, and ``dagster-taskiq doctor`` fails on."""
    found = []
    if "RedrivePolicy" not in attributes:
        found.append(
            QueueMismatch(
                f"Queue {url} has no dead-letter queue: a step that keeps killing its worker "
                "will be redelivered until the message expires.",
                "Give the queue a redrive policy to a DLQ with maxReceiveCount = the executor's "
                "max_receive_count (the CDK stack does).",
            )
        )
    else:
        deployed = SqsQueue.parse_max_receive_count(attributes["RedrivePolicy"])
        if deployed != settings.max_receive_count:
            found.append(
                QueueMismatch(
                    f"Queue {url} moves messages to its DLQ after {deployed} deliveries; the "
                    f"executor config says max_receive_count={settings.max_receive_count}.",
                    f"Set max_receive_count: {deployed} in the executor config: the health "
                    "check presumes a step dead-lettered once it has used that many "
                    "deliveries.",
                )
            )
    retention = int(attributes.get("MessageRetentionPeriod", settings.message_retention))
    if retention != settings.message_retention:
        found.append(
            QueueMismatch(
                f"Queue {url} keeps messages {retention} s; the executor config says "
                f"message_retention={settings.message_retention}.",
                f"Set message_retention: {retention} in the executor config (the stack's "
                "MessageRetentionSeconds output).",
            )
        )
    return found


def _warn_on_queue_mismatch(
    settings: ExecutorSettings, url: str, attributes: dict[str, str]
) -> None:
    for mismatch in queue_mismatches(settings, url, attributes):
        log.warning("%s %s", mismatch.detail, mismatch.fix)


@executor(
    name="taskiq",
    config_schema=TASKIQ_EXECUTOR_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def taskiq_executor(init_context: InitExecutorContext) -> Executor:
    """Runs each step on a pool of warm workers fed by an SQS queue.

    Completion of each step attempt is recorded exactly once in a PostgreSQL ledger, and a
    duplicate delivery never starts a second concurrent execution. Workers run
    ``dagster-taskiq worker`` with the same Dagster instance storage as the run.

    .. code-block:: python

        @job(executor_def=taskiq_executor.configured({"queue_url": {"env": "QUEUE_URL"}}))
        def my_job(): ...
    """
    config: dict[str, Any] = dict(init_context.executor_config)
    try:
        settings = ExecutorSettings.resolve(config, init_context.instance)
        queues, ledger = connect(settings)
    except ConfigurationError as e:
        raise TaskiqExecutorConfigError(str(e)) from e
    return TaskiqExecutor(
        SqsStepHandler(
            queues=queues,
            routing=settings.routing,
            ledger=ledger,
            settings=settings.launch,
            triggers=scale_out_triggers(settings),
            batching=config["batch_launches"],
        ),
        retries=RetryMode.from_config(config["retries"]),
        sleep_seconds=float(config["poll_interval"]),
        check_step_health_interval_seconds=int(config["health_check_interval"]),
        max_concurrent=config.get("max_concurrent"),
        tag_concurrency_limits=config.get("tag_concurrency_limits"),
        # Workers handle redelivery of a started attempt themselves (see worker/execution.py);
        # Dagster's verify_step would fail such a run as "unknown state".
        should_verify_step=False,
        step_dependency_config=StepDependencyConfig.from_config(
            config.get("step_dependency_config")
        ),
        unreachable_retry_seconds=settings.launch.retry_seconds,
        listen_for_events=config["listen_for_events"],
        outlook=RunOutlook(
            OutlookStore(ledger), settings.routing, max_concurrent=config.get("max_concurrent")
        ),
    )

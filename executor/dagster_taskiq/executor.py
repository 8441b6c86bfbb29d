"""``taskiq_executor``: Dagster's step-delegating executor with the SQS step handler."""

from __future__ import annotations

import functools
import logging
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

from dagster_taskiq.instance_storage import pooled_event_log, remember_run_stats_columns
from dagster_taskiq.ledger import Ledger, LedgerUnavailable
from dagster_taskiq.queue import QueueUnavailable, SqsQueue, sqs_client
from dagster_taskiq.routing import (
    DEFAULT_PRIORITY_THRESHOLD,
    DEFAULT_QUEUE,
    PRIORITY_TAG,
    QUEUE_TAG,
    RUN_PRIORITY_TAG,
    QueueRoute,
    Routing,
)
from dagster_taskiq.scale_trigger import ScaleOutTrigger
from dagster_taskiq.scaler import EcsWorkerService
from dagster_taskiq.settings import (
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
    ConfigurationError,
    database_url,
    env_or,
)
from dagster_taskiq.step_handler import (
    DAGSTER_STORAGE_OUTAGES,
    LaunchSettings,
    SqsStepHandler,
    retry_while_unreachable,
)

if TYPE_CHECKING:
    from dagster._core.execution.context.system import PlanOrchestrationContext
    from dagster._core.execution.plan.plan import ExecutionPlan
    from mypy_boto3_sqs.client import SQSClient

log = logging.getLogger("dagster_taskiq")

ACTIVE_POLL_INTERVAL = 0.02  # seconds between event-log reads while events arrive
ACTIVE_POLL_WINDOW = 1.0  # ... that is, within this long of the last event read

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
        description="Expected message retention of the queue; checked at run start.",
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
    "health_check_interval": Field(
        IntSource,
        default_value=10,
        description="Seconds between health checks of in-flight steps against the ledger.",
    ),
    "pickup_timeout": Field(
        Noneable(IntSource),
        default_value=None,
        description="Fail a step that no worker picked up within this many seconds.",
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
        description="Seconds between two scale-out checks of one run.",
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
    """

    def __init__(self, *args: Any, unreachable_retry_seconds: float, **kwargs: Any) -> None:
        self._last_events_at = 0.0
        super().__init__(*args, **kwargs)
        self._unreachable_retry_seconds = unreachable_retry_seconds

    # Dagster's loop sleeps ``_sleep_seconds`` between reads. While events arrive (steps
    # are finishing: the next ones wait for the read) it reads every ACTIVE_POLL_INTERVAL;
    # a run whose steps are all busy for a while is read every ``poll_interval``.
    @property
    def _sleep_seconds(self) -> float:
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
        with pooled_event_log(plan_context.instance):
            yield from super().execute(plan_context, execution_plan)

    def _pop_events(
        self, instance: DagsterInstance, run_id: str, seen_storage_ids: set[int]
    ) -> Sequence[DagsterEvent]:
        events = retry_while_unreachable(
            lambda: super(TaskiqExecutor, self)._pop_events(instance, run_id, seen_storage_ids),
            time.monotonic() + self._unreachable_retry_seconds,
            errors=DAGSTER_STORAGE_OUTAGES,
            what="The event log",
        )
        if events:
            self._last_events_at = time.monotonic()
        return events


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
    def resolve(cls, config: dict[str, Any], instance: DagsterInstance) -> ExecutorSettings:
        url = database_url(config.get("database_url"), os.environ)
        url = url or _instance_postgres_url(instance)
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
                signing_key=env_or(config.get("signing_key"), ENV_SIGNING_KEY),
                pickup_timeout=config.get("pickup_timeout"),
                retry_seconds=config["unreachable_retry_seconds"],
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


def _instance_postgres_url(instance: DagsterInstance) -> str | None:
    url = getattr(instance.run_storage, "postgres_url", None)
    return url if isinstance(url, str) else None


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
        retry_while_unreachable(ledger.ensure_schema, deadline)
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


def _warn_on_queue_mismatch(
    settings: ExecutorSettings, url: str, attributes: dict[str, str]
) -> None:
    if "RedrivePolicy" not in attributes:
        log.warning(
            "Queue %s has no dead-letter queue: a step that keeps killing its worker will be "
            "redelivered until the message expires.",
            url,
        )
    else:
        deployed = SqsQueue.parse_max_receive_count(attributes["RedrivePolicy"])
        if deployed != settings.max_receive_count:
            log.warning(
                "Queue %s moves messages to its DLQ after %s deliveries; the executor "
                "config says max_receive_count=%s.",
                url,
                deployed,
                settings.max_receive_count,
            )
    retention = int(attributes.get("MessageRetentionPeriod", settings.message_retention))
    if retention != settings.message_retention:
        log.warning(
            "Queue %s keeps messages %s s; the executor config says message_retention=%s.",
            url,
            retention,
            settings.message_retention,
        )


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
    )

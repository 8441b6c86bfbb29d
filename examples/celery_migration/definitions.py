"""Two jobs migrated from dagster-celery to dagster-taskiq.

The "before" form, with ``celery_executor`` and ``dagster-celery/*`` tags, is in
docs/migrating-from-celery.md. What changed:

- the broker and its queue names became SQS queue URLs, one per queue name, under
  ``queues``; celery's default queue (``dagster``) is ``queue_url``;
- celery's 0-10 priorities became two lanes: a step whose priority (op plus run) is at
  least ``priority_threshold`` goes to its queue's priority lane;
- ``dagster-taskiq/queue`` may also be a job tag, for every step of the job's runs.

Every value that differs per deployment comes from the environment, so this module
imports without AWS. Workers run it with, for example::

    dagster-taskiq worker --queue-url "$REPORTS_QUEUE_URL" \\
        --priority-queue-url "$REPORTS_PRIORITY_QUEUE_URL" \\
        --code-location examples.celery_migration.definitions --concurrency 2

Step outputs travel through the IO manager, as they did with celery: in production use
one every worker reaches (S3, for example); Dagster's default filesystem IO manager only
works when the run and the workers share a disk, as on the local stack.
"""

from typing import Any

from dagster import Definitions, OpExecutionContext, job, op

from dagster_taskiq import current_attempt, taskiq_executor

# Tag names, as the executor reads them.
QUEUE_TAG = "dagster-taskiq/queue"
PRIORITY_TAG = "dagster-taskiq/priority"
RUN_PRIORITY_TAG = "dagster-taskiq/run_priority"

EXECUTOR_CONFIG: dict[str, Any] = {
    # The queue named `default` (celery's `dagster` queue) and its priority lane.
    "queue_url": {"env": "DAGSTER_TASKIQ_QUEUE_URL"},
    "priority_queue_url": {"env": "DAGSTER_TASKIQ_PRIORITY_QUEUE_URL"},
    # The default queue's worker pool: scaled from zero by this Lambda.
    "scaler_function": {"env": "DAGSTER_TASKIQ_SCALER_FUNCTION"},
    "ecs_cluster": {"env": "DAGSTER_TASKIQ_ECS_CLUSTER"},
    "ecs_service": {"env": "DAGSTER_TASKIQ_ECS_SERVICE"},
    # Celery's other queue names, each an SQS queue with its own worker pool.
    "queues": {
        "heavy": {
            "url": {"env": "HEAVY_QUEUE_URL"},
            "scaler_function": {"env": "HEAVY_SCALER_FUNCTION"},
            "ecs_service": {"env": "HEAVY_ECS_SERVICE"},
        },
        "reports": {
            "url": {"env": "REPORTS_QUEUE_URL"},
            "priority_url": {"env": "REPORTS_PRIORITY_QUEUE_URL"},
            "scaler_function": {"env": "REPORTS_SCALER_FUNCTION"},
            "ecs_service": {"env": "REPORTS_ECS_SERVICE"},
        },
    },
    # Effective priority (op + run) of 1 or more: the queue's priority lane.
    "priority_threshold": 1,
    # Celery's `retries` block, unchanged.
    "retries": {"enabled": {}},
    # No counterpart in dagster-celery: at most this many steps of one run in flight.
    "max_concurrent": 8,
}

taskiq = taskiq_executor.configured(EXECUTOR_CONFIG)


@op
def extract_orders() -> list[dict[str, int]]:
    """The default queue (celery: queue `dagster`, priority 5)."""
    return [{"order_id": n, "amount_cents": 1250 * n} for n in range(1, 6)]


@op(tags={QUEUE_TAG: "heavy"})
def train_forecast(orders: list[dict[str, int]]) -> float:
    """The big workers (celery: `dagster-celery/queue: heavy`)."""
    return sum(o["amount_cents"] for o in orders) / len(orders) / 100


# celery: `dagster-celery/priority: "8"`, three above celery's default of 5; here the
# default is 0, so 3 reaches the threshold of 1: the `reports` queue's priority lane.
@op(tags={QUEUE_TAG: "reports", PRIORITY_TAG: "3"})
def publish_dashboard(context: OpExecutionContext, forecast: float) -> None:
    context.log.info(f"Forecast: {forecast:.2f} per order")


@op(tags={QUEUE_TAG: "reports"})
def close_books(context: OpExecutionContext, orders: list[dict[str, int]]) -> str:
    """A side effect outside Dagster: idempotent through the attempt's key and fence.

    Execution is at-least-once: if a worker dies mid-step, the step runs again on another
    worker. A store that keeps the highest fencing token per key ignores the older write.
    """
    attempt = current_attempt()  # None outside a taskiq worker (in tests, in-process runs)
    key = attempt.idempotency_key if attempt else context.run_id
    fence = attempt.fencing_token if attempt else 0
    total = sum(o["amount_cents"] for o in orders)
    context.log.info(f"Closing books: {total} cents (key {key}, fencing token {fence})")
    return key


@job(executor_def=taskiq)
def nightly_orders() -> None:
    publish_dashboard(train_forecast(extract_orders()))


# celery: `dagster-celery/run_priority: "2"`. Here run priority 2 plus step priority 0
# reaches the threshold, so every step of these runs goes to its queue's priority lane.
@job(executor_def=taskiq, tags={RUN_PRIORITY_TAG: "2"})
def month_end_close() -> None:
    close_books(extract_orders())


defs = Definitions(jobs=[nightly_orders, month_end_close])

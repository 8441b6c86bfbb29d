"""The scaler Lambda: every minute (and when the executor asks), size the worker service.

One function per worker pool: it reads the pool's queues (``DAGSTER_TASKIQ_QUEUE_URL``,
comma-separated: the step queue, then the high-priority lane) and sets the pool's service.

A thin shell: configuration from the environment, then ``Scaler.evaluate`` (plain,
tested logic in ``dagster_taskiq.scaling.scaler``). A scheduled invocation evaluates several
times inside its minute so the reaction time is below the schedule's; an invocation
from the executor (steps launched, no worker wanted) evaluates once, at once. The
function's reserved concurrency leaves room for it beside a scheduled invocation, and the
scaler's lock in the database keeps their evaluations from overlapping.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from aws_lambda_powertools import Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from dagster_taskiq.core.observability import METRICS_NAMESPACE, get_logger
from dagster_taskiq.scaling.scaler import TRIGGER_SOURCE, Scaler, ScalerSettings, build_scaler

logger = get_logger("dagster-taskiq-scaler")
tracer = Tracer(service="dagster-taskiq-scaler")
metrics = Metrics(namespace=METRICS_NAMESPACE, service="dagster-taskiq-scaler")

# Stop evaluating when less than this is left of the invocation's time.
SAFETY_SECONDS = 5.0


@functools.cache
def _scaler() -> tuple[Scaler, ScalerSettings]:
    settings = ScalerSettings.from_env(os.environ)
    return build_scaler(settings), settings


@metrics.log_metrics
@tracer.capture_lambda_handler
@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    scaler, settings = _scaler()
    triggered = isinstance(event, dict) and event.get("source") == TRIGGER_SOURCE
    evaluations = 1 if triggered else settings.evaluations_per_invocation
    spacing = 60.0 / evaluations
    metrics.add_metric(name="ScalerInvocations", unit=MetricUnit.Count, value=1)
    decisions = []
    for index in range(evaluations):
        started = time.monotonic()
        evaluation = scaler.evaluate()
        if evaluation is not None:
            decision = evaluation.decision
            logger.info(
                decision.detail,
                extra={
                    "reason": decision.reason.value,
                    "current": decision.current,
                    "desired": decision.desired,
                    "applied": evaluation.applied,
                    "triggered": triggered,
                },
            )
            decisions.append({"desired": decision.desired, "reason": decision.reason.value})
        if index + 1 == evaluations:
            break
        pause = spacing - (time.monotonic() - started)
        if context.get_remaining_time_in_millis() / 1000 - pause < SAFETY_SECONDS:
            break
        time.sleep(max(0.0, pause))
    return {"decisions": decisions}

"""Logs and CloudWatch EMF metrics, the same in workers and Lambdas.

Dagster-free. Two kinds of logger, both at ``DAGSTER_TASKIQ_LOG_LEVEL``:

- ``get_logger(service)``: structured JSON lines (powertools) to stdout, where the ECS
  awslogs driver and Lambda pick them up, in the processes this package owns (the worker's
  supervisor, the Lambdas);
- ``module_logger(__name__)``: a standard ``logging`` logger under ``dagster_taskiq``, in
  processes that are someone else's (a run worker is Dagster's, the CLI the operator's),
  whose handlers and format are theirs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aws_lambda_powertools import Logger, single_metric
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled

METRICS_NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "DagsterTaskiq")

ENV_LOG_LEVEL = "DAGSTER_TASKIQ_LOG_LEVEL"
PACKAGE_LOGGER = "dagster_taskiq"

__all__ = [
    "ENV_LOG_LEVEL",
    "METRICS_NAMESPACE",
    "MetricUnit",
    "emit_metric",
    "get_logger",
    "log_level",
    "module_logger",
]


def log_level(default: str = "INFO") -> str:
    """``DAGSTER_TASKIQ_LOG_LEVEL`` as a level name; ``default`` when unset or not a level
    (a typo must not stop a worker from starting, nor silence it)."""
    value = os.environ.get(ENV_LOG_LEVEL, "").strip().upper()
    return value if value in logging.getLevelNamesMapping() else default


def get_logger(service: str, **keys: Any) -> Logger:
    """Structured JSON logs of a service this package runs (the worker, a Lambda)."""
    logger = Logger(service=service, level=log_level())
    if keys:
        logger.append_keys(**keys)
    return logger


def module_logger(name: str) -> logging.Logger:
    """A module's logger, under ``dagster_taskiq``. The level of ``dagster_taskiq`` is set
    from ``DAGSTER_TASKIQ_LOG_LEVEL`` when it is set; else the host process's logging
    configuration decides."""
    if os.environ.get(ENV_LOG_LEVEL):
        logging.getLogger(PACKAGE_LOGGER).setLevel(log_level())
    return logging.getLogger(name)


def emit_metric(
    name: str, value: float, unit: MetricUnit = MetricUnit.Count, **dimensions: str
) -> None:
    """One EMF metric line. Never raises: a metric must not break a step.

    Honours POWERTOOLS_METRICS_DISABLED, which powertools' ``single_metric`` ignores.
    """
    if is_metrics_disabled():
        return
    try:
        with single_metric(
            name=name, unit=unit, value=value, namespace=METRICS_NAMESPACE
        ) as metric:
            for key, dim in dimensions.items():
                metric.add_dimension(name=key, value=dim)
    except Exception:
        pass

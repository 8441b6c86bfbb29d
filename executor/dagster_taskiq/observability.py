"""Structured JSON logs and CloudWatch EMF metrics, the same in workers and Lambdas.

Dagster-free. Logs and metrics go to stdout, where the ECS awslogs driver and Lambda
pick them up.
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, single_metric
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled

METRICS_NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "DagsterTaskiq")

__all__ = ["METRICS_NAMESPACE", "MetricUnit", "emit_metric", "get_logger"]


def get_logger(service: str, **keys: Any) -> Logger:
    logger = Logger(service=service, level=os.environ.get("DAGSTER_TASKIQ_LOG_LEVEL", "INFO"))
    if keys:
        logger.append_keys(**keys)
    return logger


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

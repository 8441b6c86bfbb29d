"""dagster-taskiq: a Dagster executor on warm ECS Fargate workers fed by SQS.

``from dagster_taskiq import taskiq_executor`` is the public entry point. It is loaded
lazily so that the dagster-free modules (``core``: ``messages``, ``ledger``, ``sqs``,
``settings``), which the Lambdas import, do not pull in dagster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dagster_taskiq.executor.definition import taskiq_executor
    from dagster_taskiq.worker.attempt_context import StepAttempt, current_attempt

__all__ = ["StepAttempt", "__version__", "current_attempt", "taskiq_executor"]


def __getattr__(name: str) -> Any:
    if name == "taskiq_executor":
        from dagster_taskiq.executor.definition import taskiq_executor

        return taskiq_executor
    if name in ("current_attempt", "StepAttempt"):
        from dagster_taskiq.worker import attempt_context

        return getattr(attempt_context, name)
    raise AttributeError(f"module 'dagster_taskiq' has no attribute {name!r}")

"""The canary job of ``dagster-taskiq doctor``: one step that does nothing but report where
it ran, sent through the real queue, worker and ledger.

Shipped in the package so that every worker has its code, and accepted by every worker
whatever its code locations (see ``worker/origins.py``). The doctor configures its
executor like the user's, through the run config.
"""

# No `from __future__ import annotations`: Dagster reads the op's context annotation.
from dagster import OpExecutionContext, job, op

from dagster_taskiq.executor.definition import taskiq_executor
from dagster_taskiq.worker.attempt_context import current_attempt

CANARY_JOB = "dagster_taskiq_canary"
CANARY_STEP = "canary"
# On the canary's runs, so that they can be told apart from the user's in the Dagster UI.
CANARY_TAG = "dagster-taskiq/canary"


@op(name=CANARY_STEP)
def canary(context: OpExecutionContext) -> None:
    attempt = current_attempt()
    worker = attempt.worker_id if attempt is not None else "no taskiq worker"
    context.log.info(f"Canary step ran on {worker}.")


@job(name=CANARY_JOB, executor_def=taskiq_executor, tags={CANARY_TAG: "true"})
def canary_job() -> None:
    canary()

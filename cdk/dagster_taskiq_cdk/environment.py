"""Environment variable names the deployed code reads, beyond ``dagster_taskiq.core.settings``."""

from __future__ import annotations

from dagster_taskiq.core.settings import ENV_DATABASE_SECRET_ARN

# The worker image's dagster.yaml reads these for dagster-postgres.
PG_HOST = "DAGSTER_PG_HOST"
PG_PORT = "DAGSTER_PG_PORT"
PG_DB = "DAGSTER_PG_DB"
PG_USER = "DAGSTER_PG_USER"
PG_PASSWORD = "DAGSTER_PG_PASSWORD"

# dagster_taskiq.scaling.scaler.ScalerSettings.from_env reads these.
MIN_WORKERS = "DAGSTER_TASKIQ_MIN_WORKERS"
MAX_WORKERS = "DAGSTER_TASKIQ_MAX_WORKERS"
TARGET_BACKLOG = "DAGSTER_TASKIQ_TARGET_BACKLOG"
STEPS_PER_WORKER = "DAGSTER_TASKIQ_STEPS_PER_WORKER"
SCALE_IN_STABILIZATION = "DAGSTER_TASKIQ_SCALE_IN_STABILIZATION_SECONDS"
SCALE_OUT_LEAD = "DAGSTER_TASKIQ_SCALE_OUT_LEAD_SECONDS"
TARGET_WAIT = "DAGSTER_TASKIQ_TARGET_WAIT_SECONDS"

# The Lambdas' ledger URL carries no password (an environment variable is visible to anyone
# who can read the function's configuration); the password is in this Secrets Manager secret.
DATABASE_PASSWORD_SECRET_ARN = ENV_DATABASE_SECRET_ARN

# aws-lambda-powertools: the CloudWatch namespace of every metric, and the "service" dimension
# of metrics emitted without one (the workers' and the DLQ processor's step metrics).
METRICS_NAMESPACE = "POWERTOOLS_METRICS_NAMESPACE"
METRICS_SERVICE = "POWERTOOLS_SERVICE_NAME"

# The namespace the code uses by default; set explicitly so the dashboard and the code agree.
METRICS_NAMESPACE_VALUE = "DagsterTaskiq"

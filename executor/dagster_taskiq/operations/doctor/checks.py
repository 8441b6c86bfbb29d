"""One function per wire of a deployment, each returning a ``CheckResult``: what was found,
and for a failure what to change. None raises: a check that cannot run says why.

Each compares what this process would give the executor (its config, the environment)
with what is deployed, through the same code the executor, the ledger and the scaler use.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
import sqlalchemy as sa
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.exc import SQLAlchemyError

from dagster_taskiq.core.errors import (
    ConfigurationError,
    LedgerUnavailable,
    QueueUnavailable,
    SchemaMismatch,
    WorkerServiceUnavailable,
)
from dagster_taskiq.core.ledger import Ledger, pg8000_connect_args
from dagster_taskiq.core.routing import DEFAULT_QUEUE, QueueRoute
from dagster_taskiq.core.schema import SchemaStatus
from dagster_taskiq.core.settings import (
    ENV_DATABASE_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_SCALER_FUNCTION,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    env_or,
    ledger_url,
    redact_url,
    signing_key,
)
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.executor.definition import (
    TASKIQ_EXECUTOR_CONFIG,
    ExecutorSettings,
    QueueMismatch,
    queue_mismatches,
)
from dagster_taskiq.scaling.scaler import EcsWorkerService

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from mypy_boto3_ecs.client import ECSClient
    from mypy_boto3_lambda.client import LambdaClient
    from mypy_boto3_sqs.client import SQSClient

    from dagster_taskiq.operations.target import Target

# A check must answer within seconds, not sit in a retry loop.
_CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 2})
_QUEUE_MISSING = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
_ACCESS_DENIED = ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation")
POLICY_HINT = "attach the stack's RunWorkerPolicyArn policy to this process's role"


class Outcome(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Outcome
    detail: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Not failed: a skipped check does not fail the doctor."""
        return self.outcome is not Outcome.FAIL

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.outcome.value,
            "ok": self.ok,
            "detail": self.detail,
            "fix": self.fix,
            "data": self.data,
        }


def passed(name: str, detail: str, **data: Any) -> CheckResult:
    return CheckResult(name, Outcome.PASS, detail, data=data)


def failed(name: str, detail: str, fix: str, **data: Any) -> CheckResult:
    return CheckResult(name, Outcome.FAIL, detail, fix, data=data)


def skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Outcome.SKIP, detail)


def _code(error: BaseException | None) -> str:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def aws_client(service: str, region: str) -> Any:
    """A boto3 client with short timeouts; its endpoint follows AWS_ENDPOINT_URL_<SERVICE>,
    as the executor's own clients do (an emulator's, on the local stack)."""
    return boto3.session.Session().client(
        service,  # type: ignore[call-overload]
        region_name=region,
        config=_CLIENT_CONFIG,
    )


# -- the executor's settings ----------------------------------------------------------------

CONFIG_CHECK = "executor config"
SIGNING_CHECK = "signing key"


def executor_config(raw: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The executor config with Dagster's defaults and ``{env: VAR}`` resolved, as a run
    would see it; or None and why it is not valid."""
    from dagster._config import process_config
    from dagster._config.field import resolve_to_config_type

    processed = process_config(resolve_to_config_type(TASKIQ_EXECUTOR_CONFIG), dict(raw))
    if not processed.success:
        # Dagster's messages end in a stack trace: the first line says what is wrong.
        errors = [e.message.split("\n", 1)[0] for e in processed.errors or []]
        return None, "; ".join(errors) or "invalid"
    return dict(processed.value or {}), None


def check_executor_config(
    raw: Mapping[str, Any], instance: DagsterInstance, *, read_signing_key: bool
) -> tuple[CheckResult, ExecutorSettings | None]:
    """Resolve the settings as the executor does at run start."""
    config, error = executor_config(raw)
    if config is None:
        return failed(
            CONFIG_CHECK,
            f"The executor config is not valid: {error}",
            "Correct the executor config (--executor-config here, the job's executor or "
            "run config in Dagster).",
        ), None
    try:
        settings = ExecutorSettings.resolve(config, instance, read_signing_key=read_signing_key)
    except ConfigurationError as e:
        return failed(
            CONFIG_CHECK,
            str(e),
            "Set what the message names, in the executor config or the environment "
            "variable the executor reads.",
        ), None
    queues = ", ".join(f"{r.name} {r.url}" for r in settings.routing.routes.values())
    return passed(
        CONFIG_CHECK,
        f"queues: {queues}; ledger {redact_url(settings.database_url)}; region {settings.region}",
        queues={r.name: list(r.urls) for r in settings.routing.routes.values()},
        region=settings.region,
        endpoint_url=settings.endpoint_url,
        max_receive_count=settings.max_receive_count,
        message_retention=settings.message_retention,
        visibility_timeout=settings.launch.lease_seconds,
    ), settings


def check_signing_key(config: Mapping[str, Any]) -> CheckResult:
    """The key the executor signs with is readable: given, or from its secret."""
    key = env_or(config.get("signing_key"), ENV_SIGNING_KEY)
    secret_arn = env_or(config.get("signing_key_secret_arn"), ENV_SIGNING_KEY_SECRET_ARN)
    if not key and not secret_arn:
        return skipped(
            SIGNING_CHECK,
            "No signing key is configured: steps are sent unsigned, and workers that have "
            "a key (a deployment's do) refuse them. The canary shows which is the case.",
        )
    try:
        value = signing_key(key, secret_arn)
    except ConfigurationError as e:
        if key and secret_arn:
            fix = f"Unset one of them: keep signing_key_secret_arn ({ENV_SIGNING_KEY_SECRET_ARN})."
        else:
            fix = (
                f"Set signing_key_secret_arn ({ENV_SIGNING_KEY_SECRET_ARN}) to the stack's "
                f"SigningKeySecretArn output, and {POLICY_HINT} "
                "(secretsmanager:GetSecretValue on the secret)."
            )
        return failed(SIGNING_CHECK, str(e), fix)
    length = len(value or "")
    if secret_arn:
        return passed(
            SIGNING_CHECK,
            f"read from the secret {secret_arn} ({length} characters)",
            source="secret",
        )
    return passed(
        SIGNING_CHECK,
        f"given in signing_key or {ENV_SIGNING_KEY} ({length} characters); a deployment "
        f"keeps it in Secrets Manager instead ({ENV_SIGNING_KEY_SECRET_ARN})",
        source="value",
    )


# -- queues ---------------------------------------------------------------------------------


def queue_check_name(route: QueueRoute, url: str) -> str:
    return f"queue {route.name}" + (" (priority lane)" if url == route.priority_url else "")


def _queue_setting(route: QueueRoute, url: str) -> str:
    if route.name != DEFAULT_QUEUE:
        field_name = "priority_url" if url == route.priority_url else "url"
        return f"queues.{route.name}.{field_name} in the executor config"
    if url == route.priority_url:
        return f"priority_queue_url (or {ENV_PRIORITY_QUEUE_URL})"
    return f"queue_url (or {ENV_QUEUE_URL})"


def check_queue(
    settings: ExecutorSettings, route: QueueRoute, url: str, client: SQSClient
) -> CheckResult:
    """The queue exists, and its DLQ, redrive, retention and visibility are what the
    executor config expects (``queue_mismatches``: what the run start warns about)."""
    name = queue_check_name(route, url)
    try:
        attributes = SqsQueue(url, client=client).attributes()
    except QueueUnavailable as e:
        code = _code(e.__cause__)
        setting = _queue_setting(route, url)
        if code in _QUEUE_MISSING:
            return failed(
                name,
                f"No queue {url} in {settings.region}"
                + (f" at {settings.endpoint_url}" if settings.endpoint_url else ""),
                f"Set {setting} to the stack's QueueUrl output (and aws_region to its region).",
            )
        if code in _ACCESS_DENIED:
            return failed(name, str(e), f"{POLICY_HINT.capitalize()} (sqs:GetQueueAttributes).")
        return failed(
            name,
            str(e),
            f"Check {setting}, aws_region and endpoint_url, and that this host reaches SQS.",
        )
    mismatches = queue_mismatches(settings, url, attributes)
    visibility = int(attributes.get("VisibilityTimeout", settings.launch.lease_seconds))
    if visibility != settings.launch.lease_seconds:
        mismatches.append(
            QueueMismatch(
                f"Queue {url} has a visibility timeout of {visibility} s; the executor's "
                f"visibility_timeout (the lease) is {settings.launch.lease_seconds} s. The "
                "stack sets both from one setting: they were configured apart.",
                f"Set visibility_timeout: {visibility} in the executor config (or deploy "
                f"with -c visibility_timeout={settings.launch.lease_seconds}).",
            )
        )
    dead_letter = _dead_letter_queue(attributes, client)
    if isinstance(dead_letter, QueueMismatch):
        mismatches.append(dead_letter)
    if mismatches:
        return failed(
            name,
            " ".join(m.detail for m in mismatches),
            " ".join(m.fix for m in mismatches),
        )
    receives = SqsQueue.parse_max_receive_count(attributes["RedrivePolicy"])
    return passed(
        name,
        f"{url}: to the DLQ {dead_letter} after {receives} deliveries; retention "
        f"{settings.message_retention} s, visibility {visibility} s, as configured",
        url=url,
        dlq_url=dead_letter,
        max_receive_count=receives,
    )


def _dead_letter_queue(attributes: Mapping[str, str], client: SQSClient) -> str | QueueMismatch:
    """The URL of the queue's DLQ, or what is wrong with it (no redrive policy is
    ``queue_mismatches``' to report)."""
    policy = attributes.get("RedrivePolicy")
    if not policy:
        return ""
    try:
        arn = str(json.loads(policy)["deadLetterTargetArn"])
        *_, account, dlq_name = arn.split(":")
        return client.get_queue_url(QueueName=dlq_name, QueueOwnerAWSAccountId=account)["QueueUrl"]
    except (ValueError, KeyError) as e:
        return QueueMismatch(
            f"The queue's redrive policy cannot be read ({e}).",
            "Redeploy the stack: it sets the redrive policy.",
        )
    except (ClientError, BotoCoreError) as e:
        return QueueMismatch(
            f"Its dead-letter queue {arn} cannot be found: {e}.",
            "Redeploy the stack, which creates the DLQ, or point the redrive policy at it.",
        )


# -- the ledger and the Dagster instance ----------------------------------------------------

LEDGER_CHECK = "ledger"
INSTANCE_CHECK = "instance storage"
_UPGRADE = (
    "Run `dagster-taskiq ledger upgrade --database-url URL` (safe while workers and runs use it)."
)


def check_ledger(settings: ExecutorSettings) -> CheckResult:
    """The ledger is reachable and at this release's schema (never changed here)."""
    where = redact_url(settings.database_url)
    try:
        ledger = Ledger(settings.database_url, pool_size=1)
    except (ConfigurationError, SQLAlchemyError, ValueError) as e:
        return failed(
            LEDGER_CHECK,
            f"The ledger URL {where} is not usable: {e}",
            f"Correct database_url (or {ENV_DATABASE_URL}).",
        )
    try:
        try:
            state = ledger.check_schema(component="run worker")
        except SchemaMismatch as e:
            state = ledger.schema_state()
            if state.status is SchemaStatus.NEWER:
                fix = "Run the release that upgraded the ledger here (and in the workers)."
            elif state.status is SchemaStatus.ABSENT:
                fix = (
                    f"{_UPGRADE} Workers create the tables when they start, so none also "
                    "means no worker has used this database: check that they use it."
                )
            else:
                fix = _UPGRADE
            return failed(LEDGER_CHECK, f"{where}: {e}", fix, revision=state.revision)
    except LedgerUnavailable as e:
        return failed(
            LEDGER_CHECK,
            str(e),
            f"Check database_url (or {ENV_DATABASE_URL}; the password from its secret) and "
            "that the database admits this host (the stack's RunWorkerSecurityGroupId).",
        )
    except SQLAlchemyError as e:
        return failed(
            LEDGER_CHECK,
            f"The ledger database {where} refused: {e}",
            f"Check the user and password of database_url (or {ENV_DATABASE_URL}).",
        )
    finally:
        ledger.dispose()
    return passed(
        LEDGER_CHECK, f"{where}: schema revision {state.revision}, current", revision=state.revision
    )


def _address(url: str) -> tuple[Any, ...]:
    """Where a PostgreSQL URL connects: host, port, database and socket, whatever its
    driver and style (libpq's ``?host=/dir`` or pg8000's ``unix_sock``)."""
    plain, _ = pg8000_connect_args(ledger_url(url))
    parsed = sa.engine.make_url(plain)
    return (parsed.host, parsed.port or 5432, parsed.database, parsed.query.get("unix_sock"))


def _identity(url: str) -> tuple[str, str]:
    """The database's name and its server's start time: the same pair means the same
    database, whichever address reached it (a cluster and its writer endpoint)."""
    store = Ledger(url, pool_size=1)
    try:
        with store.transaction() as conn:
            row = conn.execute(
                sa.select(sa.func.current_database(), sa.func.pg_postmaster_start_time())
            ).one()
        return str(row[0]), str(row[1])
    finally:
        store.dispose()


def check_instance_storage(
    instance: DagsterInstance | None, instance_error: str | None, settings: ExecutorSettings
) -> CheckResult:
    """The instance's storage is dagster-postgres on the ledger's database: the workers
    write the run's events there (their instance is on the database of their ledger)."""
    if instance is None:
        return failed(
            INSTANCE_CHECK,
            f"No Dagster instance: {instance_error}",
            "Set DAGSTER_HOME to the directory of the dagster.yaml the run worker uses.",
        )
    fix_storage = (
        "Use dagster-postgres storage (`storage: postgres:` in dagster.yaml) on the "
        "database the workers and the ledger use."
    )
    storages = {
        "run storage": instance.run_storage,
        "event log storage": instance.event_log_storage,
    }
    urls = []
    for part, storage in storages.items():
        url = getattr(storage, "postgres_url", None)
        if not isinstance(url, str):
            return failed(
                INSTANCE_CHECK,
                f"The instance's {part} is {type(storage).__name__}, not PostgreSQL: workers "
                "cannot write a run's step events where the run reads them.",
                fix_storage,
            )
        urls.append(url)
    storage_url = urls[-1]  # the event log: where the workers' events must land
    ledger = settings.database_url
    try:
        same = _address(storage_url) == _address(ledger)
        if not same:
            same = _identity(storage_url) == _identity(ledger)
    except (LedgerUnavailable, ConfigurationError, SQLAlchemyError, ValueError) as e:
        return skipped(
            INSTANCE_CHECK,
            f"Could not compare the instance's database {redact_url(storage_url)} with the "
            f"ledger's {redact_url(ledger)}: {e}",
        )
    if not same:
        return failed(
            INSTANCE_CHECK,
            f"The instance's storage is {redact_url(storage_url)}, not the ledger's database "
            f"{redact_url(ledger)}: workers, whose instance is the ledger's database, write "
            "the run's events where this run worker does not read them.",
            f"Point dagster.yaml's postgres storage and database_url (or {ENV_DATABASE_URL}) "
            "at the same database, the one the workers use.",
        )
    return passed(
        INSTANCE_CHECK,
        f"dagster-postgres on the ledger's database {redact_url(storage_url)}",
        database=redact_url(storage_url),
    )


# -- the scaler and the workers ---------------------------------------------------------------


def check_scaler(function: str, route: QueueRoute, client: LambdaClient) -> CheckResult:
    """The executor may invoke the scaler: a DryRun invocation checks the function exists
    and this role may invoke it, without running it."""
    name = f"scaler {route.name}"
    try:
        answer = client.invoke(FunctionName=function, InvocationType="DryRun", Payload=b"{}")
    except ClientError as e:
        code = _code(e)
        if code == "ResourceNotFoundException":
            return failed(
                name,
                f"No Lambda function {function}: {e}",
                f"Set scaler_function (or {ENV_SCALER_FUNCTION}) to the stack's "
                "ScalerFunctionName output, in the stack's region.",
            )
        if code in _ACCESS_DENIED:
            return failed(name, str(e), f"{POLICY_HINT.capitalize()} (lambda:InvokeFunction).")
        return failed(name, str(e), "Check the function's state in the Lambda console.")
    except BotoCoreError as e:
        return failed(name, f"Lambda is unreachable: {e}", "Check aws_region and the network.")
    return passed(
        name,
        f"{function} may be invoked (dry run, status {answer.get('StatusCode')})",
        function=function,
    )


def _ecs_service(
    route: QueueRoute, settings: ExecutorSettings, target: Target | None
) -> tuple[str | None, str | None]:
    """The worker service of ``route``: the executor's settings, else the deployment's
    outputs for the pool reading its queue."""
    cluster = settings.ecs_cluster or (target.ecs_cluster if target else None)
    service = route.ecs_service
    if service is None and target is not None:
        for pool in target.pools:
            if route.url in pool.queue_urls and pool.ecs_service:
                service = pool.ecs_service
    return cluster, service


def check_workers(
    route: QueueRoute,
    settings: ExecutorSettings,
    target: Target | None,
    ecs: ECSClient | None,
) -> CheckResult:
    """The worker service exists: ECS (desired, running), or the local stack's pool."""
    name = f"workers {route.name}"
    cluster, service = _ecs_service(route, settings, target)
    if cluster and service and ecs is not None:
        workers = EcsWorkerService(ecs, cluster=cluster, service=service)
        try:
            desired, running = workers.desired_count(), workers.running_count()
        except WorkerServiceUnavailable as e:
            code = _code(e.__cause__)
            fix = (
                f"{POLICY_HINT.capitalize()} (ecs:DescribeServices)."
                if code in _ACCESS_DENIED
                else f"Set ecs_cluster and ecs_service ({ENV_ECS_CLUSTER}, {ENV_ECS_SERVICE}) "
                "to the stack's EcsClusterName and EcsServiceName outputs."
            )
            return failed(name, str(e), fix)
        note = ""
        if desired == 0:
            note = ": the scaler starts workers when steps arrive"
        elif running < desired:
            note = ": tasks are starting, or cannot (`dagster-taskiq status` shows the events)"
        return passed(
            name,
            f"ECS service {workers.name}: desired {desired}, running {running}{note}",
            desired=desired,
            running=running,
        )
    if target is not None and target.kind == "local":
        return _local_workers(name, route, target)
    return skipped(
        name,
        f"No worker service named: set ecs_cluster and ecs_service ({ENV_ECS_CLUSTER}, "
        f"{ENV_ECS_SERVICE}) to check it.",
    )


def _local_workers(name: str, route: QueueRoute, target: Target) -> CheckResult:
    pools = [s for s in target.local_pools() if set(s.queue_urls) & set(route.urls)]
    if not pools:
        return failed(
            name,
            f"No worker pool of the local stack {target.local_root} reads {route.url}.",
            f"Start workers on it: dagster-taskiq worker --queue-url {route.url}.",
        )
    desired = sum(p.desired for p in pools)
    running = sum(p.running for p in pools)
    scaled = any(p.scaler_service for p in pools)
    described = ", ".join(
        f"local pool {p.name}: desired {p.desired}, running {p.running}" for p in pools
    )
    if running == 0 and not scaled:
        return failed(
            name,
            f"{described}, and no scaler starts one.",
            f"Start workers on it: dagster-taskiq worker --queue-url {route.url}.",
        )
    return passed(name, described, desired=desired, running=running)

"""The doctor's order: the executor's settings, then each wire, then the canary.

It sees what the run worker sees: the executor config given (``--executor-config``) and
the environment the executor reads. What the environment leaves unset comes from the
deployment the operator commands find (``operations.target``): a local stack's
``stack.env``, or a ``cdk deploy --outputs-file`` file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.routing import DEFAULT_QUEUE
from dagster_taskiq.core.settings import (
    ENV_DATABASE_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_LOCAL_STACK,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_SCALER_FUNCTION,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    ENV_STACK_OUTPUTS,
)
from dagster_taskiq.operations.doctor import DEFAULT_CANARY_TIMEOUT
from dagster_taskiq.operations.doctor.canary import CANARY_CHECK, send_canary
from dagster_taskiq.operations.doctor.checks import (
    CONFIG_CHECK,
    INSTANCE_CHECK,
    LEDGER_CHECK,
    SIGNING_CHECK,
    CheckResult,
    Outcome,
    aws_client,
    check_executor_config,
    check_instance_storage,
    check_ledger,
    check_queue,
    check_scaler,
    check_signing_key,
    check_workers,
    executor_config,
    failed,
    queue_check_name,
    skipped,
)

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from dagster_taskiq.executor.definition import ExecutorSettings
    from dagster_taskiq.operations.target import Target

# The stack's outputs the executor reads as environment variables (the default pool's).
OUTPUT_VARIABLES = {
    "QueueUrl": ENV_QUEUE_URL,
    "PriorityQueueUrl": ENV_PRIORITY_QUEUE_URL,
    "ScalerFunctionName": ENV_SCALER_FUNCTION,
    "EcsClusterName": ENV_ECS_CLUSTER,
    "EcsServiceName": ENV_ECS_SERVICE,
    "SigningKeySecretArn": ENV_SIGNING_KEY_SECRET_ARN,
}


@dataclass(frozen=True)
class DoctorOptions:
    executor_config: Mapping[str, Any] = field(default_factory=dict)
    queue_url: str | None = None
    database_url: str | None = None
    canary: bool = True
    canary_timeout: float = DEFAULT_CANARY_TIMEOUT


@dataclass(frozen=True)
class DoctorReport:
    deployment: str
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "deployment": self.deployment,
            "checks": [check.to_json() for check in self.checks],
        }


def deployment_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """What the named deployment says, as the environment variables the executor reads:
    a local stack's whole environment, or the outputs of a deployed stack."""
    from dagster_taskiq.local.stack import STACK_ENV_FILE
    from dagster_taskiq.operations.target import read_env_file, read_outputs_file

    defaults: dict[str, str] = {}
    if environ.get(ENV_LOCAL_STACK):
        path = Path(environ[ENV_LOCAL_STACK]) / STACK_ENV_FILE
        if path.is_file():
            defaults = read_env_file(path)
    elif environ.get(ENV_STACK_OUTPUTS):
        outputs = read_outputs_file(Path(environ[ENV_STACK_OUTPUTS]))
        defaults = {
            var: outputs[name] for name, var in OUTPUT_VARIABLES.items() if outputs.get(name)
        }
    # A key given in the environment is not joined by a secret from elsewhere: the executor
    # refuses both.
    if environ.get(ENV_SIGNING_KEY) or environ.get(ENV_SIGNING_KEY_SECRET_ARN):
        defaults.pop(ENV_SIGNING_KEY, None)
        defaults.pop(ENV_SIGNING_KEY_SECRET_ARN, None)
    return defaults


@contextlib.contextmanager
def _environment(defaults: Mapping[str, str], overrides: Mapping[str, str]) -> Iterator[None]:
    """``defaults`` where the environment has no value, ``overrides`` over it, for the
    doctor's duration: the executor, the Dagster instance and boto3 read them there."""
    changed = {**{k: v for k, v in defaults.items() if not os.environ.get(k)}, **overrides}
    before = {name: os.environ.get(name) for name in changed}
    os.environ.update(changed)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_doctor(options: DoctorOptions) -> DoctorReport:
    """Every check, in order; the canary only when the checks it needs passed."""
    raw = dict(options.executor_config)
    overrides: dict[str, str] = {}
    # An option beats the config file, as the executor's config beats the environment.
    if options.queue_url:
        raw.pop("queue_url", None)
        overrides[ENV_QUEUE_URL] = options.queue_url
    if options.database_url:
        raw.pop("database_url", None)
        overrides[ENV_DATABASE_URL] = options.database_url
    try:
        defaults = deployment_defaults(os.environ)
    except ConfigurationError as e:
        return DoctorReport(
            "unknown",
            [failed("deployment", str(e), f"Correct {ENV_STACK_OUTPUTS} or {ENV_LOCAL_STACK}.")],
        )
    with _environment(defaults, overrides):
        target, target_error = _target()
        with _instance() as (instance, instance_error):
            checks = list(_checks(raw, options, instance, instance_error, target))
        if target_error is not None:
            checks.insert(0, target_error)
        deployment = target.description if target is not None else "from the executor config"
        return DoctorReport(deployment, checks)


def _target() -> tuple[Target | None, CheckResult | None]:
    """The deployment the operator commands would find; None when none is named (the
    executor config alone may say everything)."""
    from dagster_taskiq.operations.target import resolve_target

    try:
        return resolve_target(), None
    except ConfigurationError as e:
        if os.environ.get(ENV_LOCAL_STACK) or os.environ.get(ENV_STACK_OUTPUTS):
            return None, failed(
                "deployment", str(e), f"Correct {ENV_LOCAL_STACK} or {ENV_STACK_OUTPUTS}."
            )
        return None, None


@contextlib.contextmanager
def _instance() -> Iterator[tuple[DagsterInstance | None, str | None]]:
    """The run worker's Dagster instance (``DAGSTER_HOME``), or why there is none."""
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        yield None, "DAGSTER_HOME is not set."
        return
    try:
        instance = DagsterInstance.get()
    except Exception as e:  # a broken dagster.yaml can fail in many ways; all are reported
        yield None, f"{type(e).__name__}: {e}"
        return
    try:
        yield instance, None
    finally:
        instance.dispose()


def _checks(
    raw: Mapping[str, Any],
    options: DoctorOptions,
    instance: DagsterInstance | None,
    instance_error: str | None,
    target: Target | None,
) -> list[CheckResult]:
    from dagster_taskiq.core.sqs import sqs_client

    processed, _ = executor_config(raw)
    signing = check_signing_key(processed or {})
    with _resolving_instance(instance) as resolving:
        config, settings = check_executor_config(raw, resolving, read_signing_key=signing.ok)
    checks = [config, signing]
    if settings is None:
        for name in ("queues", LEDGER_CHECK, INSTANCE_CHECK, "scaler", "workers", CANARY_CHECK):
            checks.append(skipped(name, f"Not checked: the {CONFIG_CHECK} did not resolve."))
        return checks
    sqs = sqs_client(region=settings.region, endpoint_url=settings.endpoint_url, read_timeout=15)
    for route in settings.routing.routes.values():
        checks.extend(check_queue(settings, route, url, sqs) for url in route.urls)
    checks.append(check_ledger(settings))
    checks.append(check_instance_storage(instance, instance_error, settings))
    checks.extend(_scalers(settings))
    ecs = aws_client("ecs", settings.region)
    checks.extend(
        check_workers(route, settings, target, ecs) for route in settings.routing.routes.values()
    )
    checks.append(_canary(raw, options, settings, instance, checks))
    return checks


@contextlib.contextmanager
def _resolving_instance(instance: DagsterInstance | None) -> Iterator[DagsterInstance]:
    """The instance the executor's settings are resolved with: without one (the instance
    check says why), an ephemeral one, so that the other settings are still checked."""
    from dagster import DagsterInstance

    if instance is not None:
        yield instance
        return
    ephemeral = DagsterInstance.ephemeral()
    try:
        yield ephemeral
    finally:
        ephemeral.dispose()


def _scalers(settings: ExecutorSettings) -> Iterator[CheckResult]:
    seen: set[str] = set()
    client = None
    for route in settings.routing.routes.values():
        function = route.scaler_function
        if not function:
            yield skipped(
                f"scaler {route.name}",
                f"No scaler function (scaler_function, {ENV_SCALER_FUNCTION}): steps wait for "
                "the scaler's schedule when no worker runs.",
            )
            continue
        if function in seen:
            continue
        seen.add(function)
        client = client or aws_client("lambda", settings.region)
        yield check_scaler(function, route, client)


def _canary(
    raw: Mapping[str, Any],
    options: DoctorOptions,
    settings: ExecutorSettings,
    instance: DagsterInstance | None,
    checks: list[CheckResult],
) -> CheckResult:
    """The canary, unless a check it needs failed: it would only fail the same way."""
    if not options.canary:
        return skipped(CANARY_CHECK, "Not sent (--no-canary).")
    outcomes = {check.name: check.outcome for check in checks}
    needed = [LEDGER_CHECK, INSTANCE_CHECK]
    default = settings.routing.routes.get(DEFAULT_QUEUE)
    if default is not None:
        needed.append(queue_check_name(default, default.url))
    broken = [name for name in needed if outcomes.get(name) is not Outcome.PASS]
    if outcomes.get(SIGNING_CHECK) is Outcome.FAIL:
        broken.append(SIGNING_CHECK)
    if broken or instance is None:
        return skipped(CANARY_CHECK, f"Not sent: fix {', '.join(broken)} first.")
    return send_canary(instance, raw, settings.database_url, timeout=options.canary_timeout)

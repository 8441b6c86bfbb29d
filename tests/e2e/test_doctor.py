"""``dagster-taskiq doctor`` on the local stack: every check passing with a canary through a
real worker, and each fault it claims to detect, detected with its fix.

One stack for the module: one worker kept by the local scaler (so the scaler function
exists), signing with a key read from Secrets Manager on moto's server, as a deployment
does. Each fault is set for one test only (an environment variable, an option or an
executor config file), the way a misconfigured run worker would have it. The AWS-only
paths (ECS, Lambda's DryRun, Secrets Manager) run against moto's server.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from alembic import command
from click.testing import CliRunner, Result

from dagster_taskiq.cli import cli
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.migrations import alembic_config, ensure_schema
from dagster_taskiq.core.settings import (
    ENV_DATABASE_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_LOCAL_STACK,
    ENV_QUEUE_URL,
    ENV_SCALER_FUNCTION,
    ENV_SIGNING_KEY_SECRET_ARN,
    read_secret_string,
)
from dagster_taskiq.local.endpoints import EMULATOR_CREDENTIALS, REGION
from dagster_taskiq.local.stack import (
    LocalStack,
    local_stack,
    write_dagster_yaml,
)
from dagster_taskiq.scaling.policy import ScalingConfig
from tests.conftest import REPO_ROOT, TEST_CODE_LOCATION, new_database
from tests.helpers import wait_for

SECRETS_ENDPOINT = "AWS_ENDPOINT_URL_SECRETS_MANAGER"


@dataclass
class Deployment:
    stack: LocalStack
    secret_arn: str
    old_schema_url: str  # a database whose ledger is at the first revision
    other_database_url: str  # a current ledger that is not the instance's database


@pytest.fixture(scope="module")
def deployment(
    postgres_url: str, sqs_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("doctor") / uuid.uuid4().hex[:6]
    with (
        pytest.MonkeyPatch.context() as env,
        new_database(postgres_url, "doctor_old") as old_schema_url,
        new_database(postgres_url, "doctor_other") as other_database_url,
    ):
        for name, value in EMULATOR_CREDENTIALS.items():
            env.setenv(name, value)
        secrets = boto3.client("secretsmanager", region_name=REGION, endpoint_url=sqs_endpoint)
        secret_arn = secrets.create_secret(
            Name=f"doctor-signing-{uuid.uuid4().hex[:8]}", SecretString=uuid.uuid4().hex
        )["ARN"]
        # The run worker's and the workers' key, from the secret as in a deployment.
        env.setenv(SECRETS_ENDPOINT, sqs_endpoint)
        env.setenv(ENV_SIGNING_KEY_SECRET_ARN, secret_arn)
        env.setenv("PYTHONPATH", str(REPO_ROOT))
        env.setenv("POWERTOOLS_METRICS_DISABLED", "true")
        old = Ledger(old_schema_url)
        with old.transaction() as conn:
            command.upgrade(alembic_config(conn), "0001")
        old.dispose()
        other = Ledger(other_database_url)
        ensure_schema(other)
        other.dispose()
        with local_stack(
            root,
            database_url=postgres_url,
            sqs_endpoint=sqs_endpoint,
            code_locations=(TEST_CODE_LOCATION,),
        ) as stack:
            pool = stack.worker_pool(extra_args=("--wait-seconds", "1"), stop_timeout=3)
            stack.autoscale(pool, ScalingConfig(min_workers=1, max_workers=1), tick_seconds=1)
            wait_for(lambda: pool.size == 1, timeout=30, what="the scaler to start a worker")
            # The shell of an operator: the stack's directory, and nothing else of it.
            env.setenv(ENV_LOCAL_STACK, str(stack.root))
            yield Deployment(stack, secret_arn, old_schema_url, other_database_url)
        read_secret_string.cache_clear()


def doctor(*args: str) -> tuple[Result, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["doctor", "--json", *args], catch_exceptions=False)
    report = json.loads(result.stdout)
    assert result.exit_code == (0 if report["ok"] else 1), result.output
    return result, report


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["status"] for check in report["checks"]}


# -- healthy ----------------------------------------------------------------------------------


def test_a_healthy_stack_passes_every_check_and_times_the_canary(
    deployment: Deployment,
) -> None:
    result, report = doctor()

    assert report["ok"] and result.exit_code == 0
    assert report["deployment"] == f"local stack {deployment.stack.root}"
    assert statuses(report) == {
        "executor config": "PASS",
        "signing key": "PASS",
        "queue default": "PASS",
        "ledger": "PASS",
        "instance storage": "PASS",
        "scaler default": "PASS",
        "workers default": "PASS",
        "canary": "PASS",
    }
    found = checks(report)
    assert deployment.secret_arn in found["signing key"]["detail"]
    assert found["queue default"]["data"]["dlq_url"] == deployment.stack.dlq_url
    assert found["workers default"]["data"] == {"desired": 1, "running": 1}
    canary = found["canary"]["data"]
    assert canary["ledger_status"] == "SUCCEEDED" and canary["worker_id"]
    assert 0 <= canary["pickup_seconds"] < canary["end_to_end_seconds"] < 60
    assert "picked up after" in found["canary"]["detail"]

    text = CliRunner().invoke(cli, ["doctor", "--no-canary"], catch_exceptions=False)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0] == f"dagster-taskiq doctor: local stack {deployment.stack.root}"
    assert [line.split()[0] for line in lines[1:-1]] == ["PASS"] * 7 + ["SKIP"]
    assert lines[-1] == "7 passed, 0 failed, 1 skipped"


# -- each fault -------------------------------------------------------------------------------


def test_a_wrong_queue_url_fails_with_its_fix(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_QUEUE_URL, deployment.stack.queue_url + "-typo")

    result, report = doctor()

    assert result.exit_code == 1
    queue = checks(report)["queue default"]
    assert queue["status"] == "FAIL" and "-typo" in queue["detail"]
    assert "QueueUrl" in queue["fix"] and ENV_QUEUE_URL in queue["fix"]
    assert checks(report)["canary"]["status"] == "SKIP", "not sent into a missing queue"
    assert statuses(report)["ledger"] == "PASS", "the other wires are still checked"

    text = CliRunner().invoke(cli, ["doctor"], catch_exceptions=False).stdout
    (line,) = [line for line in text.splitlines() if line.startswith("FAIL  queue default")]
    assert "No queue" in line and "Fix: Set queue_url" in line


def test_a_redrive_that_does_not_match_max_receive_count_fails(
    deployment: Deployment, tmp_path: Path
) -> None:
    config = tmp_path / "executor.yaml"
    config.write_text("execution:\n  config:\n    max_receive_count: 3\n")

    _, report = doctor("--executor-config", str(config), "--no-canary")

    queue = checks(report)["queue default"]
    assert queue["status"] == "FAIL"
    assert "after 5 deliveries" in queue["detail"] and "max_receive_count=3" in queue["detail"]
    assert "max_receive_count: 5" in queue["fix"]


def test_an_unreachable_ledger_fails_without_showing_its_password(
    deployment: Deployment,
) -> None:
    url = "postgresql://doctor:hunter2@127.0.0.1:1/dagster"

    result, report = doctor("--database-url", url, "--no-canary")

    ledger = checks(report)["ledger"]
    assert ledger["status"] == "FAIL" and "unreachable" in ledger["detail"]
    assert ENV_DATABASE_URL in ledger["fix"]
    assert "hunter2" not in result.output
    assert statuses(report)["instance storage"] == "SKIP", "no database to compare with"


def test_an_older_ledger_schema_says_to_upgrade(deployment: Deployment) -> None:
    _, report = doctor("--database-url", deployment.old_schema_url, "--no-canary")

    ledger = checks(report)["ledger"]
    assert ledger["status"] == "FAIL" and ledger["data"]["revision"] == "0001"
    assert "dagster-taskiq ledger upgrade" in ledger["fix"]


def test_instance_storage_on_another_database_fails(deployment: Deployment) -> None:
    _, report = doctor("--database-url", deployment.other_database_url, "--no-canary")

    assert statuses(report)["ledger"] == "PASS"
    storage = checks(report)["instance storage"]
    assert storage["status"] == "FAIL" and "not the ledger's database" in storage["detail"]
    assert "dagster.yaml" in storage["fix"]


def test_instance_storage_that_is_not_postgres_fails(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # SQLite
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv(ENV_DATABASE_URL, deployment.stack.database_url)

    _, report = doctor("--no-canary")

    storage = checks(report)["instance storage"]
    assert storage["status"] == "FAIL" and "not PostgreSQL" in storage["detail"]
    assert "storage: postgres" in storage["fix"]


def test_an_unreadable_signing_key_fails_and_the_rest_is_still_checked(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = deployment.secret_arn.rsplit(":", 1)[0] + ":no-such-secret-AbCdEf"
    monkeypatch.setenv(ENV_SIGNING_KEY_SECRET_ARN, missing)

    _, report = doctor()

    signing = checks(report)["signing key"]
    assert signing["status"] == "FAIL" and "no-such-secret" in signing["detail"]
    assert "SigningKeySecretArn" in signing["fix"]
    assert statuses(report)["executor config"] == "PASS"
    assert statuses(report)["queue default"] == "PASS"
    assert checks(report)["canary"]["detail"] == "Not sent: fix signing key first."


def test_a_scaler_function_that_does_not_exist_fails(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SCALER_FUNCTION, "no-such-scaler")

    _, report = doctor("--no-canary")

    scaler = checks(report)["scaler default"]
    assert scaler["status"] == "FAIL" and "no-such-scaler" in scaler["detail"]
    assert "ScalerFunctionName" in scaler["fix"]


def test_no_worker_to_take_the_canary_gives_up_and_says_why(deployment: Deployment) -> None:
    idle_queue, _ = deployment.stack.add_queue("idle")

    _, report = doctor("--queue-url", idle_queue, "--canary-timeout", "2")

    found = checks(report)
    assert found["queue default"]["status"] == "PASS"
    assert found["workers default"]["status"] == "FAIL", "no pool reads that queue"
    canary = found["canary"]
    assert canary["status"] == "FAIL"
    assert "not picked up by any worker within 2 s" in canary["detail"]
    assert "Start workers on the queue" in canary["fix"]
    assert canary["data"]["ledger_status"] == "FAILED", "closed: a late worker will not run it"
    assert canary["data"]["end_to_end_seconds"] < 30


def test_workers_on_another_dagster_storage_fail_the_canary_with_the_reason(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Workers whose dagster.yaml names another database than the run worker's.
    home = tmp_path / "elsewhere"
    write_dagster_yaml(home, deployment.other_database_url)
    queue, _ = deployment.stack.add_queue("elsewhere")
    pool = deployment.stack.worker_pool(
        name="elsewhere",
        extra_args=("--wait-seconds", "1", "--queue-url", queue),
        extra_env={"DAGSTER_HOME": str(home)},
        stop_timeout=3,
    )
    pool.scale_to(1)
    try:
        _, report = doctor("--queue-url", queue, "--canary-timeout", "60")
    finally:
        pool.stop()

    found = checks(report)
    assert found["workers default"]["status"] == "PASS"
    canary = found["canary"]
    assert canary["status"] == "FAIL" and canary["data"]["ledger_status"] == "FAILED"
    assert "is not in this worker's Dagster instance" in canary["detail"]
    assert "Correct what the worker said" in canary["fix"]


# -- the AWS-only paths, on moto's server -------------------------------------------------------


def test_the_scaler_and_the_ecs_service_are_checked_on_aws(
    deployment: Deployment, sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"doctor-{uuid.uuid4().hex[:8]}"
    iam = boto3.client("iam", region_name=REGION, endpoint_url=sqs_endpoint)
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("handler.py", "def handler(event, context):\n    return {}\n")
    functions = boto3.client("lambda", region_name=REGION, endpoint_url=sqs_endpoint)
    functions.create_function(
        FunctionName=name,
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": code.getvalue()},
    )
    ecs = boto3.client("ecs", region_name=REGION, endpoint_url=sqs_endpoint)
    ecs.create_cluster(clusterName=name)
    ecs.register_task_definition(
        family=name, containerDefinitions=[{"name": "worker", "image": "worker", "memory": 512}]
    )
    ecs.create_service(cluster=name, serviceName=name, taskDefinition=name, desiredCount=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", sqs_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_ECS", sqs_endpoint)
    monkeypatch.setenv(ENV_SCALER_FUNCTION, name)
    monkeypatch.setenv(ENV_ECS_CLUSTER, name)
    monkeypatch.setenv(ENV_ECS_SERVICE, name)

    _, report = doctor("--no-canary")

    found = checks(report)
    assert found["scaler default"]["status"] == "PASS", found["scaler default"]
    assert "dry run" in found["scaler default"]["detail"]
    workers = found["workers default"]
    assert workers["status"] == "PASS" and workers["data"]["desired"] == 2
    assert f"ECS service {name}/{name}" in workers["detail"]

    monkeypatch.setenv(ENV_SCALER_FUNCTION, "no-such-scaler")
    monkeypatch.setenv(ENV_ECS_SERVICE, "no-such-service")
    _, report = doctor("--no-canary")

    found = checks(report)
    assert found["scaler default"]["status"] == "FAIL"
    assert "ScalerFunctionName" in found["scaler default"]["fix"]
    workers = found["workers default"]
    assert workers["status"] == "FAIL" and "not found" in workers["detail"]
    assert "EcsServiceName" in workers["fix"]

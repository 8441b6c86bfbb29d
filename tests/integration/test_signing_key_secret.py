"""The signing key read from Secrets Manager by ARN (moto's server), as a deployment gives it:
the executor (``signing_key_secret_arn``), the worker (``--signing-key-secret-arn``) and the
DLQ processor (``DAGSTER_TASKIQ_SIGNING_KEY_SECRET_ARN``) each get the same key, read once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from dagster import DagsterInstance
from dagster._config import process_config

from dagster_taskiq import cli
from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.settings import (
    ENV_ALERT_TOPIC_ARN,
    ENV_DATABASE_URL,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    read_secret_string,
    signing_key,
)
from dagster_taskiq.executor.definition import ExecutorSettings, taskiq_executor
from dagster_taskiq.local.endpoints import REGION
from dagster_taskiq.worker import run as worker_run
from dagster_taskiq.worker.config import WorkerSettings
from lambdas.dlq_processor.handler import ProcessorSettings, build_processor
from tests.integration.test_dead_letters import emulator_credentials

KEY = "k" * 40 + uuid.uuid4().hex
TOPIC_ARN = f"arn:aws:sns:{REGION}:123456789012:alerts"


@pytest.fixture
def secret_arn(sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A secret whose string is the key, on the emulator, as the stack generates it."""
    emulator_credentials(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", sqs_endpoint)
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=sqs_endpoint)
    arn = client.create_secret(Name=f"signing-{uuid.uuid4().hex[:8]}", SecretString=KEY)["ARN"]
    read_secret_string.cache_clear()
    yield arn
    read_secret_string.cache_clear()
    client.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)


def test_the_key_is_read_once_and_kept(secret_arn: str, sqs_endpoint: str) -> None:
    assert signing_key(None, secret_arn) == KEY
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=sqs_endpoint)
    client.put_secret_value(SecretId=secret_arn, SecretString="rotated")
    # Cached for the process: every message it signs or checks uses one key.
    assert signing_key(None, secret_arn) == KEY


def test_an_unreadable_secret_is_a_clear_error(secret_arn: str) -> None:
    missing = secret_arn.rsplit(":", 1)[0] + ":no-such-key-AbCdEf"
    with pytest.raises(ConfigurationError, match=r"Cannot read the secret .*no-such-key") as e:
        signing_key(None, missing)
    assert "secretsmanager:GetSecretValue" in str(e.value)
    with pytest.raises(ConfigurationError, match="Expected a Secrets Manager secret ARN"):
        signing_key(None, "not-an-arn")


def test_a_key_and_its_secret_together_are_refused(secret_arn: str) -> None:
    with pytest.raises(ConfigurationError, match="set one"):
        signing_key("a-key", secret_arn)
    assert signing_key("a-key", None) == "a-key"
    assert signing_key(None, None) is None


def test_the_executor_reads_the_key_from_its_secret(
    secret_arn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_SIGNING_KEY, raising=False)
    monkeypatch.delenv(ENV_SIGNING_KEY_SECRET_ARN, raising=False)
    config: dict[str, Any] = {
        "queue_url": "http://localhost/123456789012/steps",
        "database_url": "postgresql://user@localhost/dagster",
    }
    with DagsterInstance.ephemeral() as instance:
        for given, environment in (
            ({"signing_key_secret_arn": secret_arn}, {}),
            ({}, {ENV_SIGNING_KEY_SECRET_ARN: secret_arn}),
        ):
            with monkeypatch.context() as patch:
                for name, value in environment.items():
                    patch.setenv(name, value)
                processed = process_config(
                    taskiq_executor.config_schema.config_type, config | given
                )
                assert processed.success, processed.errors
                settings = ExecutorSettings.resolve(dict(processed.value or {}), instance)
                assert settings.launch.signing_key == KEY


def test_the_worker_reads_the_key_from_its_secret(
    secret_arn: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[WorkerSettings] = []

    class Started:
        def __init__(self, settings: WorkerSettings, **_: object) -> None:
            started.append(settings)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(worker_run, "Worker", Started)
    monkeypatch.delenv(ENV_SIGNING_KEY, raising=False)
    result = CliRunner().invoke(
        cli.cli,
        ["worker", "--code-location", "tests.jobs", "--database-url", postgres_url],
        env={
            "DAGSTER_TASKIQ_QUEUE_URL": "http://localhost/123456789012/steps",
            ENV_SIGNING_KEY_SECRET_ARN: secret_arn,
        },
    )
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert settings.signing_key == KEY
    assert settings.signing_key_secret_arn is None  # read, and not passed on


def test_the_dlq_processor_reads_the_key_from_its_secret(
    secret_arn: str, postgres_url: str
) -> None:
    settings = ProcessorSettings.from_env(
        {
            ENV_DATABASE_URL: postgres_url,
            ENV_ALERT_TOPIC_ARN: TOPIC_ARN,
            ENV_SIGNING_KEY_SECRET_ARN: secret_arn,
        }
    )
    processor = build_processor(settings)
    try:
        assert processor._signing_key == KEY
    finally:
        processor.ledger.dispose()

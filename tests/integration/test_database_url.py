"""The ledger URL with its password from the environment or from Secrets Manager."""

from __future__ import annotations

import json

import boto3
import pytest

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.settings import (
    ENV_DATABASE_PASSWORD,
    ENV_DATABASE_SECRET_ARN,
    ENV_DATABASE_URL,
    ENV_DATABASE_USER,
    database_url,
    with_password,
    with_user,
)


def test_with_password_quotes_and_never_overrides() -> None:
    assert with_password("postgresql://app@db:5432/x", "p@ss/w:rd") == (
        "postgresql://app:p%40ss%2Fw%3Ard@db:5432/x"
    )
    assert with_password("postgresql://app:kept@db/x", "other") == "postgresql://app:kept@db/x"
    with pytest.raises(ConfigurationError, match="user name"):
        with_password("postgresql://db/x", "secret")


def test_explicit_url_then_environment() -> None:
    env = {ENV_DATABASE_URL: "postgresql://a@h/x", ENV_DATABASE_PASSWORD: "pw"}
    assert database_url(None, env) == "postgresql://a:pw@h/x"
    assert database_url("postgresql://b@h/y", env) == "postgresql://b:pw@h/y"
    assert database_url(None, {}) is None


def test_password_from_a_secrets_manager_secret(
    sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database secret as CDK/RDS create it: JSON with username, password, host, ...
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", sqs_endpoint)
    client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=sqs_endpoint)
    arn = client.create_secret(
        Name="dagster-taskiq-db-test",
        SecretString=json.dumps({"username": "app", "password": "s3cr3t!", "host": "db"}),
    )["ARN"]
    env = {ENV_DATABASE_URL: "postgresql://app@db:5432/x", ENV_DATABASE_SECRET_ARN: arn}
    assert database_url(None, env) == "postgresql://app:s3cr3t%21@db:5432/x"


def test_with_user_quotes_and_never_overrides() -> None:
    assert with_user("postgresql://db:5432/x?sslmode=require", "a@b") == (
        "postgresql://a%40b@db:5432/x?sslmode=require"
    )
    assert with_user("postgresql://kept@db/x", "other") == "postgresql://kept@db/x"


def test_user_and_password_from_the_environment_for_a_url_without_them() -> None:
    """An existing database's ledger URL names neither: ECS injects both from its secret."""
    env = {
        ENV_DATABASE_URL: "postgresql://db:5432/dagster?sslmode=require",
        ENV_DATABASE_USER: "dagster",
        ENV_DATABASE_PASSWORD: "pw",
    }
    assert database_url(None, env) == "postgresql://dagster:pw@db:5432/dagster?sslmode=require"


def test_user_and_password_from_the_users_secret(
    sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Lambdas on an existing database: both from its secret (as RDS writes it)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", sqs_endpoint)
    client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=sqs_endpoint)
    arn = client.create_secret(
        Name="dagster-users-db",
        SecretString=json.dumps({"username": "dagster", "password": "pw", "engine": "postgres"}),
    )["ARN"]
    env = {ENV_DATABASE_URL: "postgresql://db:6432/dagster", ENV_DATABASE_SECRET_ARN: arn}
    assert database_url(None, env) == "postgresql://dagster:pw@db:6432/dagster"

"""Into an existing Dagster deployment: the user's VPC, database and ECS cluster.

No database is created; workers, Lambdas and ledger use the user's (credentials from its
secret), the stack only adds ingress rules to its security group; the worker services run in
the user's cluster. The settings are checked together, with errors that say what to do.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cdk.dagster_taskiq_cdk.settings import DeploymentSettings, SettingsError
from cdk.dagster_taskiq_cdk.stack import stack_environment

from .conftest import (
    DATABASE_SECRET_ARN,
    DATABASE_SECURITY_GROUP,
    EXISTING_CLUSTER,
    EXISTING_CONTEXT,
    Build,
)
from .test_stack import _function, _key, _permissions, role_permissions

DATABASE = {
    "database_endpoint": "db.example.internal",
    "database_name": "dagster",
    "database_secret_arn": DATABASE_SECRET_ARN,
    "database_security_group_id": DATABASE_SECURITY_GROUP,
}
SECRET_READ = {"secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"}


def _settings(**values: Any) -> DeploymentSettings:
    return DeploymentSettings.from_context({"vpc_id": "vpc-0123456789abcdef0"} | values)


# -- settings ---------------------------------------------------------------------------------


def test_all_database_settings_or_none() -> None:
    assert not _settings().existing_database
    settings = _settings(**DATABASE)
    assert settings.existing_database and settings.database_port_or_default == 5432
    assert _settings(**DATABASE, database_port="6432").database_port_or_default == 6432
    partial = {k: v for k, v in DATABASE.items() if k != "database_secret_arn"}
    with pytest.raises(SettingsError, match="missing: database_secret_arn") as e:
        _settings(**partial)
    assert "Set none of them to have the stack create its own database" in str(e.value)
    with pytest.raises(SettingsError, match="'database_port' applies only to an existing"):
        _settings(database_port=5432)


def test_an_existing_database_needs_its_vpc() -> None:
    with pytest.raises(SettingsError, match="needs vpc_id"):
        DeploymentSettings.from_context(DATABASE)


def test_settings_of_a_created_database_are_refused_with_an_existing_one() -> None:
    with pytest.raises(SettingsError, match="deletion_protection, db_max_capacity"):
        _settings(**DATABASE, deletion_protection="false", db_max_capacity=8)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("database_endpoint", "postgres://db:5432", "host name or IPv4 address"),
        ("database_port", "70000", "TCP port"),
        ("database_name", "my-db", "PostgreSQL database name"),
        ("database_secret_arn", "dagster-db-secret", "full ARN of a Secrets Manager secret"),
        ("database_security_group_id", "db-group", "security group id"),
    ],
)
def test_malformed_database_settings_name_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as e:
        _settings(**DATABASE | {key: value})
    assert repr(key) in str(e.value)


def test_an_existing_cluster_name_is_checked() -> None:
    assert _settings(ecs_cluster_name="dagster_prod-1").ecs_cluster_name == "dagster_prod-1"
    with pytest.raises(SettingsError, match="'ecs_cluster_name' must be an ECS cluster name"):
        _settings(ecs_cluster_name="no spaces")


def test_the_secret_must_be_in_the_stacks_account_and_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDK_DEFAULT_ACCOUNT", "123456789012")
    monkeypatch.setenv("CDK_DEFAULT_REGION", "us-west-2")
    with pytest.raises(SettingsError, match="database_secret_arn is in eu-west-1:123456789012"):
        stack_environment(_settings(**DATABASE))


# -- the template -----------------------------------------------------------------------------


def test_no_database_and_no_cluster_are_created(existing_build: Build) -> None:
    types = {resource["Type"] for resource in existing_build.json["Resources"].values()}
    assert not {t for t in types if t.startswith("AWS::RDS::")}
    assert "AWS::ECS::Cluster" not in types
    assert "AWS::EC2::VPC" not in types
    # The one secret the stack creates is the signing key.
    (secret,) = existing_build.resources("AWS::SecretsManager::Secret")
    assert secret == existing_build.logical_id(existing_build.stack.signing_key.secret)


def test_the_users_database_admits_each_group_on_its_port(existing_build: Build) -> None:
    stack = existing_build.stack
    ingress = [
        r["Properties"]
        for r in existing_build.resources("AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == DATABASE_SECURITY_GROUP
    ]
    assert {(i["FromPort"], i["ToPort"], i["IpProtocol"]) for i in ingress} == {(6432, 6432, "tcp")}
    groups = [
        stack.workers.security_group,
        *(scaler.bundled.security_group for scaler in stack.scalers.values()),
        stack.dead_letters.bundled.security_group,
        stack.run_worker.security_group,
    ]
    assert sorted(_key(i["SourceSecurityGroupId"]) for i in ingress) == sorted(
        _key(existing_build.resolve(group.security_group_id)) for group in groups
    )


def test_workers_use_the_users_database_and_cluster(existing_build: Build) -> None:
    for pool in existing_build.stack.workers.pools.values():
        task = existing_build.resource(pool.task_definition)["Properties"]
        (container,) = task["ContainerDefinitions"]
        environment = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert environment["DAGSTER_PG_HOST"] == EXISTING_CONTEXT["database_endpoint"]
        assert environment["DAGSTER_PG_PORT"] == "6432"
        assert environment["DAGSTER_PG_DB"] == "dagster"
        # No user in the URL: it is the secret's, like the password.
        assert environment["DAGSTER_TASKIQ_DATABASE_URL"] == (
            "postgresql://dagster.cluster-c0ffee.eu-west-1.rds.amazonaws.com:6432/dagster"
            "?sslmode=require"
        )
        secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
        assert secrets["DAGSTER_PG_USER"] == f"{DATABASE_SECRET_ARN}:username::"
        assert secrets["DAGSTER_TASKIQ_DATABASE_USER"] == f"{DATABASE_SECRET_ARN}:username::"
        assert secrets["DAGSTER_TASKIQ_DATABASE_PASSWORD"] == f"{DATABASE_SECRET_ARN}:password::"
        service = existing_build.resource(pool.service)["Properties"]
        assert service["Cluster"] == EXISTING_CLUSTER
    execution_role = existing_build.stack.workers.task_definition.execution_role
    permissions = role_permissions(existing_build, execution_role)
    assert {(a, _key(DATABASE_SECRET_ARN)) for a in SECRET_READ} <= permissions


def test_lambdas_use_the_users_database(existing_build: Build) -> None:
    stack = existing_build.stack
    functions = [
        *(scaler.bundled for scaler in stack.scalers.values()),
        stack.dead_letters.bundled,
    ]
    for bundled in functions:
        variables = _function(existing_build, bundled.function)["Environment"]["Variables"]
        assert variables["DAGSTER_TASKIQ_DATABASE_SECRET_ARN"] == DATABASE_SECRET_ARN
        assert variables["DAGSTER_TASKIQ_DATABASE_URL"].startswith(
            "postgresql://dagster.cluster-c0ffee."
        )
        permissions = role_permissions(existing_build, bundled.role)
        assert ("secretsmanager:GetSecretValue", _key(DATABASE_SECRET_ARN)) in permissions
    for scaler in stack.scalers.values():
        variables = _function(existing_build, scaler.function)["Environment"]["Variables"]
        assert variables["DAGSTER_TASKIQ_ECS_CLUSTER"] == EXISTING_CLUSTER


def test_outputs_name_the_users_database_and_the_signing_key(existing_build: Build) -> None:
    outputs = existing_build.json["Outputs"]
    assert outputs["DatabaseEndpoint"]["Value"] == EXISTING_CONTEXT["database_endpoint"]
    assert outputs["DatabaseSecretArn"]["Value"] == DATABASE_SECRET_ARN
    assert outputs["EcsClusterName"]["Value"] == EXISTING_CLUSTER
    stack = existing_build.stack
    assert outputs["SigningKeySecretArn"]["Value"] == existing_build.resolve(
        stack.signing_key.secret.secret_arn
    )
    policy = existing_build.resource(stack.run_worker.policy)["Properties"]["PolicyDocument"]
    assert (
        "secretsmanager:GetSecretValue",
        _key(existing_build.resolve(stack.signing_key.secret.secret_arn)),
    ) in _permissions(policy)


def test_the_created_database_template_is_unchanged_by_the_new_settings(
    default_build: Build,
) -> None:
    """Without the settings, the database and its wiring are today's."""
    (cluster,) = default_build.resources("AWS::RDS::DBCluster").values()
    assert cluster["Properties"]["Port"] == 5432
    (task,) = default_build.resources("AWS::ECS::TaskDefinition").values()
    (container,) = task["Properties"]["ContainerDefinitions"]
    assert "DAGSTER_TASKIQ_DATABASE_USER" not in {s["Name"] for s in container["Secrets"]}
    url = json.dumps(
        {e["Name"]: e["Value"] for e in container["Environment"]}["DAGSTER_TASKIQ_DATABASE_URL"]
    )
    assert "postgresql://dagster_taskiq@" in url

"""The synthesized template: what each component must look like, with default and custom context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from cdk.dagster_taskiq_cdk.database import Database
from cdk.dagster_taskiq_cdk.lambda_bundle import LAMBDA_PYTHON_VERSION
from cdk.dagster_taskiq_cdk.paths import REPO_ROOT
from cdk.dagster_taskiq_cdk.settings import DLQ_RETENTION_SECONDS
from dagster_taskiq.core.settings import (
    ENV_ALERT_TOPIC_ARN,
    ENV_CODE_LOCATIONS,
    ENV_CONCURRENCY,
    ENV_DAGSTER_UI_URL,
    ENV_DATABASE_URL,
    ENV_QUEUE_URL,
)
from dagster_taskiq.scaling.scaler import ScalerSettings

from .conftest import Build

Permission = tuple[str, str]  # (action, resource as canonical JSON)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _key(resource: Any) -> str:
    return json.dumps(resource, sort_keys=True)


def _permissions(document: dict[str, Any]) -> set[Permission]:
    permissions: set[Permission] = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow", statement
        assert "Condition" not in statement, statement
        for action in _as_list(statement["Action"]):
            for resource in _as_list(statement["Resource"]):
                permissions.add((action, _key(resource)))
    return permissions


def role_permissions(build: Build, role: Any) -> set[Permission]:
    """Everything a role may do: its inline policies; it must have no other kind."""
    role_id = build.logical_id(role)
    properties = build.json["Resources"][role_id]["Properties"]
    assert "ManagedPolicyArns" not in properties, "no AWS managed policies"
    assert "Policies" not in properties
    permissions: set[Permission] = set()
    for policy in build.resources("AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            permissions |= _permissions(policy["Properties"]["PolicyDocument"])
    return permissions


def grant(build: Build, actions: list[str], resource: Any) -> set[Permission]:
    resolved = resource if resource == "*" else build.resolve(resource)
    return {(action, _key(resolved)) for action in actions}


def lambda_basics(build: Build, function: Any) -> set[Permission]:
    """What every function here has: its VPC interfaces, its own log group, X-Ray."""
    eni = [
        "ec2:AssignPrivateIpAddresses",
        "ec2:CreateNetworkInterface",
        "ec2:DeleteNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSubnets",
        "ec2:UnassignPrivateIpAddresses",
    ]
    return (
        grant(build, eni, "*")
        | grant(
            build, ["logs:CreateLogStream", "logs:PutLogEvents"], function.log_group.log_group_arn
        )
        | grant(build, ["xray:PutTraceSegments", "xray:PutTelemetryRecords"], "*")
    )


def secret_read(build: Build) -> set[Permission]:
    return grant(
        build,
        ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"],
        build.stack.database.secret.secret_arn,
    )


def signing_key_read(build: Build) -> set[Permission]:
    return grant(
        build,
        ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"],
        build.stack.signing_key.secret.secret_arn,
    )


def lambda_secret_read(build: Build, secret: Any) -> set[Permission]:
    """A Lambda reads a secret's value only (not DescribeSecret, which grant_read adds)."""
    return grant(build, ["secretsmanager:GetSecretValue"], secret.secret_arn)


def aurora(build: Build) -> Database:
    """The database the stack created (every build here but the existing-database one)."""
    database = build.stack.database
    assert isinstance(database, Database)
    return database


# -- the worker service ------------------------------------------------------------------


def service(build: Build) -> dict[str, Any]:
    resource = build.resource(build.stack.workers.service)
    properties: dict[str, Any] = resource["Properties"]
    return properties


def container(build: Build) -> dict[str, Any]:
    task = build.resource(build.stack.workers.task_definition)
    (definition,) = task["Properties"]["ContainerDefinitions"]
    result: dict[str, Any] = definition
    return result


def test_the_service_has_no_desired_count_the_scaler_owns_it(
    default_build: Build, custom_build: Build
) -> None:
    assert "DesiredCount" not in service(default_build)
    assert "DesiredCount" not in service(custom_build)


def test_capacity_providers_follow_spot_share(default_build: Build, custom_build: Build) -> None:
    assert service(default_build)["CapacityProviderStrategy"] == [
        {"CapacityProvider": "FARGATE", "Weight": 50},
        {"CapacityProvider": "FARGATE_SPOT", "Weight": 50},
    ]
    assert service(custom_build)["CapacityProviderStrategy"] == [
        {"CapacityProvider": "FARGATE_SPOT", "Weight": 100}
    ]
    assert "LaunchType" not in service(default_build)


def test_deployments_roll_back_on_failure_and_keep_workers_up(default_build: Build) -> None:
    deployment = service(default_build)["DeploymentConfiguration"]
    assert deployment["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert deployment["MinimumHealthyPercent"] == 100
    network = service(default_build)["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["AssignPublicIp"] == "DISABLED"


def test_stop_timeout_and_the_workers_own_is_shorter(
    default_build: Build, custom_build: Build
) -> None:
    for build, stop, worker_stop in ((default_build, 120, "105"), (custom_build, 60, "45")):
        definition = container(build)
        assert definition["StopTimeout"] == stop
        assert definition["EntryPoint"] == ["dagster-taskiq"]
        assert definition["Command"] == ["worker", "--stop-timeout", worker_stop]
        assert definition["LinuxParameters"]["InitProcessEnabled"] is True


def test_cluster_has_container_insights(default_build: Build) -> None:
    cluster = default_build.resource(default_build.stack.workers.cluster)
    assert {"Name": "containerInsights", "Value": "enhanced"} in cluster["Properties"][
        "ClusterSettings"
    ]


def test_worker_task_size_and_logs(default_build: Build, custom_build: Build) -> None:
    task = default_build.resource(default_build.stack.workers.task_definition)["Properties"]
    assert (task["Cpu"], task["Memory"]) == ("1024", "2048")
    assert task["RuntimePlatform"]["CpuArchitecture"] == "X86_64"
    custom = custom_build.resource(custom_build.stack.workers.task_definition)["Properties"]
    assert (custom["Cpu"], custom["Memory"]) == ("2048", "8192")
    logging = container(default_build)["LogConfiguration"]
    assert logging["LogDriver"] == "awslogs"
    log_group = default_build.resource(default_build.stack.workers.log_group)
    assert log_group["Properties"]["RetentionInDays"] == 30


def test_worker_environment(default_build: Build, custom_build: Build) -> None:
    definition = container(default_build)
    environment = {e["Name"]: e["Value"] for e in definition["Environment"]}
    stack = default_build.stack
    assert environment[ENV_QUEUE_URL] == default_build.resolve(stack.queues.queue.queue_url)
    assert environment[ENV_CONCURRENCY] == "2"
    assert environment[ENV_CODE_LOCATIONS] == "my_project.definitions"
    assert environment["DAGSTER_PG_HOST"] == default_build.resolve(stack.database.hostname)
    assert environment["DAGSTER_PG_PORT"] == "5432"
    assert environment["DAGSTER_PG_DB"] == "dagster"
    assert environment["POWERTOOLS_METRICS_NAMESPACE"] == "DagsterTaskiq"
    secret = default_build.resolve(stack.database.secret.secret_arn)
    secrets = {s["Name"]: s["ValueFrom"] for s in definition["Secrets"]}
    assert secrets == {
        "DAGSTER_PG_USER": {"Fn::Join": ["", [secret, ":username::"]]},
        "DAGSTER_PG_PASSWORD": {"Fn::Join": ["", [secret, ":password::"]]},
        "DAGSTER_TASKIQ_DATABASE_PASSWORD": {"Fn::Join": ["", [secret, ":password::"]]},
        # The whole secret is the key, injected by ECS: in no plain environment variable.
        "DAGSTER_TASKIQ_SIGNING_KEY": default_build.resolve(stack.signing_key.secret.secret_arn),
    }
    # The ledger connects with TLS and without a password in its URL.
    assert "sslmode=require" in json.dumps(environment["DAGSTER_TASKIQ_DATABASE_URL"])
    # No secret in the plain environment.
    assert not any("PASSWORD" in name for name in environment)
    custom = {e["Name"]: e["Value"] for e in container(custom_build)["Environment"]}
    assert custom[ENV_CONCURRENCY] == "4"
    assert custom[ENV_CODE_LOCATIONS] == "pipelines.defs,more.defs"


def _env_vars_read(node: Any) -> set[str]:
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return {node["env"]}
        return set().union(*(_env_vars_read(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_env_vars_read(v) for v in node))
    return set()


def test_the_worker_image_dagster_yaml_gets_every_variable_it_reads(default_build: Build) -> None:
    dagster_yaml = yaml.safe_load((REPO_ROOT / "worker_image" / "dagster.yaml").read_text())
    needed = _env_vars_read(dagster_yaml)
    definition = container(default_build)
    provided = {e["Name"] for e in definition["Environment"]} | {
        s["Name"] for s in definition["Secrets"]
    }
    assert needed, "dagster.yaml reads no environment variable?"
    assert needed <= provided, f"dagster.yaml reads {sorted(needed - provided)}, not set"


def test_worker_image_context_is_the_repository_cut_down(default_build: Build) -> None:
    assets = json.loads(
        (
            Path(default_build.app.outdir) / f"{default_build.stack.stack_name}.assets.json"
        ).read_text()
    )
    (image,) = assets["dockerImages"].values()
    assert image["source"]["dockerFile"] == "worker_image/Dockerfile"
    staged = Path(default_build.app.outdir) / image["source"]["directory"]
    names = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    for needed in (
        "worker_image/Dockerfile",
        "worker_image/dagster.yaml",
        "constraints.txt",
        "pyproject.toml",
        "README.md",
        "executor/dagster_taskiq/__init__.py",
    ):
        assert needed in names
    for unwanted in (".venv/", "node_modules/", ".git/", "cdk.out/", "build/", "tests/"):
        assert not any(name.startswith(unwanted) for name in names), unwanted
    assert not any("__pycache__" in name for name in names)


# -- IAM: exactly what each principal may do ----------------------------------------------


def test_worker_task_role_only_works_the_queue(default_build: Build) -> None:
    stack = default_build.stack
    task_role = stack.workers.task_definition.task_role
    assert role_permissions(default_build, task_role) == grant(
        default_build,
        # Not GetQueueAttributes: a worker never reads them (test_least_privilege runs it).
        ["sqs:ChangeMessageVisibility", "sqs:DeleteMessage", "sqs:ReceiveMessage"],
        stack.queues.queue.queue_arn,
    )


def test_worker_execution_role_pulls_logs_and_reads_the_secret(default_build: Build) -> None:
    stack = default_build.stack
    execution_role = stack.workers.task_definition.execution_role
    permissions = role_permissions(default_build, execution_role)
    assert {action for action, _ in permissions} == {
        "ecr:BatchCheckLayerAvailability",
        "ecr:BatchGetImage",
        "ecr:GetAuthorizationToken",
        "ecr:GetDownloadUrlForLayer",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "secretsmanager:DescribeSecret",
        "secretsmanager:GetSecretValue",
    }
    assert secret_read(default_build) <= permissions
    assert signing_key_read(default_build) <= permissions
    assert ("ecr:GetAuthorizationToken", _key("*")) in permissions
    # The only "*" is GetAuthorizationToken, which has no resource-level permission.
    assert {a for a, r in permissions if r == _key("*")} == {"ecr:GetAuthorizationToken"}


def test_scaler_role(default_build: Build) -> None:
    stack = default_build.stack
    scaler = stack.scaler.bundled
    assert role_permissions(default_build, scaler.role) == (
        lambda_basics(default_build, scaler)
        | grant(default_build, ["sqs:GetQueueAttributes"], stack.queues.queue.queue_arn)
        | grant(
            default_build,
            ["ecs:DescribeServices", "ecs:UpdateService"],
            stack.workers.service.service_arn,
        )
        | lambda_secret_read(default_build, stack.database.secret)
    )


def test_dead_letter_processor_role(default_build: Build) -> None:
    stack = default_build.stack
    processor = stack.dead_letters.bundled
    assert role_permissions(default_build, processor.role) == (
        lambda_basics(default_build, processor)
        | grant(
            default_build,
            [
                "sqs:ChangeMessageVisibility",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
                "sqs:GetQueueUrl",
                "sqs:ReceiveMessage",
            ],
            stack.queues.dead_letter_queue.queue_arn,
        )
        | grant(default_build, ["sns:Publish"], stack.alerts.topic.topic_arn)
        | grant(default_build, ["kms:Decrypt", "kms:GenerateDataKey"], stack.alerts.key.key_arn)
        | lambda_secret_read(default_build, stack.database.secret)
        | lambda_secret_read(default_build, stack.signing_key.secret)
    )


def test_run_worker_policy(default_build: Build) -> None:
    stack = default_build.stack
    policy = default_build.resource(stack.run_worker.policy)
    assert _permissions(policy["Properties"]["PolicyDocument"]) == (
        grant(
            default_build,
            ["sqs:GetQueueAttributes", "sqs:SendMessage"],
            stack.queues.queue.queue_arn,
        )
        | grant(default_build, ["lambda:InvokeFunction"], stack.scaler.function.function_arn)
        | grant(default_build, ["ecs:DescribeServices"], stack.workers.service.service_arn)
        | grant(
            default_build,
            ["secretsmanager:GetSecretValue"],
            stack.signing_key.secret.secret_arn,
        )
    )


def test_no_principal_gets_a_wildcard_action(default_build: Build) -> None:
    documents = [
        r["Properties"]["PolicyDocument"]
        for r in default_build.json["Resources"].values()
        if r["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy")
    ]
    actions = {a for d in documents for s in d["Statement"] for a in _as_list(s["Action"])}
    assert not [a for a in actions if "*" in a]


# -- queues --------------------------------------------------------------------------------


def test_redrive_after_max_receive_count(default_build: Build, custom_build: Build) -> None:
    for build, expected in ((default_build, 5), (custom_build, 7)):
        queue = build.resource(build.stack.queues.queue)["Properties"]
        assert queue["RedrivePolicy"] == {
            "deadLetterTargetArn": build.resolve(build.stack.queues.dead_letter_queue.queue_arn),
            "maxReceiveCount": expected,
        }


def test_dead_letters_outlive_the_queue(default_build: Build, custom_build: Build) -> None:
    for build, retention in ((default_build, 345_600), (custom_build, 86_400)):
        queue = build.resource(build.stack.queues.queue)["Properties"]
        dlq = build.resource(build.stack.queues.dead_letter_queue)["Properties"]
        assert queue["MessageRetentionPeriod"] == retention
        assert dlq["MessageRetentionPeriod"] == DLQ_RETENTION_SECONDS
        assert dlq["MessageRetentionPeriod"] > queue["MessageRetentionPeriod"]


def test_queue_visibility_is_the_lease(default_build: Build, custom_build: Build) -> None:
    assert (
        default_build.resource(default_build.stack.queues.queue)["Properties"]["VisibilityTimeout"]
        == 300
    )
    assert (
        custom_build.resource(custom_build.stack.queues.queue)["Properties"]["VisibilityTimeout"]
        == 600
    )
    dlq = default_build.resource(default_build.stack.queues.dead_letter_queue)["Properties"]
    processor = default_build.resource(default_build.stack.dead_letters.function)["Properties"]
    # The event source mapping requires the DLQ's visibility to cover the function's timeout.
    assert dlq["VisibilityTimeout"] >= processor["Timeout"]


def _denies_insecure_transport(document: dict[str, Any], resource: Any) -> bool:
    return any(
        statement["Effect"] == "Deny"
        and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        and resource in _as_list(statement["Resource"])
        for statement in document["Statement"]
    )


def test_queues_are_encrypted_and_tls_only(default_build: Build) -> None:
    policies = default_build.resources("AWS::SQS::QueuePolicy").values()
    for queue in (default_build.stack.queues.queue, default_build.stack.queues.dead_letter_queue):
        assert default_build.resource(queue)["Properties"]["SqsManagedSseEnabled"] is True
        arn = default_build.resolve(queue.queue_arn)
        assert any(
            _denies_insecure_transport(p["Properties"]["PolicyDocument"], arn) for p in policies
        )


def test_alert_topic_is_encrypted_and_tls_only(default_build: Build) -> None:
    alerts = default_build.stack.alerts
    topic = default_build.resource(alerts.topic)["Properties"]
    assert topic["KmsMasterKeyId"] == default_build.resolve(alerts.key.key_arn)
    assert default_build.resource(alerts.key)["Properties"]["EnableKeyRotation"] is True
    (policy,) = default_build.resources("AWS::SNS::TopicPolicy").values()
    document = policy["Properties"]["PolicyDocument"]
    assert _denies_insecure_transport(document, default_build.resolve(alerts.topic.topic_arn))
    # CloudWatch alarms may publish (the topic policy replaces SNS's default one) and use the key.
    assert any(
        s["Effect"] == "Allow" and s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
        for s in document["Statement"]
    )
    key_policy = default_build.resource(alerts.key)["Properties"]["KeyPolicy"]
    assert any(
        s.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
        for s in key_policy["Statement"]
    )


def test_alert_email_subscription_only_when_set(default_build: Build, custom_build: Build) -> None:
    assert default_build.resources("AWS::SNS::Subscription") == {}
    (subscription,) = custom_build.resources("AWS::SNS::Subscription").values()
    assert subscription["Properties"]["Protocol"] == "email"
    assert subscription["Properties"]["Endpoint"] == "oncall@example.com"


# -- the Lambdas -----------------------------------------------------------------------------


def _function(build: Build, function: Any) -> dict[str, Any]:
    properties: dict[str, Any] = build.resource(function)["Properties"]
    return properties


def _placeholders(variables: dict[str, Any]) -> dict[str, str]:
    """Deploy-time values (references) replaced with sample strings."""
    return {k: v if isinstance(v, str) else f"<{k}>" for k, v in variables.items()}


def test_functions_run_the_bundle_on_the_newest_python_x86(default_build: Build) -> None:
    for function in (
        default_build.stack.scaler.function,
        default_build.stack.dead_letters.function,
    ):
        properties = _function(default_build, function)
        assert properties["Runtime"] == f"python{LAMBDA_PYTHON_VERSION}" == "python3.14"
        assert properties["Architectures"] == ["x86_64"]
        assert properties["Handler"] == "handler.lambda_handler"
        assert properties["TracingConfig"] == {"Mode": "Active"}
        assert properties["VpcConfig"]["SubnetIds"]


def test_scaler_function(default_build: Build) -> None:
    scaler = _function(default_build, default_build.stack.scaler.function)
    assert scaler["Timeout"] == 70
    # Room for a triggered invocation beside the scheduled one; the scaler's lock in the
    # database serializes their evaluations.
    assert scaler["ReservedConcurrentExecutions"] == 3


def test_scaler_environment_is_what_the_scaler_reads(
    default_build: Build, custom_build: Build
) -> None:
    for build, expected in (
        (default_build, (0, 10, 5, 2, 60, None, 60)),
        (custom_build, (1, 4, 3, 4, 120, 90, 45)),
    ):
        variables = _function(build, build.stack.scaler.function)["Environment"]["Variables"]
        settings = ScalerSettings.from_env(_placeholders(variables))
        config = settings.config
        assert (
            config.min_workers,
            config.max_workers,
            config.target_backlog_per_worker,
            config.steps_per_worker,
            config.scale_in_stabilization_seconds,
            config.target_wait_seconds,
            config.scale_out_lead_seconds,
        ) == expected
        stack = build.stack
        assert variables[ENV_QUEUE_URL] == build.resolve(stack.queues.queue.queue_url)
        assert variables["DAGSTER_TASKIQ_ECS_CLUSTER"] == build.resolve(
            stack.workers.cluster.cluster_name
        )
        assert variables["DAGSTER_TASKIQ_ECS_SERVICE"] == build.resolve(
            stack.workers.service.service_name
        )
        _check_database_variables(build, variables)


def _check_database_variables(build: Build, variables: dict[str, Any]) -> None:
    """The ledger URL names user, host and database but holds no password; the secret does."""
    url = variables[ENV_DATABASE_URL]
    parts = url["Fn::Join"][1]
    assert parts[0] == "postgresql://dagster_taskiq@"
    assert parts[-1] == ":5432/dagster?sslmode=require"
    assert variables["DAGSTER_TASKIQ_DATABASE_SECRET_ARN"] == build.resolve(
        build.stack.database.secret.secret_arn
    )


def test_scaler_runs_every_minute(default_build: Build) -> None:
    (rule,) = default_build.resources("AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == default_build.resolve(default_build.stack.scaler.function.function_arn)


def test_dead_letter_processor_event_source(default_build: Build) -> None:
    (mapping,) = default_build.resources("AWS::Lambda::EventSourceMapping").values()
    properties = mapping["Properties"]
    stack = default_build.stack
    assert properties["EventSourceArn"] == default_build.resolve(
        stack.queues.dead_letter_queue.queue_arn
    )
    assert properties["FunctionName"] == default_build.resolve(
        stack.dead_letters.function.function_name
    )
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert properties["BatchSize"] == 10


def test_dead_letter_processor_environment(default_build: Build, custom_build: Build) -> None:
    for build in (default_build, custom_build):
        variables = _function(build, build.stack.dead_letters.function)["Environment"]["Variables"]
        assert variables[ENV_ALERT_TOPIC_ARN] == build.resolve(build.stack.alerts.topic.topic_arn)
        _check_database_variables(build, variables)
        # The key by its secret's ARN, never the key itself.
        assert variables["DAGSTER_TASKIQ_SIGNING_KEY_SECRET_ARN"] == build.resolve(
            build.stack.signing_key.secret.secret_arn
        )
        assert "DAGSTER_TASKIQ_SIGNING_KEY" not in variables
    default = _function(default_build, default_build.stack.dead_letters.function)
    assert ENV_DAGSTER_UI_URL not in default["Environment"]["Variables"]
    custom = _function(custom_build, custom_build.stack.dead_letters.function)
    assert custom["Environment"]["Variables"][ENV_DAGSTER_UI_URL] == "https://dagster.example.com"


# -- database and network --------------------------------------------------------------------


def test_database(default_build: Build, custom_build: Build) -> None:
    cluster = default_build.resource(aurora(default_build).cluster)["Properties"]
    assert cluster["Engine"] == "aurora-postgresql"
    assert cluster["EngineVersion"].startswith("16.")
    assert cluster["StorageEncrypted"] is True
    assert cluster["DeletionProtection"] is True
    assert cluster["EnableIAMDatabaseAuthentication"] is True
    assert cluster["ServerlessV2ScalingConfiguration"] == {"MinCapacity": 0.5, "MaxCapacity": 4}
    custom = custom_build.resource(aurora(custom_build).cluster)["Properties"]
    assert custom["DeletionProtection"] is False
    assert custom["EnableIAMDatabaseAuthentication"] is False
    (instance,) = default_build.resources("AWS::RDS::DBInstance").values()
    assert instance["Properties"]["DBInstanceClass"] == "db.serverless"
    assert instance["Properties"].get("PubliclyAccessible") is not True


def test_database_admits_only_the_system_on_5432(default_build: Build) -> None:
    stack = default_build.stack
    database_group = default_build.resolve(stack.database.security_group.security_group_id)
    sources = set()
    for ingress in default_build.resources("AWS::EC2::SecurityGroupIngress").values():
        properties = ingress["Properties"]
        if properties["GroupId"] != database_group:
            continue
        assert (properties["FromPort"], properties["ToPort"]) == (5432, 5432)
        assert "CidrIp" not in properties
        sources.add(_key(properties["SourceSecurityGroupId"]))
    database_properties = default_build.resource(stack.database.security_group)["Properties"]
    assert "SecurityGroupIngress" not in database_properties
    expected = {
        _key(default_build.resolve(group.security_group_id))
        for group in (
            stack.workers.security_group,
            stack.scaler.bundled.security_group,
            stack.dead_letters.bundled.security_group,
            stack.run_worker.security_group,
        )
    }
    assert sources == expected


def test_new_vpc_two_azs_one_nat_flow_logs(default_build: Build) -> None:
    assert len(default_build.resources("AWS::EC2::NatGateway")) == 1
    subnets = default_build.resources("AWS::EC2::Subnet").values()
    private = [s for s in subnets if s["Properties"]["MapPublicIpOnLaunch"] is False]
    assert len(private) == 2
    assert len(default_build.resources("AWS::EC2::FlowLog")) == 1


# -- monitoring --------------------------------------------------------------------------------


def _dashboard_text(build: Build) -> str:
    (dashboard,) = build.resources("AWS::CloudWatch::Dashboard").values()
    body = dashboard["Properties"]["DashboardBody"]
    parts = body["Fn::Join"][1] if isinstance(body, dict) else [body]
    return "".join(p if isinstance(p, str) else json.dumps(p) for p in parts)


def test_dashboard_shows_the_key_metrics(default_build: Build) -> None:
    text = _dashboard_text(default_build)
    for metric in (
        "ApproximateNumberOfMessagesVisible",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateAgeOfOldestMessage",
        "ECS/ContainerInsights",
        "DesiredTaskCount",
        "RunningTaskCount",
        "DagsterTaskiq",
        "StepsStarted",
        "StepsSucceeded",
        "StepsFailed",
        "StepsDeadLettered",
        "DuplicatesSuppressed",
        "LeasesLost",
        "DesiredWorkers",
        "ScalingDecisions",
        "ScalerErrors",
        "Errors",
        "Duration",
    ):
        assert metric in text, metric


def _alarm(build: Build, alarm: Any) -> dict[str, Any]:
    properties: dict[str, Any] = build.resource(alarm)["Properties"]
    return properties


def _alarm_metric_names(properties: dict[str, Any]) -> set[str]:
    return {
        query["MetricStat"]["Metric"]["MetricName"]
        for query in properties.get("Metrics", [])
        if "MetricStat" in query
    } | ({properties["MetricName"]} if "MetricName" in properties else set())


def test_four_alarms_notify_the_topic(default_build: Build, custom_build: Build) -> None:
    monitoring = default_build.stack.monitoring
    assert len(default_build.resources("AWS::CloudWatch::Alarm")) == 4
    topic = default_build.resolve(default_build.stack.alerts.topic.topic_arn)
    for alarm in monitoring.alarms:
        properties = _alarm(default_build, alarm)
        assert properties["AlarmActions"] == [topic]
        assert properties["OKActions"] == [topic]
        assert properties["TreatMissingData"] == "notBreaching"

    dead_letters = _alarm(default_build, monitoring.dead_letters_alarm)
    assert "ApproximateNumberOfMessagesVisible" in _alarm_metric_names(dead_letters)
    assert (dead_letters["Threshold"], dead_letters["ComparisonOperator"]) == (
        0,
        "GreaterThanThreshold",
    )
    oldest = _alarm(default_build, monitoring.oldest_step_alarm)
    assert oldest["MetricName"] == "ApproximateAgeOfOldestMessage"
    assert oldest["Threshold"] == 900
    custom_oldest = _alarm(custom_build, custom_build.stack.monitoring.oldest_step_alarm)
    assert custom_oldest["Threshold"] == 600
    scaler = _alarm(default_build, monitoring.scaler_alarm)
    assert _alarm_metric_names(scaler) == {"Errors", "ScalerErrors"}
    assert scaler["Threshold"] == 0
    # Held at max_workers for max_workers_alarm_minutes (30; 15 in the custom build).
    for build, periods in ((default_build, 6), (custom_build, 3)):
        alarms = build.stack.monitoring.pool_alarms["default"]
        at_max = _alarm(build, alarms.at_max_workers)
        assert at_max["MetricName"] == "AtMaxWorkers"
        assert (at_max["Statistic"], at_max["Period"]) == ("Average", 300)
        assert at_max["EvaluationPeriods"] == periods
        assert at_max["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        # The scaler's metrics name the worker service alike (cluster/service).
        (scaler_errors,) = [
            query["MetricStat"]["Metric"]
            for query in _alarm(build, alarms.scaler)["Metrics"]
            if "MetricStat" in query
            and query["MetricStat"]["Metric"]["MetricName"] == "ScalerErrors"
        ]
        assert at_max["Dimensions"] == scaler_errors["Dimensions"]


# -- outputs ----------------------------------------------------------------------------------


def test_outputs(default_build: Build) -> None:
    outputs = default_build.json["Outputs"]
    stack = default_build.stack
    expected = {
        "QueueUrl": stack.queues.queue.queue_url,
        "DeadLetterQueueUrl": stack.queues.dead_letter_queue.queue_url,
        "ScalerFunctionName": stack.scaler.function.function_name,
        "EcsClusterName": stack.workers.cluster.cluster_name,
        "EcsServiceName": stack.workers.service.service_name,
        "DatabaseSecretArn": stack.database.secret.secret_arn,
        "DatabaseEndpoint": stack.database.hostname,
        "SigningKeySecretArn": stack.signing_key.secret.secret_arn,
        "AlertTopicArn": stack.alerts.topic.topic_arn,
        "RunWorkerPolicyArn": stack.run_worker.policy.managed_policy_arn,
        "RunWorkerSecurityGroupId": stack.run_worker.security_group.security_group_id,
        # For the operations commands: `dagster-taskiq logs` reads these groups.
        "WorkerLogGroupName": stack.workers.log_group.log_group_name,
        "ScalerLogGroupName": stack.scaler.bundled.log_group.log_group_name,
        "DeadLetterProcessorLogGroupName": stack.dead_letters.bundled.log_group.log_group_name,
    }
    for name, value in expected.items():
        assert outputs[name]["Value"] == default_build.resolve(value), name
    assert outputs["MessageRetentionSeconds"]["Value"] == "345600"


def test_stack_names_follow_the_environment(default_build: Build, custom_build: Build) -> None:
    assert default_build.stack.stack_name == "DagsterTaskiq-dev"
    assert custom_build.stack.stack_name == "DagsterTaskiq-staging"

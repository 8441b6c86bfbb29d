"""Several worker pools: each its queues (lane, FIFO), service, scaler, alarms and outputs."""

from __future__ import annotations

from typing import Any

import pytest

from cdk.dagster_taskiq_cdk import environment as env
from cdk.dagster_taskiq_cdk.queue import StepQueues
from cdk.dagster_taskiq_cdk.settings import DLQ_RETENTION_SECONDS
from dagster_taskiq.core.settings import (
    ENV_CODE_LOCATIONS,
    ENV_CONCURRENCY,
    ENV_ECS_SERVICE,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
)

from .conftest import Build
from .test_stack import (
    _alarm,
    _dashboard_text,
    _denies_insecure_transport,
    _function,
    _key,
    _permissions,
    grant,
    lambda_basics,
    lambda_secret_read,
    role_permissions,
)

POOL_NAMES = ["default", "high-mem", "ordered"]
WORKER_QUEUE_ACTIONS = ["sqs:ChangeMessageVisibility", "sqs:DeleteMessage", "sqs:ReceiveMessage"]


def _queues(build: Build, pool: str) -> StepQueues:
    return build.stack.pool_queues[pool]


def _container(build: Build, pool: str) -> dict[str, Any]:
    task = build.resource(build.stack.workers.pools[pool].task_definition)
    (definition,) = task["Properties"]["ContainerDefinitions"]
    result: dict[str, Any] = definition
    return result


def _environment(build: Build, pool: str) -> dict[str, Any]:
    return {e["Name"]: e["Value"] for e in _container(build, pool)["Environment"]}


def _queue_properties(build: Build, queue: Any) -> dict[str, Any]:
    properties: dict[str, Any] = build.resource(queue)["Properties"]
    return properties


def test_every_pool_is_built_in_the_order_given(pools_build: Build) -> None:
    stack = pools_build.stack
    assert list(stack.pool_queues) == POOL_NAMES
    assert list(stack.workers.pools) == POOL_NAMES
    assert list(stack.scalers) == POOL_NAMES
    assert len(pools_build.resources("AWS::ECS::Service")) == 3
    assert len(pools_build.resources("AWS::ECS::TaskDefinition")) == 3
    # One cluster, one security group for every pool's workers.
    assert len(pools_build.resources("AWS::ECS::Cluster")) == 1
    services = pools_build.resources("AWS::ECS::Service").values()
    cluster = pools_build.resolve(stack.workers.cluster.cluster_name)
    assert all(s["Properties"]["Cluster"] == cluster for s in services)
    assert all("DesiredCount" not in s["Properties"] for s in services)


def test_the_default_pool_keeps_its_logical_ids(default_build: Build, pools_build: Build) -> None:
    """Adding pools to a deployment does not replace the default pool's queue or service."""

    def ids(build: Build) -> list[str]:
        stack = build.stack
        return [
            build.logical_id(construct)
            for construct in (
                stack.queues.queue,
                stack.queues.dead_letter_queue,
                stack.workers.service,
                stack.workers.task_definition,
                stack.workers.log_group,
                stack.scaler.function,
                stack.scaler.schedule,
                stack.monitoring.dead_letters_alarm,
                stack.monitoring.oldest_step_alarm,
                stack.monitoring.scaler_alarm,
            )
        ]

    assert ids(pools_build) == ids(default_build)


# -- queues --------------------------------------------------------------------------------


def test_only_pools_with_a_lane_have_one(default_build: Build, pools_build: Build) -> None:
    assert default_build.stack.queues.priority_queue is None
    assert len(default_build.resources("AWS::SQS::Queue")) == 2
    assert _queues(pools_build, "high-mem").priority_queue is None
    # default: queue, lane, DLQ; high-mem: queue, DLQ; ordered: queue, lane, DLQ.
    assert len(pools_build.resources("AWS::SQS::Queue")) == 8


@pytest.mark.parametrize("pool", ["default", "ordered"])
def test_the_lane_is_a_step_queue_that_dead_letters_into_the_pools_dlq(
    pools_build: Build, pool: str
) -> None:
    queues = _queues(pools_build, pool)
    assert queues.priority_queue is not None
    lane = _queue_properties(pools_build, queues.priority_queue)
    main = _queue_properties(pools_build, queues.queue)
    for name in (
        "MessageRetentionPeriod",
        "VisibilityTimeout",
        "ReceiveMessageWaitTimeSeconds",
        "SqsManagedSseEnabled",
        "RedrivePolicy",
        "FifoQueue",
        "ContentBasedDeduplication",
    ):
        assert lane.get(name) == main.get(name), name
    assert lane["RedrivePolicy"] == {
        "deadLetterTargetArn": pools_build.resolve(queues.dead_letter_queue.queue_arn),
        "maxReceiveCount": 5,
    }
    assert lane["SqsManagedSseEnabled"] is True
    assert queues.step_queues == [queues.queue, queues.priority_queue]


def test_every_queue_is_encrypted_and_tls_only(pools_build: Build) -> None:
    policies = pools_build.resources("AWS::SQS::QueuePolicy").values()
    for pool in POOL_NAMES:
        queues = _queues(pools_build, pool)
        for queue in [*queues.step_queues, queues.dead_letter_queue]:
            assert _queue_properties(pools_build, queue)["SqsManagedSseEnabled"] is True
            arn = pools_build.resolve(queue.queue_arn)
            assert any(
                _denies_insecure_transport(p["Properties"]["PolicyDocument"], arn) for p in policies
            ), (pool, queue.node.path)


@pytest.mark.parametrize(
    ("pool", "suffixes"),
    [("high-mem", ["", "-dlq"]), ("ordered", ["", "-priority", "-dlq"])],
)
def test_fifo_pools_have_fifo_queues_and_dlq(
    pools_build: Build, pool: str, suffixes: list[str]
) -> None:
    queues = _queues(pools_build, pool)
    names = []
    for queue in [*queues.step_queues, queues.dead_letter_queue]:
        properties = _queue_properties(pools_build, queue)
        assert properties["FifoQueue"] is True
        # The executor sends the idempotency key as the deduplication id.
        assert properties["ContentBasedDeduplication"] is False
        names.append(properties["QueueName"])
    assert names == [f"DagsterTaskiq-pools-{pool}{suffix}.fifo" for suffix in suffixes]
    for queue in queues.step_queues:
        properties = _queue_properties(pools_build, queue)
        assert properties["RedrivePolicy"]["deadLetterTargetArn"] == pools_build.resolve(
            queues.dead_letter_queue.queue_arn
        )
    dlq = _queue_properties(pools_build, queues.dead_letter_queue)
    assert dlq["MessageRetentionPeriod"] == DLQ_RETENTION_SECONDS


def test_standard_pools_stay_standard(pools_build: Build) -> None:
    queues = _queues(pools_build, "default")
    for queue in [*queues.step_queues, queues.dead_letter_queue]:
        properties = _queue_properties(pools_build, queue)
        assert "FifoQueue" not in properties
        assert "ContentBasedDeduplication" not in properties
        assert "QueueName" not in properties


# -- worker services ---------------------------------------------------------------------------


def test_each_pools_workers_read_their_own_queues(pools_build: Build) -> None:
    default, high_mem, ordered = (_queues(pools_build, pool) for pool in POOL_NAMES)
    assert ordered.priority_queue is not None and default.priority_queue is not None
    expected = {
        "default": (default.queue, default.priority_queue),
        "high-mem": (high_mem.queue, None),
        "ordered": (ordered.queue, ordered.priority_queue),
    }
    for pool, (queue, lane) in expected.items():
        environment = _environment(pools_build, pool)
        assert environment[ENV_QUEUE_URL] == pools_build.resolve(queue.queue_url), pool
        if lane is None:
            assert ENV_PRIORITY_QUEUE_URL not in environment
        else:
            assert environment[ENV_PRIORITY_QUEUE_URL] == pools_build.resolve(lane.queue_url)


def test_a_pool_without_a_lane_gets_no_priority_variable(default_build: Build) -> None:
    assert ENV_PRIORITY_QUEUE_URL not in _environment(default_build, "default")


def test_pools_share_the_image_and_differ_in_size_and_concurrency(pools_build: Build) -> None:
    images = {_key(_container(pools_build, pool)["Image"]) for pool in POOL_NAMES}
    assert len(images) == 1
    sizes = {}
    for pool in POOL_NAMES:
        task = pools_build.resource(pools_build.stack.workers.pools[pool].task_definition)
        sizes[pool] = (task["Properties"]["Cpu"], task["Properties"]["Memory"])
    assert sizes == {
        "default": ("1024", "2048"),
        "high-mem": ("4096", "16384"),
        "ordered": ("1024", "2048"),
    }
    high_mem = _environment(pools_build, "high-mem")
    assert high_mem[ENV_CONCURRENCY] == "1"
    assert high_mem[ENV_CODE_LOCATIONS] == "heavy.defs"
    default = _environment(pools_build, "default")
    assert default[ENV_CONCURRENCY] == "2"
    assert default[ENV_CODE_LOCATIONS] == "my_project.definitions"


def test_capacity_providers_follow_each_pools_spot_share(pools_build: Build) -> None:
    def strategy(pool: str) -> Any:
        service = pools_build.resource(pools_build.stack.workers.pools[pool].service)
        return service["Properties"]["CapacityProviderStrategy"]

    assert strategy("high-mem") == [{"CapacityProvider": "FARGATE", "Weight": 100}]
    assert strategy("default") == [
        {"CapacityProvider": "FARGATE", "Weight": 50},
        {"CapacityProvider": "FARGATE_SPOT", "Weight": 50},
    ]


def test_a_pools_workers_cannot_touch_another_pools_queues(pools_build: Build) -> None:
    every_queue = {
        pool: [
            *_queues(pools_build, pool).step_queues,
            _queues(pools_build, pool).dead_letter_queue,
        ]
        for pool in POOL_NAMES
    }
    for pool in POOL_NAMES:
        task_role = pools_build.stack.workers.pools[pool].task_definition.task_role
        permissions = role_permissions(pools_build, task_role)
        expected: set[tuple[str, str]] = set()
        for queue in _queues(pools_build, pool).step_queues:
            expected |= grant(pools_build, WORKER_QUEUE_ACTIONS, queue.queue_arn)
        assert permissions == expected, pool
        others = {
            _key(pools_build.resolve(queue.queue_arn))
            for other, queues in every_queue.items()
            if other != pool
            for queue in queues
        }
        assert not {resource for _, resource in permissions} & others, pool


# -- scalers -------------------------------------------------------------------------------


def test_each_pool_has_its_scaler_on_its_own_schedule(pools_build: Build) -> None:
    rules = pools_build.resources("AWS::Events::Rule").values()
    targets = {
        pools_build.resolve(r["Properties"]["Targets"][0]["Arn"])["Fn::GetAtt"][0] for r in rules
    }
    assert all(r["Properties"]["ScheduleExpression"] == "rate(1 minute)" for r in rules)
    assert targets == {
        pools_build.logical_id(pools_build.stack.scalers[pool].function) for pool in POOL_NAMES
    }
    for pool in POOL_NAMES:
        properties = _function(pools_build, pools_build.stack.scalers[pool].function)
        assert properties["ReservedConcurrentExecutions"] == 3


def test_a_scaler_reads_its_pools_queues_and_sets_its_pools_service(pools_build: Build) -> None:
    stack = pools_build.stack
    expected_config = {
        "default": ("0", "10", "5", "2"),
        "high-mem": ("1", "3", "2", "1"),
        "ordered": ("0", "10", "5", "2"),
    }
    for pool in POOL_NAMES:
        variables = _function(pools_build, stack.scalers[pool].function)["Environment"]["Variables"]
        urls = [pools_build.resolve(q.queue_url) for q in _queues(pools_build, pool).step_queues]
        # A comma-separated list, the step queue first; one queue is a plain reference.
        expected_urls = urls[0] if len(urls) == 1 else {"Fn::Join": [",", urls]}
        assert variables[ENV_QUEUE_URL] == expected_urls, pool
        assert variables[ENV_ECS_SERVICE] == pools_build.resolve(
            stack.workers.pools[pool].service.service_name
        )
        assert (
            variables[env.MIN_WORKERS],
            variables[env.MAX_WORKERS],
            variables[env.TARGET_BACKLOG],
            variables[env.STEPS_PER_WORKER],
        ) == expected_config[pool], pool


def test_a_scalers_role_is_its_pools_only(pools_build: Build) -> None:
    stack = pools_build.stack
    for pool in POOL_NAMES:
        scaler = stack.scalers[pool].bundled
        queues = _queues(pools_build, pool).step_queues
        expected = lambda_basics(pools_build, scaler) | lambda_secret_read(
            pools_build, stack.database.secret
        )
        for queue in queues:
            expected |= grant(pools_build, ["sqs:GetQueueAttributes"], queue.queue_arn)
        expected |= grant(
            pools_build,
            ["ecs:DescribeServices", "ecs:UpdateService"],
            stack.workers.pools[pool].service.service_arn,
        )
        assert role_permissions(pools_build, scaler.role) == expected, pool


def test_every_scaler_may_reach_the_database(pools_build: Build) -> None:
    stack = pools_build.stack
    database_group = pools_build.resolve(stack.database.security_group.security_group_id)
    sources = {
        _key(ingress["Properties"]["SourceSecurityGroupId"])
        for ingress in pools_build.resources("AWS::EC2::SecurityGroupIngress").values()
        if ingress["Properties"]["GroupId"] == database_group
    }
    for pool in POOL_NAMES:
        group = stack.scalers[pool].bundled.security_group
        assert _key(pools_build.resolve(group.security_group_id)) in sources, pool


# -- dead letters and the run worker ---------------------------------------------------------


def test_one_dead_letter_processor_takes_every_pools_dlq(pools_build: Build) -> None:
    stack = pools_build.stack
    assert len(pools_build.resources("AWS::Lambda::Function")) == 1 + 3 + 1  # + VPC custom res.
    mappings = pools_build.resources("AWS::Lambda::EventSourceMapping").values()
    function = pools_build.resolve(stack.dead_letters.function.function_name)
    assert all(m["Properties"]["FunctionName"] == function for m in mappings)
    assert all(
        m["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"] for m in mappings
    )
    assert sorted(_key(m["Properties"]["EventSourceArn"]) for m in mappings) == sorted(
        _key(pools_build.resolve(_queues(pools_build, pool).dead_letter_queue.queue_arn))
        for pool in POOL_NAMES
    )
    expected = (
        lambda_basics(pools_build, stack.dead_letters.bundled)
        | grant(pools_build, ["sns:Publish"], stack.alerts.topic.topic_arn)
        | grant(pools_build, ["kms:Decrypt", "kms:GenerateDataKey"], stack.alerts.key.key_arn)
        | lambda_secret_read(pools_build, stack.database.secret)
        | lambda_secret_read(pools_build, stack.signing_key.secret)
    )
    for pool in POOL_NAMES:
        expected |= grant(
            pools_build,
            [
                "sqs:ChangeMessageVisibility",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
                "sqs:GetQueueUrl",
                "sqs:ReceiveMessage",
            ],
            _queues(pools_build, pool).dead_letter_queue.queue_arn,
        )
    assert role_permissions(pools_build, stack.dead_letters.bundled.role) == expected


def test_the_run_worker_may_send_to_every_pool_and_wake_every_scaler(pools_build: Build) -> None:
    stack = pools_build.stack
    # One signing key for every pool: the executor signs for all of them.
    expected = grant(
        pools_build, ["secretsmanager:GetSecretValue"], stack.signing_key.secret.secret_arn
    )
    for pool in POOL_NAMES:
        for queue in _queues(pools_build, pool).step_queues:
            expected |= grant(
                pools_build, ["sqs:GetQueueAttributes", "sqs:SendMessage"], queue.queue_arn
            )
        expected |= grant(
            pools_build, ["lambda:InvokeFunction"], stack.scalers[pool].function.function_arn
        )
        expected |= grant(
            pools_build, ["ecs:DescribeServices"], stack.workers.pools[pool].service.service_arn
        )
    policy = pools_build.resource(stack.run_worker.policy)
    assert _permissions(policy["Properties"]["PolicyDocument"]) == expected


# -- monitoring ---------------------------------------------------------------------------------


def test_every_pool_has_its_alarms_and_they_notify_the_topic(pools_build: Build) -> None:
    monitoring = pools_build.stack.monitoring
    # Per pool: dead letters, oldest step, scaler, held at max_workers; and oldest
    # high-priority step per lane.
    assert len(pools_build.resources("AWS::CloudWatch::Alarm")) == 3 * 4 + 2
    assert len(monitoring.alarms) == 14
    topic = pools_build.resolve(pools_build.stack.alerts.topic.topic_arn)
    for alarm in monitoring.alarms:
        properties = _alarm(pools_build, alarm)
        assert properties["AlarmActions"] == [topic]
        assert properties["OKActions"] == [topic]
    for pool in POOL_NAMES:
        alarms = monitoring.pool_alarms[pool]
        queues = _queues(pools_build, pool)
        oldest = _alarm(pools_build, alarms.oldest_step)
        assert oldest["MetricName"] == "ApproximateAgeOfOldestMessage"
        assert oldest["Dimensions"] == [
            {"Name": "QueueName", "Value": pools_build.resolve(queues.queue.queue_name)}
        ]
        if queues.priority_queue is None:
            assert alarms.oldest_priority_step is None
        else:
            assert alarms.oldest_priority_step is not None
            lane = _alarm(pools_build, alarms.oldest_priority_step)
            assert lane["Dimensions"] == [
                {
                    "Name": "QueueName",
                    "Value": pools_build.resolve(queues.priority_queue.queue_name),
                }
            ]
        dead_letters = _alarm(pools_build, alarms.dead_letters)
        dimensions = [
            query["MetricStat"]["Metric"]["Dimensions"]
            for query in dead_letters["Metrics"]
            if "MetricStat" in query
        ]
        dlq_name = pools_build.resolve(queues.dead_letter_queue.queue_name)
        assert dimensions == [[{"Name": "QueueName", "Value": dlq_name}]] * 2, pool
        scaler = _alarm(pools_build, alarms.scaler)
        function_dimensions = [
            query["MetricStat"]["Metric"]["Dimensions"]
            for query in scaler["Metrics"]
            if "MetricStat" in query and query["MetricStat"]["Metric"]["MetricName"] == "Errors"
        ]
        function = pools_build.resolve(pools_build.stack.scalers[pool].function.function_name)
        assert function_dimensions == [[{"Name": "FunctionName", "Value": function}]], pool
    assert (
        "Pool high-mem:"
        in _alarm(pools_build, monitoring.pool_alarms["high-mem"].oldest_step)["AlarmDescription"]
    )


def test_the_dashboard_shows_every_pool(pools_build: Build) -> None:
    text = _dashboard_text(pools_build)
    for pool in POOL_NAMES:
        for title in ("Step queue", "Workers: desired vs running", "Dead letters"):
            assert f"{title} ({pool})" in text, (pool, title)
        queues = _queues(pools_build, pool)
        for queue in [*queues.step_queues, queues.dead_letter_queue]:
            assert _key(pools_build.resolve(queue.queue_name)) in text, queue.node.path
        service = pools_build.stack.workers.pools[pool].service
        assert _key(pools_build.resolve(service.service_name)) in text, pool
        scaler = pools_build.stack.scalers[pool].function
        assert _key(pools_build.resolve(scaler.function_name)) in text, pool
    assert "lane waiting (visible)" in text


# -- outputs -------------------------------------------------------------------------------


def test_outputs_per_pool(pools_build: Build, default_build: Build) -> None:
    outputs = pools_build.json["Outputs"]
    stack = pools_build.stack
    default, high_mem, ordered = (_queues(pools_build, pool) for pool in POOL_NAMES)
    assert default.priority_queue is not None and ordered.priority_queue is not None
    expected = {
        "QueueUrl": default.queue.queue_url,
        "DeadLetterQueueUrl": default.dead_letter_queue.queue_url,
        "PriorityQueueUrl": default.priority_queue.queue_url,
        "ScalerFunctionName": stack.scalers["default"].function.function_name,
        "EcsServiceName": stack.workers.pools["default"].service.service_name,
        "HighMemQueueUrl": high_mem.queue.queue_url,
        "HighMemDeadLetterQueueUrl": high_mem.dead_letter_queue.queue_url,
        "HighMemScalerFunctionName": stack.scalers["high-mem"].function.function_name,
        "HighMemEcsServiceName": stack.workers.pools["high-mem"].service.service_name,
        "HighMemWorkerLogGroupName": stack.workers.pools["high-mem"].log_group.log_group_name,
        "HighMemScalerLogGroupName": stack.scalers["high-mem"].bundled.log_group.log_group_name,
        "OrderedQueueUrl": ordered.queue.queue_url,
        "OrderedPriorityQueueUrl": ordered.priority_queue.queue_url,
        "OrderedDeadLetterQueueUrl": ordered.dead_letter_queue.queue_url,
        "OrderedScalerFunctionName": stack.scalers["ordered"].function.function_name,
        "OrderedEcsServiceName": stack.workers.pools["ordered"].service.service_name,
        "OrderedWorkerLogGroupName": stack.workers.pools["ordered"].log_group.log_group_name,
        "OrderedScalerLogGroupName": stack.scalers["ordered"].bundled.log_group.log_group_name,
    }
    for name, value in expected.items():
        assert outputs[name]["Value"] == pools_build.resolve(value), name
    assert "HighMemPriorityQueueUrl" not in outputs
    # Beyond the pools', the same outputs as a deployment with one pool.
    assert set(outputs) - set(default_build.json["Outputs"]) == {
        name for name in expected if name.startswith(("HighMem", "Ordered", "Priority"))
    }
    assert "PriorityQueueUrl" not in default_build.json["Outputs"]

"""The operations commands' AWS paths against moto's server: SQS, ECS describe_services,
CloudWatch's AWS/SQS metric and CloudWatch Logs, with the stack's outputs in the
environment as an operator would have them."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner

from dagster_taskiq.cli import cli
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.settings import (
    ENV_DATABASE_URL,
    ENV_DLQ_PROCESSOR_LOG_GROUP,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_ENDPOINT_URL,
    ENV_LOCAL_STACK,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_SCALER_LOG_GROUP,
    ENV_STACK_OUTPUTS,
    ENV_WORKER_LOG_GROUP,
)
from dagster_taskiq.core.sqs import SqsQueue, create_queue_with_dlq, sqs_client
from dagster_taskiq.local.endpoints import EMULATOR_CREDENTIALS, REGION
from dagster_taskiq.operations.logs import LogQuery, follow_logs, parse_since
from dagster_taskiq.operations.target import resolve_target
from tests.helpers import AS_A_PIPE


@dataclass
class Deployment:
    name: str
    queue_url: str
    dlq_url: str
    lane_url: str
    cluster: str
    service: str
    groups: dict[str, str]  # component -> log group
    endpoint: str

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint)  # type: ignore[call-overload]


def _ecs_service(endpoint: str, cluster: str, service: str, desired: int) -> None:
    ecs = boto3.client("ecs", region_name=REGION, endpoint_url=endpoint)
    ecs.create_cluster(clusterName=cluster)
    family = f"{cluster}-worker"
    ecs.register_task_definition(
        family=family,
        containerDefinitions=[{"name": "worker", "image": "worker:latest", "memory": 512}],
    )
    ecs.create_service(
        cluster=cluster, serviceName=service, taskDefinition=family, desiredCount=desired
    )


@pytest.fixture
def deployment(
    sqs_endpoint: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    for key, value in EMULATOR_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = f"ops-{uuid.uuid4().hex[:8]}"
    sqs = sqs_client(region=REGION, endpoint_url=sqs_endpoint)
    queue_url, dlq_url = create_queue_with_dlq(
        sqs, name, visibility_timeout=30, message_retention=3600, max_receive_count=3
    )
    lane_url, _ = create_queue_with_dlq(
        sqs, f"{name}-lane", visibility_timeout=30, message_retention=3600, max_receive_count=3
    )
    _ecs_service(sqs_endpoint, name, "workers", desired=2)
    logs = boto3.client("logs", region_name=REGION, endpoint_url=sqs_endpoint)
    groups = {c: f"/dagster-taskiq/{name}/{c}" for c in ("worker", "scaler", "dlq-processor")}
    for group in groups.values():
        logs.create_log_group(logGroupName=group)
    for unset in (ENV_LOCAL_STACK, ENV_STACK_OUTPUTS, ENV_ENDPOINT_URL, "DAGSTER_HOME"):
        monkeypatch.delenv(unset, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # Every service on moto's server, as boto3 reads it: what AWS itself would need nothing for.
    monkeypatch.setenv("AWS_ENDPOINT_URL", sqs_endpoint)
    # The stack's outputs. No DLQ URL: it is found from the queue's redrive policy.
    monkeypatch.setenv(ENV_QUEUE_URL, queue_url)
    monkeypatch.setenv(ENV_PRIORITY_QUEUE_URL, lane_url)
    monkeypatch.setenv(ENV_DATABASE_URL, ledger.url)
    monkeypatch.setenv(ENV_ECS_CLUSTER, name)
    monkeypatch.setenv(ENV_ECS_SERVICE, "workers")
    monkeypatch.setenv(ENV_WORKER_LOG_GROUP, groups["worker"])
    monkeypatch.setenv(ENV_SCALER_LOG_GROUP, groups["scaler"])
    monkeypatch.setenv(ENV_DLQ_PROCESSOR_LOG_GROUP, groups["dlq-processor"])
    yield Deployment(
        name, queue_url, dlq_url, lane_url, name, "workers", groups, endpoint=sqs_endpoint
    )


def ok(*args: str) -> str:
    result = CliRunner(env=AS_A_PIPE).invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _enqueue(ledger: Ledger, run_id: str, queue_url: str) -> None:
    ledger.enqueue(
        f"{run_id}:op:0",
        run_id=run_id,
        step_key="op",
        attempt=0,
        payload_hash="hash",
        ttl_seconds=600,
        queue_url=queue_url,
    )


def test_status_on_aws_reads_sqs_ecs_cloudwatch_and_the_ledger(
    deployment: Deployment, ledger: Ledger
) -> None:
    queue = SqsQueue(deployment.queue_url, endpoint_url=deployment.endpoint)
    queue.send("one")
    queue.send("two")
    SqsQueue(deployment.dlq_url, endpoint_url=deployment.endpoint).send("dead")
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    _enqueue(ledger, run_id, deployment.lane_url)
    # SQS publishes the oldest message's age to CloudWatch; moto keeps what is put.
    deployment.client("cloudwatch").put_metric_data(
        Namespace="AWS/SQS",
        MetricData=[
            {
                "MetricName": "ApproximateAgeOfOldestMessage",
                "Dimensions": [{"Name": "QueueName", "Value": deployment.name}],
                "Timestamp": datetime.now(UTC) - timedelta(minutes=1),
                "Value": 42.0,
                "Unit": "Seconds",
            }
        ],
    )

    report = json.loads(ok("status", "--json"))

    assert report["kind"] == "aws" and report["errors"] == []
    (pool,) = report["pools"]
    workers = pool["workers"]
    assert workers["source"] == f"ecs {deployment.cluster}/{deployment.service}"
    # moto places no task: runningCount stays 0 while desiredCount is 2.
    assert (workers["desired"], workers["running"]) == (2, 0)
    queue_status, lane, dlq, lane_dlq = pool["queues"]
    assert (dlq["role"], lane_dlq["role"]) == ("dlq", "dlq")
    assert (queue_status["role"], queue_status["visible"]) == ("queue", 2)
    assert (queue_status["oldest_age_seconds"], queue_status["oldest_age_source"]) == (
        42.0,
        "cloudwatch",
    )
    # No datapoint for the lane: the ledger's oldest waiting step, and it says so.
    assert lane["role"] == "lane" and lane["oldest_age_source"] == "ledger"
    assert lane["oldest_age_seconds"] >= 0
    assert queue_status["dlq_url"] == deployment.dlq_url, "found from the redrive policy"
    assert (dlq["url"], dlq["visible"], lane_dlq["visible"]) == (deployment.dlq_url, 1, 0)
    in_flight = {run["run_id"]: run for run in report["runs_in_flight"]}
    assert in_flight[run_id]["attempts"] == {"ENQUEUED": 1}

    table = ok("status")
    assert f"ecs {deployment.cluster}/workers): desired 2, running 0" in table
    assert "42 s (cloudwatch)" in table and "(ledger)" in table


def test_status_reports_what_it_cannot_read_and_shows_the_rest(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on port 9: the ledger is down, SQS still answers.
    monkeypatch.setenv(ENV_DATABASE_URL, "postgresql://nobody:secret@127.0.0.1:9/none")
    monkeypatch.setenv(ENV_ECS_SERVICE, "no-such-service")
    report = json.loads(ok("status", "--json"))
    errors = "\n".join(report["errors"])
    assert "ledger:" in errors and "secret" not in errors
    assert report["ledger"] == {} and report["live_leases"] is None, "unknown, not zero"
    assert "Ledger: unreadable" in ok("status")
    assert "ECS service not found" in errors
    (pool,) = report["pools"]
    assert pool["queues"][0]["visible"] == 0


def _put(deployment: Deployment, component: str, stream: str, *events: tuple[float, str]) -> None:
    logs = deployment.client("logs")
    group = deployment.groups[component]
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
    logs.put_log_events(
        logGroupName=group,
        logStreamName=stream,
        logEvents=[{"timestamp": int(at * 1000), "message": text} for at, text in events],
    )


def test_logs_on_aws_filter_a_component_to_a_run_and_a_time(deployment: Deployment) -> None:
    now = time.time()
    run_a, run_b = (f"run-{uuid.uuid4().hex[:8]}" for _ in range(2))
    _put(
        deployment,
        "worker",
        "worker/worker/task-1",
        (now - 7200, f'{{"message": "Step started", "idempotency_key": "{run_a}:op:0"}}'),
        (now - 5, f'{{"message": "Step started", "idempotency_key": "{run_a}:op:1"}}'),
        (now - 4, f'{{"message": "Step started", "idempotency_key": "{run_b}:op:0"}}'),
    )
    _put(deployment, "worker", "worker/worker/task-2", (now - 3, f"finished {run_a}:op:1"))
    _put(deployment, "scaler", "2024/01/01/[$LATEST]abc", (now - 2, "holding 1"))
    _put(deployment, "dlq-processor", "2024/01/01/[$LATEST]def", (now - 1, f"marked {run_b}"))

    lines = ok("logs", "worker", "--run", run_a).splitlines()
    assert len(lines) == 2, "the one from two hours ago is before --since 10m"
    assert all(run_a in line and run_b not in line for line in lines)
    assert f"{deployment.groups['worker']}/worker/worker/task-1" in lines[0]
    assert "task-2" in lines[1]
    assert len(ok("logs", "worker", "--run", run_a, "--since", "3h").splitlines()) == 3

    (scaler,) = [json.loads(line) for line in ok("logs", "scaler", "--json").splitlines()]
    assert scaler["message"] == "holding 1" and scaler["timestamp"].endswith("+00:00")
    assert run_b in ok("logs", "dlq-processor")


def test_logs_name_the_setting_a_log_group_needs(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Log groups are all `logs` needs.
    for name in (ENV_QUEUE_URL, ENV_PRIORITY_QUEUE_URL, ENV_DATABASE_URL):
        monkeypatch.delenv(name)
    _put(deployment, "worker", "w", (time.time(), "only the log group is set"))
    assert "only the log group is set" in ok("logs", "worker")
    monkeypatch.delenv(ENV_SCALER_LOG_GROUP)
    result = CliRunner().invoke(cli, ["logs", "scaler"])
    assert result.exit_code == 1
    assert ENV_SCALER_LOG_GROUP in result.output and "ScalerLogGroupName" in result.output


def test_follow_on_cloudwatch_prints_each_new_event_once(deployment: Deployment) -> None:
    now = time.time()
    _put(deployment, "scaler", "s", (now - 2, "first"))
    threading.Timer(0.5, lambda: _put(deployment, "scaler", "s", (time.time(), "second"))).start()
    seen: list[str] = []
    deadline = time.monotonic() + 20
    query = LogQuery(component="scaler", since=parse_since("1m"))
    for event in follow_logs(
        resolve_target(),
        query,
        stop=lambda: len(seen) >= 2 or time.monotonic() > deadline,
        poll_seconds=0.2,
    ):
        seen.append(event.message)
    assert seen == ["first", "second"]


def test_every_pool_from_a_cdk_outputs_file(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqs = sqs_client(region=REGION, endpoint_url=deployment.endpoint)
    high_mem_url, high_mem_dlq = create_queue_with_dlq(
        sqs, f"{deployment.name}-hm", visibility_timeout=30, message_retention=3600,
        max_receive_count=3,
    )  # fmt: skip
    _ecs_service(deployment.endpoint, deployment.cluster, "high-mem-workers", desired=0)
    outputs = {
        "DagsterTaskiq-dev": {
            "QueueUrl": deployment.queue_url,
            "PriorityQueueUrl": deployment.lane_url,
            "DeadLetterQueueUrl": deployment.dlq_url,
            "EcsClusterName": deployment.cluster,
            "EcsServiceName": deployment.service,
            "WorkerLogGroupName": deployment.groups["worker"],
            "ScalerLogGroupName": deployment.groups["scaler"],
            "DeadLetterProcessorLogGroupName": deployment.groups["dlq-processor"],
            "HighMemQueueUrl": high_mem_url,
            "HighMemDeadLetterQueueUrl": high_mem_dlq,
            "HighMemEcsServiceName": "high-mem-workers",
            "HighMemWorkerLogGroupName": "/hm/worker",
        }
    }
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(outputs))
    for name in (ENV_QUEUE_URL, ENV_PRIORITY_QUEUE_URL, ENV_ECS_CLUSTER, ENV_ECS_SERVICE):
        monkeypatch.delenv(name)
    monkeypatch.setenv(ENV_STACK_OUTPUTS, str(path))

    target = resolve_target()
    default, high_mem = target.pools
    assert (default.name, default.queue_urls) == (
        "default",
        (deployment.queue_url, deployment.lane_url),
    )
    assert (high_mem.name, high_mem.queue_urls, high_mem.dlq_urls) == (
        "high-mem",
        (high_mem_url,),
        (high_mem_dlq,),
    )
    assert high_mem.worker_log_group == "/hm/worker" and high_mem.scaler_log_group is None

    report = json.loads(ok("status", "--json"))
    pools = {pool["name"]: pool for pool in report["pools"]}
    assert pools["default"]["workers"]["desired"] == 2
    assert pools["high-mem"]["workers"]["desired"] == 0
    assert [q["role"] for q in pools["high-mem"]["queues"]] == ["queue", "dlq"]

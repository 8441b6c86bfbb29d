"""Step-triggered scale-out: the executor wakes the scaler when no worker runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from dagster_taskiq.local.endpoints import LambdaEndpoint
from dagster_taskiq.scaling.scaler import TRIGGER_SOURCE, EcsWorkerService
from dagster_taskiq.scaling.trigger import CHECK_INTERVAL_SECONDS, ScaleOutTrigger

REGION = "us-east-1"


@pytest.fixture
def endpoint() -> Iterator[LambdaEndpoint]:
    server = LambdaEndpoint()
    calls: list[Any] = []
    server.register("scaler", calls.append)
    yield server
    server.close()


@pytest.fixture
def service(sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> EcsWorkerService:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    name = f"trigger-{uuid.uuid4().hex[:8]}"
    ecs = boto3.client("ecs", region_name=REGION, endpoint_url=sqs_endpoint)
    ecs.create_cluster(clusterName=name)
    ecs.register_task_definition(
        family=name, containerDefinitions=[{"name": "w", "image": "w", "memory": 512}]
    )
    ecs.create_service(cluster=name, serviceName=name, taskDefinition=name, desiredCount=0)
    return EcsWorkerService(ecs, cluster=name, service=name)


def trigger_for(
    endpoint: LambdaEndpoint, service: EcsWorkerService | None, debounce: float = 30.0
) -> ScaleOutTrigger:
    client = boto3.client("lambda", region_name=REGION, endpoint_url=endpoint.url)
    return ScaleOutTrigger(
        function_name="scaler", lambda_client=client, service=service, debounce_seconds=debounce
    )


def fire(trigger: ScaleOutTrigger) -> bool:
    thread = trigger.steps_launched()
    if thread is None:
        return False
    thread.join(10)
    return True


def test_invokes_the_scaler_asynchronously_when_no_worker_runs(
    endpoint: LambdaEndpoint, service: EcsWorkerService
) -> None:
    trigger = trigger_for(endpoint, service)
    assert fire(trigger)
    assert trigger.invocations == 1
    ((name, payload),) = endpoint.invocations
    assert name == "scaler"
    assert payload["source"] == TRIGGER_SOURCE


def test_is_debounced(endpoint: LambdaEndpoint, service: EcsWorkerService) -> None:
    trigger = trigger_for(endpoint, service, debounce=30)
    assert fire(trigger)
    assert not fire(trigger), "a second launch inside the debounce window checks nothing"
    assert len(endpoint.invocations) == 1


def test_does_nothing_while_a_worker_runs(
    endpoint: LambdaEndpoint, service: EcsWorkerService
) -> None:
    service.set_desired_count(1)  # moto: runningCount follows desiredCount
    trigger = trigger_for(endpoint, service)
    assert fire(trigger)
    assert trigger.invocations == 0 and endpoint.invocations == []


def test_without_a_service_to_check_it_invokes(endpoint: LambdaEndpoint) -> None:
    trigger = trigger_for(endpoint, None, debounce=0)
    assert fire(trigger) and fire(trigger)
    assert len(endpoint.invocations) == 2


def test_a_missing_function_never_breaks_the_launch(endpoint: LambdaEndpoint) -> None:
    client = boto3.client("lambda", region_name=REGION, endpoint_url=endpoint.url)
    trigger = ScaleOutTrigger(
        function_name="no-such-function", lambda_client=client, service=None, debounce_seconds=0
    )
    assert fire(trigger)
    assert trigger.invocations == 0


def test_the_debounce_counts_from_an_invocation_that_happened(
    endpoint: LambdaEndpoint, service: EcsWorkerService
) -> None:
    client = boto3.client("lambda", region_name=REGION, endpoint_url=endpoint.url)
    trigger = ScaleOutTrigger(
        function_name="scaler",
        lambda_client=client,
        service=service,
        debounce_seconds=30,
        check_interval_seconds=0,
    )
    service.set_desired_count(1)
    assert fire(trigger)
    assert endpoint.invocations == [], "workers are wanted: nothing to do, and no debounce"

    service.set_desired_count(0)  # the pool scaled to zero before the run's next steps
    assert fire(trigger)
    assert len(endpoint.invocations) == 1
    assert not fire(trigger), "an invocation that happened starts the debounce"


def test_a_failed_invocation_does_not_start_the_debounce(endpoint: LambdaEndpoint) -> None:
    client = boto3.client("lambda", region_name=REGION, endpoint_url=endpoint.url)
    trigger = ScaleOutTrigger(
        function_name="no-such-function",
        lambda_client=client,
        service=None,
        debounce_seconds=30,
        check_interval_seconds=0,
    )
    assert fire(trigger) and fire(trigger)
    assert trigger.invocations == 0


def test_checks_are_rate_limited(endpoint: LambdaEndpoint, service: EcsWorkerService) -> None:
    service.set_desired_count(1)
    trigger = trigger_for(endpoint, service)  # a check at most every 2 s
    assert fire(trigger)
    # A fan-out launches many steps at once: they do not each read the service.
    assert not any(fire(trigger) for _ in range(50))
    time.sleep(CHECK_INTERVAL_SECONDS)
    assert fire(trigger)
    assert endpoint.invocations == []

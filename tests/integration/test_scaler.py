"""The scaler Lambda, in-process, against moto's server (SQS, ECS) and real PostgreSQL."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
import sqlalchemy as sa

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.ledger import Ledger, steps
from dagster_taskiq.core.migrations import ensure_schema
from dagster_taskiq.core.sqs import SqsQueue, create_queue_with_dlq, sqs_client
from dagster_taskiq.scaling import scaler as scaler_module
from dagster_taskiq.scaling.outlook import OutlookStore
from dagster_taskiq.scaling.policy import ExpectedSteps
from dagster_taskiq.scaling.scaler import HistoryStore, Scaler, ScalerSettings
from lambdas.scaler import handler
from tests.helpers import LambdaContext

REGION = "us-east-1"


@dataclass
class ScalerWorld:
    queue: SqsQueue
    ecs: Any
    cluster: str
    service: str
    ledger: Ledger

    def desired(self) -> int:
        found = self.ecs.describe_services(cluster=self.cluster, services=[self.service])
        return int(found["services"][0]["desiredCount"])

    def set_desired(self, count: int) -> None:
        self.ecs.update_service(cluster=self.cluster, service=self.service, desiredCount=count)

    def send(self, count: int, queue: SqsQueue | None = None) -> None:
        for _ in range(count):
            (queue or self.queue).send('{"not": "a step"}')

    def lease(self, queue: SqsQueue) -> None:
        """A step running under a live lease, sent to ``queue``."""
        key = f"{uuid.uuid4()}:step:0"
        self.ledger.enqueue(
            key,
            run_id="r",
            step_key="step",
            attempt=0,
            payload_hash="h",
            ttl_seconds=60,
            queue_url=queue.url,
        )
        self.ledger.claim(key, worker_id="w", lease_seconds=60, payload_hash="h")

    def invoke(self, event: dict[str, Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = handler.lambda_handler(
            event or {"source": "aws.events"}, LambdaContext("dagster-taskiq-scaler")
        )
        return result


@pytest.fixture
def world(
    sqs_endpoint: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ScalerWorld]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", sqs_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_ECS", sqs_endpoint)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    name = f"scaler-{uuid.uuid4().hex[:8]}"
    client = sqs_client(region=REGION, endpoint_url=sqs_endpoint)
    queue_url, _ = create_queue_with_dlq(
        client, name, visibility_timeout=30, message_retention=3600, max_receive_count=5
    )
    ecs = boto3.client("ecs", region_name=REGION, endpoint_url=sqs_endpoint)
    ecs.create_cluster(clusterName=name)
    ecs.register_task_definition(
        family=name,
        containerDefinitions=[{"name": "worker", "image": "worker:latest", "memory": 512}],
    )
    ecs.create_service(cluster=name, serviceName=name, taskDefinition=name, desiredCount=0)
    monkeypatch.setenv("DAGSTER_TASKIQ_QUEUE_URL", queue_url)
    monkeypatch.setenv("DAGSTER_TASKIQ_DATABASE_URL", postgres_url)
    monkeypatch.setenv("DAGSTER_TASKIQ_ECS_CLUSTER", name)
    monkeypatch.setenv("DAGSTER_TASKIQ_ECS_SERVICE", name)
    monkeypatch.setenv("DAGSTER_TASKIQ_MAX_WORKERS", "10")
    monkeypatch.setenv("DAGSTER_TASKIQ_SCALER_EVALUATIONS", "1")
    monkeypatch.setenv("DAGSTER_TASKIQ_SCALE_IN_STABILIZATION_SECONDS", "2")
    handler._scaler.cache_clear()
    ledger = Ledger(postgres_url)
    # A deployment's first run (or worker) brings the ledger to its schema; the scaler
    # Lambda itself never changes it.
    ensure_schema(ledger, component="test")
    yield ScalerWorld(SqsQueue(queue_url, client=client), ecs, name, name, ledger)
    handler._scaler.cache_clear()
    ledger.dispose()


def test_the_first_visible_message_scales_from_zero(world: ScalerWorld) -> None:
    world.send(1)
    result = world.invoke()
    assert result["decisions"] == [{"desired": 1, "reason": "scale_from_zero"}]
    assert world.desired() == 1


def test_a_burst_scales_out_at_once_and_respects_max(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.set_desired(1)
    world.send(23)
    assert world.invoke()["decisions"] == [{"desired": 5, "reason": "scale_out"}]
    assert world.desired() == 5

    monkeypatch.setenv("DAGSTER_TASKIQ_MAX_WORKERS", "3")
    handler._scaler.cache_clear()
    world.send(30)
    assert world.invoke()["decisions"] == [{"desired": 3, "reason": "scale_in"}]


def test_scale_in_waits_for_the_stabilization_window(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 s, not the fixture's 2: the "stabilizing" answer below must come inside the window
    # even on a loaded machine; the sleep then waits out what is left of it.
    monkeypatch.setenv("DAGSTER_TASKIQ_SCALE_IN_STABILIZATION_SECONDS", "4")
    world.set_desired(0)
    world.send(10)
    assert world.invoke()["decisions"][0]["desired"] == 2
    window_ends = time.monotonic() + 4  # at the latest: it starts when that decision is kept
    # The queue empties (the work is done).
    while messages := world.queue.receive(max_messages=10, wait_seconds=0, visibility_timeout=30):
        for message in messages:
            world.queue.delete(message.receipt_handle)
    assert world.invoke()["decisions"] == [{"desired": 2, "reason": "stabilizing"}]
    assert world.desired() == 2
    time.sleep(max(0.0, window_ends - time.monotonic()) + 0.3)
    assert world.invoke()["decisions"] == [{"desired": 0, "reason": "scale_in"}]
    assert world.desired() == 0


def test_the_window_survives_a_cold_start(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window no loaded machine outlasts between the two invocations.
    monkeypatch.setenv("DAGSTER_TASKIQ_SCALE_IN_STABILIZATION_SECONDS", "60")
    world.send(10)
    world.invoke()
    while messages := world.queue.receive(max_messages=10, wait_seconds=0, visibility_timeout=30):
        for message in messages:
            world.queue.delete(message.receipt_handle)
    handler._scaler.cache_clear()  # a new container: nothing in memory
    assert world.invoke()["decisions"] == [{"desired": 2, "reason": "stabilizing"}]
    history = HistoryStore(world.ledger).decisions(f"{world.cluster}/{world.service}")
    assert [row.reason for row in history] == ["stabilizing", "scale_from_zero"]


def test_never_below_the_workers_running_leased_steps(world: ScalerWorld) -> None:
    world.set_desired(3)
    for _ in range(3):
        world.lease(world.queue)
    time.sleep(2.5)
    assert world.invoke()["decisions"] == [{"desired": 3, "reason": "hold"}]


def test_an_unreadable_queue_keeps_the_count(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.set_desired(3)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:1")
    handler._scaler.cache_clear()
    assert world.invoke()["decisions"] == [{"desired": 3, "reason": "unreadable"}]
    assert world.desired() == 3


def test_decisions_are_logged_and_emitted_as_metrics(
    world: ScalerWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # The Logger keeps the stream it was built with; give it one this test can read.
    log_handler = handler.logger.registered_handler
    assert isinstance(log_handler, logging.StreamHandler)
    logs = io.StringIO()
    previous = log_handler.setStream(logs)
    try:
        world.send(6)
        world.invoke()
    finally:
        log_handler.setStream(previous)
    metrics = capsys.readouterr().out
    for metric in ("DesiredWorkers", "Backlog", "BacklogPerWorker", "ScalingDecisions"):
        assert f'"Name":"{metric}"' in metrics, metric
    decision = json.loads(logs.getvalue().strip().splitlines()[-1])
    assert decision["reason"] == "scale_from_zero" and decision["desired"] == 2
    assert decision["message"].startswith("backlog 6 (visible 6, delayed 0, in flight 0)")


def test_a_triggered_invocation_evaluates_once_and_at_once(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_TASKIQ_SCALER_EVALUATIONS", "3")
    handler._scaler.cache_clear()
    world.send(1)
    started = time.monotonic()
    result = world.invoke({"source": "dagster-taskiq.executor"})
    assert time.monotonic() - started < 10
    assert result["decisions"] == [{"desired": 1, "reason": "scale_from_zero"}]


# -- a pool with two queues: its step queue and a high-priority lane ---------------------------


@pytest.fixture
def lane(world: ScalerWorld, monkeypatch: pytest.MonkeyPatch) -> SqsQueue:
    """A second queue for the world's pool; the scaler is configured with both."""
    client = world.queue.client
    lane_url, _ = create_queue_with_dlq(
        client,
        f"{world.service}-priority",
        visibility_timeout=30,
        message_retention=3600,
        max_receive_count=5,
    )
    monkeypatch.setenv("DAGSTER_TASKIQ_QUEUE_URL", f"{world.queue.url},{lane_url}")
    handler._scaler.cache_clear()
    return SqsQueue(lane_url, client=client)


def _drain(queue: SqsQueue) -> None:
    while messages := queue.receive(max_messages=10, wait_seconds=0, visibility_timeout=30):
        for message in messages:
            queue.delete(message.receipt_handle)


def test_a_pool_reads_every_queue_it_is_given(world: ScalerWorld, lane: SqsQueue) -> None:
    scaler, settings = handler._scaler()
    assert settings.queue_urls == (world.queue.url, lane.url)
    assert settings.queue_urls[0] == world.queue.url
    assert [queue.url for queue in scaler.queues] == [world.queue.url, lane.url]


def test_the_backlog_is_the_sum_of_the_pools_queues(world: ScalerWorld, lane: SqsQueue) -> None:
    world.send(6)
    world.send(6, lane)
    assert world.invoke()["decisions"] == [{"desired": 3, "reason": "scale_from_zero"}]
    assert world.desired() == 3
    signals = handler._scaler()[0].read_signals()
    assert (signals.visible, signals.delayed, signals.in_flight) == (12, 0, 0)


def test_a_message_on_the_lane_alone_scales_from_zero(world: ScalerWorld, lane: SqsQueue) -> None:
    world.send(1, lane)
    assert world.invoke()["decisions"] == [{"desired": 1, "reason": "scale_from_zero"}]


def test_messages_in_flight_on_the_lane_count(world: ScalerWorld, lane: SqsQueue) -> None:
    world.send(4)
    world.send(7, lane)
    received = lane.receive(max_messages=7, wait_seconds=0, visibility_timeout=30)
    assert received
    signals = handler._scaler()[0].read_signals()
    assert signals.visible == 11 - len(received)
    assert signals.in_flight == len(received)


def test_live_leases_on_either_queue_keep_their_workers(world: ScalerWorld, lane: SqsQueue) -> None:
    world.set_desired(4)
    # Two steps leased from the step queue and two from the lane: four busy workers (one step
    # per worker here). A lease on another pool's queue is not this pool's.
    for queue in (world.queue, world.queue, lane, lane):
        world.lease(queue)
    world.lease(SqsQueue(f"{world.queue.url}-other-pool", client=world.queue.client))
    assert handler._scaler()[0].read_signals().live_leases == 4
    time.sleep(2.5)
    assert world.invoke()["decisions"] == [{"desired": 4, "reason": "hold"}]


def test_the_scale_in_window_sees_both_queues(world: ScalerWorld, lane: SqsQueue) -> None:
    world.send(10, lane)
    assert world.invoke()["decisions"][0]["desired"] == 2
    _drain(lane)
    world.send(1)  # the step queue still has work: scale in only to what it needs
    time.sleep(2.5)
    assert world.invoke()["decisions"] == [{"desired": 1, "reason": "scale_in"}]


def test_one_unreadable_queue_keeps_the_count(world: ScalerWorld, lane: SqsQueue) -> None:
    world.set_desired(3)
    world.send(20)
    lane.client.delete_queue(QueueUrl=lane.url)
    handler._scaler.cache_clear()
    # Half the backlog is no backlog: nothing changes until every queue can be read.
    assert world.invoke()["decisions"] == [{"desired": 3, "reason": "unreadable"}]
    assert world.desired() == 3
    signals = handler._scaler()[0].read_signals()
    assert (signals.visible, signals.delayed, signals.in_flight) == (None, None, None)
    assert signals.live_leases == 0


@pytest.mark.parametrize(
    ("raw", "urls"),
    [
        ("https://sqs/1/a", ("https://sqs/1/a",)),
        ("https://sqs/1/a,https://sqs/1/b", ("https://sqs/1/a", "https://sqs/1/b")),
        (" https://sqs/1/a , https://sqs/1/b ", ("https://sqs/1/a", "https://sqs/1/b")),
    ],
)
def test_queue_urls_are_comma_separated(raw: str, urls: tuple[str, ...]) -> None:
    settings = ScalerSettings.from_env(_scaler_environment(raw))
    assert settings.queue_urls == urls
    assert settings.queue_urls[0] == urls[0]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("https://sqs/1/a,", "one or more comma-separated queue URLs"),
        ("https://sqs/1/a,,https://sqs/1/b", "one or more comma-separated queue URLs"),
        ("https://sqs/1/a,https://sqs/1/a", "names a queue twice"),
        ("", "needs DAGSTER_TASKIQ_QUEUE_URL"),
    ],
)
def test_queue_url_lists_are_checked(raw: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ScalerSettings.from_env(_scaler_environment(raw))


def _scaler_environment(queue_urls: str) -> dict[str, str]:
    return {
        "DAGSTER_TASKIQ_QUEUE_URL": queue_urls,
        "DAGSTER_TASKIQ_DATABASE_URL": "postgresql+pg8000://u@db/dagster",
        "DAGSTER_TASKIQ_ECS_CLUSTER": "cluster",
        "DAGSTER_TASKIQ_ECS_SERVICE": "service",
    }


def test_a_scaler_needs_distinct_queues(world: ScalerWorld) -> None:
    built, _ = handler._scaler()
    service, config = built.service, built.config
    with pytest.raises(ValueError, match="at least one queue"):
        Scaler(queues=[], ledger=world.ledger, service=service, config=config)
    with pytest.raises(ValueError, match="must differ"):
        Scaler(
            queues=[world.queue, world.queue], ledger=world.ledger, service=service, config=config
        )


# -- expected steps, the wait target, the lock, the cap metric -----------------------------------


def test_expected_steps_start_workers_before_the_fan_out_is_queued(world: ScalerWorld) -> None:
    outlook = OutlookStore(world.ledger)
    # No durations in the ledger yet for this queue: every expected step counts.
    outlook.record("run-1", {world.queue.url: ExpectedSteps(12, 5.0)})
    outlook.record("run-2", {f"{world.queue.url}-other-pool": ExpectedSteps(40, 5.0)})
    try:
        assert world.invoke()["decisions"] == [{"desired": 3, "reason": "scale_from_zero"}]
        signals = handler._scaler()[0].read_signals()
        assert signals.expected == 12
    finally:
        outlook.clear("run-1")
        outlook.clear("run-2")


def _finished_step(world: ScalerWorld, seconds: float) -> None:
    key = f"{uuid.uuid4()}:step:0"
    world.ledger.enqueue(
        key,
        run_id="r",
        step_key="step",
        attempt=0,
        payload_hash="h",
        ttl_seconds=60,
        queue_url=world.queue.url,
    )
    claim = world.ledger.claim(key, worker_id="w", lease_seconds=60, payload_hash="h")
    assert world.ledger.complete(key, claim.fencing_token, succeeded=True)
    with world.ledger.transaction() as conn:
        conn.execute(
            sa.update(steps)
            .where(steps.c.idempotency_key == key)
            .values(started_at=steps.c.finished_at - sa.text(f"interval '{seconds} seconds'"))
        )


def test_expected_steps_wait_until_they_are_due(world: ScalerWorld) -> None:
    _finished_step(world, 300.0)  # five-minute steps on this queue
    outlook = OutlookStore(world.ledger)
    # Waiting 100 s on a five-minute step: due in about 200 s, more than the 60 s lead.
    outlook.record("run-1", {world.queue.url: ExpectedSteps(12, 100.0)})
    try:
        assert world.invoke()["decisions"] == [{"desired": 0, "reason": "hold"}]
        # Waiting 250 s: due within the lead.
        outlook.record("run-1", {world.queue.url: ExpectedSteps(12, 250.0)})
        assert world.invoke()["decisions"] == [{"desired": 3, "reason": "scale_from_zero"}]
    finally:
        outlook.clear("run-1")


def test_a_wait_target_from_the_ledgers_step_durations(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_TASKIQ_TARGET_WAIT_SECONDS", "60")
    handler._scaler.cache_clear()
    for _ in range(3):
        _finished_step(world, 30.0)
    world.send(9)
    # One step per worker: it runs one and finishes two more within 60 s, three per worker.
    assert world.invoke()["decisions"] == [{"desired": 3, "reason": "scale_from_zero"}]
    (latest, *_) = HistoryStore(world.ledger).decisions(f"{world.cluster}/{world.service}")
    assert "3 per worker (60 s wait target, 30 s steps) -> 3 workers" in latest.detail


def test_settings_of_the_outlook_come_from_the_environment() -> None:
    environ = _scaler_environment("https://sqs/1/a")
    defaults = ScalerSettings.from_env(environ).config
    assert (defaults.target_wait_seconds, defaults.scale_out_lead_seconds) == (None, 60)
    assert defaults.scale_in_stabilization_seconds == 60
    environ |= {
        "DAGSTER_TASKIQ_TARGET_WAIT_SECONDS": "90",
        "DAGSTER_TASKIQ_SCALE_OUT_LEAD_SECONDS": "45",
    }
    config = ScalerSettings.from_env(environ).config
    assert (config.target_wait_seconds, config.scale_out_lead_seconds) == (90, 45)
    with pytest.raises(ConfigurationError, match="TARGET_WAIT_SECONDS must be a whole number"):
        ScalerSettings.from_env(environ | {"DAGSTER_TASKIQ_TARGET_WAIT_SECONDS": "soon"})


def test_evaluations_of_one_service_never_overlap(world: ScalerWorld) -> None:
    scaler, _ = handler._scaler()
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with scaler.history.exclusive(scaler.service.name):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    world.send(1)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    result = world.invoke({"source": "dagster-taskiq.executor"})
    waited = time.monotonic() - started
    holder.join(10)
    # The triggered evaluation waited for the one in progress, then decided.
    assert waited >= 0.9
    assert result["decisions"] == [{"desired": 1, "reason": "scale_from_zero"}]


def test_an_evaluation_held_up_too_long_is_skipped(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scaler_module, "EVALUATION_LOCK_TIMEOUT_MS", 200)
    scaler, _ = handler._scaler()
    world.send(1)
    with scaler.history.exclusive(scaler.service.name):
        done: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda: done.append(world.invoke()))
        thread.start()
        thread.join(10)
    assert done == [{"decisions": []}]
    assert world.desired() == 0
    # The next one goes ahead.
    assert world.invoke()["decisions"] == [{"desired": 1, "reason": "scale_from_zero"}]


def test_time_at_max_workers_and_expected_steps_are_emitted(
    world: ScalerWorld, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DAGSTER_TASKIQ_MAX_WORKERS", "2")
    handler._scaler.cache_clear()
    world.send(30)
    world.invoke()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "_aws" in line]
    values = {
        name: line[name]
        for line in lines
        for name in ("AtMaxWorkers", "ExpectedSteps")
        if name in line
    }
    assert values == {"AtMaxWorkers": [1.0], "ExpectedSteps": [0.0]}

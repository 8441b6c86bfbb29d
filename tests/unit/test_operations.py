"""The operations commands' plain parts: where the deployment is, times, log lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.settings import (
    ENV_DLQ_URL,
    ENV_LOCAL_STACK,
    ENV_QUEUE_URL,
    ENV_STACK_OUTPUTS,
)
from dagster_taskiq.operations.logs import LogQuery, file_events, parse_since, read_logs
from dagster_taskiq.operations.render import duration
from dagster_taskiq.operations.target import (
    pools_from_outputs,
    read_outputs_file,
    resolve_target,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def test_since_takes_durations_and_iso_times() -> None:
    assert parse_since("10m", now=NOW) == datetime(2026, 5, 1, 11, 50, tzinfo=UTC)
    assert parse_since("2h", now=NOW) == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    assert parse_since("1d", now=NOW) == datetime(2026, 4, 30, 12, 0, tzinfo=UTC)
    assert parse_since("90s", now=NOW) == datetime(2026, 5, 1, 11, 58, 30, tzinfo=UTC)
    assert parse_since("2026-05-01T08:00:00") == datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("last tuesday")


def test_durations_read_at_a_glance() -> None:
    assert [duration(s) for s in (None, 4, 300, 7300, 200_000)] == [
        "-",
        "4 s",
        "5 min",
        "2.0 h",
        "2.3 d",
    ]


def test_pools_from_the_stack_outputs() -> None:
    outputs = {
        "QueueUrl": "https://sqs/q",
        "PriorityQueueUrl": "https://sqs/q-lane",
        "DeadLetterQueueUrl": "https://sqs/q-dlq",
        "EcsServiceName": "svc",
        "WorkerLogGroupName": "/w",
        "HighMemQueueUrl": "https://sqs/hm",
        "HighMemEcsServiceName": "hm-svc",
        "HighMemScalerLogGroupName": "/hm/s",
        "DatabaseEndpoint": "db.example",
    }
    default, high_mem = pools_from_outputs(outputs)
    assert default.name == "default"
    assert default.queue_urls == ("https://sqs/q", "https://sqs/q-lane")
    assert default.dlq_urls == ("https://sqs/q-dlq",)
    assert (default.ecs_service, default.worker_log_group) == ("svc", "/w")
    assert (high_mem.name, high_mem.queue_urls, high_mem.dlq_urls) == (
        "high-mem",
        ("https://sqs/hm",),
        (),
    )
    assert high_mem.scaler_log_group == "/hm/s"


def test_an_outputs_file_must_hold_one_stack(tmp_path: Path) -> None:
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"A": {"QueueUrl": "a"}, "B": {"QueueUrl": "b"}}))
    with pytest.raises(ConfigurationError, match="found \\['A', 'B'\\]"):
        read_outputs_file(path)
    path.write_text(json.dumps({"Other": {"BucketName": "x"}, "A": {"QueueUrl": "a"}}))
    assert read_outputs_file(path) == {"QueueUrl": "a"}


def test_no_deployment_named_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        resolve_target({})
    for name in (ENV_QUEUE_URL, ENV_STACK_OUTPUTS, ENV_LOCAL_STACK):
        assert name in str(raised.value)
    with pytest.raises(ConfigurationError, match="not a running local stack"):
        resolve_target({ENV_LOCAL_STACK: str(tmp_path)})


def test_the_environment_names_one_pool() -> None:
    target = resolve_target({ENV_QUEUE_URL: "https://sqs/q", ENV_DLQ_URL: "https://sqs/q-dlq"})
    assert target.kind == "aws" and target.database_url is None
    (pool,) = target.pools
    assert (pool.name, pool.queue_urls, pool.dlq_urls) == (
        "default",
        ("https://sqs/q",),
        ("https://sqs/q-dlq",),
    )


def test_a_local_stack_reads_its_files_and_untimed_lines_take_a_neighbours_time(
    tmp_path: Path,
) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "stack.env").write_text(f"{ENV_QUEUE_URL}=http://127.0.0.1:1/1/q\n")
    log = tmp_path / "logs" / "worker-1.log"
    log.write_text(
        "a warning before any timed line\n"
        + json.dumps({"message": "Step started", "timestamp": "2026-05-01 11:55:00,000+0000"})
        + "\n"
        + "Traceback: run-1 went wrong\n"
        + json.dumps({"message": "later", "timestamp": "2026-05-01T11:58:00+00:00"})
        + "\n"
        + "half a line being writ"
    )
    target = resolve_target({ENV_LOCAL_STACK: str(tmp_path)})
    assert target.kind == "local" and [p.name for p in target.pools] == ["worker"]

    events = read_logs(target, LogQuery(component="worker", since=parse_since("1h", now=NOW)))
    assert [e.message[:12] for e in events] == [
        "a warning be",
        '{"message": ',
        "Traceback: r",
        '{"message": ',
    ]
    assert events[0].timestamp == events[1].timestamp == events[2].timestamp
    assert events[0].source == "worker-1.log"
    later = file_events([log], since=parse_since("3m", now=NOW))
    assert [e.message for e in later] == [events[3].message]
    assert [e.message for e in file_events([log], since=NOW.replace(hour=0), run_id="run-1")] == [
        "Traceback: run-1 went wrong"
    ]

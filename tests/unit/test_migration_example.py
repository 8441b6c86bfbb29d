"""The celery migration example (examples/celery_migration) is valid, without AWS.

Its executor config is checked against ``taskiq_executor``'s config schema, and each job's
run config is resolved as Dagster does at launch; the environment variables its
``{env: VAR}`` values name are set here. Its tags name only configured queues.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from dagster import JobDefinition
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.system_config.objects import ResolvedRunConfig

from dagster_taskiq import taskiq_executor
from examples.celery_migration import definitions

SQS = "https://sqs.eu-west-1.amazonaws.com/123456789012"
ENVIRONMENT = {
    "DAGSTER_TASKIQ_QUEUE_URL": f"{SQS}/dagster-taskiq-default",
    "DAGSTER_TASKIQ_PRIORITY_QUEUE_URL": f"{SQS}/dagster-taskiq-default-priority",
    "DAGSTER_TASKIQ_SCALER_FUNCTION": "dagster-taskiq-default-scaler",
    "DAGSTER_TASKIQ_ECS_CLUSTER": "dagster-taskiq",
    "DAGSTER_TASKIQ_ECS_SERVICE": "dagster-taskiq-default-workers",
    "HEAVY_QUEUE_URL": f"{SQS}/dagster-taskiq-heavy",
    "HEAVY_SCALER_FUNCTION": "dagster-taskiq-heavy-scaler",
    "HEAVY_ECS_SERVICE": "dagster-taskiq-heavy-workers",
    "REPORTS_QUEUE_URL": f"{SQS}/dagster-taskiq-reports",
    "REPORTS_PRIORITY_QUEUE_URL": f"{SQS}/dagster-taskiq-reports-priority",
    "REPORTS_SCALER_FUNCTION": "dagster-taskiq-reports-scaler",
    "REPORTS_ECS_SERVICE": "dagster-taskiq-reports-workers",
}
JOBS = [definitions.nightly_orders, definitions.month_end_close]


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


def _env_vars(value: object) -> set[str]:
    """Every environment variable an ``{env: VAR}`` in ``value`` names."""
    if isinstance(value, Mapping):
        if set(value) == {"env"}:
            return {str(value["env"])}
        return set().union(*(_env_vars(v) for v in value.values()))
    return set()


def _processed(config: Mapping[str, Any]) -> dict[str, Any]:
    result = process_config(taskiq_executor.config_schema.config_type, config)
    errors = [e.message for e in result.errors or []]
    assert result.success, f"the example's executor config is invalid: {errors}"
    assert isinstance(result.value, dict)
    return result.value


def test_the_test_sets_every_variable_the_example_reads() -> None:
    assert _env_vars(definitions.EXECUTOR_CONFIG) == set(ENVIRONMENT)


def test_executor_config_is_valid_for_taskiq_executor() -> None:
    config = _processed(definitions.EXECUTOR_CONFIG)

    assert config["queue_url"] == ENVIRONMENT["DAGSTER_TASKIQ_QUEUE_URL"]
    assert config["priority_queue_url"] == ENVIRONMENT["DAGSTER_TASKIQ_PRIORITY_QUEUE_URL"]
    assert set(config["queues"]) == {"heavy", "reports"}
    assert config["queues"]["heavy"]["url"] == ENVIRONMENT["HEAVY_QUEUE_URL"]
    assert config["queues"]["reports"]["priority_url"] == ENVIRONMENT["REPORTS_PRIORITY_QUEUE_URL"]
    assert config["priority_threshold"] == 1
    assert config["fifo_message_group"] == "run"  # the default
    assert config["visibility_timeout"] == 300  # the default: not celery's visibility timeout


def test_executor_config_needs_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPORTS_PRIORITY_QUEUE_URL")
    result = process_config(taskiq_executor.config_schema.config_type, definitions.EXECUTOR_CONFIG)
    assert not result.success
    assert "REPORTS_PRIORITY_QUEUE_URL" in " ".join(e.message for e in result.errors or [])


@pytest.mark.parametrize("job_def", JOBS, ids=lambda j: j.name)
def test_job_run_config_resolves_with_the_configured_executor(job_def: JobDefinition) -> None:
    assert job_def.executor_def.name == taskiq_executor.name
    try:
        resolved = ResolvedRunConfig.build(job_def, {})
    except DagsterInvalidConfigError as e:  # pragma: no cover - the message is the point
        pytest.fail(f"{job_def.name}: {e}")
    executor_config = resolved.execution.execution_engine_config
    assert executor_config == _processed(definitions.EXECUTOR_CONFIG)


def _tags_of(job_def: JobDefinition) -> list[tuple[str, Mapping[str, str]]]:
    return [("job", job_def.tags)] + [(node.name, node.tags) for node in job_def.graph.nodes]


@pytest.mark.parametrize("job_def", JOBS, ids=lambda j: j.name)
def test_tags_name_configured_queues_and_whole_priorities(job_def: JobDefinition) -> None:
    known = {"default", *definitions.EXECUTOR_CONFIG["queues"]}
    for where, tags in _tags_of(job_def):
        queue = tags.get(definitions.QUEUE_TAG)
        assert queue is None or queue in known, f"{where}: unknown queue {queue!r}"
        for tag in (definitions.PRIORITY_TAG, definitions.RUN_PRIORITY_TAG):
            if tag in tags:
                int(tags[tag])  # raises if the value is not a whole number
        assert not any(t.startswith("dagster-celery/") for t in tags), where


def test_priorities_reach_the_lanes_the_guide_says() -> None:
    threshold = definitions.EXECUTOR_CONFIG["priority_threshold"]
    publish = definitions.publish_dashboard.tags
    assert int(publish[definitions.PRIORITY_TAG]) >= threshold
    run_priority = int(definitions.month_end_close.tags[definitions.RUN_PRIORITY_TAG])
    assert run_priority >= threshold
    assert definitions.nightly_orders.tags.get(definitions.RUN_PRIORITY_TAG) is None


@pytest.mark.parametrize("job_def", JOBS, ids=lambda j: j.name)
def test_ops_run_in_process(job_def: JobDefinition) -> None:
    # execute_in_process runs every step in this process: no queue, no worker, no attempt.
    result = job_def.execute_in_process()
    assert result.success

"""The executor's queue configuration: named queues, lanes, and their scale triggers."""

from __future__ import annotations

from typing import Any

import pytest

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.settings import ENV_PRIORITY_QUEUE_URL, ENV_QUEUE_URL, ENV_SCALER_FUNCTION
from dagster_taskiq.executor.definition import ExecutorSettings, _routing, scale_out_triggers
from dagster_taskiq.executor.step_handler import LaunchSettings

Q = "https://sqs.us-east-1.amazonaws.com/123456789012"


@pytest.fixture(autouse=True)
def _no_queue_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_QUEUE_URL, ENV_PRIORITY_QUEUE_URL, ENV_SCALER_FUNCTION):
        monkeypatch.delenv(name, raising=False)


def test_the_default_queue_and_its_lane_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_QUEUE_URL, f"{Q}/steps")
    monkeypatch.setenv(ENV_PRIORITY_QUEUE_URL, f"{Q}/steps-priority")
    route = _routing({}).routes["default"]
    assert route.url == f"{Q}/steps" and route.priority_url == f"{Q}/steps-priority"


def test_named_queues_sit_beside_the_default() -> None:
    routing = _routing(
        {
            "queue_url": f"{Q}/steps",
            "queues": {"highmem": {"url": f"{Q}/highmem", "priority_url": f"{Q}/highmem-p"}},
            "priority_threshold": 3,
            "fifo_message_group": "step",
        }
    )
    assert routing.names == ["default", "highmem"]
    assert routing.routes["highmem"].urls == (f"{Q}/highmem", f"{Q}/highmem-p")
    assert routing.priority_threshold == 3 and routing.fifo_group == "step"


def test_the_default_may_be_given_under_queues_but_not_twice() -> None:
    assert _routing({"queues": {"default": {"url": f"{Q}/a"}}}).routes["default"].url == f"{Q}/a"
    with pytest.raises(ConfigurationError, match="two default queues"):
        _routing({"queue_url": f"{Q}/b", "queues": {"default": {"url": f"{Q}/a"}}})


def test_no_queue_at_all_says_what_to_set() -> None:
    with pytest.raises(ConfigurationError, match="set `queue_url`"):
        _routing({})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"queue_url": "steps"}, "not an SQS queue URL"),
        ({"queue_url": f"{Q}/s", "queues": {"x": {"url": "sqs://x"}}}, "queue 'x' has url"),
        (
            {
                "queue_url": f"{Q}/s",
                "queues": {"x": {"url": f"{Q}/x.fifo", "priority_url": f"{Q}/p"}},
            },
            "both be FIFO",
        ),
    ],
)
def test_wrong_queue_settings_are_clear_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _routing(config)


def test_each_pool_has_its_scale_trigger_and_a_lane_shares_its_queues() -> None:
    routing = _routing(
        {
            "queue_url": f"{Q}/steps",
            "priority_queue_url": f"{Q}/steps-priority",
            "scaler_function": "default-scaler",
            "queues": {
                "highmem": {"url": f"{Q}/highmem", "scaler_function": "highmem-scaler"},
                "manual": {"url": f"{Q}/manual"},
            },
        }
    )
    settings = ExecutorSettings(
        routing=routing,
        region="us-east-1",
        endpoint_url=None,
        database_url="postgresql+pg8000://localhost/x",
        launch=LaunchSettings(300, 86400, 262144, None, None),
        message_retention=1209600,
        max_receive_count=5,
    )
    triggers = scale_out_triggers(settings)
    assert set(triggers) == {f"{Q}/steps", f"{Q}/steps-priority", f"{Q}/highmem"}
    assert triggers[f"{Q}/steps"] is triggers[f"{Q}/steps-priority"]
    assert triggers[f"{Q}/highmem"] is not triggers[f"{Q}/steps"]

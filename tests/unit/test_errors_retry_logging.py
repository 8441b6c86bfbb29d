"""One errors module, one retry helper, one way to get a logger."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from dagster_taskiq.core import errors
from dagster_taskiq.core.errors import (
    ConfigurationError,
    DagsterTaskiqError,
    LedgerUnavailable,
    QueueUnavailable,
    TransientError,
    WorkerServiceUnavailable,
)
from dagster_taskiq.core.observability import get_logger, log_level, module_logger
from dagster_taskiq.core.retry import Backoff, retry_while_unreachable


def test_every_error_is_the_packages_and_only_outages_are_transient() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ]
    assert all(issubclass(c, DagsterTaskiqError) for c in classes)
    transient = {c for c in classes if issubclass(c, TransientError)}
    assert transient == {
        TransientError,
        LedgerUnavailable,
        QueueUnavailable,
        WorkerServiceUnavailable,
    }


def test_an_outage_is_retried_until_it_passes() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise LedgerUnavailable("connection refused")
        return "done"

    assert retry_while_unreachable(flaky, time.monotonic() + 10) == "done"
    assert len(calls) == 3


def test_an_outage_longer_than_the_deadline_raises_its_last_error() -> None:
    started = time.monotonic()
    with pytest.raises(QueueUnavailable, match="still down"):
        retry_while_unreachable(
            lambda: (_ for _ in ()).throw(QueueUnavailable("still down")),
            started + 0.8,
        )
    assert time.monotonic() - started < 0.8  # gives up before a wait would pass it


def test_what_is_not_transient_is_not_retried() -> None:
    calls: list[int] = []

    def wrong() -> None:
        calls.append(1)
        raise ConfigurationError("set DAGSTER_TASKIQ_QUEUE_URL")

    with pytest.raises(ConfigurationError):
        retry_while_unreachable(wrong, time.monotonic() + 10)
    assert calls == [1]


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.001, 0.004)
    assert [backoff.wait() for _ in range(4)] == [0.001, 0.002, 0.004, 0.004]
    backoff.reset()
    assert backoff.next == 0.001
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    Backoff(30.0).wait(stop)  # a set stop ends the wait at once
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("DEBUG", "DEBUG"),
        ("warning", "WARNING"),
        (" error ", "ERROR"),
        ("loud", "INFO"),
        ("", "INFO"),
    ],
)
def test_the_log_level_setting(value: str, level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_TASKIQ_LOG_LEVEL", value)
    assert log_level() == level


def test_module_loggers_follow_the_setting_only_when_it_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = logging.getLogger("dagster_taskiq")
    monkeypatch.setattr(package, "level", logging.NOTSET)
    monkeypatch.delenv("DAGSTER_TASKIQ_LOG_LEVEL", raising=False)
    module_logger("dagster_taskiq.some.module")
    assert package.level == logging.NOTSET  # the host process's configuration decides
    monkeypatch.setenv("DAGSTER_TASKIQ_LOG_LEVEL", "DEBUG")
    logger = module_logger("dagster_taskiq.some.module")
    assert logger.getEffectiveLevel() == logging.DEBUG


def test_service_loggers_write_json_at_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DAGSTER_TASKIQ_LOG_LEVEL", "WARNING")
    logger = get_logger("dagster-taskiq-test", worker_id="w-1")
    logger.info("not shown")
    logger.warning("shown")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert [line["message"] for line in lines] == ["shown"]
    assert lines[0]["worker_id"] == "w-1"

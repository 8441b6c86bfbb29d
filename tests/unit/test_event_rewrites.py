"""A step process writes a repeatable event again when the database cut its connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest
from sqlalchemy.exc import OperationalError

from dagster_taskiq.worker.step_storage import rewrite_cut_events

if TYPE_CHECKING:
    from dagster import DagsterInstance


@dataclass
class Event:
    event_type_value: str


@dataclass
class Entry:
    dagster_event: Event | None


class CutOnce:
    """Event storage whose first ``cuts`` writes meet a connection the server closed."""

    def __init__(self, cuts: int) -> None:
        self.cuts = cuts
        self.stored: list[Any] = []

    def store_event(self, event: Any) -> None:
        if self.cuts:
            self.cuts -= 1
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        self.stored.append(event)


@dataclass
class Instance:
    event_log_storage: CutOnce


@pytest.mark.parametrize(
    "entry", [Entry(Event("STEP_INPUT")), Entry(Event("LOGS_CAPTURED")), Entry(None)]
)
def test_a_repeatable_event_is_written_once_the_database_is_back(entry: Entry) -> None:
    instance = Instance(CutOnce(cuts=2))
    rewrite_cut_events(cast("DagsterInstance", instance))
    instance.event_log_storage.store_event(entry)
    assert instance.event_log_storage.stored == [entry]


@pytest.mark.parametrize("event_type", ["STEP_SUCCESS", "STEP_FAILURE", "STEP_OUTPUT"])
def test_an_ending_or_an_output_is_not_written_twice(event_type: str) -> None:
    instance = Instance(CutOnce(cuts=1))
    rewrite_cut_events(cast("DagsterInstance", instance))
    with pytest.raises(OperationalError):
        instance.event_log_storage.store_event(Entry(Event(event_type)))
    assert instance.event_log_storage.stored == []


def test_a_longer_outage_still_fails_the_write() -> None:
    instance = Instance(CutOnce(cuts=100))
    rewrite_cut_events(cast("DagsterInstance", instance), patience=0.5)
    with pytest.raises(OperationalError):
        instance.event_log_storage.store_event(Entry(Event("STEP_INPUT")))

"""When the run worker reads its run's events: on a notification for its run, at least
every safety interval, and every fallback interval while it cannot listen."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from dagster_taskiq.executor.event_wait import CHANNEL, RunEventWaiter


@dataclass
class Note:
    channel: str
    payload: str


@dataclass
class FakeConnection:
    """What the waiter uses of a psycopg2 connection; readable when ``notify`` is called."""

    notifies: list[Note] = field(default_factory=list)
    arrived: list[Note] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    broken: bool = False
    closed: bool = False
    autocommit: bool = False

    def __post_init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)

    def fileno(self) -> int:
        return self._read.fileno()

    def notify(self, run_id: str, storage_id: int = 1) -> None:
        self.arrived.append(Note(CHANNEL, f"{run_id}_{storage_id}"))
        self._write.send(b"x")

    def break_(self) -> None:
        self.broken = True
        self._write.send(b"x")

    def poll(self) -> None:
        with contextlib.suppress(BlockingIOError):  # nothing to read
            self._read.recv(1024)
        if self.broken:
            raise OSError("server closed the connection unexpectedly")
        self.notifies.extend(self.arrived)
        self.arrived.clear()

    def cursor(self) -> FakeConnection:
        return self

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, statement: str) -> None:
        self.executed.append(statement)

    def close(self) -> None:
        self.closed = True
        self._read.close()
        self._write.close()


class Clock:
    """Real time, moved on by hand: ``now += seconds``."""

    def __init__(self) -> None:
        self.offset = 0.0

    @property
    def now(self) -> float:
        return time.monotonic() + self.offset

    @now.setter
    def now(self, value: float) -> None:
        self.offset += value - self.now

    def __call__(self) -> float:
        return self.now


class Connector:
    def __init__(self) -> None:
        self.made: list[FakeConnection] = []
        self.refuse = False

    def __call__(self) -> Any:
        if self.refuse:
            raise OSError("connection refused")
        self.made.append(FakeConnection())
        return self.made[-1]


@pytest.fixture
def connector() -> Iterator[Connector]:
    made = Connector()
    yield made
    for conn in made.made:
        if not conn.closed:
            conn.close()


def test_a_notification_for_the_run_makes_a_read_due(connector: Connector) -> None:
    clock = Clock()
    waiter = RunEventWaiter(connector, "run-a", clock=clock)
    conn = connector.made[0]
    assert conn.executed == [f"LISTEN {CHANNEL}"] and conn.autocommit
    assert waiter.read_due(), "the first read finds what came before the listening"
    assert not waiter.read_due()

    conn.notify("run-b")  # another run's event: no read
    waiter.wait(0.05)
    assert not waiter.read_due()

    conn.notify("run-a", 7)
    waiter.wait(5.0)  # returns at once
    assert waiter.read_due()
    assert not waiter.read_due()
    assert waiter.statements == 1


def test_a_read_that_found_events_is_followed_by_another(connector: Connector) -> None:
    waiter = RunEventWaiter(connector, "run-a", clock=Clock())
    assert waiter.read_due()
    waiter.found_events()
    assert waiter.read_due()
    assert not waiter.read_due()


def test_reads_at_least_every_safety_interval(connector: Connector) -> None:
    clock = Clock()
    waiter = RunEventWaiter(connector, "run-a", safety_read=5.0, clock=clock)
    assert waiter.read_due()
    clock.now += 4.9
    assert not waiter.read_due()
    waiter.wait(0.01)
    clock.now += 0.2
    waiter.wait(1.0)  # the safety read is due: returns at once
    assert waiter.read_due()


def test_a_lost_connection_falls_back_to_polling_and_listens_again(connector: Connector) -> None:
    clock = Clock()
    waiter = RunEventWaiter(connector, "run-a", fallback_poll=1.0, clock=clock)
    assert waiter.read_due()
    first = connector.made[0]
    connector.refuse = True
    first.break_()
    waiter.wait(5.0)  # returns: the loss is noticed, a read is due (events may be missed)
    assert first.closed and not waiter.listening
    assert waiter.read_due()
    assert not waiter.read_due()
    clock.now += 1.0
    assert waiter.read_due(), "polled every fallback interval while it cannot listen"

    connector.refuse = False
    clock.now += 1.0
    waiter.wait(5.0)
    assert waiter.listening and len(connector.made) == 2
    assert waiter.read_due(), "a read follows the reconnect: nobody was notified meanwhile"
    clock.now += 1.0
    assert not waiter.read_due(), "listening again, no fallback polling"


def test_a_refused_first_connection_polls(connector: Connector) -> None:
    connector.refuse = True
    clock = Clock()
    waiter = RunEventWaiter(connector, "run-a", fallback_poll=1.0, clock=clock)
    assert not waiter.listening
    assert waiter.read_due()
    clock.now += 0.5
    assert not waiter.read_due()
    clock.now += 0.5
    assert waiter.read_due()
    waiter.close()

"""Pooled connections checked before use (core/connections.py), on a real PostgreSQL with
both drivers the package uses: pg8000 (the ledger) and psycopg2 (Dagster's storages)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from dagster_taskiq.core import connections
from dagster_taskiq.core.connections import check_before_use, has_pending_input, needs_ping
from dagster_taskiq.core.settings import dagster_storage_url, ledger_url
from dagster_taskiq.load.faults import via_proxy
from dagster_taskiq.local.tcp_proxy import postgres_target, tcp_proxy

DRIVERS = {"pg8000": ledger_url, "psycopg2": dagster_storage_url}


def _engine(url: str, **kwargs: Any) -> sa.engine.Engine:
    return sa.create_engine(url, pool_size=1, max_overflow=0, **kwargs)


class Pings:
    """Counts the pings the engine's dialect sends."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.count = 0
        ping = engine.dialect.do_ping

        def counted(dbapi_connection: Any) -> bool:
            self.count += 1
            return ping(dbapi_connection)

        engine.dialect.do_ping = counted  # type: ignore[method-assign]


def _backend(engine: sa.engine.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> None:
    admin = sa.create_engine(ledger_url(url), poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    admin.dispose()


@pytest.fixture(params=sorted(DRIVERS))
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def driver_url(driver: str, postgres_url: str) -> str:
    return DRIVERS[driver](postgres_url)


@pytest.fixture
def engine(driver_url: str) -> Iterator[sa.engine.Engine]:
    made = _engine(driver_url)
    yield made
    made.dispose()


def test_a_connection_used_a_moment_ago_is_not_pinged(engine: sa.engine.Engine) -> None:
    check_before_use(engine)
    pings = Pings(engine)
    first = _backend(engine)  # a new connection: not pinged either
    for _ in range(20):
        assert _backend(engine) == first
    assert pings.count == 0


def test_a_connection_idle_for_a_while_is_pinged(engine: sa.engine.Engine) -> None:
    check_before_use(engine, ping_after_idle=0.2)
    pings = Pings(engine)
    first = _backend(engine)
    time.sleep(0.3)
    assert _backend(engine) == first
    assert pings.count == 1
    assert _backend(engine) == first  # used a moment ago again
    assert pings.count == 1


def test_checking_twice_changes_nothing(engine: sa.engine.Engine) -> None:
    check_before_use(engine, ping_after_idle=0.2)
    check_before_use(engine, ping_after_idle=0.2)
    pings = Pings(engine)
    _backend(engine)
    time.sleep(0.3)
    _backend(engine)
    assert pings.count == 1


def test_a_backend_ended_while_its_connection_waits_is_replaced_at_once(
    engine: sa.engine.Engine, postgres_url: str
) -> None:
    """Ended by the server (a restart, an administrator): the termination notice and the
    close make the socket readable; the connection is pinged, fails, and is replaced."""
    check_before_use(engine)  # 1 s: the next checkout comes well before a ping is due
    pings = Pings(engine)
    with engine.connect() as conn:
        first = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        raw = conn.connection.dbapi_connection  # back in the pool after the block
    _terminate(postgres_url, first)
    # The notice and the close reach this end a moment after the kill; looked for on the
    # pooled connection itself, not by a checkout (which would replace it here already).
    deadline = time.monotonic() + 5
    while not has_pending_input(raw):
        assert time.monotonic() < deadline, "no sign of the termination at this end"
        time.sleep(0.01)
    second = _backend(engine)
    assert second != first
    assert pings.count == 1


def test_without_the_check_the_statement_fails(driver_url: str, postgres_url: str) -> None:
    """The same termination without the check: the statement fails (what the check is for)."""
    plain = _engine(driver_url)
    try:
        pid = _backend(plain)
        _terminate(postgres_url, pid)
        time.sleep(0.2)
        with pytest.raises(sa.exc.DBAPIError) as failure:
            _backend(plain)
        assert failure.value.connection_invalidated
    finally:
        plain.dispose()


def test_a_cut_link_is_replaced_or_refused_never_reused(driver: str, postgres_url: str) -> None:
    """A network cut closes the link: the next checkout does not send a statement on it.
    While the cut lasts, a new connection is refused (a clear error); after, it works."""
    with tcp_proxy(postgres_target(postgres_url)) as proxy:
        engine = _engine(DRIVERS[driver](via_proxy(postgres_url, proxy)))
        check_before_use(engine)
        try:
            first = _backend(engine)
            proxy.cut()
            time.sleep(0.2)
            with pytest.raises(sa.exc.DBAPIError):
                _backend(engine)
            proxy.restore()
            assert _backend(engine) != first
        finally:
            engine.dispose()


def test_the_decision() -> None:
    left, right = socket.socketpair()
    try:
        now = 100.0
        assert not needs_ping(left, None, now)  # a connection just made
        assert not needs_ping(left, now - 0.5, now)
        assert needs_ping(left, now - connections.PING_AFTER_IDLE_SECONDS, now)
        right.send(b"N")  # the server said something unasked
        assert needs_ping(left, now - 0.5, now)
        assert needs_ping(object(), now - 0.5, now)  # no socket to look at
    finally:
        left.close()
        right.close()

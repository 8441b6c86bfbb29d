"""Pooled connections checked before use, with a round trip only where one can tell.

SQLAlchemy's pre-ping sends ``SELECT 1`` at every checkout. A step process writes a step's
events one at a time, each on a connection checked out for it, so pre-ping costs about as
many round trips as the statements themselves (docs/decisions.md #55). A connection
checked in a moment ago was alive then, and the ways it dies while it waits in the pool
mostly say so at this end: PostgreSQL sends a termination notice and closes the socket
when it stops or restarts, or when an administrator ends the backend; a cut link closes
it. Either leaves the socket readable, which a zero-timeout poll sees with no round trip.

So at checkout, a connection is pinged (as pre-ping would, and replaced if the ping
fails) when it has been idle for ``PING_AFTER_IDLE_SECONDS`` or more, or when its socket
has anything to read, or when its socket cannot be found; otherwise it is used as it is.
A connection just made is used as it is, as pre-ping does.

What this gives up: a peer that vanished without a word (a host lost, a black-holed
link) less than ``PING_AFTER_IDLE_SECONDS`` after the connection's last use is found out
by the next statement rather than by a ping. That statement fails where it would have
run on a new connection; what it was part of is retried or fails as it would for a
connection cut mid-statement, which pre-ping never covered either.
"""

from __future__ import annotations

import select
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc

PING_AFTER_IDLE_SECONDS = 1.0
# Set on a connection record at checkin; SQLAlchemy clears a record's ``info`` when it
# makes the record a new connection.
CHECKED_IN_AT = "dagster_taskiq.checked_in_at"
_POLL_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL

# Listeners go on the engine's pool and stay on the pool ``dispose()`` makes in its place.
_checked_engines: weakref.WeakSet[sa.engine.Engine] = weakref.WeakSet()


def socket_of(dbapi_connection: Any) -> int | None:
    """The file descriptor of a DBAPI connection's socket: psycopg2's ``fileno()``,
    pg8000's socket; None if neither (or it is closed)."""
    try:
        fileno = getattr(dbapi_connection, "fileno", None)
        if callable(fileno):
            return int(fileno())
        sock = getattr(dbapi_connection, "_usock", None)  # pg8000
        if sock is not None:
            fd = int(sock.fileno())
            return fd if fd >= 0 else None
    except Exception:
        return None
    return None


def has_pending_input(dbapi_connection: Any) -> bool:
    """Whether an idle connection's socket has anything to read (a notice, a close, an
    error), or cannot be looked at: either way it is pinged before use."""
    fd = socket_of(dbapi_connection)
    if fd is None:
        return True
    poller = select.poll()
    poller.register(fd, _POLL_EVENTS)
    return bool(poller.poll(0))


def needs_ping(
    dbapi_connection: Any,
    checked_in_at: float | None,
    now: float,
    ping_after_idle: float = PING_AFTER_IDLE_SECONDS,
) -> bool:
    """The decision at checkout (``checked_in_at`` None: a connection just made)."""
    if checked_in_at is None:
        return False
    return now - checked_in_at >= ping_after_idle or has_pending_input(dbapi_connection)


def checks(engine: sa.engine.Engine) -> bool:
    """Whether ``check_before_use`` was applied to the engine."""
    return engine in _checked_engines


def check_before_use(
    engine: sa.engine.Engine, ping_after_idle: float = PING_AFTER_IDLE_SECONDS
) -> None:
    """Check the engine's pooled connections at checkout as described above (once per
    engine: calling it again changes nothing)."""
    if engine in _checked_engines:
        return
    pool = engine.pool
    dialect = engine.dialect

    def checked_in(dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[CHECKED_IN_AT] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if not needs_ping(
            dbapi_connection, record.info.get(CHECKED_IN_AT), time.monotonic(), ping_after_idle
        ):
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as e:
            # The pool invalidates the connection and checks out a new one in its place.
            raise exc.DisconnectionError(f"a pooled connection failed its ping: {e}") from e

    event.listen(pool, "checkin", checked_in)
    event.listen(pool, "checkout", checkout)
    _checked_engines.add(engine)


__all__ = [
    "CHECKED_IN_AT",
    "PING_AFTER_IDLE_SECONDS",
    "check_before_use",
    "checks",
    "has_pending_input",
    "needs_ping",
    "socket_of",
]

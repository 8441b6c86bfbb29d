"""The run worker waits for its run's events on dagster-postgres' notifications.

dagster-postgres issues ``NOTIFY run_events, '<run id>_<storage id>'`` for every event it
stores (``PostgresEventLogStorage.store_event``; it keeps it for older webservers). A run
worker that polled the event log every 0.02 to 0.1 s sent 10 to 50 statements a second
while its steps ran; fifty runs waiting on long steps kept the database busy doing
nothing. Here one connection per run LISTENs on that channel, and the event log is read
when a notification names the run, after a read that found events (more may follow), at
least every ``safety_read`` seconds, and every ``fallback_poll`` seconds while no
notification can be trusted: the listening connection is down (a restart, a failover, a
network cut) and being reconnected. Each reconnect is followed by a read, since events
stored meanwhile notified no one.

The notifications go to every listener on the channel, whatever the run: a waiter keeps
those of its run and drops the rest, reading only what has arrived (no statement).

They also name what a read missed. Event ids come from a sequence before the insert
commits, so an event can commit after a later one was read; Dagster's read of the run's
events from the last id it saw then never returns it (a step's output lost: a fan-in
finds one value short). Its notification comes after its commit and names an id at or
below the ids already read that no read returned (``take_notified``); the executor then
reads again from just before it. (A log message, which Dagster's read leaves out, can
look the same once in a while: the read again costs a read, nothing more.)
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable
from typing import Any

from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.patches import event_log_engine

log = module_logger(__name__)

# dagster_postgres.event_log.event_log.CHANNEL_NAME; a contract test checks it is the same.
CHANNEL = "run_events"
SAFETY_READ_SECONDS = 5.0
FALLBACK_POLL_SECONDS = 1.0
# TCP keepalives on the listening connection: a peer gone without a word (a network cut)
# is noticed within some 25 s rather than the kernel's two hours; the safety read covers
# the time until then. (Ignored on a Unix socket, where a dead server closes the socket.)
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "connect_timeout": 5,
}


class RunEventWaiter:
    """When to read a run's events: ``read_due`` before a read, ``wait`` between reads.

    ``connect`` opens a new DBAPI (psycopg2) connection to the event log's database; any
    exception it or the connection raises counts as the connection lost.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        run_id: str,
        *,
        safety_read: float = SAFETY_READ_SECONDS,
        fallback_poll: float = FALLBACK_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect_fn = connect
        self._run_id = run_id
        self._safety_read = safety_read
        self._fallback_poll = fallback_poll
        self._clock = clock
        self._conn: Any = None
        self._due = True  # the first read finds what came before the listening began
        self._last_read = clock()
        self._next_connect = 0.0
        self._warned = False
        self.statements = 0  # LISTENs sent: the only statements a waiter makes
        self._notified: list[int] = []  # ids of the run's events notified, not yet taken
        self._connect()

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def read_due(self) -> bool:
        """Whether to read the event log now; if so, the read is taken as done."""
        if self._conn is not None:
            self._drain(0.0)
        now = self._clock()
        since = now - self._last_read
        bound = self._safety_read if self._conn is not None else self._fallback_poll
        if not (self._due or since >= bound):
            return False
        self._due = False
        self._last_read = now
        return True

    def found_events(self) -> None:
        """A read returned events: read again at once, a page may have been left."""
        self._due = True

    def take_notified(self) -> list[int]:
        """The ids of the run's events notified since the last call (call it after
        ``read_due``, before the read)."""
        notified, self._notified = self._notified, []
        return notified

    def wait(self, timeout: float) -> None:
        """Return when a read is due, or after ``timeout`` seconds."""
        deadline = self._clock() + timeout
        while not self._due:
            now = self._clock()
            if self._conn is None and now >= self._next_connect:
                self._connect()
                continue
            bound = self._safety_read if self._conn is not None else self._fallback_poll
            until = min(deadline, self._last_read + bound)
            if self._conn is None:
                until = min(until, self._next_connect)
            if until <= now:
                return
            if self._conn is not None:
                self._drain(until - now)
            else:
                time.sleep(until - now)
            if self._clock() >= deadline:
                return

    def close(self) -> None:
        if self._conn is not None:
            self._close_quietly()

    # -- the listening connection ---------------------------------------------------------

    def _connect(self) -> None:
        try:
            conn = self._connect_fn()
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            self.statements += 1
        except Exception as e:  # a driver's, or a token provider's: tried again
            self._next_connect = self._clock() + self._fallback_poll
            if not self._warned:
                self._warned = True
                log.warning(
                    "Cannot listen for the run's events (%s); reading the event log every "
                    "%.0f s until it can.",
                    e,
                    self._fallback_poll,
                )
            return
        self._conn = conn
        self._due = True  # events stored while no one listened notified no one
        if self._warned:
            self._warned = False
            log.info("Listening for the run's events again.")

    def _drain(self, timeout: float) -> None:
        conn = self._conn
        try:
            if timeout > 0:
                select.select([conn], [], [], timeout)
            conn.poll()
            notifies = conn.notifies
            while notifies:
                note = notifies.pop(0)
                run_id, _, storage_id = note.payload.rpartition("_")
                if note.channel == CHANNEL and run_id == self._run_id:
                    self._due = True
                    if storage_id.isdigit():
                        self._notified.append(int(storage_id))
        except Exception as e:  # a cut connection raises the driver's error
            self._lost(e)

    def _lost(self, error: Exception) -> None:
        self._close_quietly()
        self._due = True
        self._next_connect = self._clock()
        if not self._warned:
            self._warned = True
            log.warning(
                "Lost the connection listening for the run's events (%s); reading the "
                "event log every %.0f s until it is back.",
                error,
                self._fallback_poll,
            )

    def _close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        with contextlib.suppress(Exception):  # closing what is already broken
            conn.close()


def listen_connector(storage: Any) -> Callable[[], Any] | None:
    """How to open a listening connection to ``storage``'s database: a dagster-postgres
    event log's URL and credentials (its token provider, if it has one). None for any
    other storage, which the run worker polls."""
    from dagster_postgres.event_log.event_log import PostgresEventLogStorage

    if not isinstance(storage, PostgresEventLogStorage):
        return None
    import sqlalchemy as sa

    engine = event_log_engine(storage, poolclass=sa.pool.NullPool, connect_args=KEEPALIVES)

    def connect() -> Any:
        # The DBAPI connection itself, detached from SQLAlchemy's (null) pool.
        proxied = engine.raw_connection()
        conn = proxied.dbapi_connection
        proxied.detach()
        return conn

    return connect

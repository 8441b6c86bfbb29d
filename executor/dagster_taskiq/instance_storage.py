"""Pooled connections to Dagster's instance storage.

dagster-postgres opens a new connection for every read and write (NullPool) except in
the webserver (``optimize_for_webserver``). A new PostgreSQL connection is a server
process forked, authenticated (and, on RDS, a TLS handshake): more than the query.
The run worker reads the event log every 0.02 s while steps finish, and a step process
writes some ten events a step, so both keep pooled connections instead, each checked
before use so that one a restart or a network cut dropped is replaced, not failed on.

Dagster's run storage also asks the database catalog, on every run read, whether the
runs table has its run-stats columns yet (``has_run_stats_index_cols``): a reflection
query as dear as the read itself, which a step process makes once a step and a run
worker at each read of its run and each change of its status. The answer is kept once
it is yes (``remember_run_stats_columns``), in both.

The run worker writes an event for each step it queues. ``EventBatch`` holds those events
while a batch of steps is launched, and writes them together (and a NOTIFY each, as
dagster-postgres's ``store_event`` does) instead of in a transaction each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

# What ``optimize_for_webserver`` is given here. statement_timeout 0: no limit on the
# writes of a run or a step (the webserver's 15 s is for reads).
POOL_OPTIONS = {"statement_timeout": 0, "pool_recycle": 3600, "max_overflow": 4}


def check_before_use(engine: Any) -> None:
    """What ``create_engine(pool_pre_ping=True)`` sets, on an engine made without it."""
    pool = getattr(engine, "pool", None)
    if pool is not None and hasattr(pool, "_pre_ping"):
        pool._pre_ping = True


def remember_run_stats_columns(run_storage: Any) -> None:
    """Ask the catalog for the run-stats columns until they are there, then no more.

    A migration adds them and none takes them away, so a yes stays true for the life of
    the storage; a no is asked again (``dagster instance migrate`` may run meanwhile).
    """
    ask = getattr(run_storage, "has_run_stats_index_cols", None)
    if ask is None or isinstance(ask, _RememberedYes):
        return  # not a SQL run storage, or remembering already
    run_storage.has_run_stats_index_cols = _RememberedYes(ask)


class _RememberedYes:
    def __init__(self, ask: Callable[[], bool]) -> None:
        self.ask = ask
        self.present = False

    def __call__(self) -> bool:
        self.present = self.present or bool(self.ask())
        return self.present


@contextmanager
def pooled_event_log(instance: Any) -> Iterator[None]:
    """The instance's event-log storage on a connection pool while the block runs.

    Its own engine is put back afterwards, so an instance the caller shares (a script
    that calls ``execute_job``) is left as it was.
    """
    storage = instance.event_log_storage
    original = getattr(storage, "_engine", None)
    if original is None or not hasattr(storage, "optimize_for_webserver"):
        yield  # not dagster-postgres: nothing to pool
        return
    storage.optimize_for_webserver(**POOL_OPTIONS)
    pooled = storage._engine
    check_before_use(pooled)
    try:
        yield
    finally:
        storage._engine = original
        pooled.dispose()


class EventBatch:
    """Events of the kinds given that this thread stores while ``holding`` runs are kept
    back; ``write`` stores them in one statement. Other threads, and other kinds, are
    stored as ever. Only on dagster-postgres storage; elsewhere nothing is held."""

    def __init__(self, instance: Any) -> None:
        from dagster_postgres.event_log.event_log import PostgresEventLogStorage

        storage = instance.event_log_storage
        self._storage = storage if isinstance(storage, PostgresEventLogStorage) else None
        self.held: list[Any] = []

    @contextmanager
    def holding(self, kinds: Collection[Any]) -> Iterator[None]:
        storage: Any = self._storage  # its method is stood in for, on this instance only
        if storage is None:
            yield
            return
        thread = threading.get_ident()
        store = storage.store_event  # the bound method, or whatever stands in for it now
        shadowed = "store_event" in vars(storage)

        def hold_or_store(event: Any) -> None:
            dagster_event = event.dagster_event
            if (
                threading.get_ident() == thread
                and dagster_event is not None
                and dagster_event.event_type in kinds
            ):
                self.held.append(event)
            else:
                store(event)

        storage.store_event = hold_or_store
        try:
            yield
        finally:
            if shadowed:
                storage.store_event = store
            else:
                del storage.store_event

    def write(self) -> None:
        """Store the held events: multi-row inserts, then one statement of NOTIFYs. Raises what
        the storage raises, keeping the events; a retry after a lost answer may store
        them twice, which harms nothing (they are engine events)."""
        if not self.held or self._storage is None:
            return
        import sqlalchemy as sa
        from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
        from dagster_postgres.event_log.event_log import CHANNEL_NAME

        storage = self._storage
        # Dagster's own row for each event, sent as one executemany (SQLAlchemy makes it
        # multi-row inserts): ``prepare_insert_event_batch`` builds a VALUES clause whose
        # compilation costs more than the insert.
        rows = [storage._event_to_row(event) for event in self.held]
        insert = SqlEventLogStorageTable.insert().returning(
            SqlEventLogStorageTable.c.run_id, SqlEventLogStorageTable.c.id
        )
        with storage.index_connection() as conn:
            stored = conn.execute(insert, rows).all()
            conn.execute(
                sa.text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) p"),
                {"channel": CHANNEL_NAME, "payloads": [f"{r[0]}_{r[1]}" for r in stored]},
            )
        self.held = []

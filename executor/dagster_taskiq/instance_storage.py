"""Pooled connections to Dagster's instance storage.

dagster-postgres opens a new connection for every read and write (NullPool) except in
the webserver (``optimize_for_webserver``). A new PostgreSQL connection is a server
process forked, authenticated (and, on RDS, a TLS handshake): more than the query.
The run worker reads the event log every 0.02 s while steps finish, and a step process
writes some ten events a step, so both keep pooled connections instead, each checked
before use so that one a restart or a network cut dropped is replaced, not failed on.
"""

from __future__ import annotations

from collections.abc import Iterator
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

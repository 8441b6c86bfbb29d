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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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

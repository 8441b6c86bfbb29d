"""The run worker's event-log reads on pooled connections, and the step process's run
reads without catalog queries, on the real instance storage."""

from __future__ import annotations

import sqlalchemy as sa
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.local.stack import LocalStack
from dagster_taskiq.patches import pooled_event_log, remember_run_stats_columns
from tests import jobs
from tests.conftest import start_workers


def _counting_connects(engine: sa.Engine) -> list[int]:
    opened: list[int] = []
    sa.event.listen(engine, "connect", lambda *_: opened.append(1))
    return opened


def test_reads_share_one_connection_and_the_engine_is_put_back(
    instance: DagsterInstance, ledger: Ledger
) -> None:
    storage = instance.event_log_storage
    original = storage._engine  # type: ignore[attr-defined]
    unpooled = _counting_connects(original)
    for _ in range(5):
        instance.get_records_for_run("no-such-run", limit=10)
    assert len(unpooled) == 5, "dagster-postgres connects for every read"

    with pooled_event_log(instance):
        pooled_engine = storage._engine  # type: ignore[attr-defined]
        assert pooled_engine is not original
        pooled = _counting_connects(pooled_engine)
        for _ in range(20):
            instance.get_records_for_run("no-such-run", limit=10)
        assert len(pooled) == 1

        # A connection the server dropped (a restart, a cut) is replaced, not failed on.
        with pooled_engine.connect() as conn:
            backend = conn.execute(sa.text("select pg_backend_pid()")).scalar_one()
        with ledger.transaction() as conn:
            conn.execute(sa.text("select pg_terminate_backend(:pid)"), {"pid": backend})
        instance.get_records_for_run("no-such-run", limit=10)
        assert len(pooled) == 2

    assert storage._engine is original  # type: ignore[attr-defined]
    assert pooled_engine.pool.checkedin() == 0, "the pool is closed"


def test_a_run_puts_the_instance_s_engine_back_and_keeps_a_yes(
    stack: LocalStack, instance: DagsterInstance
) -> None:
    start_workers(stack, 1)
    original = instance.event_log_storage._engine  # type: ignore[attr-defined]
    with execute_job(reconstructable(jobs.outputs_job), instance=instance) as result:
        assert result.success
    assert instance.event_log_storage._engine is original  # type: ignore[attr-defined]
    # What it keeps: the runs table's run-stats columns are known to be there.
    catalog = _counting_catalog_reads(instance.run_storage._engine)  # type: ignore[attr-defined]
    assert instance.get_run_by_id(result.run_id) is not None
    assert catalog == []


def _counting_catalog_reads(engine: sa.Engine) -> list[str]:
    seen: list[str] = []

    def before(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "pg_catalog" in statement:
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", before)
    return seen


def test_run_reads_ask_the_catalog_once_the_columns_are_there(instance: DagsterInstance) -> None:
    storage = instance.run_storage
    catalog = _counting_catalog_reads(storage._engine)  # type: ignore[attr-defined]
    instance.get_run_by_id("no-such-run")
    asked_per_read = len(catalog)
    assert asked_per_read > 0, "Dagster's run read reflects the runs table"

    remember_run_stats_columns(storage)
    remember_run_stats_columns(storage)  # a second call changes nothing
    catalog.clear()
    for _ in range(5):
        assert instance.get_run_by_id("no-such-run") is None
    assert len(catalog) == asked_per_read, "asked once, then remembered"
    assert storage.has_run_stats_index_cols() is True  # type: ignore[attr-defined]


def test_a_missing_column_is_asked_about_again() -> None:
    answers = iter([False, False, True])
    asked: list[bool] = []

    class Storage:
        def has_run_stats_index_cols(self) -> bool:
            asked.append(True)
            return next(answers)

    storage = Storage()
    remember_run_stats_columns(storage)
    answers_seen = [storage.has_run_stats_index_cols() for _ in range(5)]
    assert answers_seen == [False, False, True, True, True]
    assert len(asked) == 3, "a no is asked again, a yes is kept"

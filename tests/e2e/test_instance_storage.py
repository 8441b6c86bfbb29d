"""The run worker's event-log reads on pooled connections, on the real instance storage."""

from __future__ import annotations

import sqlalchemy as sa
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.instance_storage import pooled_event_log
from dagster_taskiq.ledger import Ledger
from dagster_taskiq.local.stack import LocalStack
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


def test_a_run_leaves_the_instance_as_it_was(stack: LocalStack, instance: DagsterInstance) -> None:
    start_workers(stack, 1)
    original = instance.event_log_storage._engine  # type: ignore[attr-defined]
    with execute_job(reconstructable(jobs.outputs_job), instance=instance) as result:
        assert result.success
    assert instance.event_log_storage._engine is original  # type: ignore[attr-defined]

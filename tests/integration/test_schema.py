"""The ledger's schema is versioned: created and upgraded by its migrations, refused when
newer than a release knows. On real PostgreSQL; one test runs a job on a ledger that the
first release created."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.core.errors import SchemaMismatch
from dagster_taskiq.core.ledger import Ledger, Status, metadata
from dagster_taskiq.core.migrations import ensure_schema, script_revisions
from dagster_taskiq.core.schema import HEAD, REVISIONS, VERSION_TABLE, SchemaStatus
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.scaling.outlook import outlook_metadata
from dagster_taskiq.scaling.policy import ScalingConfig
from dagster_taskiq.scaling.scaler import Scaler, history_metadata
from tests import jobs
from tests.conftest import StackFactory, start_workers
from tests.helpers import REPO_ROOT, finished_records

# The tables exactly as the first release created them (``create_all``, no versions).
first_release = sa.MetaData()
sa.Table(
    "dagster_taskiq_steps",
    first_release,
    sa.Column("idempotency_key", sa.Text, primary_key=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("step_key", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("worker_id", sa.Text),
    sa.Column("fencing_token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duplicates_suppressed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("payload_hash", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_dagster_taskiq_steps_run_id", "run_id"),
    sa.Index("ix_dagster_taskiq_steps_status_lease", "status", "lease_expires_at"),
)
sa.Table(
    "dagster_taskiq_rejected_messages",
    first_release,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("idempotency_key", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("body_excerpt", sa.Text, nullable=False),
    sa.Column("worker_id", sa.Text),
    sa.Column("receive_count", sa.Integer, nullable=False, server_default="1"),
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
)


@pytest.fixture
def fresh(empty_database_url: str) -> Iterator[Ledger]:
    store = Ledger(empty_database_url)
    yield store
    store.dispose()


def _revision(store: Ledger) -> list[str]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))]


def test_the_release_knows_every_migration_in_order() -> None:
    assert list(REVISIONS) == script_revisions()


def test_a_new_ledger_is_created_at_the_head_and_matches_the_declared_tables(
    fresh: Ledger,
) -> None:
    state = ensure_schema(fresh, component="test")
    assert state.status is SchemaStatus.CURRENT and state.revision == HEAD
    assert _revision(fresh) == [HEAD]
    # The migrations build exactly the tables the code declares: no drift either way.
    declared = sa.MetaData()
    for source in (metadata, history_metadata, outlook_metadata):
        for table in source.tables.values():
            table.to_metadata(declared)
    with fresh.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        diffs = compare_metadata(context, declared)
    tables = set(declared.tables)
    assert [d for d in diffs if _concerns(d, tables)] == []


def _concerns(diff: object, tables: set[str]) -> bool:
    """A difference in one of the declared tables (the database may hold others)."""
    text = repr(diff)
    return any(name in text for name in tables)


def test_a_current_ledger_is_checked_without_importing_alembic(
    fresh: Ledger, empty_database_url: str
) -> None:
    """A worker holds what it imports for its whole life: Alembic only when it upgrades."""
    ensure_schema(fresh, component="test")
    code = (
        "import sys\n"
        "from dagster_taskiq.core.ledger import Ledger\n"
        "from dagster_taskiq.core.migrations import ensure_schema\n"
        "ledger = Ledger(sys.argv[1])\n"
        "print(ensure_schema(ledger, component='worker').status.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    checked = subprocess.run(
        [sys.executable, "-c", code, empty_database_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert checked.stdout.split("\n")[:2] == ["CURRENT", "[]"], checked.stdout


def test_the_first_releases_ledger_is_upgraded_with_its_rows(fresh: Ledger) -> None:
    first_release.create_all(fresh.engine)
    with fresh.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO dagster_taskiq_steps (idempotency_key, run_id, step_key, attempt,"
                " status, payload_hash, enqueued_at, updated_at, expires_at) VALUES"
                " ('r:s:0', 'r', 's', 0, 'SUCCEEDED', 'h', now(), now(), now())"
            )
        )
    state = ensure_schema(fresh, component="test")
    assert state.revision == HEAD
    columns = {c["name"] for c in sa.inspect(fresh.engine).get_columns("dagster_taskiq_steps")}
    assert "queue_url" in columns
    record = fresh.get("r:s:0")
    assert record is not None and record.status is Status.SUCCEEDED
    assert record.queue_url is None


def test_a_schema_newer_than_the_release_is_refused_with_what_to_do(fresh: Ledger) -> None:
    ensure_schema(fresh, component="test")
    with fresh.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(SchemaMismatch, match=r"revision 9999, newer than .* Deploy that"):
        ensure_schema(fresh, component="worker")
    # Not touched by a release that does not know it.
    assert _revision(fresh) == ["9999"]
    # A worker refuses to start on it, saying why.
    worker = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster_taskiq",
            "worker",
            "--queue-url",
            "http://127.0.0.1:9/000000000000/never-used",
            "--database-url",
            fresh.url,
            "--code-location",
            "tests.jobs",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert worker.returncode != 0
    assert "newer than this dagster-taskiq knows" in worker.stderr


def test_a_component_that_may_not_upgrade_says_how(fresh: Ledger) -> None:
    first_release.create_all(fresh.engine)
    with pytest.raises(SchemaMismatch, match="dagster-taskiq ledger upgrade"):
        fresh.check_schema(component="scaler")
    upgrade = subprocess.run(
        [sys.executable, "-m", "dagster_taskiq", "ledger", "upgrade", "--database-url", fresh.url],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"to revision {HEAD}" in upgrade.stdout
    assert fresh.check_schema(component="scaler").revision == HEAD


def test_a_job_runs_on_a_ledger_the_first_release_created(
    make_stack: StackFactory, empty_database_url: str
) -> None:
    old = sa.create_engine(Ledger(empty_database_url).url)
    first_release.create_all(old)
    old.dispose()
    with make_stack(database_url=empty_database_url) as stack:
        start_workers(stack, 1)
        instance = DagsterInstance.get()
        result = execute_job(reconstructable(jobs.outputs_job), instance=instance)
        assert result.success
        ledger = Ledger(empty_database_url)
        try:
            records = finished_records(ledger, result.run_id)
            assert {r.status for r in records} == {Status.SUCCEEDED}
            assert {r.queue_url for r in records} == {stack.queue_url}
            assert _revision(ledger) == [HEAD]
        finally:
            ledger.dispose()


class NoService:
    """A worker service the scaler must never reach while it cannot read the ledger."""

    name = "workers"

    def desired_count(self) -> int:
        raise AssertionError("evaluated on a ledger it cannot read")

    def set_desired_count(self, count: int) -> None:
        raise AssertionError("scaled on a ledger it cannot read")


def test_the_scaler_holds_on_an_older_ledger_and_refuses_a_newer_one(fresh: Ledger) -> None:
    scaler = Scaler(
        queues=[SqsQueue("http://127.0.0.1:9/000000000000/never-used", region="us-east-1")],
        ledger=fresh,
        service=NoService(),
        config=ScalingConfig(),
    )
    first_release.create_all(fresh.engine)
    # It never upgrades (its Lambda has no migrations): it holds the count meanwhile.
    assert scaler.ensure_schema() is False
    assert scaler.evaluate() is None
    assert fresh.schema_state().status is SchemaStatus.UNVERSIONED
    ensure_schema(fresh, component="worker")  # a worker of the release starts
    assert scaler.ensure_schema() is True
    with fresh.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    newer = Scaler(
        queues=list(scaler.queues), ledger=fresh, service=NoService(), config=ScalingConfig()
    )
    with pytest.raises(SchemaMismatch, match="newer than this dagster-taskiq knows"):
        newer.ensure_schema()

"""Shared fixtures: real PostgreSQL, moto's SQS server, per-test queues and instances.

PostgreSQL is embedded (pgserver) unless DAGSTER_TASKIQ_TEST_DATABASE_URL names a server;
each test session gets its own database on it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance
from dagster_postgres.event_log import PostgresEventLogStorage

from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.migrations import ensure_schema
from dagster_taskiq.core.settings import dagster_storage_url, ledger_url
from dagster_taskiq.local.stack import (
    LocalStack,
    WorkerPool,
    create_database,
    embedded_postgres,
    local_stack,
    sqs_emulator,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_TEST_DATABASE_URL = "DAGSTER_TASKIQ_TEST_DATABASE_URL"
TEST_CODE_LOCATION = "tests.jobs"


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"dagster_taskiq_test_{uuid.uuid4().hex[:8]}"
    external = os.environ.get(ENV_TEST_DATABASE_URL)
    if external:
        yield create_database(external, name)
        return
    with embedded_postgres(tmp_path_factory.mktemp("pg") / "data") as server_url:
        yield create_database(server_url, name)


@pytest.fixture(scope="session")
def sqs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("sqs") / "emulator.log"
    with open(log, "w") as log_file, sqs_emulator(log_file) as endpoint:
        yield endpoint


@contextlib.contextmanager
def new_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url``, dropped afterwards.

    For tests that read what the whole ledger holds (``status``, ``doctor``): the session's
    database also holds every other test's rows that ran before on the same worker.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(ledger_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base, _, query = server_url.partition("?")
    try:
        yield f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def empty_database_url(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the session's server, dropped afterwards."""
    with new_database(postgres_url, "dagster_taskiq_schema") as url:
        yield url


@pytest.fixture
def event_log_storage(postgres_url: str) -> Iterator[PostgresEventLogStorage]:
    """dagster-postgres's event log on the session's database."""
    store = PostgresEventLogStorage(dagster_storage_url(postgres_url))
    yield store
    store.dispose()


@pytest.fixture
def ledger(postgres_url: str) -> Iterator[Ledger]:
    store = Ledger(postgres_url)
    ensure_schema(store)
    yield store
    store.dispose()


StackFactory = Callable[..., AbstractContextManager[LocalStack]]


@pytest.fixture
def make_stack(
    tmp_path: Path, postgres_url: str, sqs_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> StackFactory:
    """A fresh queue, DLQ and DAGSTER_HOME on the session's PostgreSQL and emulator."""

    def factory(**kwargs: Any) -> AbstractContextManager[LocalStack]:
        kwargs.setdefault("code_locations", (TEST_CODE_LOCATION,))
        kwargs.setdefault("database_url", postgres_url)
        stack_cm = local_stack(tmp_path / uuid.uuid4().hex[:6], sqs_endpoint=sqs_endpoint, **kwargs)

        class _Applied:
            def __enter__(self) -> LocalStack:
                stack = stack_cm.__enter__()
                for key, value in stack.env().items():
                    monkeypatch.setenv(key, value)
                monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
                return stack

            def __exit__(self, *exc: object) -> None:
                stack_cm.__exit__(*exc)  # type: ignore[arg-type]

        return _Applied()

    return factory


@pytest.fixture
def stack(make_stack: StackFactory) -> Iterator[LocalStack]:
    with make_stack() as local:
        yield local


@pytest.fixture
def instance(stack: LocalStack) -> Iterator[DagsterInstance]:
    dagster_instance = DagsterInstance.get()
    yield dagster_instance
    dagster_instance.dispose()


def start_workers(
    stack: LocalStack, count: int = 2, *, args: tuple[str, ...] = (), **kwargs: Any
) -> WorkerPool:
    """Real worker processes; short long-polls so tests stop quickly."""
    pool = stack.worker_pool(extra_args=("--wait-seconds", "1", *args), **kwargs)
    pool.scale_to(count)
    return pool

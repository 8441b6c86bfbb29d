"""Contract tests of ``dagster_taskiq.patches``: every change made to another library's
internals, checked against the installed libraries, refused loudly when its target changes.

An upgrade of Dagster, dagster-postgres or SQLAlchemy that moves what a patch relies on
fails here (and at the patch's first use in a process), naming the patch and the library's
version, instead of misbehaving in a run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster._core.execution import context_creation_job
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.executor.step_delegating.step_delegating_executor import (
    StepDelegatingExecutor,
)
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from dagster_postgres import utils as pg_utils
from dagster_postgres.event_log import event_log as pg_event_log
from dagster_postgres.event_log.event_log import PostgresEventLogStorage

from dagster_taskiq import patches
from dagster_taskiq.core import connections
from dagster_taskiq.core.errors import PatchTargetChanged
from dagster_taskiq.core.settings import dagster_storage_url

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def unchecked() -> Iterator[None]:
    """Each test checks the shapes afresh; the process's record is put back after."""
    before = set(patches._checked)
    patches._checked.clear()
    yield
    patches._checked.clear()
    patches._checked.update(before)


@pytest.mark.parametrize("name", sorted(patches.PATCHES))
def test_every_patch_target_has_the_shape_it_was_written_for(name: str) -> None:
    assert patches.PATCHES[name].shape() == []
    patches.require(name)


@pytest.mark.parametrize("library", sorted(patches.TESTED))
def test_the_installed_libraries_are_in_the_tested_range(library: str) -> None:
    version = importlib.metadata.version(library)
    assert patches.in_tested_range(library, version), (library, version)


def test_the_declared_dagster_range_is_the_tested_one() -> None:
    """A user's Dagster version is theirs: the package declares a range, not one pin, and
    it is the range the patches were tested for."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0]: requirement
        for requirement in project["dependencies"]
    }
    for library in ("dagster", "dagster-postgres"):
        oldest, untested = patches.TESTED[library]
        assert declared[library] == f"{library}>={oldest},<{untested}"


def _changed_retry_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_utils, "retry_pg_connection_fn", lambda fn: fn())


def _run_stats_question_with_an_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SqlRunStorage, "has_run_stats_index_cols", lambda self, table: True)


def _webserver_pool_with_other_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        PostgresEventLogStorage, "optimize_for_webserver", lambda self, pool_size: None
    )


def _no_notify_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pg_event_log, "CHANNEL_NAME")


def _context_creation_with_other_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        context_creation_job, "create_context_creation_data", lambda job, plan: None
    )


def _execute_step_setup_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command still calls it, but the module it came from is gone.
    monkeypatch.setitem(sys.modules, "dagster._core.snowflake_partner", None)
    # A lookup of its own, not the process's cached one; both are put back after the test.
    fresh = functools.cache(patches._snowflake_partner_setup.__wrapped__)
    monkeypatch.setattr(patches, "_snowflake_partner_setup", fresh)
    monkeypatch.setattr(
        inspect, "getsource", lambda obj: "set_snowflake_partner_env_var()", raising=True
    )


def _loop_without_a_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        StepDelegatingExecutor, "execute", lambda self, plan_context, execution_plan: iter(())
    )


def _active_execution_without_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ActiveExecution, "__init__", lambda self, plan: None)


def _engine_factory_with_other_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_utils, "create_pg_engine", lambda url: None, raising=False)


CHANGES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "pg_connection_retries": _changed_retry_function,
    "run_stats_columns": _run_stats_question_with_an_argument,
    "storage_engines": _webserver_pool_with_other_options,
    "store_event": _no_notify_channel,
    "context_creation": _context_creation_with_other_parameters,
    "execute_step_setup": _execute_step_setup_moved,
    "step_delegating_loop": _loop_without_a_sleep,
    "active_execution": _active_execution_without_its_state,
    "event_notifications": _engine_factory_with_other_parameters,
}


def test_a_fork_server_checks_its_step_processes_patches_before_it_forks() -> None:
    # In a fresh interpreter, as a fork server starts: its children inherit the checks.
    code = (
        "from dagster_taskiq import patches\n"
        "from dagster_taskiq.worker.step_process import preload\n"
        "assert not patches._checked\n"
        "preload()\n"
        "print(' '.join(sorted(patches._checked)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert set(patches.STEP_PROCESS_PATCHES) <= set(patches.PATCHES)
    assert set(done.stdout.split()) == set(patches.STEP_PROCESS_PATCHES)


def test_every_patch_has_a_change_it_refuses() -> None:
    assert set(CHANGES) == set(patches.PATCHES)


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_changed_target_is_refused_by_name_and_version(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    CHANGES[name](monkeypatch)
    patch = patches.PATCHES[name]
    version = importlib.metadata.version(patch.library)
    with pytest.raises(PatchTargetChanged) as raised:
        patches.require(name)
    message = str(raised.value)
    assert f"{patch.library} {version}" in message
    assert f"'{name}'" in message
    assert "supports" in message
    assert name not in patches._checked  # asked again, not remembered as fine


def test_an_untested_version_with_the_same_shape_is_used_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(patches, "_version", lambda library: "9.0.0")
    with caplog.at_level(logging.WARNING, logger="dagster_taskiq"):
        patches.require("run_stats_columns")
        patches.require("run_stats_columns")
    warnings = [r for r in caplog.records if "run_stats_columns" in r.getMessage()]
    assert len(warnings) == 1
    assert "9.0.0" in warnings[0].getMessage()


def test_version_ranges() -> None:
    assert patches.version_tuple("1.13.27") == (1, 13, 27)
    assert patches.version_tuple("2.0.36+local") == (2, 0, 36)
    assert patches.version_tuple("1.14.0rc1") == (1, 14, 0)
    assert patches.in_tested_range("dagster", "1.13.0")
    assert patches.in_tested_range("dagster", "1.13.29")
    assert not patches.in_tested_range("dagster", "1.14.0")
    assert not patches.in_tested_range("dagster", "1.12.22")


def test_lengthened_retries_reach_every_connection(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_utils.retry_pg_connection_fn, "__defaults__", (5, 0.2))
    patches.lengthen_pg_connection_retries(8, 0.001)
    assert pg_utils.retry_pg_connection_fn.__defaults__ == (8, 0.001)
    attempts: list[int] = []
    engine = sa.create_engine(dagster_storage_url(postgres_url))
    connect = engine.connect

    def flaky() -> sa.Connection:
        attempts.append(1)
        if len(attempts) < 7:  # more than dagster-postgres's own 5 tries
            raise sa.exc.OperationalError("connect", {}, Exception("refused"))
        return connect()

    monkeypatch.setattr(engine, "connect", flaky)
    with pg_utils.create_pg_connection(engine) as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    engine.dispose()
    assert len(attempts) == 7


def test_pooled_event_log_is_checked_before_use_and_put_back(
    event_log_storage: PostgresEventLogStorage,
) -> None:
    class Instance:
        event_log_storage: Any

    instance: Any = Instance()
    instance.event_log_storage = event_log_storage
    original = event_log_storage._engine
    with patches.pooled_event_log(instance):
        pooled = event_log_storage._engine
        assert pooled is not original
        assert connections.checks(pooled)
        assert event_log_storage.get_logs_for_run("no-such-run") == []
    assert event_log_storage._engine is original

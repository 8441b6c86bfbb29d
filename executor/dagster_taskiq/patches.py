"""Every change this package makes to the internals of Dagster, dagster-postgres and SQLAlchemy.

Each is written against one release of its library (``TESTED``) and declares its target's
shape: the attributes, signatures and source lines it relies on. The first time a patch is
applied in a process its shape is checked; a library that changed under it fails at once,
naming the patch, the library and its version (``PatchTargetChanged``), instead of
misbehaving later. A version outside the tested range whose shape still holds is used,
with one warning. ``tests/integration/test_patches.py`` checks every shape against the
installed libraries, applies each patch to real dagster-postgres storage, and checks that a
changed target is refused.

Only the mechanisms are here; what they are used for (which events may be written twice,
how long to wait for the database) is decided by their callers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dagster_taskiq.core.connections import check_before_use
from dagster_taskiq.core.errors import PatchTargetChanged
from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.core.retry import Backoff

if TYPE_CHECKING:
    import sqlalchemy as sa
    from dagster import DagsterInstance
    from dagster._core.definitions.job_definition import JobDefinition
    from dagster._core.events.log import EventLogEntry
    from dagster._core.execution.context_creation_job import ContextCreationData
    from dagster._core.execution.plan.plan import ExecutionPlan
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.system_config.objects import ResolvedRunConfig
    from dagster_postgres.event_log.event_log import PostgresEventLogStorage

log = module_logger(__name__)

# The releases these patches were written and tested for: [oldest, first untested). The
# package's declared range (pyproject.toml) is the same; `.ci/run` runs the end-to-end tier
# on the oldest as well as on the pinned one.
TESTED: dict[str, tuple[str, str]] = {
    "dagster": ("1.13.0", "1.14"),
    "dagster-postgres": ("0.29.0", "0.30"),
    "sqlalchemy": ("2.1.0", "2.2"),
}


@dataclass(frozen=True)
class Patch:
    name: str
    library: str  # the distribution whose internals it touches
    why: str
    shape: Callable[[], list[str]]  # what of the target differs; empty when as written for
    # Applied in a worker's step processes: the fork server checks it before it forks.
    in_step_process: bool = False


def version_tuple(version: str) -> tuple[int, ...]:
    """``1.13.27`` -> (1, 13, 27); a pre-release or local part is dropped."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+", maxsplit=1)[0])[:3])


def in_tested_range(library: str, version: str) -> bool:
    oldest, untested = TESTED[library]
    return version_tuple(oldest) <= version_tuple(version) < version_tuple(untested)


def _version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


_checked: set[str] = set()
_checked_lock = threading.Lock()


def require(name: str) -> None:
    """Check once per process that patch ``name``'s target is as it was written for."""
    if name in _checked:
        return
    with _checked_lock:
        if name in _checked:
            return
        patch = PATCHES[name]
        version = _version(patch.library)
        try:
            differences = patch.shape()
        except Exception as e:  # a module or class the shape names is gone
            differences = [f"{type(e).__name__}: {e}"]
        if differences:
            oldest, untested = TESTED[patch.library]
            raise PatchTargetChanged(
                f"{patch.library} {version} changed what dagster-taskiq's patch "
                f"'{patch.name}' relies on ({patch.why}): {'; '.join(differences)}. This "
                f"release of dagster-taskiq supports {patch.library} >={oldest},<{untested}."
            )
        if not in_tested_range(patch.library, version):
            oldest, untested = TESTED[patch.library]
            log.warning(
                "dagster-taskiq's patch '%s' was tested with %s >=%s,<%s, not %s; its target "
                "has the shape it expects, so it is applied",
                patch.name,
                patch.library,
                oldest,
                untested,
                version,
            )
        _checked.add(name)


def require_all(names: Collection[str]) -> None:
    for name in names:
        require(name)


def _parameters(function: Any, expected: list[str], where: str) -> list[str]:
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return [f"{where} has no signature"]
    return [] if names == expected else [f"{where} takes {names}, not {expected}"]


def _source_has(function: Any, fragment: str, where: str) -> list[str]:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return [f"the source of {where} cannot be read"]
    return [] if fragment in source else [f"{where} no longer contains `{fragment}`"]


def _has(owner: Any, attribute: str, where: str) -> list[str]:
    return [] if hasattr(owner, attribute) else [f"{where} has no `{attribute}`"]


# -- dagster-postgres: patience with the database ---------------------------------------


def _pg_connection_retries_shape() -> list[str]:
    from dagster_postgres import utils

    fn = utils.retry_pg_connection_fn
    return (
        _parameters(fn, ["fn", "retry_limit", "retry_wait"], "retry_pg_connection_fn")
        + ([] if len(fn.__defaults__ or ()) == 2 else ["retry_pg_connection_fn's defaults"])
        + _source_has(
            utils.create_pg_connection,
            "retry_pg_connection_fn(engine.connect)",
            "create_pg_connection",
        )
    )


def lengthen_pg_connection_retries(retry_limit: int, retry_wait: float) -> None:
    """Every connection dagster-postgres opens in this process is retried ``retry_limit``
    times, backing off from ``retry_wait``: its ``create_pg_connection`` calls
    ``retry_pg_connection_fn(engine.connect)`` with the function's defaults, so changing
    them is the one place that reaches every storage. No-op without dagster-postgres."""
    try:
        from dagster_postgres import utils
    except ImportError:
        return
    require("pg_connection_retries")
    utils.retry_pg_connection_fn.__defaults__ = (retry_limit, retry_wait)


# -- Dagster's run storage: the catalog is asked once -----------------------------------


def _run_stats_columns_shape() -> list[str]:
    from dagster._core.storage.runs.sql_run_storage import SqlRunStorage

    return _parameters(
        SqlRunStorage.has_run_stats_index_cols,
        ["self"],
        "SqlRunStorage.has_run_stats_index_cols",
    )


class _RememberedYes:
    def __init__(self, ask: Callable[[], bool]) -> None:
        self.ask = ask
        self.present = False

    def __call__(self) -> bool:
        self.present = self.present or bool(self.ask())
        return self.present


def remember_run_stats_columns(run_storage: object) -> None:
    """Ask the catalog for the run-stats columns until they are there, then no more.

    Dagster's SQL run storage asks on every run read (a reflection query as dear as the
    read). A migration adds the columns and none takes them away, so a yes stays true for
    the life of the storage; a no is asked again (``dagster instance migrate`` may run
    meanwhile).
    """
    ask = getattr(run_storage, "has_run_stats_index_cols", None)
    if ask is None or isinstance(ask, _RememberedYes):
        return  # not a SQL run storage, or remembering already
    require("run_stats_columns")
    run_storage.has_run_stats_index_cols = _RememberedYes(ask)  # type: ignore[attr-defined]


# -- dagster-postgres's event log: pooled connections -----------------------------------

# What ``optimize_for_webserver`` is given here. statement_timeout 0: no limit on the
# writes of a run or a step (the webserver's 15 s is for reads).
POOL_OPTIONS = {"statement_timeout": 0, "pool_recycle": 3600, "max_overflow": 4}


def _storage_engine_shape() -> list[str]:
    from dagster._core.instance import DagsterInstance
    from dagster_postgres.event_log.event_log import PostgresEventLogStorage

    differences = _parameters(
        PostgresEventLogStorage.optimize_for_webserver,
        ["self", *POOL_OPTIONS],
        "PostgresEventLogStorage.optimize_for_webserver",
    )
    differences += _source_has(
        PostgresEventLogStorage.optimize_for_webserver,
        "self._engine =",
        "PostgresEventLogStorage.optimize_for_webserver",
    )
    for name in ("_run_storage", "_event_storage", "_schedule_storage"):
        differences += _source_has(DagsterInstance.__init__, f"self.{name}", "DagsterInstance")
    return differences


@contextlib.contextmanager
def pooled_event_log(instance: DagsterInstance) -> Iterator[None]:
    """The instance's event-log storage on a connection pool while the block runs.

    dagster-postgres opens a connection for every read and write (NullPool) except in the
    webserver (``optimize_for_webserver``); a run worker reads its run's events many times
    a second while steps finish. Its own engine is put back afterwards, so an instance the
    caller shares (a script that calls ``execute_job``) is left as it was.
    """
    storage: Any = instance.event_log_storage
    original = getattr(storage, "_engine", None)
    if original is None or not hasattr(storage, "optimize_for_webserver"):
        yield  # not dagster-postgres: nothing to pool
        return
    require("storage_engines")
    storage.optimize_for_webserver(**POOL_OPTIONS)
    pooled = storage._engine
    check_before_use(pooled)  # public pool events (core/connections.py), not a patch
    try:
        yield
    finally:
        storage._engine = original
        pooled.dispose()


def pool_instance_storages(instance: DagsterInstance) -> None:
    """Pool every storage of the instance, as the webserver does, each connection checked
    before use; for the life of the instance (a step process's)."""
    require("storage_engines")
    instance.optimize_for_webserver(**POOL_OPTIONS)
    for name in ("_run_storage", "_event_storage", "_schedule_storage"):
        engine = getattr(getattr(instance, name, None), "_engine", None)
        if engine is not None:
            check_before_use(engine)


# -- dagster-postgres's event log: what ``store_event`` does, changed -------------------


def _store_event_shape() -> list[str]:
    from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
    from dagster_postgres.event_log import event_log

    storage = event_log.PostgresEventLogStorage
    return (
        _parameters(storage.store_event, ["self", "event"], "PostgresEventLogStorage.store_event")
        + _parameters(
            storage._event_to_row, ["self", "event"], "PostgresEventLogStorage._event_to_row"
        )
        + _has(storage, "index_connection", "PostgresEventLogStorage")
        + _has(event_log, "CHANNEL_NAME", "dagster_postgres.event_log.event_log")
        + _source_has(storage.store_event, "NOTIFY", "PostgresEventLogStorage.store_event")
        + [
            f"the event log table has no `{column}` column"
            for column in ("run_id", "id")
            if column not in SqlEventLogStorageTable.c
        ]
    )


def retry_cut_event_writes(
    instance: DagsterInstance,
    repeatable: Callable[[EventLogEntry], bool],
    patience: float,
) -> None:
    """Write an event again when the database cut the connection mid-write, if
    ``repeatable(event)``: dagster-postgres retries connecting, not a statement on a
    connection the server cuts (a restart's fast shutdown)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    require("store_event")
    storage: Any = instance.event_log_storage
    store: Callable[[EventLogEntry], None] = storage.store_event

    def store_event(event: EventLogEntry) -> None:
        deadline = time.monotonic() + patience
        backoff = Backoff(0.2, 2.0)
        while True:
            try:
                return store(event)
            except (OperationalError, InterfaceError):
                if not repeatable(event) or time.monotonic() + backoff.next > deadline:
                    raise
                backoff.wait()

    storage.store_event = store_event


class EventBatch:
    """Events of the kinds given that this thread stores while ``holding`` runs are kept
    back; ``write`` stores them in one statement. Other threads, and other kinds, are
    stored as ever. Only on dagster-postgres storage; elsewhere nothing is held.

    The run worker writes an event for each step it queues: a transaction each, where a
    batch of launches needs one."""

    def __init__(self, instance: DagsterInstance) -> None:
        from dagster_postgres.event_log.event_log import PostgresEventLogStorage

        storage = instance.event_log_storage
        self._storage: PostgresEventLogStorage | None = (
            storage if isinstance(storage, PostgresEventLogStorage) else None
        )
        self.held: list[EventLogEntry] = []
        if self._storage is not None:
            require("store_event")

    @contextlib.contextmanager
    def holding(self, kinds: Collection[Any]) -> Iterator[None]:
        storage: Any = self._storage  # its method is stood in for, on this instance only
        if storage is None:
            yield
            return
        thread = threading.get_ident()
        store = storage.store_event  # the bound method, or whatever stands in for it now
        shadowed = "store_event" in vars(storage)

        def hold_or_store(event: EventLogEntry) -> None:
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
        """Store the held events: multi-row inserts, then one statement of NOTIFYs (as
        dagster-postgres's ``store_event`` sends one an event). Raises what the storage
        raises, keeping the events; a retry after a lost answer may store them twice,
        which harms nothing (they are engine events)."""
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


# -- Dagster's step context: the run config resolved once a run -------------------------


class ResolvedRun(Protocol):
    """A run's job and its run config, resolved once (a warm step process's plan cache)."""

    @property
    def job_def(self) -> JobDefinition: ...

    @property
    def run_config(self) -> Mapping[str, object]: ...

    @property
    def resolved_run_config(self) -> ResolvedRunConfig: ...


_CONTEXT_CREATION_PARAMETERS = ["job", "execution_plan", "run_config", "dagster_run", "instance"]
_CONTEXT_CREATION_FIELDS = [
    "job",
    "resolved_run_config",
    "dagster_run",
    "executor_def",
    "instance",
    "resource_keys_to_init",
    "execution_plan",
]


def _context_creation_shape() -> list[str]:
    from dagster._core.execution import context_creation_job, resources_init

    return (
        _parameters(
            context_creation_job.create_context_creation_data,
            _CONTEXT_CREATION_PARAMETERS,
            "create_context_creation_data",
        )
        + _parameters(
            context_creation_job.ContextCreationData,
            _CONTEXT_CREATION_FIELDS,
            "ContextCreationData",
        )
        + _has(resources_init, "get_required_resource_keys_to_init", "resources_init")
        + _source_has(
            context_creation_job,
            "create_context_creation_data(",
            "context_creation_job (its callers)",
        )
    )


_current_run: ResolvedRun | None = None


@functools.cache
def _dagster_create_context_creation_data() -> Callable[..., ContextCreationData]:
    from dagster._core.execution import context_creation_job

    return context_creation_job.create_context_creation_data  # Dagster's, before the swap


def _create_context_creation_data(
    job: Any,
    execution_plan: ExecutionPlan,
    run_config: Mapping[str, object],
    dagster_run: DagsterRun,
    instance: DagsterInstance,
) -> ContextCreationData:
    from dagster._core.execution.context_creation_job import ContextCreationData
    from dagster._core.execution.resources_init import get_required_resource_keys_to_init

    current = _current_run
    job_def = job.get_definition()
    if current is None or job_def is not current.job_def or run_config != current.run_config:
        return _dagster_create_context_creation_data()(
            job, execution_plan, run_config, dagster_run, instance
        )
    # What Dagster's function returns, with the run config resolved once per run.
    return ContextCreationData(
        job=job,
        resolved_run_config=current.resolved_run_config,
        dagster_run=dagster_run,
        executor_def=job_def.executor_def,
        instance=instance,
        resource_keys_to_init=get_required_resource_keys_to_init(execution_plan, job_def),
        execution_plan=execution_plan,
    )


@contextlib.contextmanager
def reuse_resolved_run_config(run: ResolvedRun) -> Iterator[None]:
    """While a step of ``run`` executes, Dagster's step context creation takes the run's
    resolved run config instead of resolving it again for every op of the job; any other
    call goes to Dagster's function unchanged."""
    global _current_run  # noqa: PLW0603 - one step at a time per process, by design
    from dagster._core.execution import context_creation_job

    require("context_creation")
    _dagster_create_context_creation_data()  # kept before it is swapped
    context_creation_job.create_context_creation_data = _create_context_creation_data
    _current_run = run
    try:
        yield
    finally:
        _current_run = None


# -- Dagster's ``execute_step``: what a step process does as it would ---------------------


@functools.cache
def _snowflake_partner_setup() -> Callable[[], None] | None:
    # Looked up once: on a release without the module, a failed import is not cached by
    # Python and would search sys.path again on every step.
    try:
        from dagster._core.snowflake_partner import set_snowflake_partner_env_var
    except ImportError:
        return None
    return set_snowflake_partner_env_var


def _execute_step_setup_shape() -> list[str]:
    from dagster._cli import api

    if "set_snowflake_partner_env_var" not in inspect.getsource(api):
        return []  # a release before it (1.13.0 has none): nothing to do as it does
    setup = _snowflake_partner_setup()
    if setup is None:
        return ["dagster api execute_step calls set_snowflake_partner_env_var, not found"]
    return _parameters(setup, [], "set_snowflake_partner_env_var")


def set_up_as_execute_step() -> None:
    """What the installed Dagster's ``dagster api execute_step`` does before it loads the
    job, beyond the instance's environment variables: since a 1.13 release, the Snowflake
    partner variable. A warm step process does not run that command, so it does this."""
    require("execute_step_setup")
    setup = _snowflake_partner_setup()
    if setup is not None:  # else the installed Dagster does not do it either
        setup()


# -- Dagster's step-delegating loop and active execution: what the executor reads -------


def _step_delegating_loop_shape() -> list[str]:
    from dagster._core.executor.step_delegating.step_delegating_executor import (
        StepDelegatingExecutor,
    )

    return _source_has(
        StepDelegatingExecutor.execute, "self._sleep_seconds", "StepDelegatingExecutor.execute"
    ) + _source_has(
        StepDelegatingExecutor.__init__, "self._sleep_seconds =", "StepDelegatingExecutor"
    )


ACTIVE_EXECUTION_STATE = (
    "_in_flight",
    "_plan",
    "_success",
    "_skipped",
    "_executable",
    "_pending",
    "_gathering_dynamic_outputs",
)


def _active_execution_shape() -> list[str]:
    from dagster._core.execution.plan.active import ActiveExecution

    differences: list[str] = []
    for name in ACTIVE_EXECUTION_STATE:
        differences += _source_has(ActiveExecution.__init__, f"self.{name}", "ActiveExecution")
    return differences


def _listen_shape() -> list[str]:
    from dagster_postgres import utils
    from dagster_postgres.event_log import event_log

    differences = _has(event_log, "CHANNEL_NAME", "dagster_postgres.event_log.event_log")
    differences += _source_has(
        event_log.PostgresEventLogStorage.__init__, "self.postgres_url", "PostgresEventLogStorage"
    )
    if hasattr(utils, "create_pg_engine"):  # since token providers (IAM auth) came in 0.29.x
        differences += _parameters(
            utils.create_pg_engine,
            ["postgres_url", "token_provider", "engine_kwargs"],
            "create_pg_engine",
        )
    return differences


def event_log_engine(storage: PostgresEventLogStorage, **engine_kwargs: Any) -> sa.Engine:
    """A new engine on ``storage``'s database, authenticated as the storage is: through its
    token provider (IAM authentication) where dagster-postgres has them, else by its URL."""
    from dagster_postgres import utils

    require("event_notifications")
    if hasattr(utils, "create_pg_engine"):
        return utils.create_pg_engine(
            storage.postgres_url, getattr(storage, "_token_provider", None), **engine_kwargs
        )
    import sqlalchemy

    return sqlalchemy.create_engine(storage.postgres_url, **engine_kwargs)


PATCHES: dict[str, Patch] = {
    patch.name: patch
    for patch in (
        Patch(
            "pg_connection_retries",
            "dagster-postgres",
            "a step process waits about 25 s for the database, not 6",
            _pg_connection_retries_shape,
            in_step_process=True,
        ),
        Patch(
            "run_stats_columns",
            "dagster",
            "the runs table's catalog is asked once, not at every run read",
            _run_stats_columns_shape,
            in_step_process=True,
        ),
        Patch(
            "storage_engines",
            "dagster-postgres",
            "Dagster's storages on connection pools",
            _storage_engine_shape,
            in_step_process=True,
        ),
        Patch(
            "store_event",
            "dagster-postgres",
            "events written again after a cut connection, and in batches",
            _store_event_shape,
            in_step_process=True,
        ),
        Patch(
            "context_creation",
            "dagster",
            "a warm step process resolves a run's config once",
            _context_creation_shape,
            in_step_process=True,
        ),
        Patch(
            "execute_step_setup",
            "dagster",
            "a warm step process sets up a step as `dagster api execute_step` does",
            _execute_step_setup_shape,
            in_step_process=True,
        ),
        Patch(
            "step_delegating_loop",
            "dagster",
            "the executor sends a pass's launches and waits where Dagster's loop sleeps",
            _step_delegating_loop_shape,
        ),
        Patch(
            "active_execution",
            "dagster",
            "the steps a run will launch next, for the scaler",
            _active_execution_shape,
        ),
        Patch(
            "event_notifications",
            "dagster-postgres",
            "the run worker waits on dagster-postgres's NOTIFY",
            _listen_shape,
        ),
    )
}

# The fork server checks these before it forks, so each step process inherits the checks
# rather than reading the libraries' sources and metadata again between its fork and its
# "ready" (about 50 ms and 8 MB a step process).
STEP_PROCESS_PATCHES = tuple(name for name, patch in PATCHES.items() if patch.in_step_process)

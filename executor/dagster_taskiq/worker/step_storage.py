"""The step process and Dagster's database: fewer connections, more patience.

- A warm step process writes some ten events per step. dagster-postgres opens a new
  connection for each (NullPool): about a fifth of a trivial step's time went to
  connecting. The step process keeps one pooled connection per storage instead, as the
  webserver does, each checked before use (``dagster_taskiq/patches.py``).
- dagster-postgres retries a failed connection 5 times over about 6 s; after that the
  step's next event write raises, and Dagster records the step as failed as soon as the
  database is back: a network blip between a worker and the database would fail the
  user's step. The step process waits longer instead (about 25 s), and a longer outage
  is left to the lease: the supervisor cannot renew it either, stops the step process
  once it runs out, and another worker runs the attempt again.
- Connecting is retried, but a statement on a connection the server cuts (a restart's
  fast shutdown) is not: a step writing one of its events at that instant would fail.
  Events a second copy of which harms nothing (inputs, logs, engine events: a write that
  did commit before the cut shows twice) are written again once the database is back.
  Endings, outputs and asset events are not: a step that cannot write its ending is given
  back and runs again (``worker/execution.py``, NO_ENDING).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagster_taskiq import patches

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from dagster._core.events.log import EventLogEntry

# dagster-postgres backs off exponentially from retry_wait: 0.1 s doubled 8 times ~ 25 s.
RETRY_LIMIT = 8
RETRY_WAIT = 0.1


def ride_out_database_outages() -> None:
    patches.lengthen_pg_connection_retries(RETRY_LIMIT, RETRY_WAIT)


def keep_connections(instance: DagsterInstance) -> None:
    """Pool the instance storage's connections, each checked before use, and read each
    step's run without asking the catalog about the runs table every time."""
    patches.pool_instance_storages(instance)
    patches.remember_run_stats_columns(instance.run_storage)


# Written again after a cut connection: nothing reads them to count or to act on them.
REPEATABLE_EVENTS = frozenset(
    {
        "STEP_WORKER_STARTED",
        "STEP_START",
        "STEP_INPUT",
        "LOADED_INPUT",
        "HANDLED_OUTPUT",
        "LOGS_CAPTURED",
        "ENGINE_EVENT",
        "RESOURCE_INIT_STARTED",
        "RESOURCE_INIT_SUCCESS",
    }
)
EVENT_WRITE_PATIENCE_SECONDS = 30.0


def repeatable(event: EventLogEntry) -> bool:
    """A second copy of this event harms nothing."""
    dagster_event = event.dagster_event
    return dagster_event is None or dagster_event.event_type_value in REPEATABLE_EVENTS


def rewrite_cut_events(
    instance: DagsterInstance, patience: float = EVENT_WRITE_PATIENCE_SECONDS
) -> None:
    """Write a repeatable event again when the database cut the connection mid-write."""
    patches.retry_cut_event_writes(instance, repeatable, patience)

"""Versioned changes of the ledger's schema, applied with Alembic.

Each script in ``versions/`` is one revision (see ``schema.REVISIONS``); they only add,
so a component of the previous release keeps working on an upgraded ledger. Upgrading
takes the schema advisory lock in the same transaction, so any number of workers, runs
and CLIs may start at once: one upgrades, the others then find the schema current.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.schema import (
    BASELINE,
    SchemaState,
    SchemaStatus,
    read_state,
    require_usable,
)

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent

# Alembic (and Mako) are imported only when a schema is to be changed: a worker that finds
# its ledger current, as it does but once a release, would otherwise hold some 8 MB of
# modules it never uses for its whole life.


def alembic_config(conn: Connection | None = None) -> Config:
    """An Alembic configuration with no ini file: the scripts are in this package, and the
    migrations run on ``conn`` (inside its transaction)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if conn is not None:
        config.attributes["connection"] = conn
    return config


def script_revisions() -> list[str]:
    """The scripts' revision ids, oldest first."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    return [s.revision for s in reversed(list(scripts.walk_revisions()))]


def upgrade(conn: Connection, lock: sa.ColumnElement[object]) -> tuple[SchemaState, SchemaState]:
    """Bring the schema to this release's revision, on ``conn`` in its transaction, after
    taking ``lock`` (the ledger's schema advisory lock). Returns the states before and
    after. A newer schema is left alone: the caller refuses it."""
    conn.execute(sa.select(lock))
    before = read_state(conn)
    if not before.needs_upgrade:
        return before, before
    from alembic import command

    config = alembic_config(conn)
    if before.status is SchemaStatus.UNVERSIONED:
        # Created by the first release, before versions: it has the baseline's tables.
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")
    return before, read_state(conn)


def upgrade_ledger(ledger: Ledger) -> tuple[SchemaState, SchemaState]:
    """Apply this release's migrations to ``ledger``; the states before and after."""
    with ledger.transaction() as conn:
        return upgrade(conn, ledger.schema_lock)


def ensure_schema(ledger: Ledger, *, component: str = "component") -> SchemaState:
    """Make sure ``component`` can use the ledger: an absent, pre-versioning or older schema
    is upgraded (safe when many start at once), a newer one is refused with SchemaMismatch.
    One catalog query and one select when the schema is current."""
    state = ledger.schema_state()
    if state.needs_upgrade:
        _, state = upgrade_ledger(ledger)
    require_usable(state, component=component)
    return state

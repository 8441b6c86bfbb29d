"""The ledger's schema version: what every component checks before it uses the ledger.

The ledger's tables live in the user's own database (by default their Dagster
database), so they change only through versioned migrations (``migrations/``, Alembic)
that record the revision in ``dagster_taskiq_schema_version``. ``dagster-taskiq ledger
upgrade`` applies them; so does a worker, a run or the CLI that finds an older schema at
start, under one advisory lock. Every migration only adds (tables, nullable columns,
indexes), so components of the previous release keep working on the upgraded schema.

A component never runs against a schema newer than it knows: it could misread rows
written under rules it does not know. The Lambdas only check, never change the schema:
their bundle carries no Alembic, and their database user needs no DDL.

Dagster-free and Alembic-free: the Lambdas import this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dagster_taskiq.core.errors import SchemaMismatch

VERSION_TABLE = "dagster_taskiq_schema_version"
# The migrations' revision ids, oldest first (a contract test checks them against the
# migration scripts).
REVISIONS = ("0001", "0002", "0003")
HEAD = REVISIONS[-1]
# The first release created its tables without a version table; a ledger found in that
# shape is stamped with this revision before it is upgraded.
BASELINE = REVISIONS[0]
# A table every revision has: its presence without a version tells a pre-versioning ledger.
_ALWAYS_PRESENT = "dagster_taskiq_steps"

UPGRADE_HINT = "Run `dagster-taskiq ledger upgrade --database-url URL` from the new release"


class SchemaStatus(enum.Enum):
    ABSENT = "absent"  # no ledger tables: a new database
    UNVERSIONED = "unversioned"  # tables from before versioning (the first release)
    OLDER = "older"  # a known revision before HEAD
    CURRENT = "current"
    NEWER = "newer"  # a revision this release does not know


@dataclass(frozen=True)
class SchemaState:
    revision: str | None
    status: SchemaStatus

    @property
    def needs_upgrade(self) -> bool:
        return self.status in (SchemaStatus.ABSENT, SchemaStatus.UNVERSIONED, SchemaStatus.OLDER)

    def describe(self) -> str:
        if self.status is SchemaStatus.ABSENT:
            return "no ledger tables yet"
        if self.status is SchemaStatus.UNVERSIONED:
            return "ledger tables from before schema versions"
        return f"schema revision {self.revision} (this release's is {HEAD})"


def read_state(conn: Connection) -> SchemaState:
    """The schema's revision and how it compares with this release's."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(VERSION_TABLE):
        present = inspector.has_table(_ALWAYS_PRESENT)
        return SchemaState(None, SchemaStatus.UNVERSIONED if present else SchemaStatus.ABSENT)
    revisions = [
        row[0] for row in conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
    ]
    if not revisions:
        present = inspector.has_table(_ALWAYS_PRESENT)
        return SchemaState(None, SchemaStatus.UNVERSIONED if present else SchemaStatus.ABSENT)
    if len(revisions) > 1 or revisions[0] not in REVISIONS:
        return SchemaState(",".join(sorted(revisions)), SchemaStatus.NEWER)
    revision = revisions[0]
    return SchemaState(revision, SchemaStatus.CURRENT if revision == HEAD else SchemaStatus.OLDER)


def require_usable(state: SchemaState, *, component: str) -> None:
    """Raise SchemaMismatch unless ``component`` can run on this schema as it is."""
    if state.status is SchemaStatus.NEWER:
        raise SchemaMismatch(
            f"The ledger's schema is at revision {state.revision}, newer than this "
            f"dagster-taskiq knows (up to {HEAD}): a newer release upgraded it. Deploy that "
            f"release's {component} too; {component}s of this release will not run on it."
        )
    if state.status is not SchemaStatus.CURRENT:
        raise SchemaMismatch(
            f"The ledger has {state.describe()}; this {component} needs revision {HEAD}. "
            f"{UPGRADE_HINT}, or start a worker or a run of it, which upgrade the ledger."
        )

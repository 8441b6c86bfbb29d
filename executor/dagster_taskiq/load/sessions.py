"""One row per load run of the simulator: its scenario, parameters and faults.

``verify`` reads it to find the runs of a load (tagged with its id) and the workers the
load killed on purpose, which explain a step executed twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from dagster_taskiq.core.settings import ledger_url
from dagster_taskiq.load.executions import ensure_tables
from dagster_taskiq.load.faults import FaultMark, killed_pids

LOAD_TAG = "dagster-taskiq/load"  # on every run the simulator submits: the load id
# The engine event the load's run launcher writes on a run before it launches the run
# again, its last run worker having exited before the run started; verify counts them.
RELAUNCHED = "Run worker exited before the run started; launching a new one"

metadata = sa.MetaData()
sessions = sa.Table(
    "dagster_taskiq_load_sessions",
    metadata,
    sa.Column("load_id", sa.Text, primary_key=True),
    sa.Column("scenario", sa.Text, nullable=False),
    sa.Column("parameters", sa.Text, nullable=False),  # JSON
    sa.Column("faults", sa.Text, nullable=False, server_default="[]"),  # JSON: FaultMark list
    sa.Column(
        "started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)


@dataclass(frozen=True)
class Session:
    load_id: str
    scenario: str
    parameters: dict[str, Any]
    faults: list[FaultMark]
    started_at: datetime
    finished_at: datetime | None

    @property
    def killed_pids(self) -> set[int]:
        return killed_pids(self.faults)


class Sessions:
    def __init__(self, database_url: str) -> None:
        self.engine = sa.create_engine(ledger_url(database_url), pool_size=1, pool_pre_ping=True)
        ensure_tables(self.engine, metadata)

    def start(self, scenario: str, parameters: dict[str, Any]) -> str:
        load_id = f"{scenario}-{uuid.uuid4().hex[:8]}"
        with self.engine.begin() as conn:
            conn.execute(
                sessions.insert().values(
                    load_id=load_id, scenario=scenario, parameters=json.dumps(parameters)
                )
            )
        return load_id

    def finish(self, load_id: str, faults: list[FaultMark]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sessions.update()
                .where(sessions.c.load_id == load_id)
                .values(
                    finished_at=sa.func.now(),
                    faults=json.dumps([asdict(m) for m in faults]),
                )
            )

    def get(self, load_id: str | None = None) -> Session | None:
        """The session ``load_id``, or the latest one."""
        stmt = sa.select(sessions)
        stmt = (
            stmt.where(sessions.c.load_id == load_id)
            if load_id
            else stmt.order_by(sessions.c.started_at.desc()).limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        if row is None:
            return None
        return Session(
            load_id=row["load_id"],
            scenario=row["scenario"],
            parameters=json.loads(row["parameters"]),
            faults=[
                FaultMark(**{**m, "pids": tuple(m.get("pids", ()))})
                for m in json.loads(row["faults"])
            ],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )

    def dispose(self) -> None:
        self.engine.dispose()

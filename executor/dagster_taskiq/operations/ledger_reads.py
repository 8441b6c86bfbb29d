"""Read-only queries of the ledger's tables for the operations commands.

Aggregates an operator asks for, kept here rather than on ``Ledger`` (whose methods are the
protocol): they read, never write, and tolerate a table that does not exist yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from dagster_taskiq.core.ledger import NON_TERMINAL, Ledger, Status, rejected_messages, steps
from dagster_taskiq.scaling.scaler import scaling_history

_LIVE_LEASE = sa.and_(
    steps.c.status.in_([Status.RUNNING, Status.CANCEL_REQUESTED]),
    steps.c.lease_expires_at > sa.func.now(),
)


def interval(seconds: float) -> sa.ColumnElement[Any]:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.cast(seconds, sa.Float))


def _age(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return sa.func.extract("epoch", sa.func.now() - column)


@dataclass(frozen=True)
class QueueLedgerRow:
    """Ledger rows of one queue in one status."""

    queue_url: str | None
    status: str
    rows: int
    live_leases: int
    oldest_enqueued_seconds: float | None  # ENQUEUED rows only: the oldest waiting step


def queue_summary(ledger: Ledger) -> list[QueueLedgerRow]:
    stmt = sa.select(
        steps.c.queue_url,
        steps.c.status,
        sa.func.count().label("rows"),
        sa.func.count().filter(_LIVE_LEASE).label("live"),
        sa.func.max(_age(steps.c.enqueued_at))
        .filter(steps.c.status == Status.ENQUEUED)
        .label("oldest"),
    ).group_by(steps.c.queue_url, steps.c.status)
    with ledger.transaction() as conn:
        return [
            QueueLedgerRow(
                queue_url=r.queue_url,
                status=r.status,
                rows=int(r.rows),
                live_leases=int(r.live),
                oldest_enqueued_seconds=float(r.oldest) if r.oldest is not None else None,
            )
            for r in conn.execute(stmt)
        ]


@dataclass(frozen=True)
class RejectionCount:
    reason: str
    messages: int
    receives: int


def rejections_since(ledger: Ledger, seconds: float) -> list[RejectionCount]:
    """Rejected messages last seen within ``seconds``, by reason."""
    table = rejected_messages
    stmt = (
        sa.select(
            table.c.reason,
            sa.func.count().label("messages"),
            sa.func.sum(table.c.receive_count).label("receives"),
        )
        .where(table.c.last_seen_at >= sa.func.now() - interval(seconds))
        .group_by(table.c.reason)
        .order_by(sa.func.count().desc())
    )
    with ledger.transaction() as conn:
        return [
            RejectionCount(r.reason, int(r.messages), int(r.receives)) for r in conn.execute(stmt)
        ]


@dataclass(frozen=True)
class RunSteps:
    """A run with a step attempt not finished in the ledger, and all its attempts by state."""

    run_id: str
    attempts: dict[str, int]
    steps: int
    live_leases: int
    first_enqueued_seconds: float  # how long ago its first attempt was enqueued
    last_update_seconds: float


def runs_in_flight(ledger: Ledger, limit: int = 50) -> list[RunSteps]:
    """Runs with an attempt not in a final state, most recently active first."""
    active = (
        sa.select(steps.c.run_id)
        .where(steps.c.status.in_(list(NON_TERMINAL)))
        .group_by(steps.c.run_id)
        .order_by(sa.func.max(steps.c.updated_at).desc())
        .limit(limit)
        .subquery()
    )
    stmt = (
        sa.select(
            steps.c.run_id,
            steps.c.status,
            sa.func.count().label("attempts"),
            sa.func.count().filter(_LIVE_LEASE).label("live"),
            sa.func.max(_age(steps.c.enqueued_at)).label("first"),
            sa.func.min(_age(steps.c.updated_at)).label("last"),
        )
        .where(steps.c.run_id.in_(sa.select(active.c.run_id)))
        .group_by(steps.c.run_id, steps.c.status)
    )
    step_keys = (
        sa.select(steps.c.run_id, sa.func.count(sa.distinct(steps.c.step_key)).label("steps"))
        .where(steps.c.run_id.in_(sa.select(active.c.run_id)))
        .group_by(steps.c.run_id)
    )
    with ledger.transaction() as conn:
        rows = conn.execute(stmt).all()
        distinct_steps = {r.run_id: int(r.steps) for r in conn.execute(step_keys)}
    runs: dict[str, dict[str, Any]] = {}
    for r in rows:
        run = runs.setdefault(
            r.run_id, {"attempts": {}, "live": 0, "first": 0.0, "last": float("inf")}
        )
        run["attempts"][r.status] = int(r.attempts)
        run["live"] += int(r.live)
        run["first"] = max(run["first"], float(r.first))
        run["last"] = min(run["last"], float(r.last))
    found = [
        RunSteps(
            run_id=run_id,
            attempts=dict(sorted(run["attempts"].items(), key=lambda kv: _status_order(kv[0]))),
            steps=distinct_steps.get(run_id, 0),
            live_leases=run["live"],
            first_enqueued_seconds=run["first"],
            last_update_seconds=run["last"],
        )
        for run_id, run in runs.items()
    ]
    return sorted(found, key=lambda run: run.last_update_seconds)


def _status_order(status: str) -> int:
    order = [s.value for s in Status]
    return order.index(status) if status in order else len(order)


@dataclass(frozen=True)
class Rejection:
    """A message the workers (or the DLQ processor: reason ``dead_letter_*``) refused."""

    message_id: str
    idempotency_key: str | None  # unverified: read from a message that did not decode
    reason: str
    detail: str
    worker_id: str | None
    receive_count: int
    first_seen_at: datetime
    last_seen_at: datetime
    body_excerpt: str

    @classmethod
    def from_row(cls, row: RowMapping) -> Rejection:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    @property
    def summary(self) -> str:
        """``forged x2``: the reason, and how many receives it was refused at."""
        return self.reason + (f" x{self.receive_count}" if self.receive_count > 1 else "")

    @property
    def text(self) -> str:
        by = f" by {self.worker_id}" if self.worker_id else ""
        return f"{self.summary}{by}: {self.detail}"


def rejections_for(
    ledger: Ledger,
    *,
    message_ids: Iterable[str] = (),
    keys: Iterable[str] = (),
    run_id: str | None = None,
) -> list[Rejection]:
    """Rejection records of these messages, or of messages naming these idempotency keys or
    a key of this run (keys in rejected messages are unverified: they may be forged)."""
    ids, key_list = list(message_ids), list(keys)
    table = rejected_messages
    matches = []
    if ids:
        matches.append(table.c.message_id.in_(ids))
    if key_list:
        matches.append(table.c.idempotency_key.in_(key_list))
    if run_id:
        escaped = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        matches.append(table.c.idempotency_key.like(f"{escaped}:%", escape="\\"))
    if not matches:
        return []
    stmt = sa.select(table).where(sa.or_(*matches)).order_by(table.c.first_seen_at)
    with ledger.transaction() as conn:
        return [Rejection.from_row(r) for r in conn.execute(stmt).mappings()]


@dataclass(frozen=True)
class ScalingDecisionView:
    """The last decision the scaler recorded for a worker service."""

    reason: str
    detail: str
    current: int
    desired: int
    age_seconds: float


def last_scaling_decision(ledger: Ledger, service: str) -> ScalingDecisionView | None:
    """None when the scaler never decided for ``service`` (or never ran: no table)."""
    stmt = (
        sa.select(
            scaling_history,
            (sa.func.extract("epoch", sa.func.now()) - scaling_history.c.at).label("age"),
        )
        .where(scaling_history.c.service == service)
        .order_by(scaling_history.c.id.desc())
        .limit(1)
    )
    exists = sa.select(sa.func.to_regclass(scaling_history.name).is_not(None))
    with ledger.transaction() as conn:
        if not conn.execute(exists).scalar():
            return None
        row = conn.execute(stmt).first()
    if row is None:
        return None
    return ScalingDecisionView(
        reason=row.reason,
        detail=row.detail,
        current=int(row.current),
        desired=int(row.desired),
        age_seconds=float(row.age),
    )


def ledger_tables_exist(ledger: Ledger) -> bool:
    with ledger.transaction() as conn:
        return bool(conn.execute(sa.select(sa.func.to_regclass(steps.name).is_not(None))).scalar())

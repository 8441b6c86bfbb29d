"""`dagster-taskiq scaling simulate` on the ledger's own history."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner

from dagster_taskiq.core.ledger import Ledger, steps
from dagster_taskiq.core.migrations import ensure_schema
from dagster_taskiq.scaling.simulation.commands import scaling
from dagster_taskiq.scaling.simulation.history import read_history


def _step(
    ledger: Ledger, run_id: str, queue: str, *, queued_ago: float, waited: float, took: float
) -> None:
    key = f"{run_id}:{uuid.uuid4().hex[:6]}:0"
    ledger.enqueue(
        key,
        run_id=run_id,
        step_key=key,
        attempt=0,
        payload_hash="h",
        ttl_seconds=86_400,
        queue_url=queue,
    )
    claim = ledger.claim(key, worker_id="w", lease_seconds=60, payload_hash="h")
    assert ledger.complete(key, claim.fencing_token, succeeded=True)

    def ago(seconds: float) -> sa.ColumnElement[datetime]:
        return sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)

    with ledger.transaction() as conn:
        conn.execute(
            sa.update(steps)
            .where(steps.c.idempotency_key == key)
            .values(
                enqueued_at=ago(queued_ago),
                started_at=ago(queued_ago - waited),
                finished_at=ago(queued_ago - waited - took),
            )
        )


def test_the_ledgers_history_is_simulated(empty_database_url: str, tmp_path: Path) -> None:
    ledger = Ledger(empty_database_url)
    ensure_schema(ledger)
    queue, other = "https://sqs/pool", "https://sqs/other-pool"
    try:
        # A run with a root, a fan-out of four and a collect step; another that is one step;
        # a step on another pool's queue; a step from before the period.
        _step(ledger, "run-1", queue, queued_ago=3000, waited=50, took=40)
        for _ in range(4):
            _step(ledger, "run-1", queue, queued_ago=2909, waited=5, took=120)
        _step(ledger, "run-1", queue, queued_ago=2780, waited=1, took=10)
        _step(ledger, "run-2", queue, queued_ago=1000, waited=60, took=30)
        _step(ledger, "run-3", other, queued_ago=500, waited=1, took=30)
        _step(ledger, "run-4", queue, queued_ago=3 * 86_400, waited=1, took=30)

        rows = read_history(empty_database_url, days=1, queue_urls=[queue])
        assert sorted({row.run_id for row in rows}) == ["run-1", "run-2"]
        assert len(rows) == 7

        result = CliRunner().invoke(
            scaling,
            [
                "simulate",
                "--database-url",
                empty_database_url,
                "--days",
                "1",
                "--queue-url",
                queue,
                "--max-workers",
                "3",
                "--output-dir",
                str(tmp_path),
            ],
        )
    finally:
        ledger.dispose()
    assert result.exit_code in (0, 1), result.output
    assert "ledger_history: 2 runs from the ledger" in result.output
    document = json.loads((tmp_path / "simulation.json").read_text())
    history = document["scenarios"]["ledger_history"]
    assert (history["runs"], history["steps"], history["max_workers"]) == (2, 7, 3)
    assert set(history["policies"]) == {
        "taskiq",
        "taskiq-previous",
        "target-tracking",
        "keda",
        "oracle",
    }
    assert (tmp_path / "ledger_history-busiest-hour.png").exists()


def test_endpoints_needs_a_database(tmp_path: Path) -> None:
    result = CliRunner(env={"DAGSTER_TASKIQ_DATABASE_URL": ""}).invoke(
        scaling, ["simulate", "--endpoints", "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "--endpoints needs $DAGSTER_TASKIQ_DATABASE_URL" in result.output

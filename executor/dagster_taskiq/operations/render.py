"""Terminal tables (rich) and JSON for the operations reports.

Text that comes from the outside (queue names, errors, message bodies) goes into rich as
``Text``, never as markup: a ``[`` in an error must print as itself.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dagster_taskiq.operations.dlq import DeadLetterView, Listing, PurgeResult
from dagster_taskiq.operations.runs import AttemptView, RunReport
from dagster_taskiq.operations.status import PoolStatus, QueueStatus, StatusReport

NONE = "-"
QUEUE_COLUMNS = (
    "queue",
    "role",
    "visible",
    "delayed",
    "in flight",
    "oldest message",
    "live leases",
)
TEXT_COLUMNS = ("queue", "role", "oldest message")
RUN_COLUMNS = ("run in flight", "steps", "attempts by state", "live leases", "since", "last change")
ATTEMPT_COLUMNS = (
    "step", "attempt", "ledger", "worker", "deliveries", "token", "lease", "dups", "event log",
)  # fmt: skip


# Free-text columns are cut at this width (with an ellipsis): one line a row, however long
# an error is. JSON and ``dlq show`` have the whole text.
WIDE_COLUMN_CHARS = 60
WIDE_COLUMNS = frozenset({"event log", "attempts by state"})


def _t(value: object, style: str = "") -> Text:
    """A cell: one line (an error's newlines become spaces, a long text ends in an
    ellipsis), never read as markup."""
    text = NONE if value is None else " ".join(str(value).split())
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _table(columns: tuple[str, ...] | list[str], *, right: tuple[str, ...] = ()) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0))
    for name in columns:
        table.add_column(
            name,
            justify="right" if name in right else "left",
            # A narrow terminal shrinks the free-text columns (only those may wrap, and their
            # cells cut themselves short instead), never the short ones.
            no_wrap=name not in WIDE_COLUMNS,
            overflow="ellipsis",
            max_width=WIDE_COLUMN_CHARS if name in WIDE_COLUMNS else None,
        )
    return table


def duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def to_jsonable(value: Any) -> Any:
    """Dataclasses (with their computed fields) as plain JSON values."""
    if isinstance(value, StatusReport):
        data = dataclasses.asdict(value)
        data["dlq_depth"] = value.dlq_depth
        for pool, raw in zip(value.pools, data["pools"], strict=True):
            for queue, raw_queue in zip(pool.queues, raw["queues"], strict=True):
                raw_queue["name"] = queue.name
        return data
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    return value


def dumps(value: Any, *, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(value), indent=indent, default=str)


# -- status --------------------------------------------------------------------------------


def _queue_row(queue: QueueStatus) -> list[Text]:
    age = duration(queue.oldest_age_seconds)
    if queue.oldest_age_source == "ledger" and queue.oldest_age_seconds is None:
        age = "none waiting (ledger)"
    elif queue.oldest_age_source:
        age = f"{age} ({queue.oldest_age_source})"
    style = "red" if queue.role == "dlq" and (queue.depth or 0) > 0 else ""
    return [
        _t(queue.name),
        _t(queue.role),
        _t(queue.visible, style),
        _t(queue.delayed),
        _t(queue.in_flight),
        _t(age),
        _t(queue.live_leases),
    ]


def _pool(pool: PoolStatus) -> RenderableType:
    workers = pool.workers
    line = Text(f"Pool {pool.name}", style="bold")
    desired = NONE if workers.desired is None else workers.desired
    running = NONE if workers.running is None else workers.running
    line.append(f"  workers ({workers.source}): desired {desired}, running {running}")
    if workers.pending:
        line.append(f", pending {workers.pending}")
    if workers.workers:
        line.append(f" [{', '.join(workers.workers)}]")
    parts: list[RenderableType] = [line]
    decision = workers.last_decision
    if decision is not None:
        parts.append(
            Text(
                f"  last scaling decision {duration(decision.age_seconds)} ago: "
                f"{decision.reason}, {decision.current} -> {decision.desired} ({decision.detail})"
            )
        )
    parts.extend(Text(f"  ECS: {event}") for event in workers.events)
    if workers.error:
        parts.append(Text(f"  workers: {workers.error}", style="red"))
    table = _table(QUEUE_COLUMNS, right=tuple(c for c in QUEUE_COLUMNS if c not in TEXT_COLUMNS))
    for queue in pool.queues:
        table.add_row(*_queue_row(queue))
    parts.append(table)
    return Group(*parts)


def render_status(report: StatusReport) -> RenderableType:
    parts: list[RenderableType] = [
        Text(f"dagster-taskiq status  {report.target}  {report.collected_at}", style="bold")
    ]
    for pool in report.pools:
        parts.extend([Text(""), _pool(pool)])
    parts.append(Text(""))
    if not report.ledger:
        parts.append(Text("Ledger: unreadable, see below", style="red"))
    else:
        counts = ", ".join(f"{state} {n}" for state, n in report.ledger.items())
        parts.append(Text(f"Ledger rows: {counts}; live leases {report.live_leases}"))
        rejected = ", ".join(
            f"{r.reason} {r.messages} ({r.receives} receives)" for r in report.rejected_last_hour
        )
        parts.append(Text(f"Rejected messages in the last hour: {rejected or 'none'}"))
        if report.runs_in_flight:
            runs = _table(RUN_COLUMNS)
            for run in report.runs_in_flight:
                runs.add_row(
                    _t(run.run_id),
                    _t(run.steps),
                    _t(", ".join(f"{state} {n}" for state, n in run.attempts.items())),
                    _t(run.live_leases),
                    _t(f"{duration(run.first_enqueued_seconds)} ago"),
                    _t(f"{duration(run.last_update_seconds)} ago"),
                )
            parts.extend([Text(""), runs])
        else:
            parts.append(Text("Runs in flight: none"))
    if report.errors:
        parts.append(Text(""))
        parts.extend(Text(f"! {error}", style="red") for error in report.errors)
    if any(q.oldest_age_source == "ledger" for p in report.pools for q in p.queues):
        parts.append(
            Text(
                "oldest message (ledger): the oldest step not yet taken by a worker; CloudWatch's "
                "ApproximateAgeOfOldestMessage had no datapoint or is not there (local stack).",
                style="dim",
            )
        )
    return Group(*parts)


# -- runs ----------------------------------------------------------------------------------


def _event_log_cell(view: AttemptView, report: RunReport) -> Text:
    if report.event_log_unavailable is not None:
        return _t("unavailable", "dim")
    logged = view.event_log
    if logged is None:
        return _t("no events", "dim")
    text = " > ".join(logged.events) or NONE
    if logged.engine_messages:
        text += f" (+{len(logged.engine_messages)} engine events)"
    return _t(text)


def _attempt_notes(view: AttemptView) -> list[str]:
    """What an attempt's errors say, in full, for the lines under the table."""
    notes = []
    if view.error:
        notes.append(f"ledger: {view.error}")
    notes.extend(f"rejected: {rejection.text}" for rejection in view.rejections)
    if view.event_log is not None and view.event_log.error:
        notes.append(f"event log: {view.event_log.error}")
    return notes


def render_run(report: RunReport) -> RenderableType:
    header = Text(f"Run {report.run_id}", style="bold")
    if report.dagster_status:
        header.append(f"  Dagster: {report.dagster_status}")
    parts: list[RenderableType] = [header]
    table = _table(ATTEMPT_COLUMNS)
    notes: list[Text] = []
    for view in report.attempts:
        ledger = view.ledger_status or "(no row)"
        if view.rejections:
            ledger += f"; rejected: {view.rejections[-1].summary}"
        table.add_row(
            _t(view.step_key),
            _t(view.attempt + 1),
            _t(ledger),
            _t(view.worker_id),
            _t(view.deliveries),
            _t(view.fencing_token),
            _t(view.lease),
            _t(view.duplicates_suppressed),
            _event_log_cell(view, report),
        )
        # Errors are long: under the table, whole, so that a narrow terminal wraps them.
        notes.extend(
            Text(f"  {view.step_key} attempt {view.attempt + 1}, {note}")
            for note in _attempt_notes(view)
        )
    parts.append(table if report.attempts else Text("No step attempt of this run is known."))
    parts.extend(notes)
    if report.event_log_unavailable:
        parts.append(Text(f"event log: unavailable ({report.event_log_unavailable})", style="dim"))
    parts.extend(Text(f"! {error}", style="red") for error in report.errors)
    return Group(*parts)


# -- dlq -----------------------------------------------------------------------------------


def _letter_lines(view: DeadLetterView) -> Text:
    """One letter in two lines: who it is, then why it is dead (wrapped, never cut)."""
    attempt = view.attempt + 1 if view.attempt is not None else None
    who = (
        f"{view.message_id or view.idempotency_key}  run {view.run_id or NONE}  "
        f"step {view.step_key or NONE}  attempt {attempt or NONE}  "
        f"receives {view.receive_count if view.receive_count is not None else NONE}  "
        f"ledger {view.ledger_status or '(no row)'}"
    )
    text = Text(who)
    text.append(f"\n    {view.reason}", style="dim")
    return text


def render_dlq_list(listing: Listing, recorded: list[DeadLetterView] | None) -> RenderableType:
    parts: list[RenderableType] = []
    views = listing.views
    title = Text(f"In the dead-letter queue(s): {len(views)}", style="bold")
    parts.append(title)
    parts.extend(_letter_lines(view) for view in views)
    parts.append(
        Text(
            f"Listing received these messages with a visibility of {listing.hold_seconds} s "
            "and gave them back at once; each receive count went up by one.",
            style="dim",
        )
    )
    if recorded is not None:
        parts.append(Text(""))
        parts.append(
            Text(
                "Dead-lettered in the ledger, letter no longer in the DLQ (marked by the "
                f"DLQ processor, or presumed by the executor): {len(recorded)}",
                style="bold",
            )
        )
        parts.extend(_letter_lines(view) for view in recorded)
    parts.extend(Text(f"! {error}", style="red") for error in listing.errors)
    return Group(*parts)


def render_letter(view: DeadLetterView) -> RenderableType:
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column("field", style="bold")
    table.add_column("value")
    fields = dataclasses.asdict(view)
    body = fields.pop("body_excerpt")
    fields["rejections"] = "\n".join(r.text for r in view.rejections) or None
    for name, value in fields.items():
        # In full here: this is the view for reading one letter.
        table.add_row(Text(name.replace("_", " ")), Text(NONE if value is None else str(value)))
    return Group(table, Text("body:", style="bold"), Text(body or NONE))


def render_purge(result: PurgeResult) -> RenderableType:
    parts: list[RenderableType] = [Text(f"Deleted {len(result.deleted)} dead letter(s).")]
    if result.missing:
        parts.append(
            Text(
                f"Not deleted, no longer in the DLQ or taken by another reader: "
                f"{', '.join(result.missing)}"
            )
        )
    parts.extend(Text(f"! {error}", style="red") for error in result.errors)
    return Group(*parts)


# -- refreshing ----------------------------------------------------------------------------


def watch(
    console: Console,
    produce: Callable[[], RenderableType],
    *,
    interval: float,
    count: int = 0,
) -> int:
    """Show ``produce()`` and refresh it every ``interval`` seconds, ``count`` times (0: until
    interrupted): in place on a terminal, one after the other elsewhere. Returns the number
    of refreshes shown."""
    shown = 0
    if console.is_terminal:
        with Live(produce(), console=console, auto_refresh=False) as live:
            shown = 1
            while count == 0 or shown < count:
                time.sleep(interval)
                live.update(produce(), refresh=True)
                shown += 1
        return shown
    while count == 0 or shown < count:
        if shown:
            time.sleep(interval)
            console.rule()
        console.print(produce())
        shown += 1
    return shown

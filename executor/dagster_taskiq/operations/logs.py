"""``dagster-taskiq logs``: one component's logs, from CloudWatch Logs or the local files.

On AWS each component has a log group (the stack's outputs name them): the workers' (one
per pool, a stream per task), the scaler's (one per pool) and the DLQ processor's. On the
local stack the workers log to ``logs/<pool>-<n>.log`` and the stack's process writes
``logs/scaler.log`` and ``logs/dlq-processor.log``. Either way an event is one line, in
time order; ``run_id`` keeps the lines that name the run (every step's log lines carry its
idempotency key, which starts with the run id).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.settings import (
    ENV_DLQ_PROCESSOR_LOG_GROUP,
    ENV_SCALER_LOG_GROUP,
    ENV_WORKER_LOG_GROUP,
)
from dagster_taskiq.operations.target import LOGS_DIR, Target

COMPONENTS = ("worker", "scaler", "dlq-processor")
LOCAL_FILES = {"scaler": "scaler.log", "dlq-processor": "dlq-processor.log"}
_ENV_BY_COMPONENT = {
    "worker": ENV_WORKER_LOG_GROUP,
    "scaler": ENV_SCALER_LOG_GROUP,
    "dlq-processor": ENV_DLQ_PROCESSOR_LOG_GROUP,
}
_OUTPUT_BY_COMPONENT = {
    "worker": "WorkerLogGroupName",
    "scaler": "ScalerLogGroupName",
    "dlq-processor": "DeadLetterProcessorLogGroupName",
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class LogEvent:
    timestamp: float  # epoch seconds
    source: str  # log group/stream, or file name
    message: str
    event_id: str

    @property
    def time(self) -> str:
        return datetime.fromtimestamp(self.timestamp, UTC).isoformat(timespec="milliseconds")

    def as_dict(self) -> dict[str, Any]:
        return {"timestamp": self.time, "source": self.source, "message": self.message}


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """``10m``, ``2h``, ``30s``, ``1d`` ago, or an ISO 8601 time (UTC when it has no zone)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration (10m, 2h, 1d) nor an ISO time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LogQuery:
    component: str
    since: datetime
    run_id: str | None = None
    pool: str | None = None


# -- CloudWatch Logs -----------------------------------------------------------------------


def log_groups(target: Target, component: str, pool: str | None = None) -> list[str]:
    """The component's log groups on AWS; ConfigurationError naming what to set if none."""
    if component == "dlq-processor":
        groups = [target.dlq_processor_log_group] if target.dlq_processor_log_group else []
    else:
        groups = [
            group
            for p in target.pools
            if pool is None or p.name == pool
            for group in [p.worker_log_group if component == "worker" else p.scaler_log_group]
            if group
        ]
    if not groups:
        raise ConfigurationError(
            f"No log group for the {component}: set {_ENV_BY_COMPONENT[component]} (the "
            f"stack's {_OUTPUT_BY_COMPONENT[component]} output)"
        )
    return list(dict.fromkeys(groups))


def cloudwatch_events(
    client: Any,
    groups: list[str],
    *,
    start: datetime,
    run_id: str | None = None,
    end: datetime | None = None,
) -> list[LogEvent]:
    """Every event of the groups from ``start``, in time order. With a run id, CloudWatch
    filters on the quoted term (a run id has hyphens, which a bare term may not)."""
    events: list[LogEvent] = []
    for group in groups:
        kwargs: dict[str, Any] = {
            "logGroupName": group,
            "startTime": int(start.timestamp() * 1000),
        }
        if end is not None:
            kwargs["endTime"] = int(end.timestamp() * 1000)
        if run_id:
            kwargs["filterPattern"] = f'"{run_id}"'
        while True:
            page = client.filter_log_events(**kwargs)
            for event in page.get("events", []):
                message = str(event.get("message", "")).rstrip("\n")
                if run_id and run_id not in message:
                    continue
                events.append(
                    LogEvent(
                        timestamp=int(event["timestamp"]) / 1000,
                        source=f"{group}/{event.get('logStreamName', '')}",
                        message=message,
                        event_id=str(event.get("eventId", "")),
                    )
                )
            token = page.get("nextToken")
            if not token or token == kwargs.get("nextToken"):
                break
            kwargs["nextToken"] = token
    return sorted(events, key=lambda e: (e.timestamp, e.source))


# -- local files ---------------------------------------------------------------------------


def log_files(target: Target, component: str, pool: str | None = None) -> list[Path]:
    """The component's files on the local stack (those that exist)."""
    if target.local_root is None:
        raise ConfigurationError("Not a local stack")
    directory = target.local_root / LOGS_DIR
    if component in LOCAL_FILES:
        path = directory / LOCAL_FILES[component]
        return [path] if path.is_file() else []
    names = [p.name for p in target.pools if pool is None or p.name == pool]
    return sorted(
        {path for name in names for path in directory.glob(f"{name}-*.log")},
        key=lambda path: (path.name.rsplit("-", 1)[0], _number(path)),
    )


def _number(path: Path) -> int:
    tail = path.stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _line_time(line: str) -> float | None:
    """The time of a JSON log line: powertools' ``2024-05-01 12:00:00,123+0000`` or ISO."""
    if not line.startswith("{"):
        return None
    try:
        stamp = json.loads(line).get("timestamp")
    except (ValueError, AttributeError):
        return None
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp.replace(",", "."))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass
class _FileCursor:
    path: Path
    offset: int = 0
    line_number: int = 0
    last_time: float | None = None
    pending: list[tuple[int, str]] = field(default_factory=list)  # untimed leading lines


def _read_new(cursor: _FileCursor) -> list[LogEvent]:
    """Complete lines added to the file since the cursor. A line with no time of its own (a
    traceback, a library's plain output) takes the time of the timed line before it, or,
    at the top of a file, of the first timed line after it."""
    try:
        with open(cursor.path, "rb") as handle:
            handle.seek(cursor.offset)
            data = handle.read()
    except OSError:
        return []
    end = data.rfind(b"\n") + 1
    cursor.offset += end
    events = []
    for raw in data[:end].decode("utf-8", errors="replace").splitlines():
        cursor.line_number += 1
        stamp = _line_time(raw)
        if stamp is None and cursor.last_time is None:
            cursor.pending.append((cursor.line_number, raw))
            continue
        if stamp is not None:
            for number, text in cursor.pending:
                events.append(_file_event(cursor.path, number, text, stamp))
            cursor.pending.clear()
            cursor.last_time = stamp
        assert cursor.last_time is not None
        events.append(_file_event(cursor.path, cursor.line_number, raw, stamp or cursor.last_time))
    return events


def _file_event(path: Path, number: int, text: str, stamp: float) -> LogEvent:
    return LogEvent(
        timestamp=stamp, source=path.name, message=text, event_id=f"{path.name}:{number}"
    )


def _keep(event: LogEvent, since: float, run_id: str | None) -> bool:
    return event.timestamp >= since and (not run_id or run_id in event.message)


def file_events(paths: list[Path], *, since: datetime, run_id: str | None = None) -> list[LogEvent]:
    start = since.timestamp()
    events = [
        event
        for path in paths
        for event in _read_new(_FileCursor(path))
        if _keep(event, start, run_id)
    ]
    return sorted(events, key=lambda e: (e.timestamp, e.source))


# -- both ----------------------------------------------------------------------------------


def read_logs(target: Target, query: LogQuery) -> list[LogEvent]:
    if target.kind == "local":
        return file_events(
            log_files(target, query.component, query.pool), since=query.since, run_id=query.run_id
        )
    return cloudwatch_events(
        target.client("logs"),
        log_groups(target, query.component, query.pool),
        start=query.since,
        run_id=query.run_id,
    )


def follow_logs(
    target: Target,
    query: LogQuery,
    *,
    stop: Callable[[], bool],
    poll_seconds: float = 2.0,
) -> Iterator[LogEvent]:
    """The events from ``query.since`` on, then the new ones as they come, until ``stop()``."""
    if target.kind == "local":
        yield from _follow_files(target, query, stop=stop, poll_seconds=poll_seconds)
        return
    client = target.client("logs")
    groups = log_groups(target, query.component, query.pool)
    start = query.since
    seen: set[str] = set()
    while True:
        events = cloudwatch_events(client, groups, start=start, run_id=query.run_id)
        for event in events:
            if event.event_id not in seen:
                seen.add(event.event_id)
                yield event
        if events:
            # CloudWatch's startTime is inclusive: the ids seen at the last millisecond are
            # remembered so that those events are not repeated.
            latest = events[-1].timestamp
            start = datetime.fromtimestamp(latest, UTC)
            seen = {e.event_id for e in events if e.timestamp >= latest}
        if stop():
            return
        time.sleep(poll_seconds)


def _follow_files(
    target: Target, query: LogQuery, *, stop: Callable[[], bool], poll_seconds: float
) -> Iterator[LogEvent]:
    since = query.since.timestamp()
    cursors: dict[Path, _FileCursor] = {}
    while True:
        for path in log_files(target, query.component, query.pool):
            cursors.setdefault(path, _FileCursor(path))
        batch = [event for cursor in cursors.values() for event in _read_new(cursor)]
        for event in sorted(batch, key=lambda e: (e.timestamp, e.source)):
            if _keep(event, since, query.run_id):
                yield event
        if stop():
            return
        time.sleep(poll_seconds)

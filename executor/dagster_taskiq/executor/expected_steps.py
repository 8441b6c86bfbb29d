"""The steps a run will launch next, recorded for the scaler (predictive scale-out).

Once the steps a run is running end, its executor launches the steps that waited on them.
Counted ahead, from the execution plan, they let the scaler start Fargate tasks while those
steps still run. For a dynamic fan-out the count is the mapping keys its running step has
yielded so far: known once they are.

This reads the private state of Dagster's ``ActiveExecution`` (steps pending and what they
wait on, steps in flight, steps ready but held back by concurrency limits, mapping keys
being gathered), the one place that knows it; ``tests/unit/test_expected_steps.py`` is the
contract test that fails if a Dagster release changes it. Whatever goes wrong here counts
as nothing expected and is logged: expected steps only bring workers earlier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dagster._core.execution.plan.step import IExecutionStep, UnresolvedMappedExecutionStep

from dagster_taskiq.core.errors import RoutingError
from dagster_taskiq.core.observability import module_logger
from dagster_taskiq.core.routing import Routing
from dagster_taskiq.patches import require
from dagster_taskiq.scaling.policy import ExpectedSteps

if TYPE_CHECKING:
    from dagster._core.execution.plan.active import ActiveExecution

log = module_logger(__name__)

# A row is refreshed this often while the run waits, so that it outlives its TTL only
# while the run worker lives.
REFRESH_SECONDS = 60.0


class OutlookWriter(Protocol):
    """Where a run's expected steps go: ``dagster_taskiq.scaling.outlook.OutlookStore``."""

    def record(self, run_id: str, counts: Mapping[str, ExpectedSteps]) -> None: ...

    def clear(self, run_id: str) -> None: ...


@dataclass(frozen=True)
class Upcoming:
    """A step the run will launch once steps it is running end, ``count`` times."""

    step: IExecutionStep
    count: int


def upcoming_steps(active: ActiveExecution) -> list[Upcoming]:
    """What ``active`` will launch once its steps in flight end, if they succeed: pending
    steps whose every dependency is done or in flight (one at least), steps ready but held
    back by concurrency limits, and the mapped steps of a running step's dynamic outputs."""
    in_flight: set[str] = active._in_flight
    if not in_flight:
        return []
    plan = active._plan
    done = active._success | active._skipped
    found = [Upcoming(plan.get_step_by_key(key), 1) for key in active._executable]
    for key, deps in active._pending.items():
        if deps and deps & in_flight and deps <= in_flight | done:
            found.append(Upcoming(plan.get_step_by_key(key), 1))
    for source, outputs in active._gathering_dynamic_outputs.items():
        if source not in in_flight:
            continue
        for output, mapping_keys in outputs.items():
            if not mapping_keys:
                continue
            for step in plan.step_dict.values():
                if (
                    isinstance(step, UnresolvedMappedExecutionStep)
                    and step.resolved_by_step_keys == {source}
                    and step.resolved_by_output_name == output
                    and step.get_all_dependency_keys() - {source} <= done
                ):
                    found.append(Upcoming(step, len(mapping_keys)))
    return found


def by_queue(
    upcoming: list[Upcoming],
    queue_of: Callable[[IExecutionStep], str | None],
    *,
    max_concurrent: int | None = None,
) -> dict[str, int]:
    """Upcoming steps per queue URL; a run limited to ``max_concurrent`` steps in flight
    never launches more than that at once."""
    counts: dict[str, int] = {}
    for item in upcoming:
        url = queue_of(item.step)
        if url is not None:
            counts[url] = counts.get(url, 0) + item.count
    if max_concurrent is not None:
        counts = {url: min(count, max_concurrent) for url, count in counts.items()}
    return counts


class RunOutlook:
    """One run's expected steps, kept current in the outlook table by a background thread.

    The executor calls :meth:`observe` on each pass of its loop; it costs a comparison of a
    few sizes unless the run's state changed. Writes happen off the executor's thread.
    """

    def __init__(
        self,
        store: OutlookWriter,
        routing: Routing,
        *,
        max_concurrent: int | None = None,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self._store = store
        self._routing = routing
        self._max_concurrent = max_concurrent
        self._refresh = refresh_seconds
        self._run_id: str | None = None
        self._run_tags: Mapping[str, str] = {}
        self._seen: tuple[int, ...] | None = None
        self._in_flight: frozenset[str] = frozenset()
        self._launched_at = time.monotonic()
        self._lock = threading.Lock()
        self._latest: dict[str, int] = {}
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    def start(self, run_id: str, run_tags: Mapping[str, str]) -> None:
        require("active_execution")  # upcoming_steps reads its private state
        self._run_id, self._run_tags = run_id, run_tags
        self._thread = threading.Thread(target=self._write_loop, name="expected-steps", daemon=True)
        self._thread.start()

    def observe(self, active: ActiveExecution) -> None:
        try:
            self._observe(active)
        except Exception:
            if not self._failed:
                log.warning("Could not count the run's upcoming steps", exc_info=True)
                self._failed = True

    def _observe(self, active: ActiveExecution) -> None:
        gathered = sum(
            len(keys or ())
            for outputs in active._gathering_dynamic_outputs.values()
            for keys in outputs.values()
        )
        seen = (
            len(active._in_flight),
            len(active._pending),
            len(active._executable),
            len(active._success),
            len(active._skipped),
            gathered,
        )
        if seen == self._seen:
            return
        self._seen = seen
        in_flight = frozenset(active._in_flight)
        if in_flight - self._in_flight:
            self._launched_at = time.monotonic()
        self._in_flight = in_flight
        counts = by_queue(
            upcoming_steps(active), self._queue_of, max_concurrent=self._max_concurrent
        )
        with self._lock:
            if counts != self._latest:
                self._latest = counts
                self._changed.set()

    def _queue_of(self, step: IExecutionStep) -> str | None:
        try:
            return self._routing.destination(step.key, step.tags or {}, self._run_tags).url
        except RoutingError:
            return None  # it fails at launch, with the reason

    def _write_loop(self) -> None:
        written: dict[str, int] = {}
        last_write = 0.0
        while not self._stop.is_set():
            self._changed.wait(self._refresh)
            self._changed.clear()
            if self._stop.is_set():
                return
            with self._lock:
                counts = dict(self._latest)
                launched_at = self._launched_at
            stale = time.monotonic() - last_write >= self._refresh
            if counts == written and not (stale and counts):
                continue
            waiting = time.monotonic() - launched_at
            try:
                self._store.record(
                    self._run_id or "",
                    {url: ExpectedSteps(steps, waiting) for url, steps in counts.items()},
                )
            except Exception as e:
                log.warning("Could not record the run's expected steps: %s", e)
                continue
            written, last_write = counts, time.monotonic()

    def close(self) -> None:
        """Stop writing and remove the run's rows: it expects nothing more."""
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._run_id is not None:
            try:
                self._store.clear(self._run_id)
            except Exception as e:
                log.warning("Could not clear the run's expected steps: %s", e)

"""Where a step goes: its queue (by name, from a tag) and its priority lane.

Dagster-free and pure: the executor feeds it the step's and the run's tags.

- ``dagster-taskiq/queue`` on an op (or on the job, for every step of its runs; the op's
  wins) names a queue of the executor's ``queues`` config; no tag means ``default``.
- ``dagster-taskiq/priority`` on an op (else Dagster's own ``dagster/priority``) plus
  ``dagster-taskiq/run_priority`` on the run (else the run's ``dagster/priority``) is the
  step's effective priority, as dagster-celery adds its run and step priorities.
- SQS has no per-message priority, so a queue may have a second queue, its priority lane:
  a step whose effective priority reaches ``priority_threshold`` is sent there, and
  workers receive from their lanes first (see ``poll_order``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from dagster_taskiq.core.errors import RoutingError

QUEUE_TAG = "dagster-taskiq/queue"
PRIORITY_TAG = "dagster-taskiq/priority"
RUN_PRIORITY_TAG = "dagster-taskiq/run_priority"
DAGSTER_PRIORITY_TAG = "dagster/priority"
DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY_THRESHOLD = 1
# Out of every PRIORITY_RATIO + 1 receives, one serves the normal queues first.
DEFAULT_PRIORITY_RATIO = 3

FifoGroup = Literal["run", "step"]


@dataclass(frozen=True)
class QueueRoute:
    """One named queue of the executor's config, and its optional priority lane."""

    name: str
    url: str
    priority_url: str | None = None
    scaler_function: str | None = None
    ecs_service: str | None = None

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, self.priority_url) if self.priority_url else (self.url,)


@dataclass(frozen=True)
class Destination:
    route: QueueRoute
    url: str  # the queue or its lane
    priority: int

    @property
    def in_priority_lane(self) -> bool:
        return self.url == self.route.priority_url


@dataclass(frozen=True)
class Routing:
    routes: Mapping[str, QueueRoute]
    priority_threshold: int = DEFAULT_PRIORITY_THRESHOLD
    fifo_group: FifoGroup = "run"

    def __post_init__(self) -> None:
        if DEFAULT_QUEUE not in self.routes:
            raise ValueError(f"routing needs a queue named {DEFAULT_QUEUE!r}")

    @property
    def names(self) -> list[str]:
        return sorted(self.routes)

    def destination(
        self, step_key: str, step_tags: Mapping[str, str], run_tags: Mapping[str, str]
    ) -> Destination:
        """The queue (or lane) a step is sent to. Raises RoutingError with what to fix."""
        name = step_tags.get(QUEUE_TAG) or run_tags.get(QUEUE_TAG) or DEFAULT_QUEUE
        route = self.routes.get(name)
        if route is None:
            raise RoutingError(
                f'Step "{step_key}" is tagged {QUEUE_TAG}={name!r}, but the executor knows no '
                f"queue of that name. Known queues: {', '.join(self.names)}. Add it under "
                "`queues` in the executor config, or fix the tag."
            )
        priority = step_priority(step_key, step_tags) + run_priority(run_tags)
        if route.priority_url and priority >= self.priority_threshold:
            return Destination(route, route.priority_url, priority)
        return Destination(route, route.url, priority)

    def message_group(self, run_id: str, step_key: str) -> str:
        """A FIFO queue's message group: per run (launch order) or per step (parallel)."""
        return run_id if self.fifo_group == "run" else f"{run_id}:{step_key}"


def _priority(value: str | None, *, what: str, tag: str) -> int:
    if value is None or value == "":
        return 0
    try:
        return int(value)
    except ValueError:
        raise RoutingError(f"{what} has {tag}={value!r}, which is not a whole number.") from None


def step_priority(step_key: str, step_tags: Mapping[str, str]) -> int:
    tag = PRIORITY_TAG if PRIORITY_TAG in step_tags else DAGSTER_PRIORITY_TAG
    return _priority(step_tags.get(tag), what=f'Step "{step_key}"', tag=tag)


def run_priority(run_tags: Mapping[str, str]) -> int:
    tag = RUN_PRIORITY_TAG if RUN_PRIORITY_TAG in run_tags else DAGSTER_PRIORITY_TAG
    return _priority(run_tags.get(tag), what="The run", tag=tag)


def poll_order(
    lanes: Sequence[str], normal: Sequence[str], round_number: int, ratio: int
) -> list[str]:
    """The order a worker receives from its queues in one round.

    Priority lanes first, except every ``ratio + 1``-th round, which serves the normal
    queues first: under a lasting backlog of priority work, normal work still gets at
    least one receive in ``ratio + 1`` and is never starved. Queues of one kind take
    turns leading, so none of them waits behind another for ever either.
    """

    def rotated(urls: Sequence[str], turn: int) -> list[str]:
        if not urls:
            return []
        shift = turn % len(urls)
        return [*urls[shift:], *urls[:shift]]

    if ratio < 1:
        raise ValueError("ratio must be 1 or more")
    cycle = ratio + 1
    # Each kind takes turns by the rounds it led, so every queue of it leads in turn.
    normal_turn = round_number // cycle
    lane_turn = round_number - normal_turn
    if round_number % cycle == ratio:
        return [*rotated(normal, normal_turn), *rotated(lanes, lane_turn)]
    return [*rotated(lanes, lane_turn), *rotated(normal, normal_turn)]

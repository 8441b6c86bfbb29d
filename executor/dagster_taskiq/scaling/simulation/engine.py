"""The discrete-event model: a queue, workers that take a while to start, and a policy.

Time is in seconds from the start of the workload. Steps wait in one FIFO queue; a worker
that has started takes a waiting step at once into a free slot (a long poll), oldest worker
first. The policy sets a desired count, as on an ECS service or a Kubernetes deployment:

- above the workers alive, new ones start, each after a start delay drawn from the scenario;
- below, workers still starting stop first, then idle ones. A busy worker with scale-in
  protection (ECS) is not stopped: it stops once it has nothing to run. Without protection
  (Kubernetes) the newest are stopped even if busy; a step not done within the grace
  period is killed and queued again.

Worker-minutes run from a worker's start request to its stop, start delay included.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dagster_taskiq.scaling.policy import ExpectedSteps
from dagster_taskiq.scaling.simulation.workload import DAY, RunSpec, Scenario

# The run worker reads the event log about this often: a stage is queued this long after
# the step before it ends.
LAUNCH_SECONDS = 0.1
# Kubernetes' default terminationGracePeriodSeconds.
GRACE_SECONDS = 30.0
# Queue depth and workers are sampled this often for the picture.
SAMPLE_SECONDS = 10.0
# After the last step ends, the policy is given this long to scale the pool in.
TAIL_SECONDS = 2 * 3600.0


@dataclass(eq=False)
class Step:
    run: RunState
    stage: int
    duration: float
    queued_at: float = 0.0
    first_queued_at: float = 0.0
    started_at: float | None = None
    worker: Worker | None = None
    attempt: int = 0
    waits: list[float] = field(default_factory=list)
    done: bool = False


@dataclass(eq=False)
class Worker:
    id: int
    requested_at: float
    ready_at: float
    slots: int
    running: list[Step] = field(default_factory=list)
    stopped_at: float | None = None
    terminating: bool = False  # Kubernetes: SIGTERM sent, takes no new step

    @property
    def ready(self) -> bool:
        return self.stopped_at is None and not self.terminating


@dataclass(eq=False)
class RunState:
    spec: RunSpec
    stage: int = -1
    remaining: int = 0  # steps of the current stage not yet ended
    launched_at: float = 0.0  # when the current stage was queued

    def expected(self, now: float) -> ExpectedSteps | None:
        """What the executor records: the next stage, if the plan knows it yet."""
        following = self.stage + 1
        if self.stage < 0 or following >= len(self.spec.stages):
            return None
        stage = self.spec.stages[following]
        if not stage.known_ahead:
            return None
        return ExpectedSteps(steps=len(stage.durations), waiting_seconds=now - self.launched_at)


@dataclass(frozen=True)
class Observation:
    """What a policy can read at one moment: SQS, the ledger, ECS."""

    visible: int
    in_flight: int
    live_leases: int
    running_workers: int  # started and not stopping (ECS runningCount)
    desired: int
    expected: tuple[ExpectedSteps, ...]
    step_seconds: float | None  # mean duration of the steps ended so far


@dataclass(frozen=True)
class Sample:
    at: float
    visible: int
    in_flight: int
    workers: int
    desired: int


class Policy(Protocol):
    name: str
    protected: bool  # ECS task scale-in protection: busy workers survive a scale-in

    def start(self, sim: Simulation) -> None: ...

    def steps_queued(self, sim: Simulation, run: RunState, count: int) -> None: ...


class Simulation:
    def __init__(self, scenario: Scenario, policy: Policy, *, seed: int) -> None:
        self.scenario = scenario
        self.policy = policy
        self.now = 0.0
        self._rng = random.Random(f"{scenario.name}-{seed}-delays")
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self.queue: deque[Step] = deque()
        self.workers: list[Worker] = []  # alive, oldest first
        self.all_workers: list[Worker] = []
        self.desired = 0
        self.steps: list[Step] = []
        self.runs = [RunState(spec) for spec in scenario.runs]
        self._active_runs: set[RunState] = set()
        self._runs_left = len(self.runs)
        self.in_flight = 0
        self.killed = 0
        self.changes = 0
        self.evaluations: list[float] = []
        self.cold_starts: list[Step] = []
        self._cold = False
        self.samples: list[Sample] = []
        self._ended_seconds = 0.0
        self._ended = 0
        self.at_max_seconds = 0.0
        self._at_max_since: float | None = None
        self._worker_ids = itertools.count(1)
        self._last_end = 0.0

    # -- the event loop ----------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (max(when, self.now), next(self._sequence), action))

    def every(self, period: float, action: Callable[[], None], *, first: float) -> None:
        """Run ``action`` at ``first`` and every ``period`` after it, while the day lasts."""

        def tick() -> None:
            action()
            self.at(self.now + period, tick)

        self.at(first, tick)

    def run(self) -> Simulation:
        for state in self.runs:
            self.at(state.spec.arrives_at, functools.partial(self._next_stage, state))
        self.every(SAMPLE_SECONDS, self._sample, first=0.0)
        self.policy.start(self)
        # Every run arrives within the span; none takes days.
        limit = self.scenario.span + 3 * DAY
        while self._events:
            when, _, action = heapq.heappop(self._events)
            if self._runs_left == 0 and (
                when > self._last_end + TAIL_SECONDS or (not self.workers and not self.desired)
            ):
                break
            if when > limit:
                raise RuntimeError(f"{self.policy.name} left runs unfinished for days")
            self.now = when
            action()
        for worker in list(self.workers):
            self._stop(worker)
        self._track_max()
        return self

    def advance(self, until: float) -> None:
        """Process the events due by ``until``, for driving a policy step by step."""
        while self._events and self._events[0][0] <= until:
            when, _, action = heapq.heappop(self._events)
            self.now = when
            action()
        self.now = max(self.now, until)

    # -- runs and steps ----------------------------------------------------------------------

    def _next_stage(self, state: RunState) -> None:
        state.stage += 1
        if state.stage >= len(state.spec.stages):
            self._active_runs.discard(state)
            self._runs_left -= 1
            self._last_end = self.now
            return
        self._active_runs.add(state)
        durations = state.spec.stages[state.stage].durations
        state.remaining = len(durations)
        state.launched_at = self.now
        for duration in durations:
            step = Step(state, state.stage, duration, first_queued_at=self.now)
            self.steps.append(step)
            self._enqueue(step)
        self.policy.steps_queued(self, state, len(durations))
        self._dispatch()

    def _enqueue(self, step: Step) -> None:
        step.queued_at = self.now
        if not self._cold and not self.workers and self.desired == 0:
            self._cold = True
            self.cold_starts.append(step)
        self.queue.append(step)

    def _start_step(self, step: Step, worker: Worker) -> None:
        step.started_at = self.now
        step.waits.append(self.now - step.queued_at)
        step.worker = worker
        worker.running.append(step)
        self.in_flight += 1
        attempt = step.attempt
        self.at(self.now + step.duration, lambda: self._step_ended(step, attempt))

    def _step_ended(self, step: Step, attempt: int) -> None:
        if step.attempt != attempt or step.done:
            return  # killed meanwhile
        step.done = True
        worker = step.worker
        assert worker is not None
        worker.running.remove(step)
        self.in_flight -= 1
        self._ended_seconds += step.duration
        self._ended += 1
        state = step.run
        state.remaining -= 1
        if state.remaining == 0:
            self.at(self.now + LAUNCH_SECONDS, lambda: self._next_stage(state))
        self._dispatch()
        self._after_worker_change(worker)

    def _dispatch(self) -> None:
        while self.queue:
            worker = next((w for w in self.workers if self._has_room(w)), None)
            if worker is None:
                return
            self._start_step(self.queue.popleft(), worker)

    def _has_room(self, worker: Worker) -> bool:
        return worker.ready and self.now >= worker.ready_at and len(worker.running) < worker.slots

    # -- workers -----------------------------------------------------------------------------

    def set_desired(self, count: int) -> None:
        """The policy's new desired count (ECS desiredCount, or the deployment's replicas)."""
        count = max(0, count)
        if count != self.desired:
            self.changes += 1
        self.desired = count
        if count > 0:
            self._cold = False  # the next step queued with no worker is a new cold start
        self._track_max()
        active = [w for w in self.workers if not w.terminating]
        if count > len(active):
            for _ in range(count - len(active)):
                self._start_worker()
            return
        excess = len(active) - count
        if excess <= 0:
            return
        if self.policy.protected:
            # ECS stops unprotected tasks: those still starting, then idle ones; a busy one
            # stops once it is idle (see _after_worker_change).
            order = sorted(active, key=lambda w: (self.now >= w.ready_at, -w.id))
            for worker in order:
                if excess == 0:
                    break
                if not worker.running:
                    self._stop(worker)
                    excess -= 1
            return
        # A ReplicaSet removes pods not ready first, then the most recently ready.
        order = sorted(active, key=lambda w: (self.now >= w.ready_at, -w.ready_at))
        for worker in order[:excess]:
            self._terminate(worker)

    def _start_worker(self) -> None:
        delay = self._rng.uniform(*self.scenario.start_delay)
        worker = Worker(
            next(self._worker_ids),
            requested_at=self.now,
            ready_at=self.now + delay,
            slots=self.scenario.steps_per_worker,
        )
        self.workers.append(worker)
        self.all_workers.append(worker)
        self.at(worker.ready_at, lambda: self._ready(worker))

    def _ready(self, worker: Worker) -> None:
        self._dispatch()
        self._after_worker_change(worker)

    def _stop(self, worker: Worker) -> None:
        if worker.stopped_at is not None:
            return
        worker.stopped_at = self.now
        self.workers.remove(worker)

    def _terminate(self, worker: Worker) -> None:
        """SIGTERM without protection: running steps get the grace period, then die."""
        worker.terminating = True
        if not worker.running:
            self._stop(worker)
            return

        def kill() -> None:
            for step in list(worker.running):
                worker.running.remove(step)
                self.in_flight -= 1
                step.attempt += 1
                step.started_at = None
                step.worker = None
                self.killed += 1
                self._enqueue(step)
            self._stop(worker)
            self._dispatch()

        self.at(self.now + GRACE_SECONDS, kill)

    def _after_worker_change(self, worker: Worker) -> None:
        if worker.running or worker.stopped_at is not None:
            return
        if worker.terminating:
            self._stop(worker)
            return
        active = sum(1 for w in self.workers if not w.terminating)
        if self.policy.protected and active > self.desired:
            self._stop(worker)

    def _track_max(self) -> None:
        at_max = self.desired >= self.scenario.max_workers
        if at_max and self._at_max_since is None:
            self._at_max_since = self.now
        elif not at_max and self._at_max_since is not None:
            self.at_max_seconds += self.now - self._at_max_since
            self._at_max_since = None

    # -- what policies read ------------------------------------------------------------------

    def observe(self) -> Observation:
        running = sum(1 for w in self.workers if w.ready and self.now >= w.ready_at)
        expected = tuple(
            found for state in self._active_runs if (found := state.expected(self.now)) is not None
        )
        return Observation(
            visible=len(self.queue),
            in_flight=self.in_flight,
            live_leases=self.in_flight,
            running_workers=running,
            desired=self.desired,
            expected=expected,
            step_seconds=self._ended_seconds / self._ended if self._ended >= 10 else None,
        )

    def evaluated(self) -> None:
        """A policy evaluation happened now (for the cold-start verdict)."""
        self.evaluations.append(self.now)

    def _sample(self) -> None:
        self.samples.append(
            Sample(self.now, len(self.queue), self.in_flight, len(self.workers), self.desired)
        )

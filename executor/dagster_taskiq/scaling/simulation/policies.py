"""The policies the simulator compares, each driven the way it runs in production.

- ``taskiq``: this project's scaler. A schedule invokes it every minute and it evaluates
  ``evaluations`` times in that minute; the executor invokes it when a run queues steps and
  the service wants no worker, at most once per run per debounce; each evaluation calls
  :func:`dagster_taskiq.scaling.policy.decide` with the recommendations of the window, as the
  scaler Lambda does. Evaluations are serialized, as the scaler's lock does.
- ``taskiq-previous``: the scaler before the changes of decision 43 (the busy floor kept in
  the window, a trigger that shares one reserved concurrency with the scheduled invocation
  and is throttled while it runs, a debounce counted from each check, no expected steps).
- ``target-tracking``: Application Auto Scaling target tracking on backlog per task.
- ``keda``: KEDA's aws-sqs-queue scaler and the Kubernetes HPA, with their defaults.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from dagster_taskiq.scaling.policy import (
    QueueSignals,
    Recommendation,
    ScalingConfig,
    decide,
    expected_soon,
)
from dagster_taskiq.scaling.simulation.engine import RunState, Simulation
from dagster_taskiq.scaling.trigger import CHECK_INTERVAL_SECONDS

# An asynchronous invocation reaching a warm function.
INVOKE_SECONDS = 0.2
# One evaluation: SQS and ledger reads, ECS update.
EVALUATION_SECONDS = 0.3
# The scaler's asynchronous invocations are dropped after this long (the CDK construct's).
MAX_EVENT_AGE_SECONDS = 120.0
# Lambda retries a throttled asynchronous invocation after 1 s, then twice as long each time.
FIRST_RETRY_SECONDS = 1.0


@dataclass
class _Trigger:
    """One run's scale-out trigger (the executor keeps one per run)."""

    checked: float | None = None
    invoked: float | None = None


class TaskiqPolicy:
    protected = True

    def __init__(
        self,
        config: ScalingConfig,
        *,
        previous: bool = False,
        evaluations: int = 3,
        debounce_seconds: float = 30.0,
        phase: float = 7.0,
        name: str | None = None,
        floor_in_history: bool | None = None,
        shared_concurrency: bool | None = None,
        previous_trigger: bool | None = None,
        predictive: bool | None = None,
    ) -> None:
        """``previous`` sets every behaviour as it was; each flag can also be set alone, to
        measure what each change does."""
        self.name = name or ("taskiq-previous" if previous else "taskiq")
        self.floor_in_history = previous if floor_in_history is None else floor_in_history
        self.shared_concurrency = previous if shared_concurrency is None else shared_concurrency
        self.previous_trigger = previous if previous_trigger is None else previous_trigger
        self.predictive = not previous if predictive is None else predictive
        self.config = config
        self.evaluations = evaluations
        self.spacing = 60.0 / evaluations
        self.debounce = debounce_seconds
        self.phase = phase
        self.history: tuple[Recommendation, ...] = ()
        self._triggers: dict[str, _Trigger] = {}
        self._lock_until = 0.0  # evaluations run one at a time
        self._scheduled_until = -1.0  # the scheduled invocation holds a concurrency until then
        self._triggered_until = -1.0

    def start(self, sim: Simulation) -> None:
        sim.every(60.0, lambda: self._scheduled(sim), first=self.phase)

    def _scheduled(self, sim: Simulation) -> None:
        self._scheduled_until = sim.now + (self.evaluations - 1) * self.spacing + EVALUATION_SECONDS
        for index in range(self.evaluations):
            sim.at(sim.now + index * self.spacing, lambda: self._evaluate(sim))

    def _evaluate(self, sim: Simulation) -> None:
        if sim.now < self._lock_until:
            sim.at(self._lock_until, lambda: self._evaluate(sim))
            return
        self._lock_until = sim.now + EVALUATION_SECONDS
        sim.evaluated()
        seen = sim.observe()
        expected = 0
        step_seconds = None
        if self.predictive:
            step_seconds = seen.step_seconds
            expected = expected_soon(
                seen.expected,
                step_seconds=step_seconds,
                lead_seconds=self.config.scale_out_lead_seconds,
            )
        signals = QueueSignals(
            visible=seen.visible,
            delayed=0,
            in_flight=seen.in_flight,
            live_leases=seen.live_leases,
            expected=expected,
            step_seconds=step_seconds,
        )
        decision = decide(
            signals, current=sim.desired, config=self.config, history=self.history, now=sim.now
        )
        history = decision.history
        if self.floor_in_history and decision.recommendation is not None:
            # Then the recommendation kept for the window included the busy floor.
            floor = min(decision.busy_workers or 0, self.config.max_workers)
            last = history[-1]
            history = (*history[:-1], Recommendation(last.at, max(last.workers, floor)))
        self.history = history
        if decision.changed:
            sim.set_desired(decision.desired)

    # -- the executor's trigger --------------------------------------------------------------

    def steps_queued(self, sim: Simulation, run: RunState, count: int) -> None:
        trigger = self._triggers.setdefault(run.spec.run_id, _Trigger())
        now = sim.now
        if self.previous_trigger:
            if trigger.checked is not None and now - trigger.checked < self.debounce:
                return
            trigger.checked = now
            if sim.observe().running_workers > 0:
                return
        else:
            if trigger.invoked is not None and now - trigger.invoked < self.debounce:
                return
            if trigger.checked is not None and now - trigger.checked < CHECK_INTERVAL_SECONDS:
                return
            trigger.checked = now
            if sim.desired > 0:
                return
        trigger.invoked = now
        sent = now
        sim.at(now + INVOKE_SECONDS, lambda: self._invoked(sim, sent, FIRST_RETRY_SECONDS))

    def _invoked(self, sim: Simulation, sent: float, retry: float) -> None:
        if self.shared_concurrency:
            # One reserved concurrency: busy while the scheduled invocation runs its minute.
            busy = sim.now <= self._scheduled_until or sim.now <= self._triggered_until
            if busy:
                if sim.now + retry - sent <= MAX_EVENT_AGE_SECONDS:
                    sim.at(sim.now + retry, lambda: self._invoked(sim, sent, retry * 2))
                return
            self._triggered_until = sim.now + EVALUATION_SECONDS
        self._evaluate(sim)


class TargetTrackingPolicy:
    """Application Auto Scaling target tracking on a backlog-per-task metric.

    The metric (visible messages / running tasks, as AWS's SQS guidance builds it) is a
    one-minute average that reaches CloudWatch ``metric_delay`` after its minute ends. The
    policy's alarms: 3 datapoints above the target scale out to ``ceil(running * metric /
    target)``; 15 below 90 % of it scale in the same way. Cooldowns of 300 s: no scale-in
    within one of a scale-out or of the last scale-in; a further scale-out may come at any
    time. From zero running tasks, the metric divides by one; and since a backlog below the
    target never breaches it, a step-scaling alarm on visible messages (1 datapoint above
    zero) starts one task from zero, as AWS suggests for scaling from zero.
    """

    protected = True
    name = "target-tracking"

    def __init__(
        self,
        *,
        max_workers: int,
        target: float = 5.0,
        metric_delay: float = 60.0,
        cooldown: float = 300.0,
    ) -> None:
        self.max_workers = max_workers
        self.target = target
        self.delay = metric_delay
        self.cooldown = cooldown
        self._samples: list[tuple[float, int]] = []  # (backlog per task, visible)
        # (available at, backlog per task, visible), one per minute
        self._datapoints: deque[tuple[float, float, float]] = deque(maxlen=64)
        self._last_out = -math.inf
        self._last_in = -math.inf

    def start(self, sim: Simulation) -> None:
        sim.every(15.0, lambda: self._sample(sim), first=0.0)
        sim.every(60.0, lambda: self._minute(sim), first=60.0)

    def steps_queued(self, sim: Simulation, run: RunState, count: int) -> None:
        return

    def _sample(self, sim: Simulation) -> None:
        seen = sim.observe()
        self._samples.append((seen.visible / max(seen.running_workers, 1), seen.visible))

    def _minute(self, sim: Simulation) -> None:
        if self._samples:
            per_task = sum(value for value, _ in self._samples) / len(self._samples)
            visible = sum(v for _, v in self._samples) / len(self._samples)
            self._datapoints.append((sim.now + self.delay, per_task, visible))
            self._samples = []
        points = [(value, visible) for at, value, visible in self._datapoints if at <= sim.now]
        available = [value for value, _ in points]
        sim.evaluated()
        if sim.desired == 0 and points and points[-1][1] > 0:
            sim.set_desired(1)
            self._last_out = sim.now
            return
        if len(available) < 3:
            return
        running = max(sim.observe().running_workers, 1)
        latest = available[-1]
        wanted = min(self.max_workers, math.ceil(running * latest / self.target))
        if all(value > self.target for value in available[-3:]):
            if wanted > sim.desired:
                sim.set_desired(wanted)
                self._last_out = sim.now
            return
        low = available[-15:]
        if len(low) == 15 and all(value < 0.9 * self.target for value in low):
            if sim.now - self._last_out < self.cooldown or sim.now - self._last_in < self.cooldown:
                return
            wanted = math.ceil(sim.desired * latest / self.target)
            if wanted < sim.desired:
                sim.set_desired(wanted)
                self._last_in = sim.now


class KedaPolicy:
    """KEDA's aws-sqs-queue scaler with its defaults, and the HPA it drives.

    KEDA polls every 30 s: a queue with messages (visible or in flight) activates a
    deployment at zero; one with none for ``cooldown`` (300 s) goes back to zero. While
    active, the HPA syncs every 15 s: ``ceil((visible + in flight) / queueLength)`` replicas
    (queueLength 5; a ratio within 10 % of the target changes nothing), at most doubled or
    +4 per sync going up, and going down no lower than the highest recommendation of the last
    300 s. Pods have no scale-in protection: a busy pod may be removed.
    """

    protected = False
    name = "keda"

    def __init__(
        self,
        *,
        max_workers: int,
        queue_length: int = 5,
        polling: float = 30.0,
        cooldown: float = 300.0,
        stabilization: float = 300.0,
        sync: float = 15.0,
    ) -> None:
        self.max_workers = max_workers
        self.queue_length = queue_length
        self.polling = polling
        self.cooldown = cooldown
        self.stabilization = stabilization
        self.sync = sync
        self._last_active = -math.inf
        self._recommendations: deque[tuple[float, int]] = deque()

    def start(self, sim: Simulation) -> None:
        sim.every(self.polling, lambda: self._poll(sim), first=3.0)
        sim.every(self.sync, lambda: self._hpa(sim), first=11.0)

    def steps_queued(self, sim: Simulation, run: RunState, count: int) -> None:
        return

    def _messages(self, sim: Simulation) -> int:
        seen = sim.observe()
        return seen.visible + seen.in_flight

    def _poll(self, sim: Simulation) -> None:
        sim.evaluated()
        if self._messages(sim) > 0:
            self._last_active = sim.now
            if sim.desired == 0:
                sim.set_desired(1)
        elif sim.desired > 0 and sim.now - self._last_active >= self.cooldown:
            sim.set_desired(0)
            self._recommendations.clear()

    def _hpa(self, sim: Simulation) -> None:
        current = sim.desired
        if current == 0:
            return
        sim.evaluated()
        messages = self._messages(sim)
        ratio = messages / (current * self.queue_length)
        if abs(ratio - 1) <= 0.1:
            recommendation = current
        else:
            recommendation = math.ceil(messages / self.queue_length)
        recommendation = min(max(recommendation, 1), self.max_workers)
        now = sim.now
        self._recommendations.append((now, recommendation))
        while self._recommendations and self._recommendations[0][0] < now - self.stabilization:
            self._recommendations.popleft()
        if recommendation > current:
            desired = min(recommendation, max(2 * current, current + 4))
        else:
            desired = max(r for _, r in self._recommendations)
            desired = min(desired, current)
        if desired != current:
            sim.set_desired(desired)

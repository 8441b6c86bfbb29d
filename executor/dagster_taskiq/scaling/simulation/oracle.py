"""The oracle: a lower bound that knows every arrival.

Each step starts the moment it is queued while fewer than ``max_workers x steps_per_worker``
steps run (a worker was started ahead of it, exactly in time), so it waits only behind the
cap. Its cost packs the busy slots into as few workers as they fill, and keeps a worker idle
through a gap only when the gap is shorter than a worker's start, which a restart would cost.
"""

from __future__ import annotations

import math

from dagster_taskiq.scaling.simulation.engine import RunState, Sample, Simulation, Step, Worker
from dagster_taskiq.scaling.simulation.workload import Scenario


class OraclePolicy:
    name = "oracle"
    protected = True

    def start(self, sim: Simulation) -> None:
        return

    def steps_queued(self, sim: Simulation, run: RunState, count: int) -> None:
        return


class OracleSimulation(Simulation):
    def __init__(self, scenario: Scenario, *, seed: int) -> None:
        super().__init__(scenario, OraclePolicy(), seed=seed)
        slots = scenario.max_workers * scenario.steps_per_worker
        # One worker with every slot of the pool, always started: packing comes later.
        self._pool = Worker(0, requested_at=0.0, ready_at=0.0, slots=slots)
        self.workers = [self._pool]
        self.busy: list[tuple[float, int]] = [(0.0, 0)]
        self.worker_starts = 0
        self.worker_seconds = 0.0

    def _enqueue(self, step: Step) -> None:
        step.queued_at = self.now
        self.queue.append(step)

    def _start_step(self, step: Step, worker: Worker) -> None:
        super()._start_step(step, worker)
        self.busy.append((self.now, self.in_flight))

    def _step_ended(self, step: Step, attempt: int) -> None:
        super()._step_ended(step, attempt)
        self.busy.append((self.now, self.in_flight))

    def _after_worker_change(self, worker: Worker) -> None:
        return

    def _sample(self) -> None:
        workers = math.ceil(self.in_flight / self.scenario.steps_per_worker)
        self.samples.append(Sample(self.now, len(self.queue), self.in_flight, workers, workers))

    def run(self) -> OracleSimulation:
        super().run()
        self._cost()
        return self

    def _cost(self) -> None:
        """Worker-seconds of the busy profile: level k is a worker alive while at least k
        workers' worth of slots are busy; a gap shorter than a start is bridged."""
        per_worker = self.scenario.steps_per_worker
        start = self.scenario.mean_start_delay
        on_since: dict[int, float] = {}
        off_since: dict[int, float] = {}
        level = 0
        total = 0.0
        starts = 0
        for at, busy in self.busy:
            wanted = math.ceil(busy / per_worker)
            for k in range(level + 1, wanted + 1):  # levels switching on
                stopped = off_since.pop(k, None)
                if stopped is not None and at - stopped < start:
                    total += at - stopped  # bridged: idle through the gap
                else:
                    total += start  # started ahead, in time
                    starts += 1
                on_since[k] = at
            for k in range(wanted + 1, level + 1):  # levels switching off
                total += at - on_since.pop(k)
                off_since[k] = at
            level = wanted
        self.worker_seconds = total
        self.worker_starts = starts
        self.changes = starts

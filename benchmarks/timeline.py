"""Where a run's wall time goes, from its own event log: ``python -m benchmarks.timeline
sleep_20``.

Runs the workload on the local stack (one warm worker with 2 step processes, as ``make
bench`` does) after an untimed warm-up and reads each timed run's events back. Every
event's timestamp is taken where it is written, so the gaps between them place the time:

- the run's start: ``execute_job`` called, to the first step started;
- each step's preamble in its step process: STEP_WORKER_STARTED to STEP_START;
- each step's ending: its first output (or the ending itself) to STEP_SUCCESS;
- the hand-over between steps: to each start after the first two, from the last step
  success before it (the freed slot's receive, vetting and claim, then the preamble);
- the run's end: the last step's success to ``execute_job`` returning.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dagster import DagsterEventType, DagsterInstance

from benchmarks.harness import bench_stack, timed_run

CONCURRENCY = 2  # step processes of the one worker


@dataclass(frozen=True)
class Event:
    at: float
    kind: DagsterEventType | None
    step_key: str | None


def events_of(instance: DagsterInstance, run_id: str) -> list[Event]:
    records = instance.get_records_for_run(run_id, limit=1_000_000).records
    return [
        Event(
            r.event_log_entry.timestamp,
            r.event_log_entry.dagster_event_type,
            r.event_log_entry.step_key,
        )
        for r in records
    ]


def _first(events: Sequence[Event], kind: DagsterEventType) -> dict[str, float]:
    found: dict[str, float] = {}
    for event in events:
        if event.kind is kind and event.step_key is not None:
            found.setdefault(event.step_key, event.at)
    return found


def phases(events: Sequence[Event], called: float, returned: float) -> dict[str, list[float]]:
    """Seconds spent in each phase: one figure per run phase, one per step for the rest."""
    started = _first(events, DagsterEventType.STEP_START)
    worker_started = _first(events, DagsterEventType.STEP_WORKER_STARTED)
    succeeded = _first(events, DagsterEventType.STEP_SUCCESS)
    first_output = _first(events, DagsterEventType.STEP_OUTPUT)
    endings = sorted(succeeded.values())
    starts = sorted(started.values())
    hand_overs = []
    for start in starts[CONCURRENCY:]:
        freed = bisect.bisect_right(endings, start)  # endings up to this start
        if freed:
            hand_overs.append(start - endings[freed - 1])
    return {
        "run start (called to first step started)": [starts[0] - called],
        "step preamble (worker started to step start)": [
            started[k] - worker_started[k] for k in started if k in worker_started
        ],
        "step ending (first output to success)": [
            succeeded[k] - first_output.get(k, succeeded[k]) for k in succeeded
        ],
        "hand-over (success to next start)": hand_overs,
        "run end (last success to returned)": [returned - endings[-1]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload", choices=("fanout_100", "chain_20", "sleep_20", "fanout_1000"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    collected: dict[str, list[float]] = {}
    walls = []
    with contextlib.ExitStack() as exits:
        _, stack, instance = bench_stack(exits)
        stack.worker_pool(concurrency=CONCURRENCY).scale_to(1)
        timed_run(instance, args.workload, "taskiq", {})  # warm-up
        for _ in range(args.runs):
            called = time.time()
            walls.append(timed_run(instance, args.workload, "taskiq", {}))
            run = instance.get_runs(limit=1)[0]
            for phase, seconds in phases(
                events_of(instance, run.run_id), called, called + walls[-1]
            ).items():
                collected.setdefault(phase, []).extend(seconds)
    print(f"{args.workload}: {args.runs} runs, wall median {statistics.median(walls):.3f} s")
    print(f"{'phase':<48}{'n':>5}{'median ms':>11}{'p90 ms':>9}")
    for phase, seconds in collected.items():
        ordered = sorted(seconds)
        p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
        median_ms, p90_ms = statistics.median(ordered) * 1000, p90 * 1000
        print(f"{phase:<48}{len(ordered):>5}{median_ms:>11.1f}{p90_ms:>9.1f}")


if __name__ == "__main__":
    main()

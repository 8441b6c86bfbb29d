"""The benchmark jobs, one per workload and executor, made by a module-level
function so that every executor (multiprocess, celery, taskiq) can rebuild them in
another process.

- ``fanout_100``: 100 independent trivial ops and a fan-in;
- ``chain_20``: 20 trivial ops in a line;
- ``sleep_20``: 20 independent ops that sleep 1 s;
- ``fanout_1000``: 1000 trivial ops and a fan-in (this executor alone);
- ``wait_10``: one op that sleeps 10 s (a run waiting on a long step, for
  ``benchmarks.launches``).
"""

# No ``from __future__ import annotations``: Dagster reads the op signatures' types.
import time

from dagster import (
    ExecutorDefinition,
    GraphDefinition,
    JobDefinition,
    OpDefinition,
    build_reconstructable_job,
    graph,
    in_process_executor,
    multiprocess_executor,
    op,
)
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster_celery import celery_executor

from dagster_taskiq import taskiq_executor


@op
def trivial() -> int:
    return 1


@op
def snooze() -> int:
    time.sleep(1.0)
    return 1


@op
def fan_in(values: list[int]) -> int:
    return sum(values)


@op
def link(previous: int) -> int:
    return previous + 1


def _fanout(name: str, width: int, body: OpDefinition) -> GraphDefinition:
    @graph(name=name)
    def fanout() -> None:
        fan_in([body.alias(f"{body.name}_{i}")() for i in range(width)])

    return fanout


@graph
def chain_20() -> None:
    value = trivial()
    for i in range(19):
        value = link.alias(f"link_{i + 1}")(value)


@graph
def sleep_20() -> None:
    for i in range(20):
        snooze.alias(f"snooze_{i}")()


@graph
def single() -> None:
    trivial()


@op
def long_nap() -> int:
    time.sleep(10.0)
    return 1


@graph
def wait_10() -> None:
    long_nap()


GRAPHS = {
    "single": single,  # one step: pick-up latency
    "fanout_100": _fanout("fanout_100", 100, trivial),
    "chain_20": chain_20,
    "sleep_20": sleep_20,
    "fanout_1000": _fanout("fanout_1000", 1000, trivial),
    "wait_10": wait_10,
}
EXECUTORS: dict[str, ExecutorDefinition] = {
    "in_process": in_process_executor,
    "multiprocess": multiprocess_executor.configured({"max_concurrent": 2}),
    "celery": celery_executor,
    "taskiq": taskiq_executor,
}


def make_job(workload: str, peer: str) -> JobDefinition:
    return GRAPHS[workload].to_job(name=f"{workload}__{peer}", executor_def=EXECUTORS[peer])


def reconstructable_job(workload: str, peer: str) -> ReconstructableJob:
    """The job, as another process (a step worker, a celery task) rebuilds it."""
    # Dagster annotates the arguments as a 1-tuple; any tuple of serializable values works.
    return build_reconstructable_job(__name__, "make_job", (workload, peer))  # type: ignore[arg-type]

"""The picture of a load run: queue, workers and throughput over time, faults marked."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from dagster_taskiq.load.faults import FaultMark
from dagster_taskiq.load.samples import Sample

FAULT_COLOURS = {
    "kill_worker": "tab:red",
    "partition": "tab:purple",
    "sqs_outage": "tab:orange",
    "restart_database": "tab:brown",
    "duplicates": "tab:olive",
}


def steps_per_second(samples: Sequence[Sample]) -> list[float | None]:
    """Finished step attempts per second between consecutive samples."""
    rates: list[float | None] = [None]
    for before, after in itertools.pairwise(samples):
        if before.steps_finished is None or after.steps_finished is None:
            rates.append(None)
            continue
        elapsed = max(after.at - before.at, 1e-6)
        rates.append(max(0.0, (after.steps_finished - before.steps_finished) / elapsed))
    return rates


def draw(samples: Sequence[Sample], faults: Sequence[FaultMark], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    start = samples[0].at if samples else 0.0
    t = [s.at - start for s in samples]
    fig, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(11, 8))
    fig.suptitle(title)

    def series(values: Sequence[int | float | None]) -> list[float]:
        return [float("nan") if v is None else float(v) for v in values]

    top.plot(t, series([s.queue_visible for s in samples]), label="queue depth (waiting)")
    top.plot(t, series([s.queue_in_flight for s in samples]), label="in flight")
    top.plot(t, series([s.live_leases for s in samples]), label="live leases", linestyle=":")
    top.set_ylabel("messages")
    desired = series([s.desired_workers for s in samples])
    middle.step(t, desired, where="post", label="desired", linestyle="--", linewidth=2)
    middle.step(t, series([s.running_workers for s in samples]), where="post", label="running")
    middle.set_ylabel("workers")
    bottom.plot(t, series(steps_per_second(samples)), label="steps finished per second")
    bottom.set_ylabel("steps / s")
    bottom.set_xlabel("seconds since the load began")

    seen: set[str] = set()
    for mark in faults:
        x = mark.at - start
        colour = FAULT_COLOURS.get(mark.kind, "tab:gray")
        for axis in (top, middle, bottom):
            if mark.seconds > 0:
                axis.axvspan(x, x + mark.seconds, color=colour, alpha=0.15)
            else:
                axis.axvline(x, color=colour, linestyle="--", linewidth=1)
        if mark.kind not in seen:  # one legend entry per kind of fault
            seen.add(mark.kind)
            top.plot([], [], color=colour, linestyle="--", label=mark.kind.replace("_", " "))
    for axis in (top, middle, bottom):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper right", fontsize="small")
        axis.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

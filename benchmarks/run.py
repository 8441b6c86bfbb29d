"""``make bench``: the same jobs, in one run, on Dagster's in-process and multiprocess
executors, dagster-celery and this executor, all on the same PostgreSQL instance storage.

Writes ``benchmarks/results/latest.json`` and ``latest.png`` and prints the ratios of
this executor to each peer. Peers run in turns, each after an untimed warm-up run, with
2-way parallelism each: multiprocess ``max_concurrent`` 2, a celery worker with
concurrency 2, one taskiq worker with 2 step processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from dagster import DagsterInstance, execute_job

from benchmarks import worker_memory
from benchmarks.cpu import STEPS, CpuClock, per_step_ms
from benchmarks.harness import QUIET, REPO_ROOT, bench_stack, timed_run
from benchmarks.jobs import reconstructable_job
from benchmarks.launches import measure as launch_figures
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.local.stack import LocalStack

RESULTS = REPO_ROOT / "benchmarks" / "results"
WORKLOADS = ("fanout_100", "chain_20", "sleep_20")
# And the one this executor alone runs (the others would take most of an hour on it).
ALL_WORKLOADS = (*WORKLOADS, "fanout_1000")
# Their CPU per step is reported by part of the stack (benchmarks.cpu).
FANOUTS = ("fanout_100", "fanout_1000")
# Top-level keys of the report that benchmarks.launches measures.
LAUNCH_KEYS = (
    "launch_steps_per_s",
    "launch_steps_per_s_before",
    "statements_per_waiting_run_per_s",
    "statements_per_waiting_run_per_s_before",
)
PEERS = ("in_process", "multiprocess", "celery", "taskiq")
ENV_REDIS_URL = "DAGSTER_TASKIQ_BENCH_REDIS_URL"


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# -- celery on Redis ------------------------------------------------------------------


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_broker() -> Iterator[tuple[str | None, str]]:
    """A Redis URL, or None and the reason there is none."""
    url = os.environ.get(ENV_REDIS_URL, "redis://127.0.0.1:6379/9")
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    if _redis_answers(host, int(port)):
        yield url, f"Redis at {url}"
        return
    server = shutil.which("redis-server")
    if server is None:
        yield None, f"no Redis answers at {url} and no redis-server to start"
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    process = subprocess.Popen(
        [server, "--port", str(free), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers("127.0.0.1", free):
            if time.monotonic() > deadline:
                yield None, "redis-server did not start"
                return
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{free}/0", f"redis-server started on port {free}"
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def celery_worker(broker: str, root: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A dagster_celery.app worker`` with concurrency 2, as dagster-celery's
    ``worker start`` runs it, configured by a ``dagster_celery_config`` module."""
    config_dir = root / "celery_config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "dagster_celery_config.py").write_text(
        f"broker_url = {broker!r}\nresult_backend = {broker!r}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(config_dir), str(REPO_ROOT)])}
    command = [
        sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker",
        "--prefetch-multiplier=1", "-Q", "dagster", "--concurrency", "2",
        "--loglevel", "WARNING", "-n", f"bench-{os.getpid()}@%h",
    ]  # fmt: skip
    with open(root / "logs" / "celery-worker.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        from celery import Celery

        probe = Celery(broker=broker, backend=broker)
        deadline = time.monotonic() + 60
        while not probe.control.ping(timeout=1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the celery worker did not start; see celery-worker.log")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# -- measuring ------------------------------------------------------------------------


def figures(seconds: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(seconds), 3),
        "min_s": round(min(seconds), 3),
        "max_s": round(max(seconds), 3),
        "runs_s": [round(s, 3) for s in seconds],
    }


def pickup_latency_ms(
    instance: DagsterInstance, stack: LocalStack, samples: int
) -> dict[str, float]:
    """Enqueue to step start on an idle warm worker, from the ledger's two timestamps
    (both from the database clock)."""
    ledger = Ledger(stack.database_url, pool_size=1)
    latencies = []
    try:
        for _ in range(samples):
            time.sleep(0.5)  # the worker idles, long-polling
            result = execute_job(
                reconstructable_job("single", "taskiq"),
                instance=instance,
                run_config=QUIET,
            )
            (record,) = ledger.for_run(result.run_id)
            assert record.started_at is not None
            latencies.append((record.started_at - record.enqueued_at).total_seconds() * 1000)
    finally:
        ledger.dispose()
    ordered = sorted(latencies)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p95": round(statistics.quantiles(ordered, n=20, method="inclusive")[18], 1),
        "samples": len(ordered),
    }


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return round(float(total) / 2**20, 1)


def memory_by_process_mb(pid: int) -> list[dict[str, Any]]:
    """RSS, PSS and USS of the worker and each of its children: summed RSS counts the
    pages the processes share (the interpreter, shared libraries) once per process."""
    process = psutil.Process(pid)
    rows = []
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = each.memory_full_info()
            rows.append(
                {
                    "pid": each.pid,
                    "role": _role(each, pid),
                    "rss": round(info.rss / 2**20, 1),
                    "pss": round(getattr(info, "pss", info.uss) / 2**20, 1),
                    "uss": round(info.uss / 2**20, 1),
                }
            )
    return rows


def _role(process: psutil.Process, worker_pid: int) -> str:
    return worker_memory.role(process, worker_pid)


# -- the run --------------------------------------------------------------------------


def run(
    reps: int,
    peers: tuple[str, ...],
    pickup_samples: int,
    workloads: tuple[str, ...] = ALL_WORKLOADS,
    launches: bool = True,
) -> dict[str, Any]:
    report: dict[str, Any] = {"workloads": {}, "skipped": {}, "reps": reps}
    with contextlib.ExitStack() as exits:
        root, stack, instance = bench_stack(exits)
        configs: dict[str, dict[str, Any]] = {p: {} for p in peers}
        if "celery" in peers:
            broker, why = exits.enter_context(redis_broker())
            if broker is None:
                report["skipped"]["celery"] = why
                say(f"celery skipped: {why}")
            else:
                say(f"celery on {why}")
                exits.enter_context(celery_worker(broker, root))
                configs["celery"] = {"execution": {"config": {"broker": broker, "backend": broker}}}
        worker_pid = None
        cpu: dict[str, dict[str, float]] = {}
        if "taskiq" in peers:
            pool = stack.worker_pool(concurrency=2)
            pool.scale_to(1)
            worker_pid = pool.processes[0].pid
        active = [p for p in peers if p not in report["skipped"]]
        for peer in active:
            say(f"warming up {peer}")
            timed_run(instance, "chain_20", peer, configs[peer])
        clock = CpuClock.for_stack(root, worker_pid) if worker_pid is not None else None
        # fanout_1000 on this executor alone.
        runs = [(w, active) for w in WORKLOADS if w in workloads]
        if "taskiq" in active and "fanout_1000" in workloads:
            runs.append(("fanout_1000", ["taskiq"]))
        for workload, peers_run in runs:
            report["workloads"][workload] = {}
            for peer in peers_run:
                timed_cpu = clock if peer == "taskiq" and workload in FANOUTS else None
                if timed_cpu is not None:
                    timed_cpu.start()
                seconds = []
                for rep in range(reps):
                    seconds.append(timed_run(instance, workload, peer, configs[peer]))
                    say(f"{workload} on {peer}, run {rep + 1}: {seconds[-1]:.2f} s")
                report["workloads"][workload][peer] = figures(seconds)
                if timed_cpu is not None:
                    cpu[workload] = per_step_ms(timed_cpu.elapsed(), STEPS[workload] * reps)
        if cpu:
            # Where a step's cost goes, on this executor (see benchmarks.cpu).
            report["cpu_ms_per_step"] = cpu
        if "taskiq" in active:
            if pickup_samples > 0:
                report["pickup_latency_ms"] = pickup_latency_ms(instance, stack, pickup_samples)
            time.sleep(2)  # idle
            assert worker_pid is not None
            report["worker_idle_rss_mb"] = rss_mb(worker_pid)
            report["worker_idle_memory_mb"] = memory_by_process_mb(worker_pid)
            # worker_idle_pss_mb (by role too) and step_process_ready_ms, top-level keys.
            report.update(worker_memory.measure(instance, stack, worker_pid=worker_pid))
        if "taskiq" in active and launches:
            # Last: the launches stop the worker pool for a while.
            say("launch throughput and statements per waiting run (benchmarks.launches)")
            measured = launch_figures(instance, stack, root, pool)
            report.update({key: measured.pop(key) for key in LAUNCH_KEYS})
            report["launches"] = measured
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    return report


# -- the ratios, the targets and the chart --------------------------------------------


def ratio(report: dict[str, Any], workload: str, peer: str) -> float | None:
    row = report["workloads"].get(workload, {})
    if "taskiq" not in row or peer not in row:
        return None
    return round(float(row["taskiq"]["median_s"]) / float(row[peer]["median_s"]), 3)


def per_step_ratio(report: dict[str, Any]) -> float | None:
    rows = report["workloads"]
    if "taskiq" not in rows.get("fanout_1000", {}) or "taskiq" not in rows.get("fanout_100", {}):
        return None
    big = float(rows["fanout_1000"]["taskiq"]["median_s"]) / STEPS["fanout_1000"]
    small = float(rows["fanout_100"]["taskiq"]["median_s"]) / STEPS["fanout_100"]
    return round(big / small, 3)


def launch_ratio(report: dict[str, Any]) -> float | None:
    after, before = report.get("launch_steps_per_s"), report.get("launch_steps_per_s_before")
    if not after or not before:
        return None
    return round(float(after) / float(before), 2)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    at_most = [
        ("fanout_100 vs celery", ratio(report, "fanout_100", "celery"), 0.5),
        ("fanout_100 vs in_process", ratio(report, "fanout_100", "in_process"), 1.5),
        ("chain_20 vs in_process", ratio(report, "chain_20", "in_process"), 1.3),
        ("sleep_20 vs celery", ratio(report, "sleep_20", "celery"), 0.8),
        ("fanout_1000 per step vs fanout_100", per_step_ratio(report), 0.7),
        (
            "statements per waiting run per s",
            report.get("statements_per_waiting_run_per_s"),
            1.0,
        ),
        ("pick-up p50 ms", report.get("pickup_latency_ms", {}).get("p50"), 100.0),
        ("idle worker PSS MB", report.get("worker_idle_pss_mb"), 200.0),
        ("step process ready after recycle p50 ms", report.get("step_process_ready_ms"), 100.0),
    ]
    at_least = [("launch steps per s vs before", launch_ratio(report), 10.0)]
    return [
        {"target": name, "value": value, "at_most": bound, "holds": value <= bound}
        for name, value, bound in at_most
        if value is not None
    ] + [
        {"target": name, "value": value, "at_least": bound, "holds": value >= bound}
        for name, value, bound in at_least
        if value is not None
    ]


def print_table(report: dict[str, Any]) -> None:
    peers = [p for p in PEERS if p != "taskiq"]
    print("| workload | " + " | ".join(f"{p} median s" for p in PEERS) + " | "
          + " | ".join(f"taskiq / {p}" for p in peers) + " |")  # fmt: skip
    print("|---" * (len(PEERS) + len(peers) + 1) + "|")
    for workload, row in report["workloads"].items():
        cells = [f"{row[p]['median_s']:.2f}" if p in row else "-" for p in PEERS]
        ratios = [ratio(report, workload, p) for p in peers]
        shown = [f"{r:.2f}x" if r is not None else "-" for r in ratios]
        print(f"| {workload} | " + " | ".join(cells) + " | " + " | ".join(shown) + " |")
    print()
    for check in report["targets"]:
        mark = "holds" if check["holds"] else "MISSED"
        bound = (
            f"at least {check['at_least']}"
            if "at_least" in check
            else f"at most {check['at_most']}"
        )
        print(f"- {check['target']}: {check['value']} ({bound}): {mark}")
    for peer, why in report["skipped"].items():
        print(f"- {peer} skipped: {why}")
    by_role = report.get("worker_idle_pss_mb_by_role", {})
    if by_role:
        parts = ", ".join(f"{name} {mb}" for name, mb in by_role.items())
        print(f"- idle worker PSS by role (MB): {parts}")
    for row in report.get("worker_idle_memory_mb", []):
        sizes = f"RSS {row['rss']} MB, PSS {row['pss']} MB, USS {row['uss']} MB"
        print(f"- idle {row['role']}: {sizes}")
    for workload, parts in report.get("cpu_ms_per_step", {}).items():
        costs = ", ".join(f"{part} {ms}" for part, ms in parts.items())
        print(f"- CPU ms per step, {workload} on taskiq: {costs}")
    by_round = report.get("launches", {}).get("launch_ratio_by_round")
    if by_round:
        print(f"- launch steps per s vs before, by round: {by_round}")


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(report["workloads"])
    fig, grid = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 4), squeeze=False)
    axes = grid[0]
    for axis, workload in zip(axes, workloads, strict=True):
        row = report["workloads"][workload]
        names = [p for p in PEERS if p in row]
        medians = [row[p]["median_s"] for p in names]
        errors = [
            [row[p]["median_s"] - row[p]["min_s"] for p in names],
            [row[p]["max_s"] - row[p]["median_s"] for p in names],
        ]
        colours = ["tab:green" if p == "taskiq" else "tab:gray" for p in names]
        axis.bar(names, medians, yerr=errors, color=colours, capsize=4)
        axis.set_title(workload)
        axis.set_ylabel("seconds (median, min-max)")
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle("dagster-taskiq and its peers, one run on one machine")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--pickup-samples", type=int, default=20, help="0: none")
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help="a subset, for a quick look (fanout_1000 runs on taskiq alone)",
    )
    parser.add_argument(
        "--no-launches",
        action="store_true",
        help="without launch throughput and statements per waiting run",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    peers = tuple(p for p in args.peers.split(",") if p)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = set(peers) - set(PEERS)
    if unknown or args.reps < 1 or set(workloads) - set(ALL_WORKLOADS):
        parser.error(f"--peers from {PEERS}; --workloads from {ALL_WORKLOADS}")
    report = run(args.reps, peers, args.pickup_samples, workloads, not args.no_launches)
    report["targets"] = targets(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    draw(report, args.output.with_suffix(".png"))
    print_table(report)
    say(f"written to {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()

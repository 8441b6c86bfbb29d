"""A job whose next steps are known while its root runs: the executor records them."""

# No ``from __future__ import annotations``: Dagster reads the op's config annotation.
import time

from dagster import Config, job, op

from dagster_taskiq import taskiq_executor

FAN_OUT = 6


class RootConfig(Config):
    seconds: float = 4.0


@op
def slow_root(config: RootConfig) -> int:
    time.sleep(config.seconds)
    return 1


def _leaf(index: int) -> object:
    @op(name=f"leaf_{index}")
    def leaf(value: int) -> int:
        return value + index

    return leaf


LEAVES = [_leaf(i) for i in range(FAN_OUT)]


@job(executor_def=taskiq_executor)
def fan_out_job() -> None:
    value = slow_root()
    for leaf in LEAVES:
        leaf(value)  # type: ignore[operator]

"""The demo job: a fan-out and fan-in of 28 steps, one of them retried once.

``dagster dev -m dagster_taskiq.local.demo_job`` serves it in the Dagster UI; the
executor and the workers take their endpoints from the environment the local stack sets.
"""

import time

from dagster import (
    Definitions,
    Failure,
    OpDefinition,
    OpExecutionContext,
    RetryPolicy,
    job,
    op,
)

from dagster_taskiq import taskiq_executor

FAN_OUT = 24


@op
def seed() -> list[int]:
    return list(range(1, FAN_OUT + 1))


def _square(index: int) -> OpDefinition:
    @op(name=f"square_{index}")
    def square(context: OpExecutionContext, numbers: list[int]) -> int:
        time.sleep(0.05)  # a little work, so the two workers share it
        value = numbers[index] ** 2
        context.log.info(f"{numbers[index]}^2 = {value}")
        return value

    return square


SQUARES = [_square(i) for i in range(FAN_OUT)]


@op(retry_policy=RetryPolicy(max_retries=2, delay=0.5))
def flaky(context: OpExecutionContext, numbers: list[int]) -> int:
    if context.retry_number == 0:
        raise Failure("flaky fails on its first attempt, on purpose; the retry succeeds")
    return len(numbers)


@op
def total(context: OpExecutionContext, squares: list[int], count: int) -> int:
    result = sum(squares)
    context.log.info(f"sum of {count} squares = {result}")
    return result


@op
def check(result: int) -> None:
    expected = sum(n * n for n in range(1, FAN_OUT + 1))
    if result != expected:
        raise Failure(f"expected {expected}, got {result}")


@job(executor_def=taskiq_executor)
def demo_job() -> None:
    numbers = seed()
    check(total([square(numbers) for square in SQUARES], flaky(numbers)))


defs = Definitions(jobs=[demo_job])

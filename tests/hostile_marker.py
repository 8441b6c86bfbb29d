"""Code no test worker may load: importing this module leaves a file behind.

Tests name it in runs and in messages; the test workers' code location is ``tests.jobs``
only, so a worker that imported it (or ran its job) would write to the file named by
``DAGSTER_TASKIQ_TEST_MARKER_FILE`` in its environment.
"""

import os

from dagster import job, op

ENV_MARKER_FILE = "DAGSTER_TASKIQ_TEST_MARKER_FILE"


def _mark(what: str) -> None:
    path = os.environ.get(ENV_MARKER_FILE)
    if path:
        with open(path, "a") as marker:
            marker.write(f"{what} in process {os.getpid()}\n")


_mark("imported")


@op
def touch() -> None:
    _mark("executed")


@job
def marker_job() -> None:
    touch()

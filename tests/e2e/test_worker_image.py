"""The worker image's entrypoint and dagster.yaml, run outside Docker on the local stack.

No Docker engine here: the test takes the image's ENTRYPOINT and dagster.yaml as they
are and runs them with the environment the ECS task definition gives the container,
reaching PostgreSQL over TCP as a Fargate task reaches Aurora.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.core.ledger import Ledger, Status
from dagster_taskiq.local.stack import LocalStack
from dagster_taskiq.local.tcp_proxy import TcpProxy, postgres_target, tcp_proxy
from tests import jobs
from tests.conftest import REPO_ROOT, TEST_CODE_LOCATION
from tests.helpers import finished_records

IMAGE = REPO_ROOT / "worker_image"


def entrypoint() -> list[str]:
    for line in (IMAGE / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            command: list[str] = json.loads(line.removeprefix("ENTRYPOINT "))
            return command
    raise AssertionError("the Dockerfile has no exec-form ENTRYPOINT")


@pytest.fixture
def postgres_over_tcp(stack: LocalStack) -> Iterator[tuple[TcpProxy, str, str]]:
    """A TCP address for the stack's database (the URL names a socket or a host)."""
    parts = urlsplit(stack.database_url)
    with tcp_proxy(postgres_target(stack.database_url)) as proxy:
        yield proxy, parts.path.lstrip("/"), parts.username or "postgres"


def test_the_image_entrypoint_and_dagster_yaml_run_a_worker(
    stack: LocalStack,
    instance: DagsterInstance,
    ledger: Ledger,
    postgres_over_tcp: tuple[TcpProxy, str, str],
    tmp_path: Path,
) -> None:
    proxy, database, user = postgres_over_tcp
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(IMAGE / "dagster.yaml", home / "dagster.yaml")
    # What the ECS task definition sets (the password comes from the secret there).
    container_env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": str(REPO_ROOT),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(proxy.port),
        "DAGSTER_PG_DB": database,
        "DAGSTER_PG_USER": user,
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_TASKIQ_QUEUE_URL": stack.queue_url,
        "DAGSTER_TASKIQ_CODE_LOCATIONS": TEST_CODE_LOCATION,
        "DAGSTER_TASKIQ_CONCURRENCY": "1",
        "DAGSTER_TASKIQ_DATABASE_URL": f"postgresql://{user}@127.0.0.1:{proxy.port}/{database}",
        "AWS_ENDPOINT_URL_SQS": stack.sqs_endpoint,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [*entrypoint(), "--wait-seconds", "1"],
            env=container_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        result = execute_job(reconstructable(jobs.outputs_job), instance=instance)
        assert result.success, log.read_text()
        rows = jobs.execution_rows(result.run_id)
        assert {r["worker_pid"] for r in rows} == {worker.pid}
        assert [r.status for r in finished_records(ledger, result.run_id)] == [Status.SUCCEEDED] * 3
    finally:
        worker.terminate()
        assert worker.wait(60) == 0, log.read_text()
    assert "Worker starting" in log.read_text()
    assert os.environ.get("DAGSTER_PG_PASSWORD") is None, "nothing leaked into the test"

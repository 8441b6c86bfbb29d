"""The doctor's parts that need no stack: the canary's place in the allow-list, the report's
lines, where its settings come from, its deadline, and the local Lambda's dry run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from dagster import job, op, reconstructable
from dagster._utils.interrupts import capture_interrupts, check_captured_interrupt

from dagster_taskiq.core.settings import (
    ENV_ECS_SERVICE,
    ENV_QUEUE_URL,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    ENV_STACK_OUTPUTS,
)
from dagster_taskiq.local.endpoints import LambdaEndpoint
from dagster_taskiq.operations.doctor import canary_job as canary
from dagster_taskiq.operations.doctor.canary import _interrupt_after
from dagster_taskiq.operations.doctor.checks import CheckResult, Outcome, failed, passed, skipped
from dagster_taskiq.operations.doctor.command import load_executor_config, render
from dagster_taskiq.operations.doctor.run import DoctorReport, deployment_defaults
from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.origins import CANARY_MODULE, origin_allowed


@op
def other_op() -> None:
    pass


@job
def other_job() -> None:
    other_op()


# -- the canary in the allow-list ---------------------------------------------------------------


def test_every_worker_accepts_the_canary_whatever_its_code_locations() -> None:
    assert canary.__name__ == CANARY_MODULE
    origin = reconstructable(canary.canary_job).get_python_origin()

    assert origin_allowed(origin, ()) is None
    assert origin_allowed(origin, (CodeLocation("my_project.definitions"),)) is None


def test_the_canary_opens_the_allow_list_to_nothing_else() -> None:
    origin = reconstructable(other_job).get_python_origin()

    refusal = origin_allowed(origin, (CodeLocation("my_project.definitions"),))

    assert refusal is not None and "tests.unit.test_doctor" in refusal


# -- the report -------------------------------------------------------------------------------


def test_one_line_per_check_with_the_fix_of_a_failure() -> None:
    report = DoctorReport(
        "local stack /somewhere",
        [
            passed("ledger", "revision 0003, current"),
            failed("queue default", "No queue q", "Set queue_url."),
            skipped("canary", "Not sent: fix queue default first."),
        ],
    )

    assert render(report).splitlines() == [
        "dagster-taskiq doctor: local stack /somewhere",
        "PASS  ledger         revision 0003, current",
        "FAIL  queue default  No queue q Fix: Set queue_url.",
        "SKIP  canary         Not sent: fix queue default first.",
        "1 passed, 1 failed, 1 skipped: not ready",
    ]
    assert not report.ok
    document = report.to_json()
    assert document["ok"] is False
    assert document["checks"][1] == {
        "name": "queue default",
        "status": "FAIL",
        "ok": False,
        "detail": "No queue q",
        "fix": "Set queue_url.",
        "data": {},
    }


def test_a_skipped_check_does_not_fail_the_doctor() -> None:
    assert CheckResult("signing key", Outcome.SKIP, "none").ok
    assert DoctorReport("x", [passed("a", "ok"), skipped("b", "later")]).ok


# -- where the settings come from ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "max_receive_count: 3\nqueue_url: {env: QUEUE}\n",
        "execution:\n  config:\n    max_receive_count: 3\n    queue_url: {env: QUEUE}\n",
    ],
)
def test_the_executor_config_is_read_bare_or_from_a_run_config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)

    assert load_executor_config(path) == {"max_receive_count": 3, "queue_url": {"env": "QUEUE"}}


def test_a_stack_outputs_file_gives_the_executor_variables(tmp_path: Path) -> None:
    outputs = {
        "QueueUrl": "https://sqs.eu-west-1.amazonaws.com/1/q",
        "EcsServiceName": "workers",
        "SigningKeySecretArn": "arn:aws:secretsmanager:eu-west-1:1:secret:k",
        "AlertTopicArn": "arn:aws:sns:eu-west-1:1:alerts",
    }
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"DagsterTaskiq": outputs}))

    defaults = deployment_defaults({ENV_STACK_OUTPUTS: str(path)})

    assert defaults == {
        ENV_QUEUE_URL: outputs["QueueUrl"],
        ENV_ECS_SERVICE: "workers",
        ENV_SIGNING_KEY_SECRET_ARN: outputs["SigningKeySecretArn"],
    }
    # A key already in the environment is not joined by the stack's secret: the executor
    # would refuse both.
    given = deployment_defaults({ENV_STACK_OUTPUTS: str(path), ENV_SIGNING_KEY: "k"})
    assert ENV_SIGNING_KEY_SECRET_ARN not in given


# -- the canary's deadline --------------------------------------------------------------------


def test_the_deadline_interrupts_a_run_as_ctrl_c_would() -> None:
    started = time.monotonic()
    # As Dagster's executor loop: inside its own capture, it polls for an interrupt.
    with _interrupt_after(0.2) as fired, capture_interrupts():
        while not check_captured_interrupt() and time.monotonic() - started < 10:
            time.sleep(0.01)
        seen = check_captured_interrupt()
    assert fired.is_set() and seen
    assert time.monotonic() - started < 5


def test_the_deadline_does_not_fire_after_the_run() -> None:
    with _interrupt_after(5.0) as fired:
        pass
    time.sleep(0.1)
    assert not fired.is_set()


# -- the local Lambda endpoint's dry run --------------------------------------------------------


def test_the_local_lambda_endpoint_answers_a_dry_run_without_running_the_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    endpoint = LambdaEndpoint()
    calls: list[Any] = []
    endpoint.register("scaler", calls.append)
    try:
        client = boto3.client("lambda", region_name="us-east-1", endpoint_url=endpoint.url)
        answer = client.invoke(FunctionName="scaler", InvocationType="DryRun", Payload=b"{}")
        assert answer["StatusCode"] == 204
        assert calls == [] and endpoint.invocations == []
        with pytest.raises(ClientError) as missing:
            client.invoke(FunctionName="nope", InvocationType="DryRun", Payload=b"{}")
        assert missing.value.response["Error"]["Code"] == "ResourceNotFoundException"
    finally:
        endpoint.close()


def test_the_command_imports_no_dagster() -> None:
    code = (
        "import sys, dagster_taskiq.operations.doctor.command\n"
        "print(','.join(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == ""

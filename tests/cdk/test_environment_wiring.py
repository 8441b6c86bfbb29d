"""Every variable the deployed code reads is in the template, and every one the template sets
is read: each ECS container's and Lambda function's environment (and its secrets' names),
as deployed, goes through that component's own settings loader.

- a worker container: the ``dagster-taskiq worker`` CLI with the container's command, up to
  the point where the worker would start (its settings are captured there);
- a scaler function: ``ScalerSettings.from_env``;
- the DLQ processor: ``ProcessorSettings.from_env``.

The loader must accept the environment (nothing missing), and read every
``DAGSTER_TASKIQ_*`` variable in it (nothing unknown: a variable no code reads is a typo or a
leftover). What a loader reads is recorded, not listed by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from dagster_taskiq import cli
from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.scaling.scaler import ScalerSettings
from dagster_taskiq.worker import run as worker_run
from dagster_taskiq.worker.config import WorkerSettings
from lambdas.dlq_processor.handler import ProcessorSettings
from tests.cfn import pseudo_parameters, resolve, sample_physical

from .conftest import Build

PREFIX = "DAGSTER_TASKIQ_"
VARIANTS = ["default_build", "custom_build", "pools_build", "existing_build"]
# The value ECS would inject for a secret: a secret's contents are not in the template.
SECRET_VALUES = {
    "DAGSTER_PG_USER": "dagster_user",
    "DAGSTER_PG_PASSWORD": "a-password",
    "DAGSTER_TASKIQ_DATABASE_USER": "dagster_user",
    "DAGSTER_TASKIQ_DATABASE_PASSWORD": "a-password",
    "DAGSTER_TASKIQ_SIGNING_KEY": "a-signing-key",
}


class RecordingEnviron(dict[str, str]):
    """An environment that remembers which names were looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)

    def unread(self) -> list[str]:
        return sorted(name for name in self if name.startswith(PREFIX) and name not in self.read)


@dataclass(frozen=True)
class Component:
    kind: str  # "worker", "scaler" or "dlq_processor"
    logical_id: str
    environment: dict[str, str]
    command: list[str]


def components(build: Build) -> Iterator[Component]:
    """Every container and function of the template that runs this project's code."""
    template = build.json
    physical = sample_physical(template)
    pseudo = pseudo_parameters()
    for logical_id, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::ECS::TaskDefinition":
            for container in properties["ContainerDefinitions"]:
                environment = {
                    item["Name"]: str(resolve(item["Value"], physical, pseudo))
                    for item in container.get("Environment", [])
                }
                for secret in container.get("Secrets", []):
                    environment[secret["Name"]] = SECRET_VALUES[secret["Name"]]
                yield Component(
                    "worker",
                    logical_id,
                    environment,
                    [*container["EntryPoint"][1:], *container["Command"]],
                )
        elif resource["Type"] == "AWS::Lambda::Function":
            variables = properties.get("Environment", {}).get("Variables", {})
            if properties.get("Handler") != "handler.lambda_handler":
                assert not any(name.startswith(PREFIX) for name in variables), logical_id
                continue  # a CDK-provided function (the VPC's default security group)
            description = properties["Description"]
            kind = "scaler" if description.startswith("dagster-taskiq scaler") else "dlq_processor"
            assert kind == "scaler" or description.startswith("dagster-taskiq DLQ processor")
            environment = {
                name: str(resolve(value, physical, pseudo)) for name, value in variables.items()
            }
            yield Component(kind, logical_id, environment, [])


def load_worker(
    component: Component, monkeypatch: pytest.MonkeyPatch
) -> tuple[WorkerSettings, RecordingEnviron]:
    """The worker CLI, given only the container's environment and command; stops where the
    worker would start, after every setting was resolved (no connection is made)."""
    started: list[WorkerSettings] = []

    class Started:
        def __init__(self, settings: WorkerSettings, **_: object) -> None:
            started.append(settings)

        def run(self) -> int:
            return 0

    environ = RecordingEnviron(component.environment)
    monkeypatch.setattr(worker_run, "Worker", Started)
    monkeypatch.setattr(worker_run, "Ledger", lambda *args, **kwargs: None)
    monkeypatch.setattr(worker_run, "sqs_queues", lambda *args, **kwargs: [])
    # The CLI and what it calls read os.environ: the container's, and nothing of this process.
    monkeypatch.setattr(os, "environ", environ)
    result = CliRunner().invoke(cli.cli, component.command)
    assert result.exit_code == 0, result.output + repr(result.exception)
    (settings,) = started
    return settings, environ


@pytest.mark.parametrize("which", VARIANTS)
def test_every_worker_container_is_what_the_worker_reads(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    build: Build = request.getfixturevalue(which)
    workers = [c for c in components(build) if c.kind == "worker"]
    assert len(workers) == len(build.stack.workers.pools)
    for component in workers:
        with monkeypatch.context() as patch:
            settings, environ = load_worker(component, patch)
        assert environ.unread() == [], component.logical_id
        assert settings.queue_urls and settings.code_locations
        # Signed messages only, and a ledger URL with its credentials: nothing left unset.
        assert settings.signing_key == SECRET_VALUES["DAGSTER_TASKIQ_SIGNING_KEY"]
        credentials = urlsplit(settings.database_url)
        assert credentials.username and credentials.password == "a-password"
        assert settings.region == "us-east-1"


@pytest.mark.parametrize("which", VARIANTS)
def test_every_scaler_function_is_what_the_scaler_reads(
    which: str, request: pytest.FixtureRequest
) -> None:
    build: Build = request.getfixturevalue(which)
    scalers = [c for c in components(build) if c.kind == "scaler"]
    assert len(scalers) == len(build.stack.scalers)
    for component in scalers:
        environ = RecordingEnviron(component.environment)
        settings = ScalerSettings.from_env(environ)
        assert environ.unread() == [], component.logical_id
        # The password (and, for an existing database, the user) come from the secret.
        assert settings.credentials.keys() == {"DAGSTER_TASKIQ_DATABASE_SECRET_ARN"}
        assert settings.region == "us-east-1"


@pytest.mark.parametrize("which", VARIANTS)
def test_the_dlq_processor_is_what_it_reads(which: str, request: pytest.FixtureRequest) -> None:
    build: Build = request.getfixturevalue(which)
    (component,) = [c for c in components(build) if c.kind == "dlq_processor"]
    environ = RecordingEnviron(component.environment)
    settings = ProcessorSettings.from_env(environ)
    assert environ.unread() == []
    assert settings.signing_key_secret_arn and settings.signing_key is None
    assert settings.environment.keys() == {"DAGSTER_TASKIQ_DATABASE_SECRET_ARN"}


def test_an_unread_variable_is_found(default_build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a misspelt variable in a container is reported."""
    (component,) = [c for c in components(default_build) if c.kind == "worker"]
    typo = Component(
        component.kind,
        component.logical_id,
        component.environment | {"DAGSTER_TASKIQ_CONCURENCY": "4"},
        component.command,
    )
    _, environ = load_worker(typo, monkeypatch)
    assert environ.unread() == ["DAGSTER_TASKIQ_CONCURENCY"]


def test_a_missing_variable_is_refused(default_build: Build) -> None:
    (component,) = [c for c in components(default_build) if c.kind == "dlq_processor"]
    environment = dict(component.environment)
    del environment["DAGSTER_TASKIQ_ALERT_TOPIC_ARN"]
    with pytest.raises(ConfigurationError, match="DAGSTER_TASKIQ_ALERT_TOPIC_ARN"):
        ProcessorSettings.from_env(environment)

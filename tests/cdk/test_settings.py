"""Deployment settings from CDK context: defaults, parsing of -c strings, clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from cdk.dagster_taskiq_cdk.paths import REPO_ROOT
from cdk.dagster_taskiq_cdk.settings import DLQ_RETENTION_SECONDS, DeploymentSettings, SettingsError


def test_defaults() -> None:
    settings = DeploymentSettings.from_context({})
    assert settings.environment == "dev"
    assert (settings.min_workers, settings.max_workers) == (0, 10)
    assert settings.target_backlog_per_worker == 5
    assert (settings.worker_cpu, settings.worker_memory) == (1024, 2048)
    assert settings.steps_per_worker == 2
    assert settings.spot_weights == {"FARGATE": 50, "FARGATE_SPOT": 50}
    assert settings.alert_email is None and settings.dagster_ui_url is None
    assert settings.vpc_id is None
    assert (settings.max_receive_count, settings.visibility_timeout) == (5, 300)
    assert settings.message_retention == 345_600 < DLQ_RETENTION_SECONDS
    assert (settings.stop_timeout, settings.worker_stop_timeout) == (120, 105)
    assert settings.scale_in_stabilization_seconds == 300
    assert settings.deletion_protection is True
    assert settings.stack_name == "DagsterTaskiq-dev"


def test_every_setting_is_documented() -> None:
    documentation = DeploymentSettings.documentation()
    assert "max_workers" in documentation
    assert all(len(meaning) > 10 for _, meaning in documentation.values())


def test_cli_strings_are_parsed() -> None:
    settings = DeploymentSettings.from_context(
        {
            "max_workers": "20",
            "spot_share": "0",
            "deletion_protection": "false",
            "db_min_capacity": "0",
            "alert_email": "",
        }
    )
    assert settings.max_workers == 20
    assert settings.spot_weights == {"FARGATE": 100}
    assert settings.deletion_protection is False
    assert settings.db_min_capacity == 0
    assert settings.alert_email is None


def test_feature_flags_and_lookups_in_the_context_are_not_settings() -> None:
    DeploymentSettings.from_context(
        {
            "@aws-cdk/aws-iam:minimizePolicies": True,
            "vpc-provider:account=1:filter.vpc-id=vpc-1:region=eu-west-1": {},
            "aws:cdk:enable-path-metadata": True,
        }
    )


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"max_worker": 3}, "Unknown context key.*max_worker.*max_workers"),
        ({"max_workers": "many"}, "'max_workers' must be a whole number"),
        ({"max_workers": True}, "'max_workers' must be a whole number"),
        ({"min_workers": 5, "max_workers": 2}, "'min_workers' must not exceed max_workers"),
        ({"worker_memory": 1024}, "'worker_memory' must be a Fargate size for worker_cpu=1024"),
        ({"worker_cpu": 1000}, "'worker_cpu' must be one of"),
        ({"spot_share": 120}, "'spot_share' must be a percentage"),
        ({"message_retention": DLQ_RETENTION_SECONDS}, "dead-letter queue keeps messages"),
        ({"stop_timeout": 300}, "'stop_timeout' must be 20 to 120 seconds"),
        ({"max_receive_count": 0}, "'max_receive_count' must be 1 to 1000"),
        ({"environment": "Prod_1"}, "'environment' must be 1-20 characters"),
        ({"vpc_id": "my-vpc"}, "'vpc_id' must be a VPC id"),
        ({"alert_email": "nobody"}, "'alert_email' must be an e-mail address"),
        ({"dagster_ui_url": "dagster.local"}, "'dagster_ui_url' must be an http"),
        ({"deletion_protection": "maybe"}, "'deletion_protection' must be true or false"),
        ({"log_retention_days": 10}, "'log_retention_days' must be one of"),
        ({"code_locations": "a,,b"}, "'code_locations' must be one or more"),
        ({"worker_dockerfile": "../Dockerfile"}, "'worker_dockerfile' must be a path inside"),
        ({"db_min_capacity": 8, "db_max_capacity": 4}, "'db_min_capacity' and db_max_capacity"),
    ],
)
def test_errors_name_the_setting(context: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        DeploymentSettings.from_context(context)


def test_the_readme_documents_every_setting_and_its_default() -> None:
    readme = (REPO_ROOT / "cdk" / "README.md").read_text()
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[2].strip()
        for line in readme.splitlines()
        if line.startswith("| `")
    }
    for key, (default, _) in DeploymentSettings.documentation().items():
        shown = "unset" if default is None else str(default)
        assert rows.get(key, "").lower() == shown.lower(), key

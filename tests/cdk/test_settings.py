"""Deployment settings from CDK context: defaults, parsing of -c strings, clear errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cdk.dagster_taskiq_cdk.paths import REPO_ROOT
from cdk.dagster_taskiq_cdk.settings import (
    DLQ_RETENTION_SECONDS,
    POOL_OVERRIDES,
    DeploymentSettings,
    SettingsError,
)


def test_defaults() -> None:
    settings = DeploymentSettings.from_context({})
    assert settings.environment == "dev"
    assert (settings.min_workers, settings.max_workers) == (0, 10)
    assert settings.target_backlog_per_worker == 5
    assert (settings.worker_cpu, settings.worker_memory) == (1024, 2048)
    assert settings.steps_per_worker == 2
    assert settings.default_pool.spot_weights == {"FARGATE": 50, "FARGATE_SPOT": 50}
    assert settings.alert_email is None and settings.dagster_ui_url is None
    assert settings.vpc_id is None
    assert (settings.max_receive_count, settings.visibility_timeout) == (5, 300)
    assert settings.message_retention == 345_600 < DLQ_RETENTION_SECONDS
    assert (settings.stop_timeout, settings.worker_stop_timeout) == (120, 105)
    assert settings.scale_in_stabilization_seconds == 60
    assert (settings.scale_out_lead_seconds, settings.target_wait_seconds) == (60, 0)
    assert settings.max_workers_alarm_minutes == 30
    assert settings.deletion_protection is True
    assert settings.stack_name == "DagsterTaskiq-dev"


def test_without_pools_there_is_one_default_pool_from_the_settings() -> None:
    settings = DeploymentSettings.from_context({"max_workers": 7, "spot_share": 0})
    assert settings.pools is None
    (pool,) = settings.worker_pools
    assert pool == settings.default_pool
    assert (pool.name, pool.is_default, pool.pascal_name) == ("default", True, "Default")
    assert (pool.min_workers, pool.max_workers, pool.target_backlog_per_worker) == (0, 7, 5)
    assert (pool.worker_cpu, pool.worker_memory, pool.steps_per_worker) == (1024, 2048, 2)
    assert pool.code_locations == "my_project.definitions"
    assert (pool.priority_lane, pool.fifo) == (False, False)
    assert pool.spot_weights == settings.default_pool.spot_weights == {"FARGATE": 100}


POOLS = [
    {"name": "gpu-heavy", "worker_cpu": 4096, "worker_memory": "16384", "fifo": True},
    {"name": "default", "priority_lane": "yes", "max_workers": 20},
]


@pytest.mark.parametrize("pools", [POOLS, json.dumps(POOLS)], ids=["cdk.json", "-c string"])
def test_pools_fall_back_to_the_top_level_settings(pools: Any) -> None:
    settings = DeploymentSettings.from_context(
        {"pools": pools, "steps_per_worker": 3, "code_locations": "a.defs"}
    )
    gpu, default = settings.worker_pools
    assert settings.default_pool == default
    assert (gpu.name, gpu.pascal_name, gpu.is_default) == ("gpu-heavy", "GpuHeavy", False)
    assert (gpu.worker_cpu, gpu.worker_memory) == (4096, 16384)
    assert (gpu.fifo, gpu.priority_lane) == (True, False)
    assert (gpu.steps_per_worker, gpu.code_locations, gpu.max_workers) == (3, "a.defs", 10)
    assert (default.worker_cpu, default.worker_memory, default.max_workers) == (1024, 2048, 20)
    assert (default.priority_lane, default.fifo) == (True, False)


def test_every_top_level_worker_setting_can_be_overridden_per_pool() -> None:
    overrides = {
        "min_workers": 2,
        "max_workers": 4,
        "target_backlog_per_worker": 9,
        "worker_cpu": 512,
        "worker_memory": 4096,
        "steps_per_worker": 6,
        "spot_share": 100,
        "code_locations": "other.defs",
    }
    assert set(overrides) == set(POOL_OVERRIDES)
    settings = DeploymentSettings.from_context({"pools": [{"name": "default", **overrides}]})
    pool = settings.default_pool
    assert {name: getattr(pool, name) for name in overrides} == overrides
    # The top-level values stay what they were.
    assert (settings.max_workers, settings.worker_cpu) == (10, 1024)


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
    assert settings.default_pool.spot_weights == {"FARGATE": 100}
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
        ({"pools": "default"}, "'pools' must be a JSON list of pools"),
        ({"pools": "[]"}, "'pools' must be a JSON list of pools"),
        ({"pools": {"name": "default"}}, "'pools' must be a JSON list of pools"),
        ({"pools": ["default"]}, r"'pools\[0\]' must be an object with a name"),
        ({"pools": [{"max_workers": 2}]}, r"'pools\[0\].name' must be 1-20 characters"),
        ({"pools": [{"name": "High_Mem"}]}, r"'pools\[0\].name' must be 1-20 characters"),
        ({"pools": [{"name": "a--b"}]}, r"'pools\[0\].name' must be 1-20 characters"),
        ({"pools": [{"name": "x" * 21}]}, r"'pools\[0\].name' must be 1-20 characters"),
        ({"pools": [{"name": "gpu"}]}, "'pools' must include a pool named 'default'"),
        (
            {"pools": [{"name": "default"}, {"name": "default"}]},
            "'pools' names the pool 'default' twice",
        ),
        (
            {"pools": [{"name": "default"}, {"name": "a-1b"}, {"name": "a1b"}]},
            "'pools' names 'a-1b' and 'a1b', which make the same output names",
        ),
        (
            {"pools": [{"name": "default", "max_worker": 3}]},
            r"'pools\[default\]' has unknown key\(s\) max_worker; a pool takes: name, min_work",
        ),
        (
            {"pools": [{"name": "default"}, {"name": "big", "worker_cpu": 4096}]},
            r"'pools\[big\].worker_memory' must be a Fargate size for worker_cpu=4096",
        ),
        (
            {"pools": [{"name": "default", "worker_cpu": 1000, "worker_memory": 2048}]},
            r"'pools\[default\].worker_cpu' must be one of",
        ),
        (
            {"pools": [{"name": "default", "min_workers": 11}]},
            r"'pools\[default\].min_workers' must not exceed max_workers \(10\)",
        ),
        (
            {"pools": [{"name": "default", "max_workers": "lots"}]},
            r"'pools\[default\].max_workers' must be a whole number",
        ),
        (
            {"pools": [{"name": "default", "steps_per_worker": 65}]},
            r"'pools\[default\].steps_per_worker' must be between 1 and 64",
        ),
        (
            {"pools": [{"name": "default", "spot_share": -1}]},
            r"'pools\[default\].spot_share' must be a percentage",
        ),
        (
            {"pools": [{"name": "default", "target_backlog_per_worker": 0}]},
            r"'pools\[default\].target_backlog_per_worker' must be 1\+",
        ),
        (
            {"pools": [{"name": "default", "code_locations": "a,"}]},
            r"'pools\[default\].code_locations' must be one or more",
        ),
        (
            {"pools": [{"name": "default", "fifo": "sometimes"}]},
            r"'pools\[default\].fifo' must be true or false",
        ),
        (
            {"pools": [{"name": "default", "priority_lane": 1}]},
            r"'pools\[default\].priority_lane' must be true or false",
        ),
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

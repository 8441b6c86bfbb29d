"""The VPC: a new one by default (see test_stack), an existing one looked up when vpc_id is set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aws_cdk import App, Environment, Stack

from cdk.dagster_taskiq_cdk.network import Network
from cdk.dagster_taskiq_cdk.settings import DeploymentSettings, SettingsError
from cdk.dagster_taskiq_cdk.stack import stack_environment

VPC_ID = "vpc-0123456789abcdef0"


def test_an_existing_vpc_is_looked_up_not_created(tmp_path: Path) -> None:
    app = App(outdir=str(tmp_path))
    stack = Stack(app, "Lookup", env=Environment(account="123456789012", region="eu-west-1"))
    Network(stack, "Network", settings=DeploymentSettings(vpc_id=VPC_ID))
    assembly = app.synth()
    manifest = json.loads((Path(assembly.directory) / "manifest.json").read_text())
    (missing,) = manifest["missing"]
    assert missing["provider"] == "vpc-provider"
    assert missing["props"]["filter"] == {"vpc-id": VPC_ID}
    template = json.loads((Path(assembly.directory) / "Lookup.template.json").read_text())
    resources = template.get("Resources", {}).values()
    assert not [r for r in resources if r["Type"] == "AWS::EC2::VPC"]


def test_a_vpc_lookup_needs_account_and_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDK_DEFAULT_ACCOUNT", raising=False)
    monkeypatch.delenv("CDK_DEFAULT_REGION", raising=False)
    assert stack_environment(DeploymentSettings()) is None  # environment-agnostic
    with pytest.raises(SettingsError, match="vpc_id needs the stack's account and region"):
        stack_environment(DeploymentSettings(vpc_id=VPC_ID))
    monkeypatch.setenv("CDK_DEFAULT_ACCOUNT", "123456789012")
    monkeypatch.setenv("CDK_DEFAULT_REGION", "eu-west-1")
    environment = stack_environment(DeploymentSettings(vpc_id=VPC_ID))
    assert environment is not None
    assert (environment.account, environment.region) == ("123456789012", "eu-west-1")

"""The CDK app built in-process, as cdk/app.py builds it, once per test run per context.

Each build takes a few seconds (the Lambda bundles, the construct tree, the synth and cdk-nag),
so the default deployment, one with every setting changed and one with several worker pools
are shared by all tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, CfnElement, Stack
from aws_cdk.assertions import Template
from constructs import IConstruct

from cdk.dagster_taskiq_cdk.paths import REPO_ROOT
from cdk.dagster_taskiq_cdk.stack import DagsterTaskiqStack, build_stack

# Every setting away from its default, to show the template follows the context.
CUSTOM_CONTEXT: dict[str, Any] = {
    "environment": "staging",
    # -c values arrive as strings: parse them like the CLI passes them.
    "max_receive_count": "7",
    "min_workers": 1,
    "max_workers": 4,
    "target_backlog_per_worker": 3,
    "steps_per_worker": 4,
    "worker_cpu": 2048,
    "worker_memory": 8192,
    "spot_share": 100,
    "stop_timeout": "60",
    "visibility_timeout": 600,
    "message_retention": 86400,
    "scale_in_stabilization_seconds": 120,
    "scale_out_lead_seconds": 45,
    "target_wait_seconds": "90",
    "max_workers_alarm_minutes": 15,
    "alert_email": "oncall@example.com",
    "dagster_ui_url": "https://dagster.example.com",
    "deletion_protection": "false",
    "iam_database_auth": False,
    "oldest_message_alarm_seconds": 600,
    "code_locations": "pipelines.defs,more.defs",
}

# Three worker pools, given as -c passes them (a JSON string): the default pool with a
# high-priority lane, a FIFO high-memory pool that overrides every per-pool setting, and a
# FIFO pool with a lane.
POOLS = [
    {"name": "default", "priority_lane": True},
    {
        "name": "high-mem",
        "min_workers": "1",
        "max_workers": 3,
        "target_backlog_per_worker": 2,
        "worker_cpu": 4096,
        "worker_memory": 16384,
        "steps_per_worker": 1,
        "spot_share": 0,
        "code_locations": "heavy.defs",
        "fifo": True,
    },
    {"name": "ordered", "fifo": "true", "priority_lane": True},
]
POOLS_CONTEXT: dict[str, Any] = {"environment": "pools", "pools": json.dumps(POOLS)}

# Deploying into an existing Dagster deployment: its VPC (looked up, here from the cached
# answer a lookup would write to cdk.context.json), its database and its ECS cluster.
ACCOUNT = "123456789012"
REGION = "eu-west-1"
VPC_ID = "vpc-0123456789abcdef0"
DATABASE_SECRET_ARN = (
    f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:rds!cluster-0a1b2c3d-AbCdEf"
)
DATABASE_SECURITY_GROUP = "sg-0fedcba9876543210"
EXISTING_CLUSTER = "dagster-prod"


def _subnets(kind: str, first_octet: int) -> dict[str, Any]:
    return {
        "name": kind,
        "type": kind,
        "subnets": [
            {
                # 17 hexadecimal digits, as EC2's ids are.
                "subnetId": f"subnet-0{first_octet}{zone}{'0' * 14}",
                "cidr": f"10.1.{first_octet * 16 + index * 4}.0/22",
                "availabilityZone": f"{REGION}{zone}",
                "routeTableId": f"rtb-0{first_octet}{zone}{'0' * 14}",
            }
            for index, zone in enumerate("ab")
        ],
    }


VPC_LOOKUP = {
    f"vpc-provider:account={ACCOUNT}:filter.vpc-id={VPC_ID}:region={REGION}"
    ":returnAsymmetricSubnets=true": {
        "vpcId": VPC_ID,
        "vpcCidrBlock": "10.1.0.0/16",
        "ownerAccountId": ACCOUNT,
        "availabilityZones": [],
        "subnetGroups": [_subnets("Private", 1), _subnets("Public", 2)],
    }
}
EXISTING_CONTEXT: dict[str, Any] = {
    "environment": "adopt",
    "vpc_id": VPC_ID,
    "database_endpoint": "dagster.cluster-c0ffee.eu-west-1.rds.amazonaws.com",
    "database_port": "6432",
    "database_name": "dagster",
    "database_secret_arn": DATABASE_SECRET_ARN,
    "database_security_group_id": DATABASE_SECURITY_GROUP,
    "ecs_cluster_name": EXISTING_CLUSTER,
    "pools": json.dumps([{"name": "default"}, {"name": "batch", "priority_lane": True}]),
    **VPC_LOOKUP,
}
# The account and region the CDK CLI resolves from credentials: a lookup needs them.
EXISTING_ENVIRONMENT = {"CDK_DEFAULT_ACCOUNT": ACCOUNT, "CDK_DEFAULT_REGION": REGION}


@dataclass(frozen=True)
class Build:
    app: App
    stack: DagsterTaskiqStack
    template: Template
    json: dict[str, Any]

    def logical_id(self, construct: IConstruct) -> str:
        """The logical id of a resource, or of an L2 construct's CloudFormation resource."""
        element = construct if isinstance(construct, CfnElement) else construct.node.default_child
        assert isinstance(element, CfnElement), f"{construct.node.path} has no CFN resource"
        return Stack.of(element).get_logical_id(element)

    def resolve(self, value: Any) -> Any:
        return self.stack.resolve(value)

    def resources(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {
            logical_id: resource
            for logical_id, resource in self.json["Resources"].items()
            if resource["Type"] == resource_type
        }

    def resource(self, construct: IConstruct) -> dict[str, Any]:
        resource: dict[str, Any] = self.json["Resources"][self.logical_id(construct)]
        return resource

    @property
    def template_path(self) -> Path:
        """The template as the CLI writes it, in the cloud assembly."""
        return Path(self.app.outdir) / f"{self.stack.artifact_id}.template.json"


def cdk_json_context() -> dict[str, Any]:
    """The context the CDK CLI gives the app: cdk.json's (feature flags)."""
    context: dict[str, Any] = json.loads((REPO_ROOT / "cdk.json").read_text())["context"]
    return context


def build(
    overrides: Mapping[str, Any], outdir: Path, environment: Mapping[str, str] | None = None
) -> Build:
    """``environment``: the CDK_DEFAULT_* variables the CLI would set (else none)."""
    app = App(context=cdk_json_context() | dict(overrides), outdir=str(outdir))
    with pytest.MonkeyPatch.context() as patch:
        for name in ("CDK_DEFAULT_ACCOUNT", "CDK_DEFAULT_REGION"):
            patch.delenv(name, raising=False)
        for name, value in (environment or {}).items():
            patch.setenv(name, value)
        stack = build_stack(app)
    # Synthesizes the app: the policy validation (cdk-nag) runs and fails on any violation.
    template = Template.from_stack(stack)
    return Build(app=app, stack=stack, template=template, json=dict(template.to_json()))


@pytest.fixture(scope="package")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    yield build({}, tmp_path_factory.mktemp("cdk-default"))


@pytest.fixture(scope="package")
def custom_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    yield build(CUSTOM_CONTEXT, tmp_path_factory.mktemp("cdk-custom"))


@pytest.fixture(scope="package")
def pools_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    yield build(POOLS_CONTEXT, tmp_path_factory.mktemp("cdk-pools"))


@pytest.fixture(scope="package")
def existing_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    """Into an existing deployment: VPC, database and cluster are the user's."""
    yield build(EXISTING_CONTEXT, tmp_path_factory.mktemp("cdk-existing"), EXISTING_ENVIRONMENT)

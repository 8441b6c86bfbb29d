"""A Lambda function from a bundle of this repository, in the VPC, with its own small role."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from .lambda_bundle import LAMBDA_PYTHON_VERSION, build_bundle
from .nag import Acknowledgment, acknowledge
from .paths import LAMBDA_BUILD_DIR
from .settings import DeploymentSettings

# The newest Python runtime Lambda offers. The bundle's compiled extensions are built for it
# (lambda_bundle.LAMBDA_PYTHON_VERSION): the two change together.
LAMBDA_RUNTIME = lambda_.Runtime.PYTHON_3_14
if LAMBDA_RUNTIME.name != f"python{LAMBDA_PYTHON_VERSION}":
    raise RuntimeError(f"The Lambda runtime is not the bundle's Python {LAMBDA_PYTHON_VERSION}")

# What the code calls to read a secret (boto3 and powertools): grant_read would add
# secretsmanager:DescribeSecret, which nothing here calls.
SECRET_READ_ACTIONS = ("secretsmanager:GetSecretValue",)

# Lambda creates and deletes the function's network interfaces with these, on behalf of the
# role; the same actions as AWS's AWSLambdaVPCAccessExecutionRole, without its logs:* on "*".
ENI_ACTIONS = (
    "ec2:AssignPrivateIpAddresses",
    "ec2:CreateNetworkInterface",
    "ec2:DeleteNetworkInterface",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSubnets",
    "ec2:UnassignPrivateIpAddresses",
)


class BundledFunction(Construct):
    """``lambdas/<bundle>/handler.py`` as a Python 3.14 x86_64 function (see lambda_bundle)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bundle: str,
        description: str,
        security_group_description: str,
        settings: DeploymentSettings,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        timeout: Duration,
        environment: Mapping[str, str],
        memory_size: int = 256,
        reserved_concurrent_executions: int | None = None,
        build_dir: Path = LAMBDA_BUILD_DIR,
    ) -> None:
        super().__init__(scope, construct_id)
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description=f"{security_group_description}: outbound to AWS APIs and the database",
            allow_all_outbound=True,
        )
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            retention=settings.log_retention,
            removal_policy=RemovalPolicy.DESTROY,
        )
        # An own role rather than Lambda's default, which would attach the AWS managed
        # execution policies (logs:* on every log group).
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=description,
        )
        self.role.add_to_policy(iam.PolicyStatement(actions=list(ENI_ACTIONS), resources=["*"]))
        self.log_group.grant_write(self.role)
        self.function = lambda_.Function(
            self,
            "Function",
            description=description,
            # The bundle's compiled extensions are CPython wheels for x86_64 Linux.
            runtime=LAMBDA_RUNTIME,
            architecture=lambda_.Architecture.X86_64,
            handler="handler.lambda_handler",
            code=lambda_.Code.from_asset(str(build_bundle(bundle, build_dir=build_dir))),
            role=self.role,
            timeout=timeout,
            memory_size=memory_size,
            reserved_concurrent_executions=reserved_concurrent_executions,
            environment=dict(environment),
            vpc=vpc,
            vpc_subnets=subnets,
            security_groups=[self.security_group],
            tracing=lambda_.Tracing.ACTIVE,
            log_group=self.log_group,
        )
        acknowledge(
            self.role,
            [
                Acknowledgment(
                    "AwsSolutions-IAM5",
                    "Lambda attaches the function to the VPC through network interfaces it "
                    "creates with the role: EC2 grants those actions only on '*', and X-Ray "
                    "(active tracing for the powertools Tracer) has no resource-level "
                    "permissions either.",
                    findings=("Resource::*",),
                ),
            ],
        )

    def grant_secret_read(self, secret: secretsmanager.ISecret) -> None:
        """Read ``secret``'s value, and nothing else of it."""
        self.role.add_to_policy(
            iam.PolicyStatement(actions=list(SECRET_READ_ACTIONS), resources=[secret.secret_arn])
        )

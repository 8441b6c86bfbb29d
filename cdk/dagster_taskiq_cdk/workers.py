"""The worker services: warm `dagster-taskiq worker` tasks on Fargate (and Fargate Spot), one
service per worker pool."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, Duration, IgnoreMode, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from dagster_taskiq.core.settings import (
    ENV_CODE_LOCATIONS,
    ENV_CONCURRENCY,
    ENV_DATABASE_PASSWORD,
    ENV_DATABASE_URL,
    ENV_DATABASE_USER,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_REGION,
    ENV_SIGNING_KEY,
)

from . import environment as env
from .database import DagsterDatabase
from .nag import Acknowledgment, acknowledge
from .paths import REPO_ROOT
from .queue import StepQueues
from .settings import DEFAULT_POOL, DeploymentSettings, WorkerPool

# What a worker does with its pool's queues: receive, extend its lease (the heartbeat), and
# delete after completion. Nothing else (it never reads the queue's attributes), and only on
# those queues.
WORKER_QUEUE_ACTIONS = (
    "sqs:ChangeMessageVisibility",
    "sqs:DeleteMessage",
    "sqs:ReceiveMessage",
)

CONTAINER_NAME = "worker"

# The worker image's build context is the repository root (worker_image/Dockerfile installs
# the package from it). Everything is left out but what the Dockerfile copies, in
# .dockerignore syntax: without this the context would include .venv, node_modules and .git.
IMAGE_CONTEXT_EXCLUDES = (
    "*",
    "!constraints.txt",
    "!pyproject.toml",
    "!README.md",
    "!executor",
    "!worker_image",
    "**/__pycache__",
    "**/*.pyc",
    "**/*.egg-info",
)


class Workers(Construct):
    """The ECS cluster, the workers' security group, and one service per worker pool.

    A service has no desiredCount: its pool's scaler owns it. The default pool's task
    definition, log group and service sit directly in this construct (where they were before
    there were pools, so its resources keep their logical ids); another pool's sit in a child
    named after it (``Workers/HighMem/Service``).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        pools: Sequence[StepQueues],
        database: DagsterDatabase,
        signing_key: secretsmanager.ISecret,
        dockerfile: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description="dagster-taskiq workers: no inbound; outbound to AWS APIs and the database",
            allow_all_outbound=True,
        )
        self.cluster: ecs.ICluster
        if settings.ecs_cluster_name:
            # The user's cluster: it must have the FARGATE and FARGATE_SPOT capacity
            # providers (the services' strategy names them); its settings stay the user's.
            self.cluster = ecs.Cluster.from_cluster_attributes(
                self, "Cluster", cluster_name=settings.ecs_cluster_name, vpc=vpc
            )
        else:
            self.cluster = ecs.Cluster(
                self,
                "Cluster",
                vpc=vpc,
                container_insights_v2=ecs.ContainerInsights.ENHANCED,
                enable_fargate_capacity_providers=True,
            )
        # Built at deploy time (cdk deploy runs docker build); synth only hashes and stages the
        # build context: the repository root, cut down to what the Dockerfile copies. One image
        # for every pool: they differ in task size, concurrency and queues, not in code.
        image = ecs.ContainerImage.from_asset(
            str(REPO_ROOT),
            file=dockerfile,
            exclude=list(IMAGE_CONTEXT_EXCLUDES),
            ignore_mode=IgnoreMode.DOCKER,
            platform=ecr_assets.Platform.LINUX_AMD64,
        )
        self.pools: dict[str, PoolService] = {}
        for queues in pools:
            pool = queues.pool
            self.pools[pool.name] = PoolService(
                self if pool.is_default else Construct(self, pool.pascal_name),
                settings=settings,
                pool=pool,
                queues=queues,
                cluster=self.cluster,
                security_group=self.security_group,
                subnets=subnets,
                database=database,
                signing_key=signing_key,
                image=image,
            )
        default = self.pools[DEFAULT_POOL]
        self.service = default.service
        self.task_definition = default.task_definition
        self.log_group = default.log_group


class PoolService:
    """One pool's task definition, log group and Fargate service, built into ``scope``."""

    def __init__(
        self,
        scope: Construct,
        *,
        settings: DeploymentSettings,
        pool: WorkerPool,
        queues: StepQueues,
        cluster: ecs.ICluster,
        security_group: ec2.ISecurityGroup,
        subnets: ec2.SubnetSelection,
        database: DagsterDatabase,
        signing_key: secretsmanager.ISecret,
        image: ecs.ContainerImage,
    ) -> None:
        self.pool = pool
        task_definition = ecs.FargateTaskDefinition(
            scope,
            "Task",
            cpu=pool.worker_cpu,
            memory_limit_mib=pool.worker_memory,
            runtime_platform=ecs.RuntimePlatform(
                cpu_architecture=ecs.CpuArchitecture.X86_64,
                operating_system_family=ecs.OperatingSystemFamily.LINUX,
            ),
        )
        # This pool's queues only: a pool's workers cannot take another pool's steps.
        task_definition.add_to_task_role_policy(
            iam.PolicyStatement(
                actions=list(WORKER_QUEUE_ACTIONS),
                resources=[queue.queue_arn for queue in queues.step_queues],
            )
        )
        self.log_group = logs.LogGroup(
            scope,
            "Logs",
            retention=settings.log_retention,
            removal_policy=RemovalPolicy.DESTROY,
        )
        environment = {
            ENV_QUEUE_URL: queues.queue.queue_url,
            ENV_CONCURRENCY: str(pool.steps_per_worker),
            ENV_CODE_LOCATIONS: pool.code_locations,
            ENV_REGION: Aws.REGION,
            env.PG_HOST: database.hostname,
            env.PG_PORT: str(database.port),
            env.PG_DB: database.name,
            # The ledger (pg8000) with TLS; its password comes from the secret below.
            ENV_DATABASE_URL: database.password_less_url(),
            env.METRICS_NAMESPACE: env.METRICS_NAMESPACE_VALUE,
            env.METRICS_SERVICE: settings.metrics_service,
        }
        if queues.priority_queue is not None:
            # The worker receives from the lane first, then from the step queue.
            environment[ENV_PRIORITY_QUEUE_URL] = queues.priority_queue.queue_url
        secrets = {
            env.PG_USER: ecs.Secret.from_secrets_manager(database.secret, "username"),
            env.PG_PASSWORD: ecs.Secret.from_secrets_manager(database.secret, "password"),
            ENV_DATABASE_PASSWORD: ecs.Secret.from_secrets_manager(database.secret, "password"),
            # The whole secret string is the key: the worker accepts only what it verifies.
            ENV_SIGNING_KEY: ecs.Secret.from_secrets_manager(signing_key),
        }
        if database.username is None:
            # An existing database's user is in its secret, not in the ledger URL.
            secrets[ENV_DATABASE_USER] = ecs.Secret.from_secrets_manager(
                database.secret, "username"
            )
        task_definition.add_container(
            CONTAINER_NAME,
            image=image,
            # Both set, so the task runs the worker whatever the image's ENTRYPOINT is.
            entry_point=["dagster-taskiq"],
            command=["worker", "--stop-timeout", str(settings.worker_stop_timeout)],
            environment=environment,
            secrets=secrets,
            logging=ecs.LogDrivers.aws_logs(stream_prefix=CONTAINER_NAME, log_group=self.log_group),
            # SIGTERM, then this long to finish or give back running steps, then SIGKILL.
            stop_timeout=Duration.seconds(settings.stop_timeout),
            # An init process as PID 1 forwards SIGTERM and reaps what steps leave behind.
            linux_parameters=ecs.LinuxParameters(
                scope, "LinuxParameters", init_process_enabled=True
            ),
        )
        self.service = ecs.FargateService(
            scope,
            "Service",
            cluster=cluster,
            task_definition=task_definition,
            security_groups=[security_group],
            vpc_subnets=subnets,
            assign_public_ip=False,
            platform_version=ecs.FargatePlatformVersion.LATEST,
            capacity_provider_strategies=[
                ecs.CapacityProviderStrategy(capacity_provider=provider, weight=weight)
                for provider, weight in pool.spot_weights.items()
            ],
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            # A deployment starts the new workers before it stops the old ones, which then
            # finish (or give back) their steps within the stop timeout.
            min_healthy_percent=100,
            max_healthy_percent=200,
            propagate_tags=ecs.PropagatedTagSource.SERVICE,
        )
        # A DesiredCount in the template would reset the scaler's count on every deploy.
        # Without one, CloudFormation starts one task on create and leaves the count alone on
        # updates. aws-cdk-lib 2.275 renders none when none is given (older versions rendered
        # 1); the override keeps it out whatever a future version renders.
        cfn_service = self.service.node.default_child
        if not isinstance(cfn_service, ecs.CfnService):
            raise TypeError("The Fargate service's default child is not a CfnService")
        cfn_service.add_property_deletion_override("DesiredCount")
        self.task_definition = task_definition
        self._acknowledge()

    def _acknowledge(self) -> None:
        acknowledge(
            self.task_definition,
            [
                Acknowledgment(
                    "AwsSolutions-ECS2",
                    "The plain environment holds only non-secret configuration (queue URLs, "
                    "concurrency, code locations, database host/port/name, metric names); the "
                    "database username and password and the message signing key come from "
                    "Secrets Manager as ECS secrets.",
                ),
            ],
        )
        execution_role = self.task_definition.execution_role
        if execution_role is not None:
            acknowledge(
                execution_role,
                [
                    Acknowledgment(
                        "AwsSolutions-IAM5",
                        "ecr:GetAuthorizationToken, which the execution role needs to pull the "
                        "worker image, exists only on '*'; the pull itself is limited to the "
                        "asset repository.",
                        findings=("Resource::*",),
                    ),
                ],
            )

"""The scaler Lambda: every minute (and when the executor asks), size the worker service."""

from __future__ import annotations

from aws_cdk import Aws, Duration
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from dagster_taskiq.settings import (
    ENV_DATABASE_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_QUEUE_URL,
    ENV_REGION,
)

from . import environment as env
from .database import Database
from .functions import BundledFunction
from .settings import DeploymentSettings
from .workers import Workers

# A scheduled invocation evaluates for most of a minute (three times, 20 s apart); the extra
# ten seconds cover a slow last evaluation.
SCALER_TIMEOUT = Duration.seconds(70)
SCHEDULE = events.Schedule.rate(Duration.minutes(1))

SCALER_QUEUE_ACTIONS = ("sqs:GetQueueAttributes",)
SCALER_SERVICE_ACTIONS = ("ecs:DescribeServices", "ecs:UpdateService")


class ScalerFunction(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        queue: sqs.IQueue,
        database: Database,
        workers: Workers,
    ) -> None:
        super().__init__(scope, construct_id)
        self.bundled = BundledFunction(
            self,
            "Scaler",
            bundle="scaler",
            description="dagster-taskiq scaler: sets the worker service's desired count",
            security_group_description="dagster-taskiq scaler Lambda",
            settings=settings,
            vpc=vpc,
            subnets=subnets,
            timeout=SCALER_TIMEOUT,
            # One scaler at a time: two would race on desiredCount and on the decision history.
            reserved_concurrent_executions=1,
            environment={
                ENV_QUEUE_URL: queue.queue_url,
                ENV_REGION: Aws.REGION,
                ENV_DATABASE_URL: database.password_less_url(),
                env.DATABASE_PASSWORD_SECRET_ARN: database.secret.secret_arn,
                ENV_ECS_CLUSTER: workers.cluster.cluster_name,
                ENV_ECS_SERVICE: workers.service.service_name,
                env.MIN_WORKERS: str(settings.min_workers),
                env.MAX_WORKERS: str(settings.max_workers),
                env.TARGET_BACKLOG: str(settings.target_backlog_per_worker),
                env.STEPS_PER_WORKER: str(settings.steps_per_worker),
                env.SCALE_IN_STABILIZATION: str(settings.scale_in_stabilization_seconds),
                env.METRICS_NAMESPACE: env.METRICS_NAMESPACE_VALUE,
            },
        )
        self.function = self.bundled.function
        # A failed evaluation is not retried (the next minute's invocation is the retry), and an
        # invocation that waited behind a running one for two minutes is stale: dropped.
        self.function.configure_async_invoke(retry_attempts=0, max_event_age=Duration.minutes(2))
        self.function.add_to_role_policy(
            iam.PolicyStatement(actions=list(SCALER_QUEUE_ACTIONS), resources=[queue.queue_arn])
        )
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=list(SCALER_SERVICE_ACTIONS), resources=[workers.service_arn]
            )
        )
        database.secret.grant_read(self.function)
        database.allow_from(self.bundled.security_group, "scaler Lambda")
        self.schedule = events.Rule(
            self,
            "EveryMinute",
            description="Runs the dagster-taskiq scaler every minute",
            schedule=SCHEDULE,
            targets=[targets.LambdaFunction(self.function)],
        )

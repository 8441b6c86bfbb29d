"""The scaler Lambdas: every minute (and when the executor asks), size a pool's service."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, Duration, Fn
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from dagster_taskiq.core.settings import (
    ENV_DATABASE_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_QUEUE_URL,
    ENV_REGION,
)

from . import environment as env
from .database import DagsterDatabase
from .functions import BundledFunction
from .settings import DeploymentSettings, WorkerPool

# A scheduled invocation evaluates for most of a minute (three times, 20 s apart); the extra
# ten seconds cover a slow last evaluation.
SCALER_TIMEOUT = Duration.seconds(70)
# One for the scheduled invocation, which runs for most of each minute, and room beside it for
# the executor's triggered ones, so a trigger is never throttled behind the schedule. The
# scaler's lock in the database keeps their evaluations of one service from overlapping.
SCALER_CONCURRENCY = 3
SCHEDULE = events.Schedule.rate(Duration.minutes(1))

SCALER_QUEUE_ACTIONS = ("sqs:GetQueueAttributes",)
SCALER_SERVICE_ACTIONS = ("ecs:DescribeServices", "ecs:UpdateService")


class ScalerFunction(Construct):
    """One worker pool's scaler: it reads the pool's queues (step queue, then lane) and sets
    the pool's service."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        pool: WorkerPool,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        queues: Sequence[sqs.IQueue],
        database: DagsterDatabase,
        cluster: ecs.ICluster,
        service: ecs.FargateService,
    ) -> None:
        super().__init__(scope, construct_id)
        of_pool = "" if pool.is_default else f" of pool {pool.name}"
        self.bundled = BundledFunction(
            self,
            "Scaler",
            bundle="scaler",
            description=f"dagster-taskiq scaler: sets the worker service's desired count{of_pool}",
            security_group_description=f"dagster-taskiq scaler Lambda{of_pool}",
            settings=settings,
            vpc=vpc,
            subnets=subnets,
            timeout=SCALER_TIMEOUT,
            reserved_concurrent_executions=SCALER_CONCURRENCY,
            environment={
                # The pool's queues, comma-separated (one queue renders as a plain reference).
                ENV_QUEUE_URL: Fn.join(",", [queue.queue_url for queue in queues]),
                ENV_REGION: Aws.REGION,
                ENV_DATABASE_URL: database.password_less_url(),
                env.DATABASE_PASSWORD_SECRET_ARN: database.secret.secret_arn,
                ENV_ECS_CLUSTER: cluster.cluster_name,
                ENV_ECS_SERVICE: service.service_name,
                env.MIN_WORKERS: str(pool.min_workers),
                env.MAX_WORKERS: str(pool.max_workers),
                env.TARGET_BACKLOG: str(pool.target_backlog_per_worker),
                env.STEPS_PER_WORKER: str(pool.steps_per_worker),
                env.SCALE_IN_STABILIZATION: str(settings.scale_in_stabilization_seconds),
                env.SCALE_OUT_LEAD: str(settings.scale_out_lead_seconds),
                **(
                    {env.TARGET_WAIT: str(settings.target_wait_seconds)}
                    if settings.target_wait_seconds
                    else {}
                ),
                env.METRICS_NAMESPACE: env.METRICS_NAMESPACE_VALUE,
            },
        )
        self.function = self.bundled.function
        # A failed evaluation is not retried (the next minute's invocation is the retry), and an
        # invocation that waited behind a running one for two minutes is stale: dropped.
        self.function.configure_async_invoke(retry_attempts=0, max_event_age=Duration.minutes(2))
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=list(SCALER_QUEUE_ACTIONS), resources=[q.queue_arn for q in queues]
            )
        )
        self.function.add_to_role_policy(
            iam.PolicyStatement(
                actions=list(SCALER_SERVICE_ACTIONS), resources=[service.service_arn]
            )
        )
        self.bundled.grant_secret_read(database.secret)
        database.allow_from(self.bundled.security_group, f"scaler Lambda{of_pool}")
        self.schedule = events.Rule(
            self,
            "EveryMinute",
            description=f"Runs the dagster-taskiq scaler{of_pool} every minute",
            schedule=SCHEDULE,
            targets=[targets.LambdaFunction(self.function)],
        )

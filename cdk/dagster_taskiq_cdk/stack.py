"""The whole system in one stack, and the app that cdk/app.py and the tests build."""

from __future__ import annotations

import os

from aws_cdk import App, CfnOutput, Environment, Stack, Tags
from constructs import Construct

from .alerts import AlertTopic
from .database import Database
from .dead_letters import DEAD_LETTER_VISIBILITY_TIMEOUT, DeadLetterFunction
from .monitoring import Monitoring
from .nag import add_checks
from .network import Network
from .paths import REPO_ROOT
from .queue import StepQueues
from .run_worker import RunWorkerAccess
from .scaling import ScalerFunction
from .settings import DeploymentSettings, SettingsError
from .workers import Workers


class DagsterTaskiqStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        env: Environment | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=env,
            description=f"dagster-taskiq ({settings.environment}): SQS step queue, ECS Fargate "
            "workers, PostgreSQL ledger, scaler and DLQ processor",
        )
        self.settings = settings
        Tags.of(self).add("project", "dagster-taskiq")
        Tags.of(self).add("environment", settings.environment)

        network = Network(self, "Network", settings=settings)
        subnets = network.private_subnets
        self.queues = StepQueues(
            self,
            "StepQueues",
            settings=settings,
            dead_letter_visibility_timeout=DEAD_LETTER_VISIBILITY_TIMEOUT,
        )
        self.database = Database(
            self, "Database", settings=settings, vpc=network.vpc, subnets=subnets
        )
        self.workers = Workers(
            self,
            "Workers",
            settings=settings,
            vpc=network.vpc,
            subnets=subnets,
            queue=self.queues.queue,
            database=self.database,
            dockerfile=worker_dockerfile(settings),
        )
        self.database.allow_from(self.workers.security_group, "dagster-taskiq workers")
        self.alerts = AlertTopic(self, "Alerts", settings=settings)
        self.scaler = ScalerFunction(
            self,
            "Scaling",
            settings=settings,
            vpc=network.vpc,
            subnets=subnets,
            queue=self.queues.queue,
            database=self.database,
            workers=self.workers,
        )
        self.dead_letters = DeadLetterFunction(
            self,
            "DeadLetters",
            settings=settings,
            vpc=network.vpc,
            subnets=subnets,
            dead_letter_queue=self.queues.dead_letter_queue,
            database=self.database,
            topic=self.alerts.topic,
            topic_key=self.alerts.key,
        )
        self.run_worker = RunWorkerAccess(
            self,
            "RunWorker",
            vpc=network.vpc,
            queue=self.queues.queue,
            scaler=self.scaler.function,
            service_arn=self.workers.service_arn,
            database=self.database,
        )
        self.monitoring = Monitoring(
            self,
            "Monitoring",
            settings=settings,
            queue=self.queues.queue,
            dead_letter_queue=self.queues.dead_letter_queue,
            workers=self.workers,
            scaler=self.scaler.function,
            dead_letter_processor=self.dead_letters.function,
            topic=self.alerts.topic,
        )
        self._outputs()

    def _outputs(self) -> None:
        outputs = {
            "QueueUrl": (self.queues.queue.queue_url, "executor queue_url, workers' queue"),
            "DeadLetterQueueUrl": (self.queues.dead_letter_queue.queue_url, "the DLQ"),
            "ScalerFunctionName": (
                self.scaler.function.function_name,
                "executor scaler_function (DAGSTER_TASKIQ_SCALER_FUNCTION)",
            ),
            "EcsClusterName": (
                self.workers.cluster.cluster_name,
                "executor ecs_cluster (DAGSTER_TASKIQ_ECS_CLUSTER)",
            ),
            "EcsServiceName": (
                self.workers.service.service_name,
                "executor ecs_service (DAGSTER_TASKIQ_ECS_SERVICE)",
            ),
            "DatabaseSecretArn": (
                self.database.secret.secret_arn,
                "username and password of the database",
            ),
            "DatabaseEndpoint": (self.database.hostname, "PostgreSQL host (port 5432)"),
            "AlertTopicArn": (self.alerts.topic.topic_arn, "dead-letter alerts and alarms"),
            "RunWorkerPolicyArn": (
                self.run_worker.policy.managed_policy_arn,
                "attach to the Dagster run worker's role",
            ),
            "RunWorkerSecurityGroupId": (
                self.run_worker.security_group.security_group_id,
                "put Dagster run workers (and webserver, daemon) in it to reach the database",
            ),
            "MessageRetentionSeconds": (
                str(self.settings.message_retention),
                "executor message_retention, to match the queue",
            ),
        }
        for name, (value, description) in outputs.items():
            CfnOutput(self, name, value=value, description=description)


def worker_dockerfile(settings: DeploymentSettings) -> str:
    if not (REPO_ROOT / settings.worker_dockerfile).is_file():
        raise SettingsError(
            f"No worker Dockerfile at {settings.worker_dockerfile} (context setting "
            "'worker_dockerfile', relative to the repository root)."
        )
    return settings.worker_dockerfile


def stack_environment(settings: DeploymentSettings) -> Environment | None:
    """The account and region the CLI resolved, if any; a VPC lookup needs both."""
    account = os.environ.get("CDK_DEFAULT_ACCOUNT")
    region = os.environ.get("CDK_DEFAULT_REGION")
    if account and region:
        return Environment(account=account, region=region)
    if settings.vpc_id:
        raise SettingsError(
            "vpc_id needs the stack's account and region: run cdk with AWS credentials (or "
            "set CDK_DEFAULT_ACCOUNT and CDK_DEFAULT_REGION) and a cached cdk.context.json."
        )
    # Environment-agnostic: synthesizes anywhere; deploys to the CLI's account and region.
    return None


def build_stack(app: App) -> DagsterTaskiqStack:
    """The stack, with cdk-nag's AWS Solutions checks applied to the whole app.

    Settings come from the app's context: cdk.json, cdk.context.json and ``-c`` values.
    """
    settings = DeploymentSettings.from_context(app.node.get_all_context())
    stack = DagsterTaskiqStack(
        app, settings.stack_name, settings=settings, env=stack_environment(settings)
    )
    add_checks(app)
    return stack

"""The whole system in one stack, and the app that cdk/app.py and the tests build."""

from __future__ import annotations

import os

from aws_cdk import App, CfnOutput, Environment, Stack, Tags
from constructs import Construct

from .alerts import AlertTopic
from .database import Database, ExistingDatabase, build_database
from .dead_letters import DEAD_LETTER_VISIBILITY_TIMEOUT, DeadLetterFunction
from .monitoring import MonitoredPool, Monitoring
from .nag import add_checks
from .network import Network
from .paths import REPO_ROOT
from .queue import StepQueues
from .run_worker import RunWorkerAccess
from .scaling import ScalerFunction
from .settings import DEFAULT_POOL, DeploymentSettings, SettingsError, WorkerPool
from .signing import SigningKey
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
        # The default pool's constructs keep the ids they had before there were pools (so an
        # existing deployment keeps its queues and service); another pool's carry its
        # PascalCase name.
        pools = settings.worker_pools
        self.pool_queues = {
            pool.name: StepQueues(
                self,
                _pool_id(pool, "StepQueues"),
                settings=settings,
                pool=pool,
                dead_letter_visibility_timeout=DEAD_LETTER_VISIBILITY_TIMEOUT,
            )
            for pool in pools
        }
        self.queues = self.pool_queues[DEFAULT_POOL]
        # The user's Dagster database (database_endpoint and friends), or a new one.
        self.database: Database | ExistingDatabase = build_database(
            self, "Database", settings=settings, vpc=network.vpc, subnets=subnets
        )
        self.signing_key = SigningKey(self, "SigningKey", settings=settings)
        self.workers = Workers(
            self,
            "Workers",
            settings=settings,
            vpc=network.vpc,
            subnets=subnets,
            pools=list(self.pool_queues.values()),
            database=self.database,
            signing_key=self.signing_key.secret,
            dockerfile=worker_dockerfile(settings),
        )
        self.database.allow_from(self.workers.security_group, "dagster-taskiq workers")
        self.alerts = AlertTopic(self, "Alerts", settings=settings)
        self.scalers = {
            pool.name: ScalerFunction(
                self,
                _pool_id(pool, "Scaling"),
                settings=settings,
                pool=pool,
                vpc=network.vpc,
                subnets=subnets,
                queues=self.pool_queues[pool.name].step_queues,
                database=self.database,
                cluster=self.workers.cluster,
                service=self.workers.pools[pool.name].service,
            )
            for pool in pools
        }
        self.scaler = self.scalers[DEFAULT_POOL]
        self.dead_letters = DeadLetterFunction(
            self,
            "DeadLetters",
            settings=settings,
            vpc=network.vpc,
            subnets=subnets,
            dead_letter_queues=[q.dead_letter_queue for q in self.pool_queues.values()],
            database=self.database,
            topic=self.alerts.topic,
            topic_key=self.alerts.key,
            signing_key=self.signing_key.secret,
        )
        self.run_worker = RunWorkerAccess(
            self,
            "RunWorker",
            vpc=network.vpc,
            queues=[q for queues in self.pool_queues.values() for q in queues.step_queues],
            scalers=[scaler.function for scaler in self.scalers.values()],
            service_arns=[p.service.service_arn for p in self.workers.pools.values()],
            database=self.database,
            signing_key=self.signing_key.secret,
        )
        self.monitoring = Monitoring(
            self,
            "Monitoring",
            settings=settings,
            cluster=self.workers.cluster,
            pools=[
                MonitoredPool(
                    queues=self.pool_queues[pool.name],
                    service=self.workers.pools[pool.name].service,
                    scaler=self.scalers[pool.name].function,
                )
                for pool in pools
            ],
            dead_letter_processor=self.dead_letters.function,
            topic=self.alerts.topic,
        )
        self._outputs()
        self._pool_outputs()

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
            "DatabaseEndpoint": (
                self.database.hostname,
                f"PostgreSQL host (port {self.database.port})",
            ),
            "SigningKeySecretArn": (
                self.signing_key.secret.secret_arn,
                "executor signing_key_secret_arn (DAGSTER_TASKIQ_SIGNING_KEY_SECRET_ARN)",
            ),
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
            "WorkerLogGroupName": (
                self.workers.log_group.log_group_name,
                "the workers' logs (DAGSTER_TASKIQ_WORKER_LOG_GROUP)",
            ),
            "ScalerLogGroupName": (
                self.scaler.bundled.log_group.log_group_name,
                "the scaler's logs (DAGSTER_TASKIQ_SCALER_LOG_GROUP)",
            ),
            "DeadLetterProcessorLogGroupName": (
                self.dead_letters.bundled.log_group.log_group_name,
                "the DLQ processor's logs (DAGSTER_TASKIQ_DLQ_PROCESSOR_LOG_GROUP)",
            ),
        }
        for name, (value, description) in outputs.items():
            CfnOutput(self, name, value=value, description=description)

    def _pool_outputs(self) -> None:
        """The default pool's lane, and every other pool's queues, scaler and service, under
        its PascalCase name: ``HighMemQueueUrl``, ``HighMemPriorityQueueUrl``, ..."""
        for pool in self.settings.worker_pools:
            queues = self.pool_queues[pool.name]
            outputs: dict[str, tuple[str, str]] = {}
            if not pool.is_default:
                outputs |= {
                    "QueueUrl": (queues.queue.queue_url, f"pool {pool.name}: its step queue"),
                    "DeadLetterQueueUrl": (
                        queues.dead_letter_queue.queue_url,
                        f"pool {pool.name}: its DLQ",
                    ),
                    "ScalerFunctionName": (
                        self.scalers[pool.name].function.function_name,
                        f"pool {pool.name}: its scaler",
                    ),
                    "EcsServiceName": (
                        self.workers.pools[pool.name].service.service_name,
                        f"pool {pool.name}: its worker service",
                    ),
                    "WorkerLogGroupName": (
                        self.workers.pools[pool.name].log_group.log_group_name,
                        f"pool {pool.name}: its workers' logs",
                    ),
                    "ScalerLogGroupName": (
                        self.scalers[pool.name].bundled.log_group.log_group_name,
                        f"pool {pool.name}: its scaler's logs",
                    ),
                }
            if queues.priority_queue is not None:
                outputs["PriorityQueueUrl"] = (
                    queues.priority_queue.queue_url,
                    f"pool {pool.name}: its high-priority lane",
                )
            for name, (value, description) in outputs.items():
                CfnOutput(self, pool.prefixed(name), value=value, description=description)


def _pool_id(pool: WorkerPool, base: str) -> str:
    return base if pool.is_default else f"{base}{pool.pascal_name}"


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
        secret = settings.database_secret_arn
        if secret and secret.split(":")[3:5] != [region, account]:
            raise SettingsError(
                f"database_secret_arn is in {':'.join(secret.split(':')[3:5])} (region:account) "
                f"but the stack deploys to {region}:{account}: the workers and Lambdas read "
                "the database secret of their own account and region."
            )
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

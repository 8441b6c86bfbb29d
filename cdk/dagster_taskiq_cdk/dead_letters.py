"""The DLQ processor Lambda: marks dead-lettered steps in the ledger and publishes alerts."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from dagster_taskiq.core.settings import (
    ENV_ALERT_TOPIC_ARN,
    ENV_DAGSTER_UI_URL,
    ENV_DATABASE_URL,
    ENV_SIGNING_KEY_SECRET_ARN,
)

from . import environment as env
from .database import DagsterDatabase
from .functions import BundledFunction
from .settings import DeploymentSettings

# Each record is one ledger update and one SNS publish, a second or two; a batch of ten with
# retries against a slow database fits well inside a minute.
DLQ_PROCESSOR_TIMEOUT = Duration.seconds(60)
# AWS's advice for SQS event sources: the queue's visibility timeout at six times the function's.
DEAD_LETTER_VISIBILITY_TIMEOUT = Duration.seconds(6 * 60)
BATCH_SIZE = 10
# Dead letters come in bursts when a bad release kills workers; two concurrent processors
# drain them without opening dozens of database connections.
MAX_CONCURRENCY = 2
TOPIC_KEY_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey")


class DeadLetterFunction(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        dead_letter_queues: Sequence[sqs.IQueue],
        database: DagsterDatabase,
        topic: sns.ITopic,
        topic_key: kms.IKey,
        signing_key: secretsmanager.ISecret,
    ) -> None:
        super().__init__(scope, construct_id)
        environment = {
            ENV_DATABASE_URL: database.password_less_url(),
            env.DATABASE_PASSWORD_SECRET_ARN: database.secret.secret_arn,
            ENV_ALERT_TOPIC_ARN: topic.topic_arn,
            # Read once per container: a dead letter is authenticated before it marks a step.
            ENV_SIGNING_KEY_SECRET_ARN: signing_key.secret_arn,
            env.METRICS_NAMESPACE: env.METRICS_NAMESPACE_VALUE,
            env.METRICS_SERVICE: settings.metrics_service,
        }
        if settings.dagster_ui_url:
            environment[ENV_DAGSTER_UI_URL] = settings.dagster_ui_url
        self.bundled = BundledFunction(
            self,
            "Processor",
            bundle="dlq_processor",
            description="dagster-taskiq DLQ processor: fails dead-lettered steps, alerts",
            security_group_description="dagster-taskiq DLQ processor Lambda",
            settings=settings,
            vpc=vpc,
            subnets=subnets,
            timeout=DLQ_PROCESSOR_TIMEOUT,
            environment=environment,
        )
        self.function = self.bundled.function
        # One function for every pool's DLQ (a dead letter carries its step's identity, not its
        # pool's). Each source grants its DLQ's receive, delete, visibility and attribute calls.
        for dead_letter_queue in dead_letter_queues:
            self.function.add_event_source(
                event_sources.SqsEventSource(
                    dead_letter_queue,
                    batch_size=BATCH_SIZE,
                    report_batch_item_failures=True,
                    max_concurrency=MAX_CONCURRENCY,
                )
            )
        # Not topic.grant_publish, which grants kms:GenerateDataKey* (a wildcard): publishing
        # to an encrypted topic needs exactly these two on its key.
        self.function.add_to_role_policy(
            iam.PolicyStatement(actions=["sns:Publish"], resources=[topic.topic_arn])
        )
        self.function.add_to_role_policy(
            iam.PolicyStatement(actions=list(TOPIC_KEY_ACTIONS), resources=[topic_key.key_arn])
        )
        self.bundled.grant_secret_read(database.secret)
        self.bundled.grant_secret_read(signing_key)
        database.allow_from(self.bundled.security_group, "DLQ processor Lambda")

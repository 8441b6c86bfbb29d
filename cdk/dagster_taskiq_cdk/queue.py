"""The step queue and its dead-letter queue."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from .settings import DLQ_RETENTION_SECONDS, DeploymentSettings

# Workers long-poll; so does nothing else, but a queue default keeps every consumer cheap.
RECEIVE_WAIT_SECONDS = 20


class StepQueues(Construct):
    """SQS-managed encryption (no KMS key for the executor, workers and Lambdas to be granted),
    TLS-only queue policies, and a redrive after ``max_receive_count`` deliveries."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        dead_letter_visibility_timeout: Duration,
    ) -> None:
        super().__init__(scope, construct_id)
        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetterQueue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            # Longer than the step queue's retention: a dead letter outlives its original.
            retention_period=Duration.seconds(DLQ_RETENTION_SECONDS),
            # The DLQ processor's event source requires at least the function's timeout.
            visibility_timeout=dead_letter_visibility_timeout,
        )
        self.queue = sqs.Queue(
            self,
            "Queue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.seconds(settings.message_retention),
            visibility_timeout=Duration.seconds(settings.visibility_timeout),
            receive_message_wait_time=Duration.seconds(RECEIVE_WAIT_SECONDS),
            dead_letter_queue=sqs.DeadLetterQueue(
                max_receive_count=settings.max_receive_count, queue=self.dead_letter_queue
            ),
        )

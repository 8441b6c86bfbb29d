"""A worker pool's queues: its step queue, an optional high-priority lane, and their DLQ."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from .settings import DLQ_RETENTION_SECONDS, DeploymentSettings, WorkerPool

# Workers long-poll; so does nothing else, but a queue default keeps every consumer cheap.
RECEIVE_WAIT_SECONDS = 20
FIFO_SUFFIX = ".fifo"


class StepQueues(Construct):
    """SQS-managed encryption (no KMS key for the executor, workers and Lambdas to be granted),
    TLS-only queue policies, and a redrive after ``max_receive_count`` deliveries.

    With ``priority_lane``, a second queue with the same settings that the pool's workers
    receive from first; it dead-letters into the same DLQ, so one DLQ holds all of the pool's
    dead letters. With ``fifo``, all three are FIFO queues (SQS requires a FIFO queue's DLQ to
    be FIFO too), named ``<stack>-<pool>[-priority|-dlq].fifo`` because a FIFO queue's name
    must end in ``.fifo``; content-based deduplication is off, the executor sends the step's
    idempotency key as the deduplication id.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        pool: WorkerPool,
        dead_letter_visibility_timeout: Duration,
    ) -> None:
        super().__init__(scope, construct_id)
        self.pool = pool

        def fifo_name(suffix: str) -> str | None:
            if not pool.fifo:
                return None
            return f"{settings.stack_name}-{pool.name}{suffix}{FIFO_SUFFIX}"

        # None leaves the property out: a standard queue's template is unchanged.
        fifo = True if pool.fifo else None
        content_based_deduplication = False if pool.fifo else None
        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetterQueue",
            queue_name=fifo_name("-dlq"),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            # Longer than the step queue's retention: a dead letter outlives its original.
            retention_period=Duration.seconds(DLQ_RETENTION_SECONDS),
            # The DLQ processor's event source requires at least the function's timeout.
            visibility_timeout=dead_letter_visibility_timeout,
            fifo=fifo,
            content_based_deduplication=content_based_deduplication,
        )

        def step_queue(construct_id: str, name: str | None) -> sqs.Queue:
            return sqs.Queue(
                self,
                construct_id,
                queue_name=name,
                encryption=sqs.QueueEncryption.SQS_MANAGED,
                enforce_ssl=True,
                retention_period=Duration.seconds(settings.message_retention),
                visibility_timeout=Duration.seconds(settings.visibility_timeout),
                receive_message_wait_time=Duration.seconds(RECEIVE_WAIT_SECONDS),
                dead_letter_queue=sqs.DeadLetterQueue(
                    max_receive_count=settings.max_receive_count, queue=self.dead_letter_queue
                ),
                fifo=fifo,
                content_based_deduplication=content_based_deduplication,
            )

        self.queue = step_queue("Queue", fifo_name(""))
        self.priority_queue = (
            step_queue("PriorityQueue", fifo_name("-priority")) if pool.priority_lane else None
        )

    @property
    def step_queues(self) -> list[sqs.Queue]:
        """The queues steps are sent to: the step queue, then the lane if there is one."""
        return [self.queue] if self.priority_queue is None else [self.queue, self.priority_queue]

"""What a Dagster run worker (the process running the executor) needs from this stack."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from .database import DagsterDatabase

RUN_WORKER_QUEUE_ACTIONS = ("sqs:GetQueueAttributes", "sqs:SendMessage")
# The executor reads the signing key by ARN (signing_key_secret_arn); nothing else.
RUN_WORKER_SECRET_ACTIONS = ("secretsmanager:GetSecretValue",)


class RunWorkerAccess(Construct):
    """A managed policy to attach to the run worker's role, and a security group to put it in.

    The executor sends steps to any pool's queues (and lanes) and checks their settings; for
    scale-from-zero it reads a pool's worker service and invokes the pool's scaler. It signs
    each message with the key it reads from the signing key's secret. It also writes the
    ledger and Dagster's event log, so the group is admitted to the database.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        vpc: ec2.IVpc,
        queues: Sequence[sqs.IQueue],
        scalers: Sequence[lambda_.IFunction],
        service_arns: Sequence[str],
        database: DagsterDatabase,
        signing_key: secretsmanager.ISecret,
    ) -> None:
        super().__init__(scope, construct_id)
        self.policy = iam.ManagedPolicy(
            self,
            "Policy",
            description="dagster-taskiq run worker: send signed steps, wake the scaler",
            statements=[
                iam.PolicyStatement(
                    actions=list(RUN_WORKER_QUEUE_ACTIONS),
                    resources=[queue.queue_arn for queue in queues],
                ),
                iam.PolicyStatement(
                    actions=["lambda:InvokeFunction"],
                    resources=[scaler.function_arn for scaler in scalers],
                ),
                iam.PolicyStatement(actions=["ecs:DescribeServices"], resources=list(service_arns)),
                iam.PolicyStatement(
                    actions=list(RUN_WORKER_SECRET_ACTIONS), resources=[signing_key.secret_arn]
                ),
            ],
        )
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description="dagster-taskiq run workers (and the Dagster webserver and daemon)",
            allow_all_outbound=True,
        )
        database.allow_from(self.security_group, "Dagster run workers")

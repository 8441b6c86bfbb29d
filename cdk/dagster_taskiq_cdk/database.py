"""The PostgreSQL that holds Dagster's storage (dagster-postgres) and the ledger: an Aurora
Serverless v2 cluster the stack creates, or the user's own Dagster database."""

from __future__ import annotations

from typing import Protocol

from aws_cdk import Duration
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_rds as rds
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from .nag import Acknowledgment, acknowledge
from .settings import DeploymentSettings

DATABASE_NAME = "dagster"
DATABASE_USER = "dagster_taskiq"
DATABASE_PORT = 5432
ENGINE_VERSION = rds.AuroraPostgresEngineVersion.VER_16_13


class DagsterDatabase(Protocol):
    """What the workers, the Lambdas and the run worker need of the database."""

    hostname: str
    port: int
    name: str
    # JSON with "username" and "password" (the format RDS and Aurora write).
    secret: secretsmanager.ISecret
    # In the ledger URL; None: the user name comes from the secret too.
    username: str | None

    def allow_from(self, peer: ec2.ISecurityGroup, description: str) -> None: ...

    def password_less_url(self) -> str: ...


def ledger_url_without_password(
    hostname: str, port: int, name: str, username: str | None = None
) -> str:
    """The ledger URL; the password (and, without ``username``, the user) stays in the secret.

    TLS is required (``sslmode=require``: encrypted; the RDS CA is not in the bundle to
    verify against).
    """
    user = f"{username}@" if username else ""
    return f"postgresql://{user}{hostname}:{port}/{name}?sslmode=require"


def build_database(
    scope: Construct,
    construct_id: str,
    *,
    settings: DeploymentSettings,
    vpc: ec2.IVpc,
    subnets: ec2.SubnetSelection,
) -> Database | ExistingDatabase:
    """The user's database when the settings name one, else a new Aurora cluster."""
    if settings.existing_database:
        return ExistingDatabase(scope, construct_id, settings=settings)
    return Database(scope, construct_id, settings=settings, vpc=vpc, subnets=subnets)


class ExistingDatabase(Construct):
    """The user's Dagster database (``database_endpoint`` and friends): nothing is created
    but one ingress rule on its security group for each group of this stack that connects.

    The credentials are the secret's ``username`` and ``password``; the secret's ARN must be
    complete (with its six-character suffix), so that IAM policies and ECS name it exactly.
    """

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: DeploymentSettings
    ) -> None:
        super().__init__(scope, construct_id)
        if not (
            settings.database_endpoint
            and settings.database_name
            and settings.database_secret_arn
            and settings.database_security_group_id
        ):  # the settings check this; repeated for the type checker
            raise ValueError("An existing database needs all of its settings")
        # mutable: the stack adds its ingress rules to the group (and removes them with it).
        self.security_group = ec2.SecurityGroup.from_security_group_id(
            self, "SecurityGroup", settings.database_security_group_id, mutable=True
        )
        self.secret: secretsmanager.ISecret = secretsmanager.Secret.from_secret_complete_arn(
            self, "Secret", settings.database_secret_arn
        )
        self.hostname = settings.database_endpoint
        self.port = settings.database_port_or_default
        self.name = settings.database_name
        self.username: str | None = None

    def allow_from(self, peer: ec2.ISecurityGroup, description: str) -> None:
        self.security_group.add_ingress_rule(peer, ec2.Port.tcp(self.port), description)

    def password_less_url(self) -> str:
        return ledger_url_without_password(self.hostname, self.port, self.name)


class Database(Construct):
    """One writer in private subnets; the password is generated into Secrets Manager.

    Nothing reaches port 5432 unless ``allow_from`` admits its security group.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: DeploymentSettings,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
    ) -> None:
        super().__init__(scope, construct_id)
        self.security_group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description="dagster-taskiq database: PostgreSQL from the workers, Lambdas and runs",
            allow_all_outbound=False,
        )
        self._generated_secret = rds.DatabaseSecret(self, "Secret", username=DATABASE_USER)
        self.cluster = rds.DatabaseCluster(
            self,
            "Cluster",
            engine=rds.DatabaseClusterEngine.aurora_postgres(version=ENGINE_VERSION),
            credentials=rds.Credentials.from_secret(self._generated_secret),
            default_database_name=DATABASE_NAME,
            port=DATABASE_PORT,
            writer=rds.ClusterInstance.serverless_v2("Writer"),
            serverless_v2_min_capacity=settings.db_min_capacity,
            serverless_v2_max_capacity=settings.db_max_capacity,
            vpc=vpc,
            vpc_subnets=subnets,
            security_groups=[self.security_group],
            storage_encrypted=True,
            deletion_protection=settings.deletion_protection,
            iam_authentication=settings.iam_database_auth,
            backup=rds.BackupProps(retention=Duration.days(7)),
        )
        # The secret attached to the cluster: it also holds host, port and engine, and
        # references to it wait for the cluster.
        attached = self.cluster.secret
        if attached is None:  # a cluster created with a secret always has one
            raise RuntimeError("The database cluster has no secret")
        self.secret: secretsmanager.ISecret = attached
        self.hostname = self.cluster.cluster_endpoint.hostname
        self.port = DATABASE_PORT
        self.name = DATABASE_NAME
        self.username: str | None = DATABASE_USER
        self._acknowledge(settings)

    def allow_from(self, peer: ec2.ISecurityGroup, description: str) -> None:
        self.security_group.add_ingress_rule(peer, ec2.Port.tcp(self.port), description)

    def password_less_url(self) -> str:
        return ledger_url_without_password(self.hostname, self.port, self.name, self.username)

    def _acknowledge(self, settings: DeploymentSettings) -> None:
        acknowledgments = [
            Acknowledgment(
                "AwsSolutions-RDS11",
                "The default port adds no exposure here: the cluster is in private subnets and "
                "its security group admits only the workers', the Lambdas' and the run "
                "workers' groups; 5432 keeps the dagster-postgres and ledger URLs plain.",
            ),
        ]
        if not settings.deletion_protection:
            acknowledgments.append(
                Acknowledgment(
                    "AwsSolutions-RDS10",
                    "deletion_protection=false was set in this deployment's CDK context (a "
                    "disposable environment); it is on by default.",
                )
            )
        if not settings.iam_database_auth:
            acknowledgments.append(
                Acknowledgment(
                    "AwsSolutions-RDS6",
                    "iam_database_auth=false was set in this deployment's CDK context; the "
                    "ledger and dagster-postgres authenticate with the Secrets Manager password.",
                )
            )
        acknowledge(self.cluster, acknowledgments)
        acknowledge(
            self._generated_secret,
            [
                Acknowledgment(
                    "AwsSolutions-SMG4",
                    "Not rotated automatically: ECS injects the password into each worker when "
                    "it starts and warm workers live for hours, so a rotation would break their "
                    "new connections until the service is redeployed. Rotate with a deployment.",
                ),
            ],
        )

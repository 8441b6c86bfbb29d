"""Aurora Serverless v2 PostgreSQL: Dagster's storage (dagster-postgres) and the ledger."""

from __future__ import annotations

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
        self.username = DATABASE_USER
        self._acknowledge(settings)

    def allow_from(self, peer: ec2.ISecurityGroup, description: str) -> None:
        self.security_group.add_ingress_rule(peer, ec2.Port.tcp(self.port), description)

    def password_less_url(self) -> str:
        """The ledger URL without the password, which stays in the secret.

        TLS is required (``sslmode=require``: encrypted; the RDS CA is not in the bundle to
        verify against).
        """
        return (
            f"postgresql://{self.username}@{self.hostname}:{self.port}/{self.name}?sslmode=require"
        )

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

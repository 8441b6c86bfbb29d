"""The HMAC key step messages are signed with, generated into Secrets Manager.

The run worker signs with it, the workers accept only messages it verifies, and the DLQ
processor authenticates a dead letter with it before marking its step. Nobody types it and
it is in no plain environment variable: ECS injects it into the workers, and the run worker
and the DLQ processor read it by ARN.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from .nag import Acknowledgment, acknowledge
from .settings import DeploymentSettings

# 64 letters and digits: about 380 bits, far beyond what HMAC-SHA256 needs.
KEY_LENGTH = 64


class SigningKey(Construct):
    def __init__(
        self, scope: Construct, construct_id: str, *, settings: DeploymentSettings
    ) -> None:
        super().__init__(scope, construct_id)
        self.secret = secretsmanager.Secret(
            self,
            "Secret",
            description=f"dagster-taskiq {settings.environment}: HMAC key of step messages",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=KEY_LENGTH,
                exclude_punctuation=True,
                include_space=False,
            ),
            # Destroyed with the stack: a key outliving its queues signs nothing.
            removal_policy=RemovalPolicy.DESTROY,
        )
        acknowledge(
            self.secret,
            [
                Acknowledgment(
                    "AwsSolutions-SMG4",
                    "Not rotated automatically: workers verify every message with the key "
                    "they were started with, so a rotation would make them reject the steps "
                    "of runs signed with the new key (and the reverse) until all were "
                    "restarted. Rotate it by hand while no run is in flight: put a new value, "
                    "then redeploy the worker services and restart the run workers.",
                ),
            ],
        )

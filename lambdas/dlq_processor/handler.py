"""The DLQ processor Lambda: the step queue's dead-letter queue is its SQS event source.

Thin: the logic is ``dagster_taskiq.dead_letters.processor``. Each record is one dead letter; a
record that fails (ledger unreachable, SNS refused the alert) is reported in the partial
batch response, so SQS delivers only that one again. Processing is safe to repeat.

Environment:

- ``DAGSTER_TASKIQ_DATABASE_URL``: the ledger (required).
- ``DAGSTER_TASKIQ_ALERT_TOPIC_ARN``: the SNS topic alerts go to (required).
- ``DAGSTER_TASKIQ_DATABASE_SECRET_ARN``: the database secret, for the password (and user)
  the ledger URL leaves out.
- ``DAGSTER_TASKIQ_SIGNING_KEY_SECRET_ARN``: the secret holding the key step messages are
  signed with (or ``DAGSTER_TASKIQ_SIGNING_KEY``, the key itself), if any.
- ``DAGSTER_TASKIQ_DAGSTER_UI_URL``: the Dagster UI, for run links in alerts.
- ``AWS_ENDPOINT_URL_SNS``: another SNS endpoint (an emulator), read by boto3 itself.
- ``POWERTOOLS_METRICS_NAMESPACE``: the CloudWatch namespace, ``DagsterTaskiq`` by default.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import boto3
from aws_lambda_powertools import Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.observability import METRICS_NAMESPACE, get_logger
from dagster_taskiq.core.settings import (
    ENV_ALERT_TOPIC_ARN,
    ENV_DAGSTER_UI_URL,
    ENV_DATABASE_PASSWORD,
    ENV_DATABASE_SECRET_ARN,
    ENV_DATABASE_URL,
    ENV_DATABASE_USER,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    database_url,
    signing_key,
)
from dagster_taskiq.dead_letters.processor import (
    SERVICE,
    DeadLetter,
    DeadLetterProcessor,
    DeadLetterResult,
    SnsAlerts,
)

logger = get_logger(SERVICE)
# Disabled outside Lambda (no LAMBDA_TASK_ROOT) or by POWERTOOLS_TRACE_DISABLED. Only boto
# calls are patched: the record's subsegment already times the ledger.
tracer = Tracer(service=SERVICE, patch_modules=["botocore"])
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)
batch = BatchProcessor(event_type=EventType.SQS)


@dataclass(frozen=True)
class ProcessorSettings:
    """The DLQ processor's configuration, read from its environment and nothing else.

    Secrets are named, not read: ``environment`` holds what ``database_url`` needs to
    resolve the ledger's credentials, and ``signing_key_secret_arn`` is read when the
    processor is built.
    """

    database_url: str
    topic_arn: str
    environment: Mapping[str, str]
    signing_key: str | None = None
    signing_key_secret_arn: str | None = None
    dagster_ui_url: str | None = None

    @property
    def topic_region(self) -> str:
        return self.topic_arn.split(":")[3]

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProcessorSettings:
        url = environ.get(ENV_DATABASE_URL) or None
        topic_arn = environ.get(ENV_ALERT_TOPIC_ARN) or None
        if not url or not topic_arn:
            raise ConfigurationError(
                f"Set {ENV_DATABASE_URL} (the ledger) and {ENV_ALERT_TOPIC_ARN} (the SNS topic "
                "for alerts) on the DLQ processor Lambda."
            )
        arn_parts = topic_arn.split(":")
        if len(arn_parts) != 6 or arn_parts[2] != "sns":
            raise ConfigurationError(
                f"{ENV_ALERT_TOPIC_ARN} must be an SNS topic ARN "
                f"(arn:aws:sns:<region>:<account>:<name>), got {topic_arn!r}"
            )
        credentials = {
            name: environ[name]
            for name in (ENV_DATABASE_USER, ENV_DATABASE_PASSWORD, ENV_DATABASE_SECRET_ARN)
            if environ.get(name)
        }
        return cls(
            database_url=url,
            topic_arn=topic_arn,
            environment=credentials,
            signing_key=environ.get(ENV_SIGNING_KEY) or None,
            signing_key_secret_arn=environ.get(ENV_SIGNING_KEY_SECRET_ARN) or None,
            dagster_ui_url=environ.get(ENV_DAGSTER_UI_URL) or None,
        )


def build_processor(settings: ProcessorSettings) -> DeadLetterProcessor:
    """Reads the secrets the settings name, and connects nothing yet."""
    url = database_url(settings.database_url, settings.environment) or settings.database_url
    sns = boto3.session.Session().client(
        "sns",
        # The topic's own region, whichever region the Lambda runs in.
        region_name=settings.topic_region,
        config=Config(
            connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 3}
        ),
    )
    return DeadLetterProcessor(
        # Records are processed one at a time: one connection per container is enough.
        Ledger(url, pool_size=1),
        SnsAlerts(sns, settings.topic_arn),
        signing_key=signing_key(settings.signing_key, settings.signing_key_secret_arn),
        dagster_ui_url=settings.dagster_ui_url,
    )


@functools.cache
def get_processor() -> DeadLetterProcessor:
    """Built on first use and kept for the container's life: one pool, one SNS client."""
    return build_processor(ProcessorSettings.from_env(os.environ))


@tracer.capture_method(capture_response=False)
def record_handler(record: SQSRecord) -> DeadLetterResult:
    letter = DeadLetter(
        message_id=record.message_id,
        body=record.body,
        receive_count=int(record.attributes.approximate_receive_count),
    )
    try:
        result = get_processor().process(letter)
    except Exception:
        # The batch processor records the failure silently: say why here.
        logger.exception(
            "Dead letter not processed; SQS will deliver it again",
            extra={"message_id": letter.message_id, "receive_count": letter.receive_count},
        )
        raise
    logger.info(
        "Dead letter processed",
        extra={"message_id": letter.message_id, "receive_count": letter.receive_count}
        | asdict(result),
    )
    return result


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    """The partial batch response: the records to deliver again.

    A batch whose records all fail (the ledger is down) fails the invocation instead, as
    powertools does by default, which Lambda's Errors metric and alarms see.
    """
    try:
        response = process_partial_response(
            event=event, record_handler=record_handler, processor=batch, context=context
        )
    except BatchProcessingError as e:
        _count_failed(len(e.child_exceptions))
        raise
    _count_failed(len(response["batchItemFailures"]))
    return response


def _count_failed(records: int) -> None:
    metrics.add_metric(name="DeadLetterRecordsFailed", unit=MetricUnit.Count, value=records)

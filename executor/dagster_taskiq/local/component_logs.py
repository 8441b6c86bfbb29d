"""Log files of the local stack's scaler and DLQ processor, like their CloudWatch log groups.

In AWS the scaler and the DLQ processor are Lambdas, each with a log group. Locally they
run as threads of the process that holds the stack, so their loggers get a file each under
the stack's ``logs/`` (``scaler.log``, ``dlq-processor.log``), one JSON object a line like
the workers' logs, for ``dagster-taskiq logs``. Loggers are process-wide: two stacks open
in one process at once write to both stacks' files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster_taskiq.dead_letters.processor import DeadLetterResult
    from dagster_taskiq.scaling.scaler import Evaluation

SCALER_LOG = "scaler.log"
DLQ_PROCESSOR_LOG = "dlq-processor.log"
# The loggers whose records each file gets. "dlq-processor" is the powertools logger of
# dagster_taskiq.dead_letters.processor (powertools names it after the service).
SCALER_LOGGERS = ("dagster_taskiq.scaling.scaler", "dagster_taskiq.local.autoscale")
DLQ_PROCESSOR_LOGGERS = ("dlq-processor", "dagster_taskiq.local.dlq_processor")

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

log_scaler = logging.getLogger("dagster_taskiq.local.autoscale")
log_dead_letters = logging.getLogger("dagster_taskiq.local.dlq_processor")


class JsonLines(logging.Formatter):
    """One JSON object a line, with the record's extra fields, as powertools writes."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": record.levelname,
            "message": record.getMessage(),
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "logger": record.name,
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@contextlib.contextmanager
def component_logs(log_dir: Path) -> Iterator[None]:
    """Attach the scaler's and the DLQ processor's log files for the life of a stack."""
    attached: list[tuple[logging.Logger, logging.Handler, int]] = []
    files = ((SCALER_LOG, SCALER_LOGGERS), (DLQ_PROCESSOR_LOG, DLQ_PROCESSOR_LOGGERS))
    try:
        for file_name, names in files:
            handler = logging.FileHandler(log_dir / file_name, encoding="utf-8")
            handler.setFormatter(JsonLines())
            handler.setLevel(logging.INFO)
            for name in names:
                logger = logging.getLogger(name)
                attached.append((logger, handler, logger.level))
                # A decision is INFO: a logger left at NOTSET would inherit root's WARNING.
                if logger.level == logging.NOTSET or logger.level > logging.INFO:
                    logger.setLevel(logging.INFO)
                logger.addHandler(handler)
        yield
    finally:
        for logger, attached_handler, level in reversed(attached):
            logger.removeHandler(attached_handler)
            logger.setLevel(level)
        for closing in {h for _, h, _ in attached}:
            closing.close()


def log_evaluation(evaluation: Evaluation, cause: str) -> None:
    """A decision of the local scaler, with the fields the scaler Lambda logs."""
    decision = evaluation.decision
    log_scaler.info(
        decision.detail,
        extra={
            "reason": decision.reason.value,
            "current": decision.current,
            "desired": decision.desired,
            "applied": evaluation.applied,
            "cause": cause,
        },
    )


def log_dead_letter(result: DeadLetterResult) -> None:
    """What the local DLQ processor did with one dead letter."""
    log_dead_letters.info(
        f"Dead letter {result.outcome.value}: {result.detail}",
        extra={
            "outcome": result.outcome.value,
            "idempotency_key": result.idempotency_key,
            "run_id": result.run_id,
            "step_key": result.step_key,
            "attempt": result.attempt,
            "alerted": result.alerted,
        },
    )

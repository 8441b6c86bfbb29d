"""Every error this package raises on purpose, in one place.

Two kinds matter to a caller. A ``TransientError`` is an outage: the same call may succeed
later, and ``core.retry`` retries it until a deadline. Anything else is not retried: a
wrong setting, a message that must not run, a library that changed under a patch.

Dagster-free (the Lambdas import it). The executor's config error is a ``DagsterError``, so
it lives with the executor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dagster_taskiq.core.messages import RejectReason


class DagsterTaskiqError(Exception):
    """Raised by dagster-taskiq on purpose; the message says what happened and what to do."""


class TransientError(DagsterTaskiqError):
    """An outage: retrying the same call later may succeed."""


class LedgerUnavailable(TransientError):
    """The database could not be reached or refused the statement; safe to retry."""


class QueueUnavailable(TransientError):
    """SQS could not be reached or refused the call; safe to retry."""


class WorkerServiceUnavailable(TransientError):
    """The worker service could not be read or updated."""


class ConfigurationError(DagsterTaskiqError):
    """A setting is missing or wrong; the message says what to set."""


class SchemaMismatch(ConfigurationError):
    """The ledger's schema is not one this release can use; the message says what to do."""


class RoutingError(DagsterTaskiqError):
    """A step's tags name no configured queue or carry a priority that is not a number."""


class MessageRejected(DagsterTaskiqError):
    """A message that must not be executed. ``reason`` is one of RejectReason."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


class MessageTooLarge(DagsterTaskiqError):
    """Raised at launch: the encoded message would not fit in an SQS message."""


class PatchTargetChanged(DagsterTaskiqError):
    """A library no longer has what one of dagster-taskiq's patches of its internals relies
    on: upgrade dagster-taskiq, or keep the library at a version the patch was tested for."""

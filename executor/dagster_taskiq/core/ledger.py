"""The exactly-once ledger: one PostgreSQL row per step attempt (idempotency key).

Dagster-free: the executor, the workers and the Lambdas all use it.

Statuses::

    ENQUEUED -> RUNNING -> SUCCEEDED | FAILED
    ENQUEUED | RUNNING -> DEAD_LETTERED
    any non-terminal -> CANCEL_REQUESTED -> CANCELLED

Every transition is one conditional statement, so concurrent workers, the executor and
the dead-letter Lambda can race without a lock. A worker holds a step through a lease
and a fencing token: claiming increments the token, and heartbeats and completion only
apply ``WHERE fencing_token = mine``, so an attempt that lost its lease can never record
anything. All times come from the database clock (``now()``), never a worker's.
"""

from __future__ import annotations

import enum
import hashlib
import ssl
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from dagster_taskiq.core.connections import check_before_use
from dagster_taskiq.core.errors import ConfigurationError, LedgerUnavailable
from dagster_taskiq.core.messages import safe_text
from dagster_taskiq.core.schema import SchemaState, read_state, require_usable
from dagster_taskiq.core.settings import ledger_url, redact_url


class Status(enum.StrEnum):
    ENQUEUED = "ENQUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DEAD_LETTERED = "DEAD_LETTERED"
    CANCEL_REQUESTED = "CANCEL_REQUESTED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.DEAD_LETTERED, Status.CANCELLED})
NON_TERMINAL = frozenset(Status) - TERMINAL

metadata = sa.MetaData()

steps = sa.Table(
    "dagster_taskiq_steps",
    metadata,
    sa.Column("idempotency_key", sa.Text, primary_key=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("step_key", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("queue_url", sa.Text),  # where the step was sent: the scaler counts per queue
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("worker_id", sa.Text),
    sa.Column("fencing_token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duplicates_suppressed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("payload_hash", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_dagster_taskiq_steps_run_id", "run_id"),
    sa.Index("ix_dagster_taskiq_steps_status_lease", "status", "lease_expires_at"),
)

# Messages that were never executed: malformed, forged, unknown version, no ledger row.
rejected_messages = sa.Table(
    "dagster_taskiq_rejected_messages",
    metadata,
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("idempotency_key", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("body_excerpt", sa.Text, nullable=False),
    sa.Column("worker_id", sa.Text),
    sa.Column("receive_count", sa.Integer, nullable=False, server_default="1"),
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
)

NOW = sa.func.now()
# The error of a row the executor marked DEAD_LETTERED before the DLQ processor did: its
# message used its last delivery, so it can only be in the DLQ. No column says so (no
# schema change): this prefix does, and the DLQ processor replaces it when it confirms.
PRESUMED_DEAD_LETTER = "presumed dead-lettered by the executor: "
# What a rejection record keeps of a message's text: enough to recognise it.
REJECTION_TEXT_CHARS = 2000
REJECTION_KEY_CHARS = 1000
# What a step row keeps of an error: an op's exception text may hold NUL (refused by
# PostgreSQL text) or be very long; the full story is in Dagster's event log.
ERROR_TEXT_CHARS = 8000
# Seeded with the module's first-release name, not its path: every release must take the
# same lock, or two releases running side by side during a deploy would not exclude each other.
_SCHEMA_LOCK_ID = int.from_bytes(hashlib.sha256(b"dagster_taskiq.ledger").digest()[:4], "big")


def _error_text(text: str | None) -> str | None:
    return None if text is None else safe_text(text, ERROR_TEXT_CHARS)


def _seconds(value: int | float) -> sa.ColumnElement[Any]:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.cast(value, sa.Float))


# SQLSTATEs of a server that is going away or not there yet: connection exceptions
# (class 08), shutting down or starting up (57P01-57P03), too many connections (53300).
# pg8000 reports these from the server as DatabaseError, not OperationalError.
_OUTAGE_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def _sqlstate(error: DBAPIError) -> str | None:
    args = getattr(error.orig, "args", ())
    return args[0].get("C") if args and isinstance(args[0], dict) else None


def _is_outage(error: DBAPIError) -> bool:
    if error.connection_invalidated or isinstance(
        error, sa.exc.OperationalError | sa.exc.InterfaceError
    ):
        return True
    state = _sqlstate(error) or ""
    return state in _OUTAGE_STATES or state.startswith("08")


def _server_refused(error: BaseException) -> bool:
    """The server refused the statement and said why (a SQLSTATE): it answered in full, so
    the connection is in step with it. An outage is not that, nor is any failure on this
    side of the wire (a value the driver could not encode, an interrupt)."""
    return isinstance(error, DBAPIError) and _sqlstate(error) is not None and not _is_outage(error)


def _discard_unless_refused(conn: Connection, error: BaseException) -> None:
    # pg8000 can fail after part of a statement is on the wire, leaving unread replies
    # behind: every later statement on that connection would read the wrong ones.
    if not _server_refused(error) and not conn.invalidated:
        conn.invalidate()


@dataclass(frozen=True)
class StepRecord:
    idempotency_key: str
    run_id: str
    step_key: str
    attempt: int
    queue_url: str | None
    status: Status
    worker_id: str | None
    fencing_token: int
    lease_expires_at: datetime | None
    lease_live: bool
    deliveries: int
    duplicates_suppressed: int
    payload_hash: str
    error: str | None
    enqueued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    age_seconds: float
    # Seconds since the lease expired, by the database clock: negative while it is live,
    # None when the row never had one.
    lease_expired_seconds: float | None = None
    idle_seconds: float = 0.0  # seconds since the row last changed

    @classmethod
    def from_row(cls, row: RowMapping) -> StepRecord:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["status"] = Status(row["status"])
        values["age_seconds"] = float(row["age_seconds"])
        values["idle_seconds"] = float(row["idle_seconds"])
        expired = row["lease_expired_seconds"]
        values["lease_expired_seconds"] = None if expired is None else float(expired)
        return cls(**values)

    @property
    def presumed_dead_letter(self) -> bool:
        """DEAD_LETTERED by the executor, which gave up waiting for the DLQ processor;
        the DLQ processor confirms it (and alerts) once it comes."""
        return self.status is Status.DEAD_LETTERED and (self.error or "").startswith(
            PRESUMED_DEAD_LETTER
        )


@dataclass(frozen=True)
class NewStep:
    """A step attempt to record as ENQUEUED (``Ledger.enqueue_many``)."""

    key: str
    run_id: str
    step_key: str
    attempt: int
    payload_hash: str
    queue_url: str | None = None


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # run it: the token is yours
    DUPLICATE = "duplicate"  # already terminal: delete the message
    BUSY = "busy"  # a live lease is held elsewhere: hide the message for a while
    CANCELLED = "cancelled"  # cancel was requested before it started: delete the message
    UNKNOWN = "unknown"  # no ledger row: never launched by an executor, or expired
    MISMATCH = "mismatch"  # a different payload than the one launched under this key


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    fencing_token: int = 0
    previous_worker: str | None = None
    previous_status: Status | None = None
    lease_remaining_seconds: float = 0.0
    record: StepRecord | None = None

    @property
    def is_takeover(self) -> bool:
        """True when an earlier delivery started this attempt and lost its lease."""
        return self.outcome is ClaimOutcome.CLAIMED and self.previous_status is Status.RUNNING


def pg8000_connect_args(url: str) -> tuple[str, dict[str, Any]]:
    """Move libpq's connection options, which pg8000 does not take, into its arguments.

    ``sslmode`` require / verify-ca / verify-full become an SSL context (RDS and Aurora
    URLs carry them); disable, allow and prefer connect without TLS. ``connect_timeout``
    becomes pg8000's ``timeout``, 10 s by default, so an unreachable host fails fast.
    """
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    args: dict[str, Any] = {"timeout": int(query.pop("connect_timeout", 10))}
    sslmode = query.pop("sslmode", "disable")
    cafile = query.pop("sslrootcert", None)
    if sslmode in ("require", "verify-ca", "verify-full"):
        context = ssl.create_default_context(cafile=cafile)
        if sslmode != "verify-full":
            context.check_hostname = False
        if sslmode == "require":
            context.verify_mode = ssl.CERT_NONE
        args["ssl_context"] = context
    elif sslmode not in ("disable", "allow", "prefer"):
        raise ConfigurationError(f"Unknown sslmode {sslmode!r} in {redact_url(url)}")
    return url.split("?", 1)[0] + (f"?{urlencode(query)}" if query else ""), args


class Ledger:
    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url, connect_args = pg8000_connect_args(ledger_url(url))
        self.engine: Engine = sa.create_engine(
            self.url,
            connect_args=connect_args,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_recycle=1800,
        )
        check_before_use(self.engine)

    def __repr__(self) -> str:
        return f"Ledger({redact_url(self.url)})"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction on the ledger's database; outages raise LedgerUnavailable.

        A connection whose statement failed other than by the server's clean refusal is
        invalidated, before any rollback is tried on it: the pool never hands it out again.
        """
        try:
            with self.engine.connect() as conn:
                try:
                    with conn.begin():
                        try:
                            yield conn
                        except BaseException as e:
                            _discard_unless_refused(conn, e)
                            raise
                except BaseException as e:  # the commit failed
                    _discard_unless_refused(conn, e)
                    raise
        except DBAPIError as e:
            if _is_outage(e):
                raise LedgerUnavailable(
                    f"The ledger database {redact_url(self.url)} is unreachable: {e.orig}"
                ) from e
            raise
        except SQLAlchemyError as e:
            if isinstance(e, sa.exc.TimeoutError):
                raise LedgerUnavailable(f"The ledger database pool timed out: {e}") from e
            raise
        except OSError as e:
            # pg8000 lets a socket error through unwrapped when the server goes away while
            # it connects (a restart: BrokenPipeError), so SQLAlchemy never sees a DBAPIError.
            raise LedgerUnavailable(
                f"The ledger database {redact_url(self.url)} is unreachable: {e!r}"
            ) from e

    def dispose(self) -> None:
        self.engine.dispose()

    # -- schema --------------------------------------------------------------------------

    def schema_state(self) -> SchemaState:
        """The schema's revision and how it compares with this release's (see ``schema``)."""
        with self.transaction() as conn:
            return read_state(conn)

    def check_schema(self, *, component: str) -> SchemaState:
        """Raise SchemaMismatch, saying what to do, unless ``component`` can use the ledger
        as it is. Never changes the schema: ``migrations.ensure_schema`` does, for the
        components that carry the migrations (the Lambdas do not)."""
        state = self.schema_state()
        require_usable(state, component=component)
        return state

    @property
    def schema_lock(self) -> sa.ColumnElement[Any]:
        """The advisory lock every schema change takes, in its transaction."""
        return sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)

    def ensure_tables(self, tables: sa.MetaData) -> None:
        """Create ``tables`` in this database if missing. One advisory lock serialises every
        creation, so workers, runs and Lambdas may all start at once."""
        with self.transaction() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
            tables.create_all(conn, checkfirst=True)

    def ping(self) -> None:
        with self.transaction() as conn:
            conn.execute(sa.select(1))

    # -- reads ---------------------------------------------------------------------------

    def _select(self) -> sa.Select[Any]:
        lease_live = sa.and_(
            steps.c.status == Status.RUNNING, steps.c.lease_expires_at > NOW
        ).label("lease_live")
        age = sa.func.extract("epoch", NOW - steps.c.enqueued_at).label("age_seconds")
        expired = sa.func.extract("epoch", NOW - steps.c.lease_expires_at)
        idle = sa.func.extract("epoch", NOW - steps.c.updated_at).label("idle_seconds")
        return sa.select(*steps.c, lease_live, age, expired.label("lease_expired_seconds"), idle)

    def get(self, key: str) -> StepRecord | None:
        with self.transaction() as conn:
            row = conn.execute(self._select().where(steps.c.idempotency_key == key)).mappings()
            found = row.first()
        return StepRecord.from_row(found) if found else None

    def for_run(self, run_id: str) -> list[StepRecord]:
        return self.for_runs([run_id])

    def live_leases(self, queue_url: str | None = None) -> int:
        """Steps running under a live lease (on one queue, if given): the workers the
        scaler must not take away."""
        stmt = sa.select(sa.func.count()).where(
            steps.c.status.in_([Status.RUNNING, Status.CANCEL_REQUESTED]),
            steps.c.lease_expires_at > NOW,
        )
        if queue_url is not None:
            stmt = stmt.where(steps.c.queue_url == queue_url)
        with self.transaction() as conn:
            return int(conn.execute(stmt).scalar_one())

    def finished_since(self, since: datetime) -> int:
        """Step attempts that reached a final status at or after ``since``."""
        stmt = sa.select(sa.func.count()).where(
            steps.c.status.in_(list(TERMINAL)), steps.c.finished_at >= since
        )
        with self.transaction() as conn:
            return int(conn.execute(stmt).scalar_one())

    def for_runs(self, run_ids: list[str]) -> list[StepRecord]:
        if not run_ids:
            return []
        stmt = self._select().where(steps.c.run_id.in_(run_ids)).order_by(steps.c.enqueued_at)
        with self.transaction() as conn:
            return [StepRecord.from_row(r) for r in conn.execute(stmt).mappings()]

    # -- protocol ------------------------------------------------------------------------

    def enqueue(
        self,
        key: str,
        *,
        run_id: str,
        step_key: str,
        attempt: int,
        payload_hash: str,
        ttl_seconds: int,
        queue_url: str | None = None,
    ) -> bool:
        """Insert ENQUEUED before the message is sent. False if the key already exists."""
        stmt = (
            pg_insert(steps)
            .values(
                idempotency_key=key,
                run_id=run_id,
                step_key=step_key,
                attempt=attempt,
                queue_url=queue_url,
                status=Status.ENQUEUED,
                payload_hash=payload_hash,
                enqueued_at=NOW,
                updated_at=NOW,
                expires_at=NOW + _seconds(ttl_seconds),
            )
            .on_conflict_do_nothing(index_elements=[steps.c.idempotency_key])
        )
        with self.transaction() as conn:
            return conn.execute(stmt).rowcount == 1

    def enqueue_many(self, entries: Sequence[NewStep], *, ttl_seconds: int) -> set[str]:
        """``enqueue`` for many steps in one statement. Returns the keys inserted; a key
        that already existed is left as it was."""
        if not entries:
            return set()
        # The rows travel as one array a column (unnest): a multi-row VALUES of hundreds of
        # rows costs more to build and send than the insert costs the server.
        text_array, int_array = ARRAY(sa.Text), ARRAY(sa.Integer)
        rows = (
            sa.func.unnest(
                sa.cast(sa.bindparam("keys"), text_array),
                sa.cast(sa.bindparam("run_ids"), text_array),
                sa.cast(sa.bindparam("step_keys"), text_array),
                sa.cast(sa.bindparam("attempts"), int_array),
                sa.cast(sa.bindparam("queue_urls"), text_array),
                sa.cast(sa.bindparam("hashes"), text_array),
            )
            .table_valued("key", "run_id", "step_key", "attempt", "queue_url", "hash")
            .render_derived()
        )
        values = sa.select(
            rows.c.key,
            rows.c.run_id,
            rows.c.step_key,
            rows.c.attempt,
            rows.c.queue_url,
            sa.literal(Status.ENQUEUED.value),
            rows.c.hash,
            NOW,
            NOW,
            NOW + _seconds(ttl_seconds),
        )
        stmt = (
            pg_insert(steps)
            .from_select(
                [
                    steps.c.idempotency_key,
                    steps.c.run_id,
                    steps.c.step_key,
                    steps.c.attempt,
                    steps.c.queue_url,
                    steps.c.status,
                    steps.c.payload_hash,
                    steps.c.enqueued_at,
                    steps.c.updated_at,
                    steps.c.expires_at,
                ],
                values,
            )
            .on_conflict_do_nothing(index_elements=[steps.c.idempotency_key])
            .returning(steps.c.idempotency_key)
        )
        params = {
            "keys": [e.key for e in entries],
            "run_ids": [e.run_id for e in entries],
            "step_keys": [e.step_key for e in entries],
            "attempts": [e.attempt for e in entries],
            "queue_urls": [e.queue_url for e in entries],
            "hashes": [e.payload_hash for e in entries],
        }
        with self.transaction() as conn:
            return set(conn.execute(stmt, params).scalars())

    def claim(
        self,
        key: str,
        *,
        worker_id: str,
        lease_seconds: float,
        payload_hash: str,
        deliveries: int = 1,
    ) -> Claim:
        """Take the step if it is ENQUEUED, or RUNNING under an expired lease.

        One conditional UPDATE: of two workers holding the same message, exactly one gets
        a row back; the other sees why it did not.
        """
        prev = (
            sa.select(
                steps.c.idempotency_key.label("key"),
                steps.c.worker_id.label("previous_worker"),
                steps.c.status.label("previous_status"),
            )
            .where(steps.c.idempotency_key == key)
            .subquery()
        )
        claimable = sa.or_(
            steps.c.status == Status.ENQUEUED,
            sa.and_(steps.c.status == Status.RUNNING, steps.c.lease_expires_at <= NOW),
        )
        stmt = (
            sa.update(steps)
            .where(
                steps.c.idempotency_key == prev.c.key,
                steps.c.payload_hash == payload_hash,
                claimable,
            )
            .values(
                status=Status.RUNNING,
                worker_id=worker_id,
                fencing_token=steps.c.fencing_token + 1,
                lease_expires_at=NOW + _seconds(lease_seconds),
                started_at=sa.func.coalesce(steps.c.started_at, NOW),
                deliveries=sa.func.greatest(steps.c.deliveries, deliveries),
                error=None,
                updated_at=NOW,
            )
            .returning(steps.c.fencing_token, prev.c.previous_worker, prev.c.previous_status)
        )
        with self.transaction() as conn:
            claimed = conn.execute(stmt).first()
            if claimed is not None:
                previous_status = Status(claimed.previous_status)
                return Claim(
                    ClaimOutcome.CLAIMED,
                    fencing_token=claimed.fencing_token,
                    previous_worker=claimed.previous_worker,
                    previous_status=previous_status,
                )
            return self._why_not_claimed(conn, key, payload_hash, deliveries)

    def _why_not_claimed(
        self, conn: Connection, key: str, payload_hash: str, deliveries: int
    ) -> Claim:
        found = conn.execute(self._select().where(steps.c.idempotency_key == key)).mappings()
        row = found.first()
        if row is None:
            return Claim(ClaimOutcome.UNKNOWN)
        record = StepRecord.from_row(row)
        if record.payload_hash != payload_hash:
            return Claim(ClaimOutcome.MISMATCH, record=record)
        if record.status.is_terminal:
            conn.execute(
                sa.update(steps)
                .where(steps.c.idempotency_key == key)
                .values(
                    duplicates_suppressed=steps.c.duplicates_suppressed + 1,
                    deliveries=sa.func.greatest(steps.c.deliveries, deliveries),
                )
            )
            return Claim(ClaimOutcome.DUPLICATE, record=record)
        if record.status is Status.CANCEL_REQUESTED:
            # Never started (or its worker is gone): nobody else will finish the cancel.
            done = conn.execute(
                sa.update(steps)
                .where(
                    steps.c.idempotency_key == key,
                    steps.c.status == Status.CANCEL_REQUESTED,
                    sa.or_(steps.c.lease_expires_at.is_(None), steps.c.lease_expires_at <= NOW),
                )
                .values(status=Status.CANCELLED, finished_at=NOW, updated_at=NOW)
            )
            if done.rowcount == 1:
                return Claim(ClaimOutcome.CANCELLED, record=record)
        remaining = conn.execute(
            sa.select(
                sa.func.greatest(sa.func.extract("epoch", steps.c.lease_expires_at - NOW), 0)
            ).where(steps.c.idempotency_key == key)
        ).scalar()
        return Claim(
            ClaimOutcome.BUSY,
            previous_worker=record.worker_id,
            previous_status=record.status,
            lease_remaining_seconds=float(remaining or 0.0),
            record=record,
        )

    def _fenced(self, key: str, token: int, *statuses: Status) -> sa.ColumnElement[bool]:
        return sa.and_(
            steps.c.idempotency_key == key,
            steps.c.fencing_token == token,
            steps.c.status.in_(statuses),
        )

    def heartbeat(self, key: str, token: int, lease_seconds: float) -> bool:
        """Renew the lease. False means the lease is lost or cancel was requested."""
        stmt = (
            sa.update(steps)
            .where(self._fenced(key, token, Status.RUNNING))
            .values(lease_expires_at=NOW + _seconds(lease_seconds), updated_at=NOW)
        )
        with self.transaction() as conn:
            return conn.execute(stmt).rowcount == 1

    def complete(
        self,
        key: str,
        token: int,
        *,
        succeeded: bool,
        error: str | None = None,
        duplicate: bool = False,
    ) -> bool:
        """Record the outcome of the attempt, once. False if this token no longer holds it.

        ``duplicate``: the outcome was already in Dagster's event log from an earlier
        delivery, so this delivery recorded it without executing (counted as suppressed).
        """
        return self._end(
            self._fenced(key, token, Status.RUNNING),
            Status.SUCCEEDED if succeeded else Status.FAILED,
            error=_error_text(error),
            duplicates_suppressed=steps.c.duplicates_suppressed + int(duplicate),
        )

    def fail(self, key: str, token: int, error: str) -> bool:
        return self.complete(key, token, succeeded=False, error=error)

    def release(self, key: str, token: int, reason: str) -> bool:
        """Give the lease up now (shutdown, step process died) so the next delivery takes over."""
        stmt = (
            sa.update(steps)
            .where(self._fenced(key, token, Status.RUNNING, Status.CANCEL_REQUESTED))
            .values(lease_expires_at=NOW, error=_error_text(reason), updated_at=NOW)
        )
        with self.transaction() as conn:
            return conn.execute(stmt).rowcount == 1

    def finish_cancel(self, key: str, token: int) -> bool:
        return self._end(
            self._fenced(key, token, Status.CANCEL_REQUESTED, Status.RUNNING), Status.CANCELLED
        )

    def request_cancel(self, key: str) -> Status | None:
        """Ask for cancellation. Returns the status it had, or None if already terminal/absent."""
        prev = (
            sa.select(steps.c.idempotency_key.label("key"), steps.c.status.label("was"))
            .where(steps.c.idempotency_key == key)
            .subquery()
        )
        stmt = (
            sa.update(steps)
            .where(
                steps.c.idempotency_key == prev.c.key,
                steps.c.status.in_([Status.ENQUEUED, Status.RUNNING]),
            )
            .values(status=Status.CANCEL_REQUESTED, updated_at=NOW)
            .returning(prev.c.was)
        )
        with self.transaction() as conn:
            was = conn.execute(stmt).scalar()
        return Status(was) if was else None

    def abandon(self, key: str, reason: str, *, token: int | None = None) -> bool:
        """ENQUEUED -> FAILED, so that a late delivery will not start it (pick-up timeout).

        With ``token``: RUNNING under that token with an expired lease -> FAILED instead (a
        step given back to the queue that no worker took again in time).
        """
        if token is None:
            waiting = steps.c.status == Status.ENQUEUED
        else:
            waiting = self._unheld(key, token, Status.RUNNING)
        return self._end(
            sa.and_(steps.c.idempotency_key == key, waiting),
            Status.FAILED,
            error=_error_text(reason),
        )

    def _end(self, where: sa.ColumnElement[bool], status: Status, **values: Any) -> bool:
        """The row ``where`` picks -> ``status``, ended now and held by no lease. True only
        if this statement made the change."""
        stmt = (
            sa.update(steps)
            .where(where)
            .values(status=status, lease_expires_at=None, finished_at=NOW, updated_at=NOW, **values)
        )
        with self.transaction() as conn:
            return conn.execute(stmt).rowcount == 1

    def _unheld(self, key: str, token: int, *statuses: Status) -> sa.ColumnElement[bool]:
        """The row is still as judged (a status, ``token``) and no lease is live on it."""
        return sa.and_(
            self._fenced(key, token, *statuses),
            sa.or_(steps.c.lease_expires_at.is_(None), steps.c.lease_expires_at <= NOW),
        )

    def presume_dead_lettered(self, key: str, token: int, reason: str) -> bool:
        """RUNNING under ``token`` with an expired lease (or ENQUEUED) -> DEAD_LETTERED,
        presumed.

        For a step whose message used its last delivery, when the DLQ processor has not
        marked it in time: the message can only be in the DLQ (or on its way there), and a
        delivery that comes all the same finds the step terminal and never starts it. The
        DLQ processor confirms the row (``dead_letter``) when it comes.
        """
        return self._end(
            self._unheld(key, token, Status.RUNNING, Status.ENQUEUED),
            Status.DEAD_LETTERED,
            error=PRESUMED_DEAD_LETTER + reason,
        )

    def close_cancel(self, key: str, token: int, reason: str) -> bool:
        """CANCEL_REQUESTED under ``token`` that no lease holds -> CANCELLED: what a worker
        does when it receives the message, for a step whose message no worker receives."""
        return self._end(
            self._unheld(key, token, Status.CANCEL_REQUESTED),
            Status.CANCELLED,
            error=_error_text(reason),
        )

    def dead_letter(self, key: str, *, deliveries: int, reason: str) -> bool:
        """Mark a step whose message reached the DLQ. True only on the transition.

        A message can reach the DLQ after its step completed (a lost delete): a terminal
        row is left alone, so no false alarm. A row the executor presumed dead-lettered is
        confirmed, once: its error loses the presumption, so a repeat matches nothing.
        """
        presumed = sa.and_(
            steps.c.status == Status.DEAD_LETTERED,
            steps.c.error.startswith(PRESUMED_DEAD_LETTER, autoescape=True),
        )
        stmt = (
            sa.update(steps)
            .where(
                steps.c.idempotency_key == key,
                sa.or_(steps.c.status.in_(list(NON_TERMINAL)), presumed),
            )
            .values(
                status=Status.DEAD_LETTERED,
                deliveries=sa.func.greatest(steps.c.deliveries, deliveries),
                error=_error_text(reason),
                lease_expires_at=None,
                # A presumed row keeps the time the executor gave up on it.
                finished_at=sa.func.coalesce(steps.c.finished_at, NOW),
                updated_at=NOW,
            )
        )
        with self.transaction() as conn:
            return conn.execute(stmt).rowcount == 1

    def cleanup_expired(self) -> int:
        """Delete terminal rows past their TTL. Returns how many were deleted."""
        stmt = sa.delete(steps).where(steps.c.expires_at < NOW, steps.c.status.in_(list(TERMINAL)))
        with self.transaction() as conn:
            return conn.execute(stmt).rowcount

    # -- rejected messages ---------------------------------------------------------------

    def record_rejection(
        self,
        *,
        message_id: str,
        reason: str,
        detail: str,
        body: str,
        worker_id: str | None,
        idempotency_key: str | None = None,
    ) -> None:
        # Every value may come from a hostile message: made storable here, so that no
        # caller can forget to (a lone surrogate would break the connection, see
        # ``transaction``; NUL is refused by PostgreSQL).
        insert = pg_insert(rejected_messages).values(
            message_id=safe_text(message_id, REJECTION_KEY_CHARS),
            idempotency_key=(
                safe_text(idempotency_key, REJECTION_KEY_CHARS)
                if idempotency_key is not None
                else None
            ),
            reason=safe_text(reason, REJECTION_KEY_CHARS),
            detail=safe_text(detail, REJECTION_TEXT_CHARS),
            body_excerpt=safe_text(body, REJECTION_TEXT_CHARS),
            worker_id=safe_text(worker_id, REJECTION_KEY_CHARS) if worker_id is not None else None,
            first_seen_at=NOW,
            last_seen_at=NOW,
        )
        stmt = insert.on_conflict_do_update(
            index_elements=[rejected_messages.c.message_id],
            set_={
                "receive_count": rejected_messages.c.receive_count + 1,
                "last_seen_at": NOW,
                "worker_id": insert.excluded.worker_id,
            },
        )
        with self.transaction() as conn:
            conn.execute(stmt)

    def rejections(self) -> list[Mapping[str, Any]]:
        stmt = sa.select(rejected_messages).order_by(rejected_messages.c.first_seen_at)
        with self.transaction() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def rejections_of(self, keys: Sequence[str]) -> dict[str, Mapping[str, Any]]:
        """For each idempotency key, the rejection of its most rejected message, if any.

        A ``mismatch`` is left out: that message is not the one launched under the key.
        """
        # Keys are stored as ``record_rejection`` made them storable.
        stored = {safe_text(key, REJECTION_KEY_CHARS): key for key in keys}
        if not stored:
            return {}
        stmt = (
            sa.select(rejected_messages)
            .where(
                rejected_messages.c.idempotency_key.in_(list(stored)),
                rejected_messages.c.reason.not_in(["mismatch", "dead_letter_mismatch"]),
            )
            .order_by(rejected_messages.c.receive_count)
        )
        with self.transaction() as conn:
            # Ordered by count: the most rejected message of each key is written last.
            return {stored[r["idempotency_key"]]: dict(r) for r in conn.execute(stmt).mappings()}

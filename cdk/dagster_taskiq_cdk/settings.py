"""Deployment settings, read from CDK context (``cdk.json`` or ``cdk synth -c key=value``).

Every setting has a default; a wrong value or an unknown key fails the synth with a message
that names the key and what it accepts. Values given with ``-c`` arrive as strings, values
from ``cdk.json`` as JSON: both are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

from aws_cdk import aws_logs as logs

# SQS's maximum retention. The DLQ keeps dead letters this long, so an operator has the most
# time to look at them; the step queue must keep its messages for less (see message_retention).
DLQ_RETENTION_SECONDS = 1_209_600

# Fargate's valid task sizes: CPU units -> the memory sizes (MiB) allowed with it.
FARGATE_TASK_SIZES: dict[int, tuple[int, ...]] = {
    256: (512, 1024, 2048),
    512: tuple(range(1024, 4097, 1024)),
    1024: tuple(range(2048, 8193, 1024)),
    2048: tuple(range(4096, 16385, 1024)),
    4096: tuple(range(8192, 30721, 1024)),
    8192: tuple(range(16384, 61441, 4096)),
    16384: tuple(range(32768, 122881, 8192)),
}

# CloudWatch Logs accepts only these retention periods: days -> CDK's name for it.
LOG_RETENTION_DAYS: dict[int, str] = {
    1: "ONE_DAY",
    3: "THREE_DAYS",
    5: "FIVE_DAYS",
    7: "ONE_WEEK",
    14: "TWO_WEEKS",
    30: "ONE_MONTH",
    60: "TWO_MONTHS",
    90: "THREE_MONTHS",
    120: "FOUR_MONTHS",
    150: "FIVE_MONTHS",
    180: "SIX_MONTHS",
    365: "ONE_YEAR",
    400: "THIRTEEN_MONTHS",
    545: "EIGHTEEN_MONTHS",
    731: "TWO_YEARS",
}

# Fargate sends SIGKILL at most 120 s after SIGTERM.
MAX_STOP_TIMEOUT = 120
# The worker's --stop-timeout is this much below the container's stop timeout: after it, the
# worker still has to give unfinished steps back (release leases, visibility 0) before SIGKILL.
WORKER_GIVE_BACK_SECONDS = 15

_ENVIRONMENT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_VPC_ID = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_SECURITY_GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")
_SECRET_ARN = re.compile(
    r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@!-]+$"
)
# A DNS name or an IPv4 address: what an RDS endpoint or a PostgreSQL host looks like.
_HOSTNAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*$")
# An unquoted PostgreSQL identifier (63 bytes at most).
_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
# The settings that name an existing database: all of them or none (database_port has a
# default). database_security_group_id is the database's own group, which gets an ingress
# rule for each of this stack's groups.
EXISTING_DATABASE_SETTINGS = (
    "database_endpoint",
    "database_name",
    "database_secret_arn",
    "database_security_group_id",
)
# Settings of the database the stack creates: meaningless with an existing one.
CREATED_DATABASE_SETTINGS = (
    "deletion_protection",
    "iam_database_auth",
    "db_min_capacity",
    "db_max_capacity",
)
DEFAULT_DATABASE_PORT = 5432
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Context keys the settings own look like this; CDK's own keys (feature flags, lookups,
# "aws:cdk:...") contain "@", ":" or "/" and are left alone.
_SETTING_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
# A pool name: lowercase words of letters and digits joined by single hyphens. It becomes part
# of construct ids, output names (PascalCase) and, for FIFO pools, queue names.
_POOL_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
MAX_POOL_NAME_LENGTH = 20
# The pool that steps without a routing tag go to; its resources and outputs keep the names
# they had before there were pools.
DEFAULT_POOL = "default"


class SettingsError(ValueError):
    """A context value is missing, malformed or out of range; the message names the key."""


def _setting(default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class PoolSpec:
    """One entry of the ``pools`` setting, as given. A value left out (None) is the top-level
    setting of the same name. Field names are the keys a pool takes."""

    name: str
    min_workers: int | None = None
    max_workers: int | None = None
    target_backlog_per_worker: int | None = None
    worker_cpu: int | None = None
    worker_memory: int | None = None
    steps_per_worker: int | None = None
    spot_share: int | None = None
    code_locations: str | None = None
    # A second queue the pool's workers receive from first: steps tagged high-priority.
    priority_lane: bool = False
    # FIFO queues (names end in .fifo; content-based deduplication off: the executor sends
    # the idempotency key as the deduplication id).
    fifo: bool = False


# The top-level settings a pool may override.
POOL_OVERRIDES = tuple(
    f.name for f in dataclasses.fields(PoolSpec) if f.name not in ("name", "priority_lane", "fifo")
)


@dataclass(frozen=True)
class WorkerPool:
    """A worker pool with every value resolved: its own queue (and lane), DLQ, service and
    scaler."""

    name: str
    min_workers: int
    max_workers: int
    target_backlog_per_worker: int
    worker_cpu: int
    worker_memory: int
    steps_per_worker: int
    spot_share: int
    code_locations: str
    priority_lane: bool = False
    fifo: bool = False

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_POOL

    @property
    def pascal_name(self) -> str:
        """``high-mem`` -> ``HighMem``: the prefix of the pool's outputs and construct ids."""
        return pascal_case(self.name)

    def prefixed(self, name: str) -> str:
        """An output's or construct's id for this pool: the default pool's keep the ids they
        had before there were pools; another pool's start with its PascalCase name."""
        return name if self.is_default else f"{self.pascal_name}{name}"

    @property
    def spot_weights(self) -> dict[str, int]:
        """Capacity provider -> weight; a provider with no weight is left out."""
        weights = {"FARGATE": 100 - self.spot_share, "FARGATE_SPOT": self.spot_share}
        return {provider: weight for provider, weight in weights.items() if weight > 0}


def pascal_case(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("-"))


class _WorkerValues(Protocol):
    """What the top-level settings and a pool have in common: the worker service's shape."""

    @property
    def min_workers(self) -> int: ...
    @property
    def max_workers(self) -> int: ...
    @property
    def target_backlog_per_worker(self) -> int: ...
    @property
    def worker_cpu(self) -> int: ...
    @property
    def worker_memory(self) -> int: ...
    @property
    def steps_per_worker(self) -> int: ...
    @property
    def spot_share(self) -> int: ...
    @property
    def code_locations(self) -> str: ...


@dataclass(frozen=True)
class DeploymentSettings:
    """What one deployment of dagster-taskiq looks like. Field names are the context keys."""

    environment: str = _setting("dev", "deployment name: the stack is DagsterTaskiq-<environment>")
    min_workers: int = _setting(0, "fewest worker tasks the scaler keeps running")
    max_workers: int = _setting(10, "most worker tasks the scaler starts")
    target_backlog_per_worker: int = _setting(5, "waiting steps per worker the scaler aims for")
    worker_cpu: int = _setting(1024, "Fargate CPU units per worker task")
    worker_memory: int = _setting(2048, "MiB per worker task (a valid Fargate size for the CPU)")
    steps_per_worker: int = _setting(2, "step processes per worker (the worker's --concurrency)")
    spot_share: int = _setting(50, "percent of the capacity-provider weight on FARGATE_SPOT")
    alert_email: str | None = _setting(None, "e-mail address subscribed to the alert topic")
    dagster_ui_url: str | None = _setting(None, "Dagster UI base URL, for run links in alerts")
    vpc_id: str | None = _setting(None, "existing VPC to deploy into; default: a new VPC")
    database_endpoint: str | None = _setting(
        None, "existing PostgreSQL host (your Dagster database); default: a new Aurora cluster"
    )
    database_port: int | None = _setting(
        None, "existing PostgreSQL port; default 5432 (only with database_endpoint)"
    )
    database_name: str | None = _setting(None, "existing PostgreSQL database name")
    database_secret_arn: str | None = _setting(
        None, "Secrets Manager secret (JSON: username, password) of the existing database"
    )
    database_security_group_id: str | None = _setting(
        None, "the existing database's security group: it admits the workers and Lambdas"
    )
    ecs_cluster_name: str | None = _setting(
        None, "existing ECS cluster for the worker services; default: a new cluster"
    )
    max_receive_count: int = _setting(5, "deliveries of a step before SQS dead-letters it")
    visibility_timeout: int = _setting(300, "seconds: a worker's lease on a step message")
    message_retention: int = _setting(345_600, "seconds the step queue keeps a message")
    stop_timeout: int = _setting(120, "seconds between SIGTERM and SIGKILL for a worker")
    scale_in_stabilization_seconds: int = _setting(
        60, "the scaler's scale-in window, seconds (about a worker's start time)"
    )
    scale_out_lead_seconds: int = _setting(
        60, "the scaler counts the steps runs launch next once due within this long, seconds"
    )
    target_wait_seconds: int = _setting(
        0, "aim for this many seconds of wait per step instead of target_backlog_per_worker; 0: off"
    )
    max_workers_alarm_minutes: int = _setting(
        30, "alarm when a pool has been held at max_workers this long, minutes"
    )
    code_locations: str = _setting(
        "my_project.definitions", "comma-separated modules or files the workers may run jobs from"
    )
    worker_dockerfile: str = _setting(
        "worker_image/Dockerfile",
        "the worker image's Dockerfile, relative to the repository root (its build context)",
    )
    deletion_protection: bool = _setting(True, "protect the database from deletion")
    iam_database_auth: bool = _setting(True, "enable IAM authentication on the database")
    db_min_capacity: float = _setting(0.5, "Aurora Serverless v2 minimum ACUs")
    db_max_capacity: float = _setting(4.0, "Aurora Serverless v2 maximum ACUs")
    oldest_message_alarm_seconds: int = _setting(
        900, "alarm when the oldest waiting step is older than this, seconds"
    )
    log_retention_days: int = _setting(30, "CloudWatch Logs retention of every log group, days")
    pools: tuple[PoolSpec, ...] | None = _setting(
        None,
        "worker pools, a JSON list (see Worker pools); unset: one pool, default, from the "
        "settings above",
    )

    def __post_init__(self) -> None:
        self._validate()

    @property
    def existing_database(self) -> bool:
        """True: workers, Lambdas and ledger use the user's database; none is created."""
        return self.database_endpoint is not None

    @property
    def database_port_or_default(self) -> int:
        return self.database_port or DEFAULT_DATABASE_PORT

    @property
    def stack_name(self) -> str:
        return f"DagsterTaskiq-{self.environment}"

    @property
    def worker_stop_timeout(self) -> int:
        """The worker's own --stop-timeout: leaves time to give steps back before SIGKILL."""
        return self.stop_timeout - WORKER_GIVE_BACK_SECONDS

    @property
    def worker_pools(self) -> tuple[WorkerPool, ...]:
        """The pools in the order given; without ``pools``, one named default."""
        specs = self.pools if self.pools is not None else (PoolSpec(DEFAULT_POOL),)
        return tuple(self._resolve(spec) for spec in specs)

    @property
    def default_pool(self) -> WorkerPool:
        (pool,) = (p for p in self.worker_pools if p.is_default)
        return pool

    def _resolve(self, spec: PoolSpec) -> WorkerPool:
        overrides = {name: getattr(spec, name) for name in POOL_OVERRIDES}
        return WorkerPool(
            name=spec.name,
            priority_lane=spec.priority_lane,
            fifo=spec.fifo,
            **{
                name: getattr(self, name) if value is None else value
                for name, value in overrides.items()
            },
        )

    @property
    def log_retention(self) -> logs.RetentionDays:
        return logs.RetentionDays[LOG_RETENTION_DAYS[self.log_retention_days]]

    @property
    def metrics_service(self) -> str:
        """The ``service`` dimension of the step metrics workers and the DLQ processor emit.

        Set as POWERTOOLS_SERVICE_NAME, so two deployments in one account and region keep
        their metrics apart.
        """
        return f"dagster-taskiq-{self.environment}"

    @classmethod
    def documentation(cls) -> dict[str, tuple[Any, str]]:
        """Context key -> (default, meaning)."""
        return {f.name: (f.default, f.metadata["doc"]) for f in dataclasses.fields(cls)}

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> DeploymentSettings:
        """Parse the settings from a CDK context mapping (the app's whole context).

        Keys that look like settings but are not one are refused: a typo would otherwise
        deploy the default silently.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in context if _SETTING_KEY.match(k) and k not in fields)
        if unknown:
            raise SettingsError(
                f"Unknown context key(s) {', '.join(unknown)}; the settings are: "
                + ", ".join(sorted(fields))
            )
        values: dict[str, Any] = {}
        for name, field in fields.items():
            raw = context.get(name)
            if raw is None:
                continue
            values[name] = _PARSERS[field.type](name, raw)
        return cls(**values)

    def _validate(self) -> None:
        _check(
            bool(_ENVIRONMENT_NAME.match(self.environment)),
            "environment",
            "must be 1-20 characters: a lowercase letter, then lowercase letters, digits or -",
        )
        _check_workers(self, lambda name: name)
        _check(
            self.alert_email is None or bool(_EMAIL.match(self.alert_email)),
            "alert_email",
            "must be an e-mail address",
        )
        _check(
            self.dagster_ui_url is None or self.dagster_ui_url.startswith(("https://", "http://")),
            "dagster_ui_url",
            "must be an http(s) URL",
        )
        _check(
            self.vpc_id is None or bool(_VPC_ID.match(self.vpc_id)),
            "vpc_id",
            "must be a VPC id (vpc-0123456789abcdef0)",
        )
        _check(1 <= self.max_receive_count <= 1000, "max_receive_count", "must be 1 to 1000")
        _check(
            0 <= self.visibility_timeout <= 43_200,
            "visibility_timeout",
            "must be 0 to 43200 seconds (SQS's limit)",
        )
        _check(
            60 <= self.message_retention < DLQ_RETENTION_SECONDS,
            "message_retention",
            f"must be at least 60 and below {DLQ_RETENTION_SECONDS} seconds: the dead-letter "
            "queue keeps messages for the SQS maximum, and must keep them longer than the "
            "step queue, or a dead letter could expire before anyone sees it",
        )
        _check(
            WORKER_GIVE_BACK_SECONDS + 5 <= self.stop_timeout <= MAX_STOP_TIMEOUT,
            "stop_timeout",
            f"must be {WORKER_GIVE_BACK_SECONDS + 5} to {MAX_STOP_TIMEOUT} seconds "
            "(Fargate's maximum)",
        )
        _check(
            0 <= self.scale_in_stabilization_seconds <= 3600,
            "scale_in_stabilization_seconds",
            "must be 0 to 3600 seconds",
        )
        _check(
            0 <= self.scale_out_lead_seconds <= 3600,
            "scale_out_lead_seconds",
            "must be 0 to 3600 seconds",
        )
        _check(
            0 <= self.target_wait_seconds <= 86_400,
            "target_wait_seconds",
            "must be 0 (off) to 86400 seconds",
        )
        _check(
            5 <= self.max_workers_alarm_minutes <= 1440 and self.max_workers_alarm_minutes % 5 == 0,
            "max_workers_alarm_minutes",
            "must be a multiple of 5 from 5 to 1440 minutes",
        )
        dockerfile = PurePosixPath(self.worker_dockerfile)
        _check(
            bool(self.worker_dockerfile)
            and not dockerfile.is_absolute()
            and ".." not in dockerfile.parts,
            "worker_dockerfile",
            "must be a path inside the repository, relative to its root",
        )
        _check(
            0 <= self.db_min_capacity <= self.db_max_capacity <= 256
            and self.db_max_capacity >= 1
            and (self.db_min_capacity * 2).is_integer()
            and (self.db_max_capacity * 2).is_integer(),
            "db_min_capacity",
            "and db_max_capacity must be multiples of 0.5 ACU with 0 <= min <= max <= 256 "
            "and max >= 1",
        )
        _check(
            self.oldest_message_alarm_seconds >= 60,
            "oldest_message_alarm_seconds",
            "must be 60 seconds or more",
        )
        _check(
            self.log_retention_days in LOG_RETENTION_DAYS,
            "log_retention_days",
            f"must be one of {sorted(LOG_RETENTION_DAYS)} (CloudWatch Logs' periods)",
        )
        self._validate_pools()
        self._validate_existing_database()
        self._validate_cluster()

    def _validate_existing_database(self) -> None:
        given = [name for name in EXISTING_DATABASE_SETTINGS if getattr(self, name) is not None]
        if self.database_port is not None and not given:
            raise SettingsError(
                "Context setting 'database_port' applies only to an existing database: set it "
                "with " + ", ".join(EXISTING_DATABASE_SETTINGS) + "."
            )
        if not given:
            return
        missing = [name for name in EXISTING_DATABASE_SETTINGS if name not in given]
        if missing:
            raise SettingsError(
                "An existing database needs all of "
                + ", ".join(EXISTING_DATABASE_SETTINGS)
                + f" (and optionally database_port); missing: {', '.join(missing)}. Set none "
                "of them to have the stack create its own database."
            )
        _check(
            self.vpc_id is not None,
            "database_endpoint",
            "needs vpc_id: the workers and Lambdas must run in the database's VPC",
        )
        changed = [
            name
            for name in CREATED_DATABASE_SETTINGS
            if getattr(self, name) != DeploymentSettings.documentation()[name][0]
        ]
        if changed:
            raise SettingsError(
                f"Context setting(s) {', '.join(changed)} configure the database the stack "
                "creates; with database_endpoint the stack creates none. Unset them."
            )
        _check(
            bool(_HOSTNAME.match(self.database_endpoint or "")),
            "database_endpoint",
            "must be a host name or IPv4 address (the RDS endpoint, without port or scheme)",
        )
        _check(
            1 <= self.database_port_or_default <= 65_535,
            "database_port",
            "must be a TCP port, 1 to 65535",
        )
        _check(
            bool(_DATABASE_NAME.match(self.database_name or "")),
            "database_name",
            "must be a PostgreSQL database name (letters, digits, _ and $; 63 at most)",
        )
        _check(
            bool(_SECRET_ARN.match(self.database_secret_arn or "")),
            "database_secret_arn",
            "must be the full ARN of a Secrets Manager secret "
            "(arn:aws:secretsmanager:<region>:<account>:secret:<name>-<suffix>)",
        )
        _check(
            bool(_SECURITY_GROUP_ID.match(self.database_security_group_id or "")),
            "database_security_group_id",
            "must be a security group id (sg-0123456789abcdef0)",
        )

    def _validate_cluster(self) -> None:
        _check(
            self.ecs_cluster_name is None or bool(_CLUSTER_NAME.match(self.ecs_cluster_name)),
            "ecs_cluster_name",
            "must be an ECS cluster name: 1-255 letters, digits, hyphens and underscores",
        )

    def _validate_pools(self) -> None:
        if self.pools is None:
            return
        names = [spec.name for spec in self.pools]
        _check(
            DEFAULT_POOL in names,
            "pools",
            f"must include a pool named {DEFAULT_POOL!r}: steps without a routing tag go to it, "
            "and the stack's QueueUrl, EcsServiceName and ScalerFunctionName outputs are its",
        )
        outputs: dict[str, str] = {}
        for pool in self.worker_pools:
            clash = outputs.setdefault(pool.pascal_name, pool.name)
            _check(
                clash == pool.name,
                "pools",
                f"names {clash!r} and {pool.name!r}, which make the same output names "
                f"({pool.pascal_name}QueueUrl)",
            )
            _check_workers(pool, _pool_key(pool.name))


def _pool_key(pool: str) -> Callable[[str], str]:
    return lambda name: f"pools[{pool}].{name}"


def _check_workers(values: _WorkerValues, key: Callable[[str], str]) -> None:
    """The worker service's shape; ``key`` names the setting (top-level, or a pool's)."""
    _check(values.min_workers >= 0, key("min_workers"), "must be 0 or more")
    _check(1 <= values.max_workers <= 1000, key("max_workers"), "must be between 1 and 1000")
    _check(
        values.min_workers <= values.max_workers,
        key("min_workers"),
        f"must not exceed max_workers ({values.max_workers})",
    )
    _check(values.target_backlog_per_worker >= 1, key("target_backlog_per_worker"), "must be 1+")
    _check(1 <= values.steps_per_worker <= 64, key("steps_per_worker"), "must be between 1 and 64")
    _check(
        values.worker_cpu in FARGATE_TASK_SIZES,
        key("worker_cpu"),
        f"must be one of {sorted(FARGATE_TASK_SIZES)}",
    )
    allowed_memory = FARGATE_TASK_SIZES[values.worker_cpu]
    _check(
        values.worker_memory in allowed_memory,
        key("worker_memory"),
        f"must be a Fargate size for worker_cpu={values.worker_cpu}: "
        f"{allowed_memory[0]} to {allowed_memory[-1]} MiB in the steps Fargate allows",
    )
    _check(0 <= values.spot_share <= 100, key("spot_share"), "must be a percentage, 0 to 100")
    locations = [part.strip() for part in values.code_locations.split(",")]
    _check(
        all(locations),
        key("code_locations"),
        "must be one or more comma-separated module names or files, none empty",
    )


def _check(ok: bool, key: str, requirement: str) -> None:
    if not ok:
        raise SettingsError(f"Context setting {key!r} {requirement}.")


def _parse_int(key: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise SettingsError(f"Context setting {key!r} must be a whole number, got {raw!r}.")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"-?\d+", raw.strip()):
        return int(raw)
    raise SettingsError(f"Context setting {key!r} must be a whole number, got {raw!r}.")


def _parse_float(key: str, raw: Any) -> float:
    if not isinstance(raw, bool) and isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            pass
    raise SettingsError(f"Context setting {key!r} must be a number, got {raw!r}.")


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _parse_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise SettingsError(f"Context setting {key!r} must be true or false, got {raw!r}.")


def _parse_str(key: str, raw: Any) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise SettingsError(f"Context setting {key!r} must be a string, got {raw!r}.")


def _parse_optional_str(key: str, raw: Any) -> str | None:
    # An empty string unsets an optional value, so `-c alert_email=` turns it off.
    return _parse_str(key, raw) or None


def _parse_optional_int(key: str, raw: Any) -> int | None:
    return None if raw is None else _parse_int(key, raw)


_POOLS_FORMAT = (
    'a JSON list of pools like [{"name": "default"}, {"name": "highmem", "worker_cpu": 4096, '
    '"worker_memory": 16384}]'
)


def _parse_pools(key: str, raw: Any) -> tuple[PoolSpec, ...]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SettingsError(f"Context setting {key!r} must be {_POOLS_FORMAT}: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise SettingsError(f"Context setting {key!r} must be {_POOLS_FORMAT}, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(PoolSpec)}
    specs: list[PoolSpec] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise SettingsError(
                f"Context setting '{key}[{index}]' must be an object with a name, got {entry!r}."
            )
        name = entry.get("name")
        if not (
            isinstance(name, str) and len(name) <= MAX_POOL_NAME_LENGTH and _POOL_NAME.match(name)
        ):
            raise SettingsError(
                f"Context setting '{key}[{index}].name' must be 1-{MAX_POOL_NAME_LENGTH} "
                "characters: lowercase letters and digits, starting with a letter, words "
                f"joined by single hyphens (got {name!r})."
            )
        _check(name not in (spec.name for spec in specs), key, f"names the pool {name!r} twice")
        unknown = sorted(k for k in entry if k not in fields)
        _check(
            not unknown,
            f"{key}[{name}]",
            f"has unknown key(s) {', '.join(map(str, unknown))}; a pool takes: "
            + ", ".join(fields),
        )
        values = {
            field: _POOL_PARSERS[fields[field].type](f"{key}[{name}].{field}", value)
            for field, value in entry.items()
            if field != "name"
        }
        specs.append(PoolSpec(name=name, **values))
    return tuple(specs)


# Keyed by the annotation text (``from __future__ import annotations`` keeps them strings).
_PARSERS: dict[Any, Callable[[str, Any], Any]] = {
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "str": _parse_str,
    "str | None": _parse_optional_str,
    "int | None": _parse_optional_int,
    "tuple[PoolSpec, ...] | None": _parse_pools,
}
_POOL_PARSERS: dict[Any, Callable[[str, Any], Any]] = {
    "int | None": _parse_optional_int,
    "str | None": _parse_optional_str,
    "bool": _parse_bool,
}

"""Where the deployment is: its worker pools, queues, services, log groups and database.

On AWS everything comes from the stack's outputs, through the environment variables the
executor and the Lambdas already read (``DAGSTER_TASKIQ_QUEUE_URL``, ``..._DLQ_URL``,
``..._ECS_CLUSTER``, ``..._ECS_SERVICE``, ``..._DATABASE_URL``, the log groups) or, for
several pools at once, from the JSON file ``cdk deploy --outputs-file`` writes
(``DAGSTER_TASKIQ_STACK_OUTPUTS``). A local stack is named by its root directory
(``DAGSTER_TASKIQ_LOCAL_STACK``): its ``stack.env`` and its pools' state files say the rest.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.settings import (
    DEFAULT_REGION,
    ENV_DATABASE_URL,
    ENV_DLQ_PROCESSOR_LOG_GROUP,
    ENV_DLQ_URL,
    ENV_ECS_CLUSTER,
    ENV_ECS_SERVICE,
    ENV_ENDPOINT_URL,
    ENV_LOCAL_STACK,
    ENV_PRIORITY_QUEUE_URL,
    ENV_QUEUE_URL,
    ENV_REGION,
    ENV_SCALER_LOG_GROUP,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_SECRET_ARN,
    ENV_STACK_OUTPUTS,
    ENV_WORKER_LOG_GROUP,
    database_url,
    signing_key,
)
from dagster_taskiq.local.stack import POOLS_DIR, STACK_ENV_FILE

if TYPE_CHECKING:
    from mypy_boto3_ecs.client import ECSClient
    from mypy_boto3_sqs.client import SQSClient

Kind = Literal["aws", "local"]
DEFAULT_POOL = "default"
LOGS_DIR = "logs"  # under a local stack's root

# An operator's command must answer or fail within seconds, not hang on a retry loop.
_CLIENT_CONFIG = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 2}}


@dataclass(frozen=True)
class PoolTarget:
    """One worker pool: the queues its workers read (step queue first, then its lane), its
    dead-letter queues when named explicitly, and where its workers and scaler are."""

    name: str
    queue_urls: tuple[str, ...]
    dlq_urls: tuple[str, ...] = ()
    ecs_service: str | None = None
    worker_log_group: str | None = None
    scaler_log_group: str | None = None
    local_state: Path | None = None  # pools/<name>.json of a local pool


@dataclass(frozen=True)
class LocalWorkerProcess:
    name: str
    pid: int
    log: str

    @property
    def running(self) -> bool:
        return pid_running(self.pid)


@dataclass(frozen=True)
class LocalPoolState:
    """What a local worker pool published of itself (``WorkerPool.publish``)."""

    name: str
    queue_urls: tuple[str, ...]
    desired: int
    scaler_service: str | None
    workers: tuple[LocalWorkerProcess, ...]

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.running)

    @classmethod
    def read(cls, path: Path) -> LocalPoolState:
        data = json.loads(path.read_text())
        return cls(
            name=str(data["name"]),
            queue_urls=tuple(data.get("queue_urls", ())),
            desired=int(data.get("desired", 0)),
            scaler_service=data.get("scaler_service"),
            workers=tuple(
                LocalWorkerProcess(str(w["name"]), int(w["pid"]), str(w.get("log", "")))
                for w in data.get("workers", ())
            ),
        )


def pid_running(pid: int) -> bool:
    """The process exists and is not a zombie (a worker that died before its pool noticed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: existing is all that can be said
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@dataclass
class Target:
    kind: Kind
    pools: tuple[PoolTarget, ...]
    database_url: str | None
    region: str
    endpoint_url: str | None  # SQS's; other services follow AWS_ENDPOINT_URL_<SERVICE>
    ecs_cluster: str | None = None
    dlq_processor_log_group: str | None = None
    signing_key: str | None = None
    signing_key_secret_arn: str | None = None
    dagster_home: str | None = None
    local_root: Path | None = None
    # A local stack's emulator credentials (not secrets), so that a shell with nothing but
    # the stack's directory set can reach the emulator; on AWS boto3 finds its own.
    emulator_credentials: tuple[str, str] | None = field(default=None, repr=False)
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def description(self) -> str:
        if self.kind == "local":
            return f"local stack {self.local_root}"
        return f"AWS {self.region}" + (f", cluster {self.ecs_cluster}" if self.ecs_cluster else "")

    @property
    def queue_urls(self) -> list[str]:
        return [url for pool in self.pools for url in pool.queue_urls]

    def client(self, service: str) -> Any:
        """A boto3 client with short timeouts, one per service."""
        if service not in self._clients:
            key_id, secret = self.emulator_credentials or (None, None)
            self._clients[service] = boto3.session.Session(
                aws_access_key_id=key_id, aws_secret_access_key=secret
            ).client(
                service,  # type: ignore[call-overload]
                region_name=self.region,
                endpoint_url=self.endpoint_url if service == "sqs" else None,
                config=Config(**_CLIENT_CONFIG),  # type: ignore[arg-type]
            )
        return self._clients[service]

    @property
    def sqs(self) -> SQSClient:
        client: SQSClient = self.client("sqs")
        return client

    @property
    def ecs(self) -> ECSClient:
        client: ECSClient = self.client("ecs")
        return client

    def message_signing_key(self) -> str | None:
        """The key step messages are signed with: as given, or read from its secret (the
        stack's SigningKeySecretArn). Raises ConfigurationError when it cannot be read."""
        return signing_key(self.signing_key, self.signing_key_secret_arn)

    def local_pools(self) -> list[LocalPoolState]:
        """The local pools' published states; a pool whose file is unreadable is left out."""
        states = []
        for pool in self.pools:
            if pool.local_state is None or not pool.local_state.is_file():
                continue
            try:
                states.append(LocalPoolState.read(pool.local_state))
            except (OSError, ValueError, KeyError):
                continue
        return states

    def dead_letter_queue(self, queue_url: str, attributes: Mapping[str, str]) -> str | None:
        """The DLQ of ``queue_url``: from its redrive policy (``attributes`` are the queue's),
        else the one named in the environment for it."""
        policy = attributes.get("RedrivePolicy")
        if policy:
            try:
                arn = str(json.loads(policy)["deadLetterTargetArn"])
                *_, account, name = arn.split(":")
                return self.sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)[
                    "QueueUrl"
                ]
            except (ValueError, KeyError, ClientError, BotoCoreError):
                pass
        for pool in self.pools:
            if queue_url in pool.queue_urls and pool.dlq_urls:
                index = pool.queue_urls.index(queue_url)
                return pool.dlq_urls[min(index, len(pool.dlq_urls) - 1)]
        return None

    def dead_letter_queues(self) -> list[str]:
        """Every pool's DLQs: named in the environment, else found from the queues."""
        found: list[str] = []
        for pool in self.pools:
            for queue_url in pool.queue_urls:
                attributes: dict[str, str] = {}
                try:
                    answer = self.sqs.get_queue_attributes(
                        QueueUrl=queue_url, AttributeNames=["RedrivePolicy"]
                    )
                    attributes.update({str(k): v for k, v in answer.get("Attributes", {}).items()})
                except (ClientError, BotoCoreError):
                    pass  # then only a DLQ named in the environment is known
                dlq = self.dead_letter_queue(queue_url, attributes)
                if dlq and dlq not in found:
                    found.append(dlq)
            for dlq in pool.dlq_urls:
                if dlq not in found:
                    found.append(dlq)
        return found


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() and not name.lstrip().startswith("#"):
            values[name.strip()] = value
    return values


def _kebab(pascal: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", pascal).lower()


def pools_from_outputs(outputs: Mapping[str, str]) -> tuple[PoolTarget, ...]:
    """The pools of a stack's outputs: the default pool's have plain names (``QueueUrl``),
    another pool's start with its PascalCase name (``HighMemQueueUrl``)."""
    prefixes = sorted(
        {name.removesuffix("EcsServiceName") for name in outputs if name.endswith("EcsServiceName")}
    )
    pools = []
    for prefix in prefixes:
        queue = outputs.get(f"{prefix}QueueUrl")
        if not queue:
            continue
        lane = outputs.get(f"{prefix}PriorityQueueUrl")
        dlq = outputs.get(f"{prefix}DeadLetterQueueUrl")
        pools.append(
            PoolTarget(
                name=_kebab(prefix) if prefix else DEFAULT_POOL,
                queue_urls=(queue, lane) if lane else (queue,),
                dlq_urls=(dlq,) if dlq else (),
                ecs_service=outputs.get(f"{prefix}EcsServiceName"),
                worker_log_group=outputs.get(f"{prefix}WorkerLogGroupName"),
                scaler_log_group=outputs.get(f"{prefix}ScalerLogGroupName"),
            )
        )
    return tuple(pools)


def read_outputs_file(path: Path) -> dict[str, str]:
    """The outputs of the one stack in a ``cdk deploy --outputs-file`` file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"{ENV_STACK_OUTPUTS}: cannot read {path}: {e}") from e
    stacks = {
        name: outputs
        for name, outputs in (data.items() if isinstance(data, dict) else ())
        if isinstance(outputs, dict) and "QueueUrl" in outputs
    }
    if len(stacks) != 1:
        raise ConfigurationError(
            f"{ENV_STACK_OUTPUTS}: expected the outputs of one dagster-taskiq stack in "
            f"{path}, found {sorted(stacks) or 'none'}"
        )
    (outputs,) = stacks.values()
    return {str(k): str(v) for k, v in outputs.items()}


def resolve_target(environ: Mapping[str, str] | None = None, *, need_queues: bool = True) -> Target:
    """The deployment the environment names. Raises ConfigurationError saying what to set.
    ``need_queues=False``: log groups alone will do (for ``logs``)."""
    env = dict(os.environ if environ is None else environ)
    local_root = Path(env[ENV_LOCAL_STACK]) if env.get(ENV_LOCAL_STACK) else None
    if local_root is not None:
        env_file = local_root / STACK_ENV_FILE
        if not env_file.is_file():
            raise ConfigurationError(
                f"{ENV_LOCAL_STACK}={local_root} is not a running local stack (no {env_file})"
            )
        # The stack named wins over whatever else the shell has set.
        env.update(read_env_file(env_file))
    outputs: dict[str, str] = {}
    if env.get(ENV_STACK_OUTPUTS) and local_root is None:
        outputs = read_outputs_file(Path(env[ENV_STACK_OUTPUTS]))
    region = env.get(ENV_REGION) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    target = Target(
        kind="local" if local_root is not None else "aws",
        pools=(),
        database_url=database_url(None, env),
        region=region or DEFAULT_REGION,
        endpoint_url=env.get(ENV_ENDPOINT_URL) or None,
        ecs_cluster=env.get(ENV_ECS_CLUSTER) or outputs.get("EcsClusterName"),
        dlq_processor_log_group=env.get(ENV_DLQ_PROCESSOR_LOG_GROUP)
        or outputs.get("DeadLetterProcessorLogGroupName"),
        signing_key=env.get(ENV_SIGNING_KEY) or None,
        signing_key_secret_arn=env.get(ENV_SIGNING_KEY_SECRET_ARN) or None,
        dagster_home=env.get("DAGSTER_HOME") or None,
        local_root=local_root,
    )
    if local_root is not None:
        target.pools = _local_pools(local_root, env)
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            target.emulator_credentials = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    elif outputs:
        target.pools = pools_from_outputs(outputs)
    else:
        queues = _split(env.get(ENV_QUEUE_URL)) + _split(env.get(ENV_PRIORITY_QUEUE_URL))
        log_groups = (ENV_WORKER_LOG_GROUP, ENV_SCALER_LOG_GROUP, ENV_DLQ_PROCESSOR_LOG_GROUP)
        if queues or (not need_queues and any(env.get(name) for name in log_groups)):
            target.pools = (
                PoolTarget(
                    name=DEFAULT_POOL,
                    queue_urls=queues,
                    dlq_urls=_split(env.get(ENV_DLQ_URL)),
                    ecs_service=env.get(ENV_ECS_SERVICE) or None,
                    worker_log_group=env.get(ENV_WORKER_LOG_GROUP) or None,
                    scaler_log_group=env.get(ENV_SCALER_LOG_GROUP) or None,
                ),
            )
    if (need_queues and not target.queue_urls) or not target.pools:
        raise ConfigurationError(
            f"No deployment named: set {ENV_QUEUE_URL} (and {ENV_DATABASE_URL}, "
            f"{ENV_ECS_CLUSTER}, {ENV_ECS_SERVICE}) from the stack's outputs, or "
            f"{ENV_STACK_OUTPUTS} to a `cdk deploy --outputs-file` file, or "
            f"{ENV_LOCAL_STACK} to a local stack's directory."
        )
    return target


def _local_pools(root: Path, env: Mapping[str, str]) -> tuple[PoolTarget, ...]:
    pools = []
    for path in sorted((root / POOLS_DIR).glob("*.json")):
        try:
            state = LocalPoolState.read(path)
        except (OSError, ValueError, KeyError):
            continue
        pools.append(PoolTarget(name=state.name, queue_urls=state.queue_urls, local_state=path))
    if not pools:
        # No worker started yet: the stack's queue, with no pool behind it.
        queues = _split(env.get(ENV_QUEUE_URL)) + _split(env.get(ENV_PRIORITY_QUEUE_URL))
        pools.append(
            PoolTarget(name="worker", queue_urls=queues, dlq_urls=_split(env.get(ENV_DLQ_URL)))
        )
    stack_queue = _split(env.get(ENV_QUEUE_URL))
    stack_dlq = _split(env.get(ENV_DLQ_URL))
    return tuple(
        PoolTarget(
            name=pool.name,
            queue_urls=pool.queue_urls,
            # The stack's own DLQ is known; other queues' are found from their policy.
            dlq_urls=stack_dlq if pool.queue_urls[:1] == stack_queue else pool.dlq_urls,
            local_state=pool.local_state,
        )
        for pool in pools
    )

"""Least privilege, proven by running the code: each role's policies, read out of the
synthesized template, given to credentials on moto's server with IAM enforced
(``tests.iam_server``), and that component's own code run with them.

The default template is "deployed" onto the server: a queue, topic, secret, ECS cluster and
service, Lambda function and IAM role for each of the template's, and every reference in the
policies and environments resolved to what was created. Then, per component:

- the worker (task role): receive, claim, heartbeat (ChangeMessageVisibility, by the
  worker's own Heartbeat) and delete after completion; and a real ``dagster-taskiq worker``
  running a real step for a real run, with the run worker's credentials on the other side;
- the scaler (its role): the Lambda handler, evaluating with a step waiting: reads the
  queue, the service, and sets the service's desired count;
- the DLQ processor (its role): a signed dead letter received from the DLQ as Lambda's event
  source does it, handled by the Lambda handler: marked, and alerted on SNS;
- the run worker (``RunWorkerPolicyArn``): the executor's settings (the signing key read by
  ARN), its start-of-run check of the queue, a step sent, and the scale-out trigger (service
  read, scaler invoked; moto's Lambda runs no code, but IAM is checked before that).

Every call succeeds, and every permission the template grants is used by one of them,
except the ones only AWS itself uses on the role's behalf (listed with why). Then each used
permission (an action on a resource) is removed in turn, and that very call must be refused
with AccessDenied: no permission is there for nothing, and the test can fail. A statement
removed whole refuses at least as much, IAM being monotonic here (no Deny).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.parameters.base import (  # type: ignore[attr-defined]
    DEFAULT_PROVIDERS as POWERTOOLS_PROVIDERS,
)
from dagster import DagsterInstance, execute_job, reconstructable
from dagster._config import process_config

from cdk.dagster_taskiq_cdk.paths import REPO_ROOT
from dagster_taskiq.core.errors import QueueUnavailable
from dagster_taskiq.core.ledger import ClaimOutcome, Ledger, Status
from dagster_taskiq.core.messages import encode
from dagster_taskiq.core.migrations import ensure_schema
from dagster_taskiq.core.observability import get_logger
from dagster_taskiq.core.settings import ENV_DATABASE_URL, read_secret_string
from dagster_taskiq.core.sqs import SqsQueue
from dagster_taskiq.executor import definition as executor_module
from dagster_taskiq.executor.definition import (
    ExecutorSettings,
    connect,
    scale_out_triggers,
    taskiq_executor,
)
from dagster_taskiq.local.stack import write_dagster_yaml
from dagster_taskiq.scaling.scaler import TRIGGER_SOURCE
from dagster_taskiq.worker.heartbeat import Heartbeat, Lease
from dagster_taskiq.worker.protection import TaskProtection
from lambdas.dlq_processor import handler as dlq_handler
from lambdas.scaler import handler as scaler_handler
from tests import jobs
from tests.cfn import Physical, pseudo_parameters, resolve, sample_physical
from tests.helpers import LambdaContext
from tests.iam_server import ACCOUNT
from tests.integration.test_dead_letters import MAX_BYTES, launch, step_message

from .conftest import Build

REGION = "us-east-1"
Permission = tuple[str, str]  # (action, resource ARN or "*")

# Used by AWS itself with the role, never by this project's code: moto cannot show them.
SERVICE_SIDE = {
    "ec2:AssignPrivateIpAddresses": "Lambda attaches the function to the VPC",
    "ec2:CreateNetworkInterface": "Lambda attaches the function to the VPC",
    "ec2:DeleteNetworkInterface": "Lambda attaches the function to the VPC",
    "ec2:DescribeNetworkInterfaces": "Lambda attaches the function to the VPC",
    "ec2:DescribeSubnets": "Lambda attaches the function to the VPC",
    "ec2:UnassignPrivateIpAddresses": "Lambda attaches the function to the VPC",
    "logs:CreateLogStream": "the Lambda runtime writes the function's logs",
    "logs:PutLogEvents": "the Lambda runtime writes the function's logs",
    "xray:PutTraceSegments": "Lambda's X-Ray integration sends the traces",
    "xray:PutTelemetryRecords": "Lambda's X-Ray integration sends the traces",
    "kms:Decrypt": "SNS encrypts a published alert with the topic's key as the publisher",
    "kms:GenerateDataKey": "SNS encrypts a published alert with the topic's key as the publisher",
    # The DLQ's event source mapping; its receive and delete are played by the test.
    "sqs:ChangeMessageVisibility@dead-letter queue": "Lambda's event source mapping",
    "sqs:GetQueueAttributes@dead-letter queue": "Lambda's event source mapping",
    "sqs:GetQueueUrl@dead-letter queue": "Lambda's event source mapping",
}

# Every permission the code uses, by component: (action, what it is on). Removing one makes
# that call fail. test_every_granted_permission_is_used_or_service_side keeps this in step
# with the template.
USED = [
    ("worker", "sqs:ReceiveMessage", "step queue"),
    ("worker", "sqs:ChangeMessageVisibility", "step queue"),
    ("worker", "sqs:DeleteMessage", "step queue"),
    ("scaler", "sqs:GetQueueAttributes", "step queue"),
    ("scaler", "ecs:DescribeServices", "worker service"),
    ("scaler", "ecs:UpdateService", "worker service"),
    ("scaler", "secretsmanager:GetSecretValue", "database secret"),
    ("dlq_processor", "sqs:ReceiveMessage", "dead-letter queue"),
    ("dlq_processor", "sqs:DeleteMessage", "dead-letter queue"),
    ("dlq_processor", "secretsmanager:GetSecretValue", "database secret"),
    ("dlq_processor", "secretsmanager:GetSecretValue", "signing key"),
    ("dlq_processor", "sns:Publish", "alert topic"),
    ("run_worker", "secretsmanager:GetSecretValue", "signing key"),
    ("run_worker", "sqs:GetQueueAttributes", "step queue"),
    ("run_worker", "sqs:SendMessage", "step queue"),
    ("run_worker", "ecs:DescribeServices", "worker service"),
    ("run_worker", "lambda:InvokeFunction", "scaler function"),
]
COMPONENTS = ["worker", "scaler", "dlq_processor", "run_worker"]


# -- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IamServer:
    endpoint: str
    admin: dict[str, str]  # boto3 client keyword arguments
    audit: Path

    def client(self, service: str) -> Any:
        """A client of any service, as the administrator (boto3's overloads want a literal)."""
        make: Any = boto3.client
        return make(service, endpoint_url=self.endpoint, region_name=REGION, **self.admin)

    def decisions(self, principal: str, since: int) -> list[dict[str, Any]]:
        """The server's decisions on ``principal``'s calls after byte ``since`` of the audit."""
        with open(self.audit, "rb") as audit:
            audit.seek(since)
            lines = audit.read().decode().splitlines()
        entries = [json.loads(line) for line in lines if line]
        return [e for e in entries if e["principal"].endswith(f":user/{principal}")]

    def position(self) -> int:
        return self.audit.stat().st_size


@pytest.fixture(scope="session")
def iam_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamServer]:
    """One moto server for the session, IAM enforced from its first request."""
    directory = tmp_path_factory.mktemp("iam")
    audit = directory / "audit.jsonl"
    audit.touch()
    log = open(directory / "server.log", "w")  # noqa: SIM115 (open for the server's life)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.iam_server", str(audit)],
        cwd=REPO_ROOT,
        env=environment | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        yield IamServer(
            endpoint=f"http://127.0.0.1:{started['port']}",
            admin={
                "aws_access_key_id": started["key_id"],
                "aws_secret_access_key": started["secret"],
            },
            audit=audit,
        )
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
        log.close()


# -- the template, deployed onto the server ----------------------------------------------------


@dataclass
class Deployment:
    server: IamServer
    build: Build
    physical: Physical
    ledger: Ledger
    database_url: str
    signing_key: str
    alert_inbox: str  # a queue subscribed to the alert topic, to read alerts back
    # Resolved ARN or URL -> what it is ("step queue", ...), for the USED table.
    labels: dict[str, str] = field(default_factory=dict)

    def resolve(self, value: Any) -> Any:
        return resolve(value, self.physical, pseudo_parameters())

    def ref(self, construct: Any, attribute: str | None = None) -> str:
        return self.physical(self.build.logical_id(construct), attribute)

    def environment(self, function: Any) -> dict[str, str]:
        """A Lambda function's environment as deployed, its ledger on the test database."""
        variables = self.build.resource(function)["Properties"]["Environment"]["Variables"]
        environment = {name: str(self.resolve(value)) for name, value in variables.items()}
        return environment | {ENV_DATABASE_URL: self.database_url}

    @property
    def queue_url(self) -> str:
        return self.ref(self.build.stack.queues.queue)

    @property
    def dlq_url(self) -> str:
        return self.ref(self.build.stack.queues.dead_letter_queue)

    def grants(self, component: str) -> list[dict[str, Any]]:
        """The component's policy statements from the template, references resolved."""
        stack, build = self.build.stack, self.build
        if component == "run_worker":
            documents = [build.resource(stack.run_worker.policy)["Properties"]["PolicyDocument"]]
        else:
            role = {
                "worker": stack.workers.task_definition.task_role,
                "scaler": stack.scaler.bundled.role,
                "dlq_processor": stack.dead_letters.bundled.role,
            }[component]
            role_id = build.logical_id(role)
            documents = [
                policy["Properties"]["PolicyDocument"]
                for policy in build.resources("AWS::IAM::Policy").values()
                if {"Ref": role_id} in policy["Properties"]["Roles"]
            ]
        return [self.resolve(s) for d in documents for s in d["Statement"]]

    def permissions(self, component: str) -> set[Permission]:
        found: set[Permission] = set()
        for statement in self.grants(component):
            assert statement["Effect"] == "Allow" and "Condition" not in statement
            for action in _as_list(statement["Action"]):
                for resource in _as_list(statement["Resource"]):
                    found.add((action, resource))
        return found

    def label(self, permission: Permission) -> str:
        return self.labels.get(permission[1], permission[1])


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _deploy(
    server: IamServer, build: Build, database_url: str
) -> dict[tuple[str, str | None], str]:
    """Create on the server what the template's policies and environments refer to."""
    resources: dict[str, Any] = build.json["Resources"]
    created: dict[tuple[str, str | None], str] = {}
    sample = sample_physical(build.json)

    def physical(logical_id: str, attribute: str | None) -> str:
        return created.get((logical_id, attribute)) or sample(logical_id, attribute)

    def value(item: Any) -> Any:
        return resolve(item, physical, pseudo_parameters())

    def of_type(kind: str) -> list[tuple[str, dict[str, Any]]]:
        return [(k, r.get("Properties", {})) for k, r in resources.items() if r["Type"] == kind]

    iam, secrets = server.client("iam"), server.client("secretsmanager")
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    for logical_id, _ in of_type("AWS::IAM::Role"):
        role = iam.create_role(RoleName=logical_id[:64], AssumeRolePolicyDocument=json.dumps(trust))
        created[(logical_id, "Arn")] = role["Role"]["Arn"]
    for logical_id, properties in of_type("AWS::SecretsManager::Secret"):
        generated = properties.get("GenerateSecretString", {})
        if "SecretStringTemplate" in generated:  # a database secret: the test database's
            text = json.dumps({"username": "postgres", "password": "not-needed-locally"})
        else:  # the signing key
            text = uuid.uuid4().hex + uuid.uuid4().hex
        arn = secrets.create_secret(Name=logical_id, SecretString=text)["ARN"]
        created[(logical_id, None)] = arn
    for logical_id, properties in of_type("AWS::SecretsManager::SecretTargetAttachment"):
        created[(logical_id, None)] = value(properties["SecretId"])
    sqs = server.client("sqs")
    queues = of_type("AWS::SQS::Queue")
    # Dead-letter queues first: the others' redrive policies name them.
    for logical_id, properties in sorted(queues, key=lambda q: "RedrivePolicy" in q[1]):
        attributes = {
            "VisibilityTimeout": str(properties.get("VisibilityTimeout", 30)),
            "MessageRetentionPeriod": str(properties.get("MessageRetentionPeriod", 345_600)),
        }
        if "RedrivePolicy" in properties:
            attributes["RedrivePolicy"] = json.dumps(value(properties["RedrivePolicy"]))
        if properties.get("FifoQueue"):
            attributes["FifoQueue"] = "true"
        name = properties.get("QueueName", logical_id)
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        created[(logical_id, None)] = url
        created[(logical_id, "Arn")] = arn["Attributes"]["QueueArn"]
        created[(logical_id, "QueueName")] = name
    sns = server.client("sns")
    for logical_id, _ in of_type("AWS::SNS::Topic"):
        created[(logical_id, None)] = sns.create_topic(Name=logical_id)["TopicArn"]
    kms = server.client("kms")
    for logical_id, _ in of_type("AWS::KMS::Key"):
        created[(logical_id, "Arn")] = kms.create_key()["KeyMetadata"]["Arn"]
    ecs = server.client("ecs")
    for logical_id, _ in of_type("AWS::ECS::Cluster"):
        ecs.create_cluster(clusterName=logical_id)
        created[(logical_id, None)] = logical_id
    for logical_id, properties in of_type("AWS::ECS::Service"):
        cluster = value(properties["Cluster"])
        ecs.register_task_definition(
            family=logical_id,
            containerDefinitions=[{"name": "worker", "image": "worker", "memory": 512}],
        )
        service = ecs.create_service(
            cluster=cluster, serviceName=logical_id, taskDefinition=logical_id, desiredCount=0
        )["service"]
        created[(logical_id, None)] = service["serviceArn"]
        created[(logical_id, "Name")] = logical_id
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("handler.py", "def lambda_handler(event, context):\n    return None\n")
    functions = server.client("lambda")
    for logical_id, properties in of_type("AWS::Lambda::Function"):
        function = functions.create_function(
            FunctionName=logical_id,
            Runtime="python3.13",
            Role=value(properties["Role"]),
            Handler="handler.lambda_handler",
            Code={"ZipFile": code.getvalue()},
        )
        created[(logical_id, None)] = logical_id
        created[(logical_id, "Arn")] = function["FunctionArn"]
    return created


@pytest.fixture(scope="module")
def deployment(
    iam_server: IamServer, default_build: Build, postgres_url: str
) -> Iterator[Deployment]:
    created = _deploy(iam_server, default_build, postgres_url)
    sample = sample_physical(default_build.json)

    def physical(logical_id: str, attribute: str | None) -> str:
        return created.get((logical_id, attribute)) or sample(logical_id, attribute)

    ledger = Ledger(postgres_url)
    ensure_schema(ledger)
    stack = default_build.stack
    signing_arn = physical(default_build.logical_id(stack.signing_key.secret), None)
    signing_key = iam_server.client("secretsmanager").get_secret_value(SecretId=signing_arn)
    sqs = iam_server.client("sqs")
    inbox = sqs.create_queue(QueueName="alert-inbox")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])
    iam_server.client("sns").subscribe(
        TopicArn=physical(default_build.logical_id(stack.alerts.topic), None),
        Protocol="sqs",
        Endpoint=inbox_arn["Attributes"]["QueueArn"],
    )
    deployed = Deployment(
        server=iam_server,
        build=default_build,
        physical=physical,
        ledger=ledger,
        database_url=postgres_url,
        signing_key=signing_key["SecretString"],
        alert_inbox=inbox,
    )
    named = {
        "step queue": (stack.queues.queue, "Arn"),
        "dead-letter queue": (stack.queues.dead_letter_queue, "Arn"),
        "worker service": (stack.workers.service, None),
        "scaler function": (stack.scaler.function, "Arn"),
        "alert topic": (stack.alerts.topic, None),
        "signing key": (stack.signing_key.secret, None),
        "database secret": (stack.database.secret, None),
    }
    for label, (construct, attribute) in named.items():
        deployed.labels[deployed.ref(construct, attribute)] = label
    yield deployed
    ledger.dispose()


# -- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    user: str
    environment: dict[str, str]


def credentials(
    deployment: Deployment, component: str, statements: list[dict[str, Any]]
) -> Credentials:
    """An IAM user with exactly ``statements``, and the environment that signs as it."""
    iam = deployment.server.client("iam")
    user = f"{component}-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    if statements:  # IAM refuses a policy without statements: no policy is the same
        document = {"Version": "2012-10-17", "Statement": statements}
        iam.put_user_policy(
            UserName=user, PolicyName="template", PolicyDocument=json.dumps(document)
        )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return Credentials(
        user,
        {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_ENDPOINT_URL": deployment.server.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        },
    )


def _as_environment(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> None:
    """Only these AWS settings: no profile, token or per-service endpoint of another test."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)


def _forget_clients() -> None:
    """Clients and values cached per process hold the credentials they were made with."""
    boto3.DEFAULT_SESSION = None  # boto3.client()'s session keeps the first credentials
    read_secret_string.cache_clear()
    POWERTOOLS_PROVIDERS.clear()  # powertools' secret provider, with its client and cache
    executor_module._shared_sqs_client.cache_clear()
    if scaler_handler._scaler.cache_info().currsize:
        scaler_handler._scaler()[0].ledger.dispose()
    scaler_handler._scaler.cache_clear()
    if dlq_handler.get_processor.cache_info().currsize:
        dlq_handler.get_processor().ledger.dispose()
    dlq_handler.get_processor.cache_clear()


# -- each component's code path ----------------------------------------------------------------


def worker_path(deployment: Deployment) -> None:
    """What a worker does with one message, through the worker's own queue and heartbeat."""
    queue = SqsQueue(deployment.queue_url)
    message = step_message(step_key="work")
    body = launch(deployment.ledger, message, signing_key=deployment.signing_key)
    deployment.server.client("sqs").send_message(QueueUrl=deployment.queue_url, MessageBody=body)
    (received,) = queue.receive(max_messages=1, wait_seconds=1, visibility_timeout=15)
    key = message.idempotency_key
    claim = deployment.ledger.claim(
        key, worker_id="worker-1", lease_seconds=10, payload_hash=message.payload_hash
    )
    assert claim.outcome is ClaimOutcome.CLAIMED
    log = get_logger("dagster-taskiq-worker")
    lease = Lease(
        key=key,
        token=claim.fencing_token,
        queue=queue,
        receipt_handle=received.receipt_handle,
        lease_seconds=10,
        on_change=lambda _: None,
        hidden_until=received.hidden_until,
    )
    heartbeat = Heartbeat(
        ledger=deployment.ledger,
        protection=TaskProtection(None, log),
        log=log,
        max_interval=1.0,
        first_renewal_after=1.0,
    )
    heartbeat.beat(lease)  # ChangeMessageVisibility, then the ledger lease
    assert deployment.ledger.complete(key, claim.fencing_token, succeeded=True)
    queue.delete(received.receipt_handle)


def scaler_path(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scaler Lambda's handler, invoked as the executor invokes it, with a step waiting
    and no worker: it reads the queue and the service, and asks for a worker."""
    stack = deployment.build.stack
    admin_ecs = deployment.server.client("ecs")
    environment = deployment.environment(stack.scaler.function)
    admin_ecs.update_service(
        cluster=environment["DAGSTER_TASKIQ_ECS_CLUSTER"],
        service=environment["DAGSTER_TASKIQ_ECS_SERVICE"],
        desiredCount=0,
    )
    deployment.server.client("sqs").send_message(QueueUrl=deployment.queue_url, MessageBody="{}")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    scaler_handler.lambda_handler({"source": TRIGGER_SOURCE}, LambdaContext("scaler"))


def dlq_path(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed dead letter, received from the DLQ as Lambda's event source mapping does with
    the function's role, handled by the Lambda's handler, and deleted when processed."""
    stack = deployment.build.stack
    message = step_message(step_key="dead")
    body = launch(deployment.ledger, message, signing_key=deployment.signing_key)
    deployment.server.client("sqs").send_message(QueueUrl=deployment.dlq_url, MessageBody=body)
    for name, value in deployment.environment(stack.dead_letters.function).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    dead_letters = SqsQueue(deployment.dlq_url)
    received = dead_letters.receive(max_messages=10, wait_seconds=1, visibility_timeout=360)
    records = [
        {
            "messageId": m.message_id,
            "receiptHandle": m.receipt_handle,
            "body": m.body,
            "attributes": {
                "ApproximateReceiveCount": str(m.receive_count),
                "SentTimestamp": str(m.sent_timestamp_ms),
            },
            "messageAttributes": {},
            "eventSource": "aws:sqs",
            "eventSourceARN": deployment.ref(stack.queues.dead_letter_queue, "Arn"),
            "awsRegion": REGION,
        }
        for m in received
    ]
    try:
        response = dlq_handler.lambda_handler({"Records": records}, LambdaContext("dlq"))
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
    except Exception:
        failed = {m.message_id for m in received}  # the whole batch failed
    for m in received:
        if m.message_id not in failed:
            dead_letters.delete(m.receipt_handle)
    if not failed:
        record = deployment.ledger.get(message.idempotency_key)
        assert record is not None and record.status is Status.DEAD_LETTERED


def run_worker_settings(deployment: Deployment) -> ExecutorSettings:
    stack = deployment.build.stack
    scaler = deployment.environment(stack.scaler.function)
    config = {
        "queue_url": deployment.queue_url,
        "scaler_function": deployment.ref(stack.scaler.function),
        "ecs_cluster": scaler["DAGSTER_TASKIQ_ECS_CLUSTER"],
        "ecs_service": scaler["DAGSTER_TASKIQ_ECS_SERVICE"],
        "signing_key_secret_arn": deployment.ref(stack.signing_key.secret),
        "database_url": deployment.database_url,
        "message_retention": deployment.build.stack.settings.message_retention,
        "unreachable_retry_seconds": 0,
    }
    processed = process_config(taskiq_executor.config_schema.config_type, config)
    assert processed.success, processed.errors
    with DagsterInstance.ephemeral() as instance:
        return ExecutorSettings.resolve(dict(processed.value or {}), instance)


def run_worker_path(deployment: Deployment) -> None:
    """The executor at run start and at a step's launch: the signing key read by ARN, the
    queue checked, a signed step sent, the scale-out trigger (service read, scaler invoked)."""
    stack = deployment.build.stack
    scaler = deployment.environment(stack.scaler.function)
    deployment.server.client("ecs").update_service(
        cluster=scaler["DAGSTER_TASKIQ_ECS_CLUSTER"],
        service=scaler["DAGSTER_TASKIQ_ECS_SERVICE"],
        desiredCount=0,
    )
    settings = run_worker_settings(deployment)
    assert settings.launch.signing_key == deployment.signing_key
    queues, _ = connect(settings)
    message = step_message(step_key="launched")
    body = encode(message, signing_key=settings.launch.signing_key, max_bytes=MAX_BYTES)
    queues[deployment.queue_url].send(body)
    checked = scale_out_triggers(settings)[deployment.queue_url].steps_launched()
    assert checked is not None
    checked.join(30)


PATHS: dict[str, Callable[[Deployment, pytest.MonkeyPatch], None]] = {
    "worker": lambda deployment, _: worker_path(deployment),
    "scaler": scaler_path,
    "dlq_processor": dlq_path,
    "run_worker": lambda deployment, _: run_worker_path(deployment),
}


@dataclass(frozen=True)
class Outcome:
    decisions: list[dict[str, Any]]
    error: BaseException | None

    @property
    def allowed(self) -> set[Permission]:
        return {(d["action"], d["resource"]) for d in self.decisions if d["allowed"]}

    @property
    def denied(self) -> set[Permission]:
        return {(d["action"], d["resource"]) for d in self.decisions if not d["allowed"]}


def run(
    deployment: Deployment,
    component: str,
    statements: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> Outcome:
    """``component``'s code path with credentials carrying exactly ``statements``."""
    creds = credentials(deployment, component, statements)
    since = deployment.server.position()
    for url in (deployment.queue_url, deployment.dlq_url):
        _drain(deployment.server.client("sqs"), url)
    error: BaseException | None = None
    with monkeypatch.context() as patch:
        _as_environment(patch, creds.environment)
        _forget_clients()
        try:
            PATHS[component](deployment, patch)
        except (Exception, AssertionError) as e:  # judged from the decisions below
            error = e
        finally:
            _forget_clients()
    return Outcome(deployment.server.decisions(creds.user, since), error)


def _drain(sqs: Any, url: str) -> None:
    """Delete what an earlier run left visible (PurgeQueue is allowed once a minute)."""
    while True:
        messages = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=60
        ).get("Messages", [])
        if not messages:
            return
        for message in messages:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def _service_side(deployment: Deployment, permission: Permission) -> bool:
    action, _ = permission
    return action in SERVICE_SIDE or f"{action}@{deployment.label(permission)}" in SERVICE_SIDE


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_runs_with_exactly_its_template_policies(
    deployment: Deployment, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqs = deployment.server.client("sqs")
    _drain(sqs, deployment.alert_inbox)
    outcome = run(deployment, component, deployment.grants(component), monkeypatch)
    assert outcome.error is None, repr(outcome.error)
    if component == "dlq_processor":  # alerted: the dead letter's alert is on the topic
        alerts = sqs.receive_message(QueueUrl=deployment.alert_inbox, MaxNumberOfMessages=10)
        (alert,) = alerts["Messages"]
        assert "dead" in json.loads(alert["Body"])["Message"]
    assert outcome.denied == set()
    used = {
        (component_, action, label) for component_, action, label in USED if component_ == component
    }
    made = {(component, action, deployment.label((action, r))) for action, r in outcome.allowed}
    assert used <= made, sorted(used - made)


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_granted_permission_is_used_or_service_side(
    deployment: Deployment, component: str
) -> None:
    """The USED table is the template's grants, less what only AWS uses for the role."""
    granted = {
        (component, action, deployment.label((action, resource)))
        for action, resource in deployment.permissions(component)
        if not _service_side(deployment, (action, resource))
    }
    assert granted == {u for u in USED if u[0] == component}


# A handler that fails before its first metric says so; expected here.
@pytest.mark.filterwarnings("ignore:No application metrics to publish")
@pytest.mark.parametrize(
    ("component", "action", "label"),
    USED,
    ids=[f"{component}:{action}:{label.replace(' ', '-')}" for component, action, label in USED],
)
def test_without_any_one_permission_that_call_is_refused(
    deployment: Deployment, component: str, action: str, label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    permissions = deployment.permissions(component)
    (removed,) = [p for p in permissions if p[0] == action and deployment.label(p) == label]
    statements = [
        {"Effect": "Allow", "Action": a, "Resource": r} for a, r in sorted(permissions - {removed})
    ]
    outcome = run(deployment, component, statements, monkeypatch)
    assert removed in outcome.denied, f"{action} on {label} was not refused: {outcome.decisions}"


def test_a_real_worker_runs_a_real_step_with_the_template_policies(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dagster-taskiq worker`` with the task role's policies takes a step that the executor,
    with the run worker's, launched for a run: every call of both is allowed."""
    worker = credentials(deployment, "worker", deployment.grants("worker"))
    run_worker = credentials(deployment, "run_worker", deployment.grants("run_worker"))
    home = tmp_path / "dagster_home"
    write_dagster_yaml(home, deployment.database_url)
    _drain(deployment.server.client("sqs"), deployment.queue_url)  # earlier tests' messages
    since = deployment.server.position()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAGSTER"))}
    environment |= worker.environment | {
        # As ECS injects it from the secret (the task role cannot read the secret itself).
        "DAGSTER_TASKIQ_SIGNING_KEY": deployment.signing_key,
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": str(REPO_ROOT),
        "DAGSTER_TASKIQ_LOAD_RECORD_URL": deployment.database_url,
    }
    stack = deployment.build.stack
    with open(tmp_path / "worker.log", "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster_taskiq",
                "worker",
                "--queue-url",
                deployment.queue_url,
                "--code-location",
                "tests.jobs",
                "--database-url",
                deployment.database_url,
                "--concurrency",
                "1",
                "--wait-seconds",
                "1",
                "--max-heartbeat-interval",
                "0.5",
            ],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with monkeypatch.context() as patch:
                _as_environment(patch, run_worker.environment)
                patch.setenv("DAGSTER_HOME", str(home))
                _forget_clients()
                scaler = deployment.environment(stack.scaler.function)
                execution = {
                    "queue_url": deployment.queue_url,
                    "scaler_function": deployment.ref(stack.scaler.function),
                    "ecs_cluster": scaler["DAGSTER_TASKIQ_ECS_CLUSTER"],
                    "ecs_service": scaler["DAGSTER_TASKIQ_ECS_SERVICE"],
                    "signing_key_secret_arn": deployment.ref(stack.signing_key.secret),
                    "message_retention": stack.settings.message_retention,
                    # Fail within a minute if the worker never takes the step.
                    "pickup_timeout": 60,
                }
                with DagsterInstance.get() as instance:
                    result = execute_job(
                        reconstructable(jobs.slow_job),
                        instance=instance,
                        run_config={
                            "execution": {"config": execution},
                            "ops": {"slow": {"config": {"seconds": 2.0}}},
                        },
                        raise_on_error=False,
                    )
                _forget_clients()
        finally:
            process.terminate()
            process.wait(60)
    assert result.success, (tmp_path / "worker.log").read_text()[-5000:]
    time.sleep(0.5)  # the worker's last delete, recorded after the run saw the step succeed
    worker_calls = deployment.server.decisions(worker.user, since)
    run_worker_calls = deployment.server.decisions(run_worker.user, since)
    assert [d for d in worker_calls + run_worker_calls if not d["allowed"]] == []
    assert {d["action"] for d in worker_calls} >= {
        "sqs:ReceiveMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:DeleteMessage",
    }
    assert {d["action"] for d in run_worker_calls} >= {
        "secretsmanager:GetSecretValue",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
    }


def test_the_server_refuses_what_no_policy_allows(deployment: Deployment) -> None:
    """The premise: credentials with no statement may not even read the queue."""
    creds = credentials(deployment, "nobody", [])
    queue = SqsQueue(
        deployment.queue_url,
        client=boto3.client(
            "sqs",
            endpoint_url=deployment.server.endpoint,
            region_name=REGION,
            aws_access_key_id=creds.environment["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=creds.environment["AWS_SECRET_ACCESS_KEY"],
        ),
    )
    with pytest.raises(QueueUnavailable, match="AccessDenied"):
        queue.receive(max_messages=1, wait_seconds=0, visibility_timeout=1)
    assert ACCOUNT in deployment.queue_url

"""Names of environment variables, defaults, and database URL handling.

Dagster-free: the Lambdas import this module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from dagster_taskiq.core.errors import ConfigurationError

ENV_QUEUE_URL = "DAGSTER_TASKIQ_QUEUE_URL"
# The priority lane(s): served first by workers (comma-separated for a worker).
ENV_PRIORITY_QUEUE_URL = "DAGSTER_TASKIQ_PRIORITY_QUEUE_URL"
ENV_DATABASE_URL = "DAGSTER_TASKIQ_DATABASE_URL"
# The URL may leave the password out: it then comes from one of these, so that it can be
# injected from Secrets Manager instead of sitting in a plain environment variable.
ENV_DATABASE_PASSWORD = "DAGSTER_TASKIQ_DATABASE_PASSWORD"
ENV_DATABASE_SECRET_ARN = "DAGSTER_TASKIQ_DATABASE_SECRET_ARN"
# The user name, for a URL that has none (an existing database: the user is in its secret).
ENV_DATABASE_USER = "DAGSTER_TASKIQ_DATABASE_USER"
ENV_ENDPOINT_URL = "DAGSTER_TASKIQ_ENDPOINT_URL"
ENV_REGION = "DAGSTER_TASKIQ_AWS_REGION"
ENV_SIGNING_KEY = "DAGSTER_TASKIQ_SIGNING_KEY"
# Or the Secrets Manager secret whose string is the key: read once, never in the environment.
ENV_SIGNING_KEY_SECRET_ARN = "DAGSTER_TASKIQ_SIGNING_KEY_SECRET_ARN"
ENV_CODE_LOCATIONS = "DAGSTER_TASKIQ_CODE_LOCATIONS"
ENV_CONCURRENCY = "DAGSTER_TASKIQ_CONCURRENCY"
ENV_STEP_PROCESS_START = "DAGSTER_TASKIQ_STEP_PROCESS_START"
ENV_MAX_STEP_ARGS_BYTES = "DAGSTER_TASKIQ_MAX_STEP_ARGS_BYTES"
ENV_ECS_CLUSTER = "DAGSTER_TASKIQ_ECS_CLUSTER"
ENV_ECS_SERVICE = "DAGSTER_TASKIQ_ECS_SERVICE"
ENV_SCALER_FUNCTION = "DAGSTER_TASKIQ_SCALER_FUNCTION"
ENV_ALERT_TOPIC_ARN = "DAGSTER_TASKIQ_ALERT_TOPIC_ARN"
ENV_DAGSTER_UI_URL = "DAGSTER_TASKIQ_DAGSTER_UI_URL"
# For the operations commands (status, runs, dlq, logs): what the stack outputs name.
# The dead-letter queue(s), in the order of the queues; read from a queue's redrive policy
# when unset.
ENV_DLQ_URL = "DAGSTER_TASKIQ_DLQ_URL"
ENV_WORKER_LOG_GROUP = "DAGSTER_TASKIQ_WORKER_LOG_GROUP"
ENV_SCALER_LOG_GROUP = "DAGSTER_TASKIQ_SCALER_LOG_GROUP"
ENV_DLQ_PROCESSOR_LOG_GROUP = "DAGSTER_TASKIQ_DLQ_PROCESSOR_LOG_GROUP"
# The JSON file ``cdk deploy --outputs-file`` writes: every pool's outputs at once.
ENV_STACK_OUTPUTS = "DAGSTER_TASKIQ_STACK_OUTPUTS"
# The root directory of a running local stack: its stack.env, pool states and logs.
ENV_LOCAL_STACK = "DAGSTER_TASKIQ_LOCAL_STACK"

DEFAULT_REGION = "us-east-1"
DEFAULT_VISIBILITY_TIMEOUT = 300
DEFAULT_MESSAGE_RETENTION = 1_209_600
DEFAULT_MAX_RECEIVE_COUNT = 5
DEFAULT_IDEMPOTENCY_KEY_TTL = 86_400
# The classic SQS limit. Queues may allow up to 1 MiB; 256 KiB works with every queue.
DEFAULT_MAX_MESSAGE_BYTES = 262_144

LEDGER_DRIVER = "postgresql+pg8000"
DAGSTER_STORAGE_DRIVER = "postgresql+psycopg2"
_POSTGRES_SCHEMES = {"postgres", "postgresql"}


def env_or(value: str | None, env_var: str) -> str | None:
    """Explicit value first, then the environment variable; empty strings count as unset."""
    if value:
        return value
    return os.environ.get(env_var) or None


def _with_driver(url: str, driver: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme.split("+", 1)[0] not in _POSTGRES_SCHEMES:
        raise ConfigurationError(
            f"Expected a PostgreSQL URL (postgresql://...), got scheme {scheme!r} "
            f"in {redact_url(url)}"
        )
    # Not urlunsplit: it drops the "//" of an empty netloc for schemes it does not know.
    return driver + url[len(scheme) :]


def _join(scheme: str, netloc: str, path: str, query: str) -> str:
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def with_password(url: str, password: str) -> str:
    """The URL with ``password`` in it, unless it already has one."""
    parts = urlsplit(url)
    if parts.password is not None or not password:
        return url
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if not at:
        raise ConfigurationError(f"A password needs a user name in the URL: {redact_url(url)}")
    netloc = f"{userinfo}:{quote(password, safe='')}@{hostinfo}"
    return _join(parts.scheme, netloc, parts.path, parts.query)


def with_user(url: str, user: str) -> str:
    """The URL with ``user`` in it, unless it already names one."""
    parts = urlsplit(url)
    if parts.username or not user:
        return url
    _, at, hostinfo = parts.netloc.rpartition("@")
    netloc = f"{quote(user, safe='')}@{hostinfo if at else parts.netloc}"
    return _join(parts.scheme, netloc, parts.path, parts.query)


def _secret_credentials(secret_arn: str) -> dict[str, str]:
    # An RDS/Aurora secret is JSON with "username" and "password". Cached by powertools for
    # 5 min, so a rotated password reaches new connections.
    from aws_lambda_powertools.utilities import parameters

    secret = parameters.get_secret(secret_arn, transform="json")
    if not isinstance(secret, dict) or "password" not in secret:
        raise ConfigurationError(f"The secret {secret_arn} has no 'password' key")
    return {key: str(value) for key, value in secret.items() if key in ("username", "password")}


def database_url(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """The ledger URL: explicit, else $DAGSTER_TASKIQ_DATABASE_URL; with the password from
    $DAGSTER_TASKIQ_DATABASE_PASSWORD or the secret $DAGSTER_TASKIQ_DATABASE_SECRET_ARN
    when the URL has none, and likewise the user ($DAGSTER_TASKIQ_DATABASE_USER or the
    secret's ``username``)."""
    url = explicit or environ.get(ENV_DATABASE_URL) or None
    if url is None:
        return None
    user = environ.get(ENV_DATABASE_USER) or None
    password = environ.get(ENV_DATABASE_PASSWORD) or None
    needs_user = not urlsplit(url).username and user is None
    secret_arn = environ.get(ENV_DATABASE_SECRET_ARN)
    if (password is None or needs_user) and secret_arn:
        credentials = _secret_credentials(secret_arn)
        password = password or credentials["password"]
        user = user or credentials.get("username")
    if user:
        url = with_user(url, user)
    return with_password(url, password) if password else url


@functools.cache
def read_secret_string(secret_arn: str, endpoint_url: str | None = None) -> str:
    """A Secrets Manager secret's string, read once per process (boto3, the secret's region).

    Raises ConfigurationError naming the secret and what to check when it cannot be read.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parts = secret_arn.split(":")
    if len(parts) < 7 or parts[2] != "secretsmanager":
        raise ConfigurationError(
            f"Expected a Secrets Manager secret ARN "
            f"(arn:aws:secretsmanager:<region>:<account>:secret:<name>), got {secret_arn!r}"
        )
    client = boto3.session.Session().client(
        "secretsmanager", region_name=parts[3], endpoint_url=endpoint_url or None
    )
    try:
        value: object = client.get_secret_value(SecretId=secret_arn).get("SecretString")
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise ConfigurationError(
            f"Cannot read the secret {secret_arn} ({code}): {e}. This process's role needs "
            "secretsmanager:GetSecretValue on it (for the signing key, the stack's "
            "RunWorkerPolicyArn policy has it), and kms:Decrypt on its key if that is not "
            "AWS managed."
        ) from e
    except BotoCoreError as e:
        raise ConfigurationError(f"Cannot read the secret {secret_arn}: {e}") from e
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"The secret {secret_arn} has no string value")
    return value


def signing_key(
    key: str | None, secret_arn: str | None, *, endpoint_url: str | None = None
) -> str | None:
    """The HMAC signing key: given as is, or read from its secret. Not both: a key in the
    environment beside a secret would be one of them left over, and they may differ."""
    if key and secret_arn:
        raise ConfigurationError(
            f"Both a signing key ({ENV_SIGNING_KEY} or signing_key) and its secret "
            f"({ENV_SIGNING_KEY_SECRET_ARN} or signing_key_secret_arn) are set: set one."
        )
    if secret_arn:
        return read_secret_string(secret_arn, endpoint_url)
    return key or None


def ledger_url(url: str) -> str:
    """Normalise any PostgreSQL URL to the pg8000 driver the ledger uses.

    libpq-style ``?host=/socket/dir`` becomes pg8000's ``?unix_sock=/socket/dir/.s.PGSQL.<port>``.
    """
    parts = urlsplit(_with_driver(url, LEDGER_DRIVER))
    query = dict(parse_qsl(parts.query))
    netloc = parts.netloc
    host = query.pop("host", None)
    if host and host.startswith("/"):
        port = parts.port or int(query.pop("port", 5432))
        query["unix_sock"] = f"{host.rstrip('/')}/.s.PGSQL.{port}"
        userinfo, at, _ = netloc.rpartition("@")
        netloc = userinfo + at
    elif host:
        query["host"] = host
    return _join(LEDGER_DRIVER, netloc, parts.path, urlencode(query))


def dagster_storage_url(url: str) -> str:
    """The same database for dagster-postgres, which uses psycopg2."""
    return _with_driver(url, DAGSTER_STORAGE_DRIVER)


def redact_url(url: str) -> str:
    """The URL with any password replaced (in the user part or the query), safe to log."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="/*")
    if netloc == parts.netloc and query == urlencode(pairs, safe="/*"):
        return url
    return _join(parts.scheme, netloc, parts.path, query)

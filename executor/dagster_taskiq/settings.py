"""Names of environment variables, defaults, and database URL handling.

Dagster-free: the Lambdas import this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

ENV_QUEUE_URL = "DAGSTER_TASKIQ_QUEUE_URL"
# The priority lane(s): served first by workers (comma-separated for a worker).
ENV_PRIORITY_QUEUE_URL = "DAGSTER_TASKIQ_PRIORITY_QUEUE_URL"
ENV_DATABASE_URL = "DAGSTER_TASKIQ_DATABASE_URL"
# The URL may leave the password out: it then comes from one of these, so that it can be
# injected from Secrets Manager instead of sitting in a plain environment variable.
ENV_DATABASE_PASSWORD = "DAGSTER_TASKIQ_DATABASE_PASSWORD"
ENV_DATABASE_SECRET_ARN = "DAGSTER_TASKIQ_DATABASE_SECRET_ARN"
ENV_ENDPOINT_URL = "DAGSTER_TASKIQ_ENDPOINT_URL"
ENV_REGION = "DAGSTER_TASKIQ_AWS_REGION"
ENV_SIGNING_KEY = "DAGSTER_TASKIQ_SIGNING_KEY"
ENV_CODE_LOCATIONS = "DAGSTER_TASKIQ_CODE_LOCATIONS"
ENV_CONCURRENCY = "DAGSTER_TASKIQ_CONCURRENCY"
ENV_ECS_CLUSTER = "DAGSTER_TASKIQ_ECS_CLUSTER"
ENV_ECS_SERVICE = "DAGSTER_TASKIQ_ECS_SERVICE"
ENV_SCALER_FUNCTION = "DAGSTER_TASKIQ_SCALER_FUNCTION"
ENV_ALERT_TOPIC_ARN = "DAGSTER_TASKIQ_ALERT_TOPIC_ARN"
ENV_DAGSTER_UI_URL = "DAGSTER_TASKIQ_DAGSTER_UI_URL"

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


class ConfigurationError(Exception):
    """A setting is missing or wrong; the message says what to set."""


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


def _secret_password(secret_arn: str) -> str:
    # An RDS/Aurora secret is JSON with a "password" key. Cached by powertools for 5 min.
    from aws_lambda_powertools.utilities import parameters

    secret = parameters.get_secret(secret_arn, transform="json")
    if not isinstance(secret, dict) or "password" not in secret:
        raise ConfigurationError(f"The secret {secret_arn} has no 'password' key")
    return str(secret["password"])


def database_url(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """The ledger URL: explicit, else $DAGSTER_TASKIQ_DATABASE_URL; with the password from
    $DAGSTER_TASKIQ_DATABASE_PASSWORD or the secret $DAGSTER_TASKIQ_DATABASE_SECRET_ARN
    when the URL has none."""
    url = explicit or environ.get(ENV_DATABASE_URL) or None
    if url is None:
        return None
    password = environ.get(ENV_DATABASE_PASSWORD)
    if not password and environ.get(ENV_DATABASE_SECRET_ARN):
        password = _secret_password(environ[ENV_DATABASE_SECRET_ARN])
    return with_password(url, password) if password else url


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

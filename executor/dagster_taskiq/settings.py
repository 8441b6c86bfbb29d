"""Names of environment variables, defaults, and database URL handling.

Dagster-free: the Lambdas import this module.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ENV_QUEUE_URL = "DAGSTER_TASKIQ_QUEUE_URL"
ENV_DATABASE_URL = "DAGSTER_TASKIQ_DATABASE_URL"
ENV_ENDPOINT_URL = "DAGSTER_TASKIQ_ENDPOINT_URL"
ENV_REGION = "DAGSTER_TASKIQ_AWS_REGION"
ENV_SIGNING_KEY = "DAGSTER_TASKIQ_SIGNING_KEY"
ENV_CODE_LOCATIONS = "DAGSTER_TASKIQ_CODE_LOCATIONS"
ENV_CONCURRENCY = "DAGSTER_TASKIQ_CONCURRENCY"

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
    parts = urlsplit(url)
    base = parts.scheme.split("+", 1)[0]
    if base not in _POSTGRES_SCHEMES:
        raise ConfigurationError(
            f"Expected a PostgreSQL URL (postgresql://...), got scheme {parts.scheme!r} "
            f"in {redact_url(url)}"
        )
    return urlunsplit((driver, *parts[1:]))


def ledger_url(url: str) -> str:
    """Normalise any PostgreSQL URL to the pg8000 driver the ledger uses.

    libpq-style ``?host=/socket/dir`` becomes pg8000's ``?unix_sock=/socket/dir/.s.PGSQL.<port>``.
    """
    url = _with_driver(url, LEDGER_DRIVER)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = query.pop("host", None)
    if host and host.startswith("/"):
        port = parts.port or int(query.pop("port", 5432))
        query["unix_sock"] = f"{host.rstrip('/')}/.s.PGSQL.{port}"
        netloc = parts.netloc.rsplit("@", 1)
        netloc_str = netloc[0] + "@" if len(netloc) == 2 else ""
        parts = parts._replace(netloc=netloc_str)
    elif host:
        query["host"] = host
    return urlunsplit(parts._replace(query=urlencode(query)))


def dagster_storage_url(url: str) -> str:
    """The same database for dagster-postgres, which uses psycopg2."""
    return _with_driver(url, DAGSTER_STORAGE_DRIVER)


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))

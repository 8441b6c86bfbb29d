"""Database URL handling and environment lookups."""

from __future__ import annotations

import ssl
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.ledger import pg8000_connect_args
from dagster_taskiq.core.settings import (
    DAGSTER_STORAGE_DRIVER,
    LEDGER_DRIVER,
    dagster_storage_url,
    env_or,
    ledger_url,
    redact_url,
)

ENV = "DAGSTER_TASKIQ_TEST_SETTING"


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


# -- ledger_url ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@db.example:5432/app", "postgresql+pg8000://u:p@db.example:5432/app"),
        ("postgresql://u:p@db.example/app", "postgresql+pg8000://u:p@db.example/app"),
        ("postgresql+psycopg2://u:p@db.example/app", "postgresql+pg8000://u:p@db.example/app"),
        ("postgresql+pg8000://u:p@db.example/app", "postgresql+pg8000://u:p@db.example/app"),
        ("postgresql://u@db.example:6543/app", "postgresql+pg8000://u@db.example:6543/app"),
        ("postgres://db.example/app", "postgresql+pg8000://db.example/app"),
    ],
)
def test_ledger_url_uses_pg8000(url: str, expected: str) -> None:
    assert ledger_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@db.example:5432/app", "postgresql+psycopg2://u:p@db.example:5432/app"),
        ("postgresql://u:p@db.example/app", "postgresql+psycopg2://u:p@db.example/app"),
        ("postgresql+pg8000://u@db.example/app", "postgresql+psycopg2://u@db.example/app"),
        ("postgresql+psycopg2://u:p@db.example/app", "postgresql+psycopg2://u:p@db.example/app"),
        (
            "postgresql://u:p@/app?host=/run/postgresql",
            "postgresql+psycopg2://u:p@/app?host=/run/postgresql",
        ),
    ],
)
def test_dagster_storage_url_uses_psycopg2(url: str, expected: str) -> None:
    assert dagster_storage_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected_prefix", "expected_sock"),
    [
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg/data",
            "postgresql+pg8000://postgres:@/postgres",
            "/tmp/pg/data/.s.PGSQL.5432",
        ),
        (
            "postgres://u:secret@/app?host=/run/postgresql/",
            "postgresql+pg8000://u:secret@/app",
            "/run/postgresql/.s.PGSQL.5432",
        ),
        (
            "postgresql://u@/app?host=/run/postgresql&port=6543",
            "postgresql+pg8000://u@/app",
            "/run/postgresql/.s.PGSQL.6543",
        ),
        (
            "postgresql+psycopg2://u:p@localhost:5433/app?host=/sock",
            "postgresql+pg8000://u:p@/app",
            "/sock/.s.PGSQL.5433",
        ),
    ],
)
def test_ledger_url_turns_socket_host_into_unix_sock(
    url: str, expected_prefix: str, expected_sock: str
) -> None:
    converted = ledger_url(url)
    assert converted.split("?", 1)[0] == expected_prefix
    assert _query(converted) == {"unix_sock": [expected_sock]}
    # What the pg8000 driver will actually receive.
    parsed = sa.engine.make_url(converted)
    assert parsed.drivername == LEDGER_DRIVER
    assert parsed.query == {"unix_sock": expected_sock}
    assert parsed.host is None


def test_ledger_url_keeps_password_and_database_with_socket() -> None:
    parsed = sa.engine.make_url(ledger_url("postgresql://me:s3cret@/mydb?host=/var/run/pg"))
    assert parsed.username == "me"
    assert parsed.password == "s3cret"
    assert parsed.database == "mydb"


def test_ledger_url_keeps_network_host_query_and_other_parameters() -> None:
    converted = ledger_url("postgresql://u@h/app?host=db.internal&application_name=x")
    assert converted.startswith("postgresql+pg8000://u@h/app?")
    assert _query(converted) == {"host": ["db.internal"], "application_name": ["x"]}


def test_ledger_url_without_query_has_none() -> None:
    assert "?" not in ledger_url("postgresql://u:p@h:5432/app")


@pytest.mark.parametrize(
    "url", ["postgresql:///app?host=/run/postgresql", "postgresql:///app"], ids=["socket", "bare"]
)
def test_ledger_url_with_empty_netloc_is_parseable(url: str) -> None:
    converted = ledger_url(url)
    assert converted.startswith("postgresql+pg8000:///app")
    assert sa.engine.make_url(converted).database == "app"


def test_dagster_storage_url_with_empty_netloc_is_parseable() -> None:
    assert dagster_storage_url("postgresql:///app") == "postgresql+psycopg2:///app"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:p@h/db",
        "sqlite:///tmp/x.db",
        "mysql+pymysql://u@h/db",
        "postgresqlx://u@h/db",
        "db.example/app",
    ],
)
def test_non_postgres_urls_are_rejected(url: str) -> None:
    with pytest.raises(ConfigurationError):
        ledger_url(url)
    with pytest.raises(ConfigurationError):
        dagster_storage_url(url)


def test_configuration_error_names_scheme_and_redacts_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        ledger_url("mysql://admin:hunter2@db.example/app")
    text = str(info.value)
    assert "'mysql'" in text
    assert "hunter2" not in text
    assert "admin:***@db.example" in text


def test_drivers_are_the_documented_ones() -> None:
    assert LEDGER_DRIVER == "postgresql+pg8000"
    assert DAGSTER_STORAGE_DRIVER == "postgresql+psycopg2"


# -- redact_url ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql+pg8000://u:secret@h/db?x=1", "postgresql+pg8000://u:***@h/db?x=1"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:secret@/db?host=/tmp", "postgresql://u:***@/db?host=/tmp"),
    ],
)
def test_redact_url_hides_password(url: str, expected: str) -> None:
    redacted = redact_url(url)
    assert redacted == expected
    assert "secret" not in redacted


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h/db", "postgresql://h:5432/db", "postgresql:///db?host=/tmp", "not a url"],
)
def test_redact_url_leaves_passwordless_url_unchanged(url: str) -> None:
    assert redact_url(url) == url


# -- env_or ----------------------------------------------------------------------------


def test_env_or_prefers_explicit_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "from-env")
    assert env_or("explicit", ENV) == "explicit"


def test_env_or_falls_back_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "from-env")
    assert env_or(None, ENV) == "from-env"
    assert env_or("", ENV) == "from-env"


def test_env_or_none_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert env_or(None, ENV) is None
    assert env_or("", ENV) is None
    monkeypatch.setenv(ENV, "")
    assert env_or(None, ENV) is None
    assert env_or("", ENV) is None


def test_libpq_ssl_and_timeout_options_become_pg8000_arguments() -> None:
    url, args = pg8000_connect_args(
        "postgresql+pg8000://u:p@db.example.com:5432/app?sslmode=require&connect_timeout=3"
    )
    assert url == "postgresql+pg8000://u:p@db.example.com:5432/app"
    assert args["timeout"] == 3
    context = args["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname

    _, full = pg8000_connect_args("postgresql+pg8000://u@h/app?sslmode=verify-full")
    assert full["ssl_context"].check_hostname
    assert full["ssl_context"].verify_mode == ssl.CERT_REQUIRED

    plain_url, plain = pg8000_connect_args("postgresql+pg8000://u@h/app?sslmode=prefer&x=1")
    assert plain == {"timeout": 10}
    assert plain_url == "postgresql+pg8000://u@h/app?x=1"


def test_unknown_sslmode_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="sslmode"):
        pg8000_connect_args("postgresql+pg8000://u:secret@h/app?sslmode=sometimes")


def test_password_in_the_query_is_redacted() -> None:
    assert redact_url("postgresql://u@h/db?password=secret&x=1") == (
        "postgresql://u@h/db?password=***&x=1"
    )

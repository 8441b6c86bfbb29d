"""Assemble a worker from its settings: queue, ledger, Dagster instance."""

from __future__ import annotations

import dataclasses
import os

from dagster_taskiq.core.errors import ConfigurationError
from dagster_taskiq.core.ledger import Ledger
from dagster_taskiq.core.settings import ENV_DATABASE_URL, signing_key
from dagster_taskiq.core.settings import database_url as resolve_database_url
from dagster_taskiq.core.sqs import sqs_queues
from dagster_taskiq.worker.config import WorkerSettings
from dagster_taskiq.worker.supervisor import Worker


def _instance_database_url() -> str | None:
    from dagster import DagsterInstance

    from dagster_taskiq.executor.instance_storage import instance_postgres_url

    instance = DagsterInstance.get()
    try:
        return instance_postgres_url(instance)
    finally:
        instance.dispose()


def run_worker(settings: WorkerSettings) -> int:
    database_url = resolve_database_url(settings.database_url or None, os.environ)
    database_url = database_url or _instance_database_url()
    if not database_url:
        raise ConfigurationError(
            f"No ledger database: pass --database-url or set {ENV_DATABASE_URL}, or give the "
            "worker a Dagster instance with dagster-postgres storage (DAGSTER_HOME)."
        )
    settings = dataclasses.replace(
        settings,
        database_url=database_url,
        signing_key=signing_key(settings.signing_key, settings.signing_key_secret_arn),
        signing_key_secret_arn=None,
    )
    queues = sqs_queues(
        settings.all_queue_urls, region=settings.region, endpoint_url=settings.endpoint_url
    )
    ledger = Ledger(database_url, pool_size=settings.concurrency + 2)
    return Worker(settings, queues={q.url: q for q in queues}, ledger=ledger).run()

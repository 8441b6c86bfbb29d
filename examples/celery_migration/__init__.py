"""A job migrated from dagster-celery: see docs/migrating-from-celery.md."""

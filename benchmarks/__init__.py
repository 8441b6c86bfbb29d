"""`make bench`: this executor side by side with Dagster's executors and dagster-celery."""

"""The Dagster side: the executor, its step handler and how it waits."""

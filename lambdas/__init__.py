"""The two Lambdas: thin powertools handlers over dagster-free logic in dagster_taskiq."""

"""Examples of dagster-taskiq in use."""

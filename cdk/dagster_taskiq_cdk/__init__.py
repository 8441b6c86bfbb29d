"""Constructs for dagster-taskiq on AWS: one module per component, composed in ``stack``."""

"""What operators ask during an incident, answered from SQS, ECS, CloudWatch and the ledger.

One module a concept: ``target`` (where the deployment is: AWS from the stack's outputs, or
a local stack), ``status``, ``runs``, ``dlq`` and ``logs`` (plain functions that return
data), ``render`` (tables for a terminal) and ``commands`` (the CLI). Dagster-free but for
the event-log part of ``runs``, which imports it when asked.
"""

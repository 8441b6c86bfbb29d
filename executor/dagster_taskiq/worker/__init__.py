"""The worker: a supervisor process feeding warm step processes from SQS.

``supervisor`` polls the queue and claims steps in the ledger; ``step_process`` runs one
step at a time, in-process, in a long-lived child; ``heartbeat`` keeps leases, message
visibility and ECS scale-in protection alive; ``execution`` is the Dagster part.
"""

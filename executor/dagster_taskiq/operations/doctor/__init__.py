"""``dagster-taskiq doctor``: check every wire of a deployment from where the run worker
runs, then send a canary step through a real worker.

``checks`` holds one small function per wire, each returning a ``CheckResult`` (never
raising); ``canary`` runs the canary job; ``run`` puts them in order; ``command`` is the
CLI and its output.
"""

# Seconds the canary step may wait: enough for a Fargate cold start (the scaler's
# decision, the image pull, the worker's imports).
DEFAULT_CANARY_TIMEOUT = 300.0

"""A seeded discrete-event model of a day of step arrivals, to compare scaling policies.

``dagster-taskiq scaling simulate`` runs it: runs of stages (a root step, a fan-out, a
collect step) arrive over a day, or come from the ledger's own history; each policy sizes a
worker pool whose workers take a while to start; the report compares the waits and the
worker-minutes. Dagster-free: it needs the scaling policy and, for history, the ledger.
"""

"""The step process's patience with Dagster's database.

dagster-postgres retries a failed connection 5 times over about 6 s; after that the
step's next event write raises, and Dagster records the step as failed as soon as the
database is back: a network blip between a worker and the database would fail the
user's step. The step process waits longer instead (about 25 s), and a longer outage
is left to the lease: the supervisor cannot renew it either, stops the step process
once it runs out, and another worker runs the attempt again.
"""

from __future__ import annotations

# dagster-postgres backs off exponentially from retry_wait: 0.1 s doubled 8 times ~ 25 s.
RETRY_LIMIT = 8
RETRY_WAIT = 0.1


def ride_out_database_outages() -> None:
    try:
        from dagster_postgres import utils
    except ImportError:  # another instance storage: nothing to lengthen
        return
    # create_pg_connection() calls retry_pg_connection_fn(engine.connect) with the
    # function's defaults, so lengthening them applies to every connection it opens.
    utils.retry_pg_connection_fn.__defaults__ = (RETRY_LIMIT, RETRY_WAIT)

"""Run a job from tests.jobs in this process: ``python -m tests.run_job JOB RUN_CONFIG``.

Prints ``RUN_ID <id>`` before execution starts, so the test can watch and interrupt it.
With ``--stream`` the run's events are consumed and dropped as they come, as a
deployment's run worker (``dagster api execute_run``) does, rather than kept for a result.
"""

from __future__ import annotations

import json
import sys

from dagster import DagsterInstance, DagsterRunStatus, reconstructable
from dagster._core.execution.api import execute_run, execute_run_iterator

from tests import jobs


def main() -> int:
    stream = "--stream" in sys.argv
    job_name, config_text = [a for a in sys.argv[1:] if a != "--stream"][:2]
    run_config = json.loads(config_text)
    job_def = getattr(jobs, job_name)
    instance = DagsterInstance.get()
    recon_job = reconstructable(job_def)
    run = instance.create_run_for_job(
        job_def,
        run_config=run_config,
        # The job's tags become the run's, as execute_job and the launchpad do.
        tags=job_def.run_tags,
        job_code_origin=recon_job.get_python_origin(),
    )
    print(f"RUN_ID {run.run_id}", flush=True)
    if stream:
        for _ in execute_run_iterator(recon_job, run, instance):
            pass
        ended = instance.get_run_by_id(run.run_id)
        return 0 if ended is not None and ended.status == DagsterRunStatus.SUCCESS else 1
    result = execute_run(recon_job, run, instance)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())

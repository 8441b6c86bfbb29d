"""Run a job from tests.jobs in this process: ``python -m tests.run_job JOB RUN_CONFIG``.

Prints ``RUN_ID <id>`` before execution starts, so the test can watch and interrupt it.
"""

from __future__ import annotations

import json
import sys

from dagster import DagsterInstance, reconstructable
from dagster._core.execution.api import execute_run

from tests import jobs


def main() -> int:
    job_name, run_config = sys.argv[1], json.loads(sys.argv[2])
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
    result = execute_run(recon_job, run, instance)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())

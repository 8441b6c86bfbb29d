"""Run a command with an embedded PostgreSQL server: ``python -m tests.with_postgres DIR
-- COMMAND...``. The server's URL is in DAGSTER_TASKIQ_TEST_DATABASE_URL for the command.

For an interpreter that cannot install pgserver itself (it has no wheel for Python 3.13
and later): this project's own virtualenv starts the server, the other runs the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dagster_taskiq.local.stack import embedded_postgres
from tests.conftest import ENV_TEST_DATABASE_URL


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    data_dir, command = Path(argv[0]), argv[2:]
    with embedded_postgres(data_dir) as url:
        env = {**os.environ, ENV_TEST_DATABASE_URL: url}
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

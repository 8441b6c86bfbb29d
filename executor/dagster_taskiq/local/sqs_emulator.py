"""moto's server on a free loopback port; prints the port, then serves until killed.

Run as a child process (``python -m dagster_taskiq.local.sqs_emulator``) so that the
emulator does not share a GIL with the run worker or the tests.

moto's SQS costs more per call the more messages a queue holds, which real SQS does
not: every send and receive looks at every message of the queue, each time through a
clock that builds datetimes, and a receive asks for the whole queue's attributes (every
message counted again) once per message it looks at. With a thousand steps queued the
emulator spent most of its time there and held back the runs it served. Two changes,
with the same answers: the clock is read as a float, and the retention check reads
the queue's retention period instead of all its attributes.

Every request, whatever the queue depth, also paid for two things SQS has no part in:
moto's server listed its own package directory to find the request's service (a
directory scan under a lock that serializes all requests), and werkzeug wrote an
access-log line. The list of moto's services is read once; the access log is off
(errors are still logged).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from moto.core.utils import unix_time as _moto_unix_time
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1)
    os._exit(0)


def _unix_time(dt: Any = None) -> float:
    if dt is None:
        return time.time()
    return _moto_unix_time(dt)


def _unix_time_millis(dt: Any = None) -> float:
    return _unix_time(dt) * 1000.0


def _is_message_valid_based_on_retention_period(
    backend: Any, queue_name: str, message: Any
) -> bool:
    retention_period = int(backend.get_queue(queue_name).message_retention_period)
    return bool(retention_period + message.sent_timestamp / 1000 > time.time())


def speed_up_moto() -> list[str]:
    """Take the per-message clock and attribute work out of moto's SQS calls; returns
    what was replaced (a moto without one of these names keeps its own)."""
    from moto import backends
    from moto.sqs import models

    # moto's package directory does not change while the server runs.
    services = tuple(backends.list_of_moto_modules())

    def _list_of_moto_modules() -> tuple[str, ...]:
        return services

    # The clock is the names moto's SQS models imported: other services keep theirs.
    replacements: tuple[tuple[Any, str, Any], ...] = (
        (models, "unix_time", _unix_time),
        (models, "unix_time_millis", _unix_time_millis),
        (
            models.SQSBackend,
            "is_message_valid_based_on_retention_period",
            _is_message_valid_based_on_retention_period,
        ),
        (backends, "list_of_moto_modules", _list_of_moto_modules),
    )
    replaced = []
    for owner, name, replacement in replacements:
        if hasattr(owner, name):
            setattr(owner, name, replacement)
            replaced.append(name)
    return replaced


def main() -> None:
    speed_up_moto()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""moto's server on a free loopback port; prints the port, then serves until killed.

Run as a child process (``python -m dagster_taskiq.local.sqs_emulator``) so that the
emulator does not share a GIL with the run worker or the tests.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

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


def main() -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""moto's server on a free loopback port; prints the port, then serves until killed.

Run as a child process (``python -m dagster_taskiq.local.sqs_emulator``) so that the
emulator does not share a GIL with the run worker or the tests.

moto's SQS costs more per call the more messages a queue holds, which real SQS does
not: every send and receive looks at every message of the queue, each time through a
clock that builds datetimes, and a receive asks for the whole queue's attributes (every
message counted again) once per message it looks at. With a thousand steps queued the
emulator spent most of its time there and held back the runs it served. Two changes,
with the same answers: the clock is read as a float, and the retention check reads
the queue's retention period instead of all its attributes. A send, likewise, built all
the queue's attributes (every message counted three times) once per message to read one
setting, ContentBasedDeduplication: while a send runs, that setting is all it is given.

moto's delete rebuilds the queue's list of messages without the lock its sends append
under, so a message sent during a delete was lost, and of two deletes at once one
brought the other's message back (delivered again). A delete now holds that lock. Its
receive walks the queue's pending messages while another receive changes them (a
``RuntimeError``, answered as a server error) and can hand one message to two receives at
once; each pass of a receive now holds that lock too, and its long poll waits outside it.

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


_sending = threading.local()


def _while_sending(send: Any) -> Any:
    """``send`` (moto's send_message or send_message_batch) with the queue's attributes
    cut down, in this thread, to the one a send reads."""

    def sending(*args: Any, **kwargs: Any) -> Any:
        _sending.active = True
        try:
            return send(*args, **kwargs)
        finally:
            _sending.active = False

    return sending


def _queue_attributes(full: Any) -> Any:
    """moto's ``Queue.attributes``; within a send, only ContentBasedDeduplication, as the
    whole would render it (a FIFO queue's, lower-case; a standard queue has none)."""

    def attributes(queue: Any) -> dict[str, Any]:
        if not getattr(_sending, "active", False):
            return full.fget(queue)  # type: ignore[no-any-return]
        if not queue.fifo_queue:
            return {}
        return {"ContentBasedDeduplication": str(queue.content_based_deduplication).lower()}

    return property(attributes)


def _locked_delete(delete: Any) -> Any:
    """moto's ``Queue.delete_message``, under the lock a send appends under."""

    def delete_message(queue: Any, receipt_handle: str) -> None:
        with queue._messages_lock:
            delete(queue, receipt_handle)

    return delete_message


def _locked_receive(receive: Any) -> Any:
    """moto's ``SQSBackend.receive_message``: each look at the queue under the lock a send
    appends under, the long poll's waiting between looks outside it."""

    def receive_message(
        backend: Any,
        queue_name: str,
        count: int,
        wait_seconds_timeout: int,
        *rest: Any,  # the visibility timeout and attribute names, as moto's server passes them
    ) -> Any:
        queue = backend.get_queue(queue_name)
        polling_end = time.time() + wait_seconds_timeout
        while True:
            with queue._messages_lock:
                received = receive(backend, queue_name, count, 0, *rest)
            remaining = polling_end - time.time()
            if received or remaining <= 0:
                return received
            queue.wait_for_messages(min(1.0, remaining))

    return receive_message


def speed_up_moto() -> list[str]:
    """Take the per-message clock and attribute work out of moto's SQS calls, and lock
    its deletes; returns what was replaced (a moto without one of these names keeps its
    own)."""
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
        (models.SQSBackend, "send_message", _while_sending(models.SQSBackend.send_message)),
        (
            models.SQSBackend,
            "send_message_batch",
            _while_sending(models.SQSBackend.send_message_batch),
        ),
        (models.Queue, "attributes", _queue_attributes(models.Queue.attributes)),
        (models.Queue, "delete_message", _locked_delete(models.Queue.delete_message)),
        (
            models.SQSBackend,
            "receive_message",
            _locked_receive(models.SQSBackend.receive_message),
        ),
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

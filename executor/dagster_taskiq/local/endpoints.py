"""Local stand-ins for the two AWS endpoints moto cannot serve without Docker.

- The ECS agent's task-protection endpoint, one path per local worker, so the local
  pool scales in like ECS does: unprotected (idle) workers first.
- Lambda's Invoke API, which calls a Python function in this process: the executor's
  step-triggered scale-out reaches the local scaler through the real boto3 call.

Both listen on a free loopback port, in a thread of the process that owns them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The region every local AWS client names (moto's server serves any).
REGION = "us-east-1"
# moto accepts any credentials; these are not secrets.
EMULATOR_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}

_PROTECTION = re.compile(r"^/(?P<worker>[\w-]+)/task-protection/v1/state$")
_INVOKE = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _owner(handler: BaseHTTPRequestHandler) -> Any:
    return handler.server.owner  # type: ignore[attr-defined]


def _reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _read_json(handler: BaseHTTPRequestHandler) -> Any:
    length = int(handler.headers.get("Content-Length", 0))
    raw = handler.rfile.read(length) if length else b""
    return json.loads(raw) if raw else {}


class _ProtectionHandler(BaseHTTPRequestHandler):
    def do_PUT(self) -> None:
        match = _PROTECTION.match(self.path)
        if not match:
            _reply(self, 404, {"error": "unknown path"})
            return
        enabled = bool(_read_json(self).get("ProtectionEnabled"))
        _owner(self).set(match["worker"], enabled)
        _reply(self, 200, {"protection": {"ProtectionEnabled": enabled}})

    def log_message(self, *args: Any) -> None:
        pass


class TaskProtectionAgent(_Server):
    """Which local workers are protected from scale-in right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._protected: dict[str, bool] = {}
        self.calls = 0
        super().__init__(_ProtectionHandler)

    def agent_uri(self, worker: str) -> str:
        """The ECS_AGENT_URI to give one worker."""
        return f"{self.url}/{worker}"

    def set(self, worker: str, enabled: bool) -> None:
        with self._lock:
            self._protected[worker] = enabled
            self.calls += 1

    def is_protected(self, worker: str) -> bool:
        with self._lock:
            return self._protected.get(worker, False)


class _InvokeHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        match = _INVOKE.match(self.path.split("?", 1)[0])
        if not match:
            _reply(self, 404, {"Message": "unknown path"})
            return
        payload = _read_json(self)
        invocation_type = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        owner: LambdaEndpoint = _owner(self)
        function = owner.functions.get(match["name"])
        if function is None:
            # The header is where boto3 reads the error code from, as Lambda sends it.
            _reply(
                self,
                404,
                {"Type": "User", "Message": f"Function not found: {match['name']}"},
                {"x-amzn-ErrorType": "ResourceNotFoundException"},
            )
            return
        if invocation_type == "DryRun":
            # As Lambda: the function exists and may be invoked; nothing runs (no body).
            self.send_response(204)
            self.end_headers()
            return
        owner.invocations.append((match["name"], payload))
        if invocation_type == "Event":
            threading.Thread(target=function, args=(payload,), daemon=True).start()
            _reply(self, 202, {})
        else:
            _reply(self, 200, function(payload) or {})

    def log_message(self, *args: Any) -> None:
        pass


class LambdaEndpoint(_Server):
    """Lambda's Invoke API for functions that are Python callables in this process."""

    def __init__(self) -> None:
        self.functions: dict[str, Callable[[Any], Any]] = {}
        self.invocations: list[tuple[str, Any]] = []
        super().__init__(_InvokeHandler)

    def register(self, name: str, function: Callable[[Any], Any]) -> None:
        self.functions[name] = function

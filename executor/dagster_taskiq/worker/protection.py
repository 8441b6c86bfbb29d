"""ECS task scale-in protection: on while a step runs, off when the worker is idle.

The ECS agent serves ``$ECS_AGENT_URI/task-protection/v1/state`` inside every task.
A protected task is not chosen for scale-in, so the scaler can lower desiredCount
without killing a busy worker. Failures are logged, never fatal: protection is an
optimisation, the lease protocol is what keeps steps safe.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from aws_lambda_powertools import Logger

ENV_AGENT_URI = "ECS_AGENT_URI"


class TaskProtection:
    def __init__(self, agent_uri: str | None, log: Logger, *, expires_minutes: int = 60) -> None:
        self._url = f"{agent_uri.rstrip('/')}/task-protection/v1/state" if agent_uri else None
        self._log = log
        self._expires_minutes = expires_minutes
        self._lock = threading.Lock()
        self._busy = 0
        self._protected_until = 0.0  # monotonic; 0 when off

    @property
    def enabled(self) -> bool:
        return self._url is not None

    def step_started(self) -> None:
        with self._lock:
            self._busy += 1
            if self._busy == 1:
                self._set(True)

    def step_finished(self) -> None:
        with self._lock:
            self._busy = max(0, self._busy - 1)
            if self._busy == 0:
                self._set(False)

    def renew(self) -> None:
        """Called on every heartbeat: re-protect well before the protection expires."""
        with self._lock:
            margin = self._expires_minutes * 60 / 2
            if self._busy and self._protected_until - time.monotonic() < margin:
                self._set(True)

    def _set(self, enabled: bool) -> None:
        if self._url is None:
            return
        body: dict[str, Any] = {"ProtectionEnabled": enabled}
        if enabled:
            body["ExpiresInMinutes"] = self._expires_minutes
        request = urllib.request.Request(
            self._url,
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                payload = json.loads(response.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            self._log.warning("ECS task protection call failed", extra={"error": str(e)})
            return
        if payload.get("failure"):
            self._log.warning("ECS task protection refused", extra={"failure": payload})
            return
        self._protected_until = time.monotonic() + self._expires_minutes * 60 if enabled else 0

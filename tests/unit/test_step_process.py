"""A step process found dead is reaped before the slot hears of it: its exit code is
known, and it is not alive when the slot decides whether to start another."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from dagster_taskiq.core.messages import StepMessage
from dagster_taskiq.worker.step_process import StepProcess, StepProcessDied


class ExitingProcess:
    """Has exited (its sentinel is readable) but is reaped only when joined, as a real
    process is for a moment after its pipe and sentinel close."""

    def __init__(self) -> None:
        self._sentinel_read, sentinel_write = os.pipe()
        os.close(sentinel_write)  # readable at once: the process is gone
        self.exitcode: int | None = None
        self.joined = False

    @property
    def sentinel(self) -> int:
        return self._sentinel_read

    def join(self, timeout: float | None = None) -> None:
        self.joined = True
        self.exitcode = 17

    def is_alive(self) -> bool:
        return self.exitcode is None


@pytest.mark.parametrize("peer_gone", [False, True], ids=["sentinel", "end-of-pipe"])
def test_a_dead_step_process_is_reaped_before_it_is_reported(peer_gone: bool) -> None:
    conn, peer = multiprocessing.Pipe()
    if peer_gone:
        peer.close()
    process = ExitingProcess()
    step_process = StepProcess(process=process, conn=conn)
    with pytest.raises(StepProcessDied) as died:
        step_process.vet(StepMessage.new("run", "step", 0, "step arguments", 60))
    assert died.value.exitcode == 17
    assert process.joined
    assert not step_process.alive

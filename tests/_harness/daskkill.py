"""A Dask worker plugin for tests: the first worker to start its second
describe batch SIGKILLs itself (once per marker file), so a worker is lost
mid-batch after at least one batch was done.

Kept apart from the test modules: Dask workers import it by name, and it
imports nothing from pytest.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

PREFIX = "cachebuild-describe"


class KillOnSecondBatch(WorkerPlugin):
    def __init__(self, marker: str):
        self.marker = marker
        self.done = 0

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if not str(key).startswith(PREFIX):
            return
        if finish == "memory":
            self.done += 1
        elif finish == "executing" and self.done >= 1:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # another worker was killed already
            os.write(fd, f"{os.getpid()} {key}\n".encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

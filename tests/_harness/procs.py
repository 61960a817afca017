"""Killing a real child process at a chosen moment, for the tests that resume after a SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

__all__ = ["sigkill_when"]


def sigkill_when(
    proc: subprocess.Popen[Any],
    until: Callable[[], bool],
    *,
    timeout_s: float,
    poll_s: float = 0.01,
) -> None:
    """SIGKILL ``proc`` once ``until()`` holds (or ``timeout_s`` has passed); it must still be running then.

    ``proc`` is reaped either way, its output read and dropped (the assertion
    that it was still running shows that output).
    """
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not until():
            time.sleep(poll_s)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()

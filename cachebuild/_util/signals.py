"""Interrupts held back across a step that must not be cut in half.

A Ctrl-C (or the SIGTERM a build turns into one) that lands while a Dask
local cluster starts or closes leaves it half made: distributed's own exit
hook then tries to close it and prints its tracebacks after the build's
error.  :func:`deferred_interrupts` holds SIGINT and SIGTERM back for such
a step and delivers the first one as soon as it ends, so the step's owner
cleans up a whole object.  A second signal while one is held is delivered
at once: an operator who presses Ctrl-C twice is not kept waiting by a
step that hangs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["deferred_interrupts"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM held back while inside, then handled as they would have been.

    Only signals whose handler is a Python function are held (Python's
    ``KeyboardInterrupt``, the build's SIGTERM handler); outside the main
    thread, where no handler can be set, this does nothing.
    """

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    previous: dict[int, Callable[[int, Any], Any]] = {}
    for sig in _SIGNALS:
        handler = signal.getsignal(sig)
        if callable(handler):
            previous[int(sig)] = handler

    def hold(signum: int, frame: Any) -> None:
        if held:  # the second one: at once (and only once)
            held.clear()
            previous[signum](signum, frame)
        else:
            held.append((signum, frame))

    for signum in previous:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            first, frame = held[0]
            previous[first](first, frame)

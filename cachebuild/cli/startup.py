"""A Ctrl-C while a doit command is still loading: one line and exit 130, not a traceback.

Loading cachebuild's commands imports numpy, faiss and the rest, which takes
a noticeable moment; Python's default SIGINT handler would print a
KeyboardInterrupt traceback from inside an import.  Until the command
starts (:func:`started`), SIGINT ends the process with the documented exit
130, the usual error and remedy lines on stderr, and the JSON report when
one was asked for.  Nothing has been read or written yet, so nothing needs
undoing.  Installed only in a command's own process (``doit``, the ``cachebuild``
script), never in an importer's.

At the other end, once a command's outcome is decided (:func:`settled`) a
Ctrl-C changes nothing, and the process ends with the reported exit code
(:func:`leave`) without Python's interpreter teardown, where a late SIGINT
killed it (exit -2) and a native library's threads could abort it (-6).

In between, a Ctrl-C that Python delivers inside a weakref callback, a
``__del__`` or the garbage collector is swallowed there ("Exception ignored
in ...", a traceback, and the build carried on); :func:`started` has such an
interrupt delivered again, in ordinary code, so it stops the command.
"""

from __future__ import annotations

import _thread
import atexit
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["guard", "leave", "settled", "started"]

#: Long enough for the unraisable hook to have returned when the interrupt lands again.
_AGAIN_S = 0.02


def _command_process() -> bool:
    """Whether this process is a command's own: ``doit`` or the ``cachebuild`` console script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", "") in ("doit.__main__", "cachebuild.cli.console"):
        return True
    return Path(sys.argv[0]).name in ("doit", "cachebuild")


def _interrupted(signum: int, frame: Any) -> None:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "doit")
    error = "interrupted (SIGINT) while starting; nothing was read or changed"
    remedy = "run the command again"
    os.write(2, f"ERROR [start, exit 130]: {error}\n  remedy: {remedy}\n".encode())
    fmt = os.environ.get("CACHEBUILD_REPORT", "")
    if "REPORT=json" in sys.argv or fmt.lower() == "json":
        report = {"command": command, "outcome": "failure", "exit_code": 130}
        report.update(failure_phase="start", error=error, remedy=remedy)
        os.write(1, (json.dumps(report, sort_keys=True) + "\n").encode())
    os._exit(130)


def guard() -> None:
    """In a doit process still at Python's default handler: SIGINT ends it quietly until :func:`started`."""
    if _command_process() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def started() -> None:
    """The command is loaded: Ctrl-C is a KeyboardInterrupt again, which each command handles."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _command_process() and sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _unraisable


def _unraisable(unraisable: Any) -> None:
    """A KeyboardInterrupt Python could not raise (in a callback, ``__del__``, the collector) lands
    again a moment later, in ordinary code; anything else goes to Python's own hook.

    Another thread delivers it: raised from here, it would land in this hook
    and be swallowed again.  Once :func:`settled` ignores SIGINT, it is a no-op.
    """
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        if not sys.is_finalizing():  # no thread starts then, and nothing is left to stop
            again = threading.Timer(_AGAIN_S, _thread.interrupt_main)
            again.daemon = True
            again.start()
        return
    sys.__unraisablehook__(unraisable)


def settled() -> None:
    """The command's outcome is decided: in a command's process a Ctrl-C from here on is ignored.

    What is left is writing the report, which says what happened; an
    interrupt there would replace it with a traceback and exit -2.
    """
    if _command_process() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def leave(code: int) -> int:
    """In a command's process (doit, the console script): end now with ``code``, after the exit
    hooks; elsewhere (an importer's process) return it.

    The hooks (logging, filelock, finalizers) run and the output is flushed;
    the interpreter's teardown is skipped. Every thread a command owns has
    ended by then; a native library's idle pool (ONNX Runtime, OpenMP) could
    otherwise abort the process as its statics are destroyed, and a Ctrl-C
    once signal handlers are restored there ended it with -2 instead of
    ``code``.
    """
    if not _command_process() or threading.current_thread() is not threading.main_thread():
        return code
    settled()
    try:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code)

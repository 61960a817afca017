"""Python warnings shown to the operator as the project's own one line.

A warning raised anywhere in a command (ours, such as a key file readable by
others, or a library's, such as rasterio's ``NotGeoreferencedWarning``)
reaches the terminal as ``WARNING: <message>``: one line, secrets redacted,
never the source line and file position Python prints by default, which
read like a traceback to an operator.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from cachebuild._util.report import redact

__all__ = ["operator_warnings", "warning_line"]


def warning_line(message: Any) -> str:
    """The one line shown for ``message``: whitespace folded, secrets redacted.

    >>> warning_line("key  file\\n is open")
    'WARNING: key file is open'
    """
    return "WARNING: " + redact(" ".join(str(message).split()))


@contextmanager
def operator_warnings(
    record: Callable[[str], None] | None = None, stream: TextIO | None = None
) -> Iterator[None]:
    """Within the block, every shown warning is one :func:`warning_line` on ``stream`` (stderr).

    ``record`` also gets each message (the report's ``warnings``).  A message
    is said once however many places raise it; Python's filters still decide
    what is shown (``-W ignore`` silences them).
    """
    previous = warnings.showwarning
    shown: set[str] = set()

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        text = warning_line(message)
        if text in shown:  # the same warning from another place (the key, read twice): said once
            return
        shown.add(text)
        out = stream or sys.stderr
        out.write(text + "\n")
        out.flush()
        if record is not None:
            record(redact(" ".join(str(message).split())))

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous

"""``LOG_LEVEL`` (or ``CACHEBUILD_LOG_LEVEL``): the ``logging`` records of a command, on stderr.

cachebuild's modules and the libraries it drives (httpx, paramiko, boto3)
log through :mod:`logging`; without a handler their INFO and DEBUG records
go nowhere.  ``LOG_LEVEL=debug`` installs one handler on stderr for the
whole run, with a filter that redacts every known secret value
(:func:`cachebuild._util.report.redact`) from the message and any traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from cachebuild._util.report import redact
from cachebuild.errors import UsageError, did_you_mean

__all__ = ["LEVELS", "RedactFilter", "configure_logging"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactFilter(logging.Filter):
    """Replace every secret value in a record's message (and traceback) with ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class _Handler(logging.StreamHandler):
    """The one handler cachebuild installs (recognised to be replaced, not stacked)."""


def configure_logging(
    vars: Mapping[str, str], env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Take ``LOG_LEVEL`` off ``vars`` and set logging up for it; returns the other variables.

    Without ``LOG_LEVEL`` (or ``CACHEBUILD_LOG_LEVEL``) logging is left as it is.
    """
    env = os.environ if env is None else env
    rest = dict(vars)
    raw = rest.pop("LOG_LEVEL", None) or env.get("CACHEBUILD_LOG_LEVEL")
    if not raw:
        return rest
    level = LEVELS.get(raw.strip().lower())
    if level is None:
        raise UsageError(
            f"LOG_LEVEL={raw!r} is not a level{did_you_mean(raw.strip().lower(), LEVELS)}",
            remedy="LOG_LEVEL=debug, info, warning or error",
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RedactFilter())
    root.addHandler(handler)
    root.setLevel(level)
    return rest

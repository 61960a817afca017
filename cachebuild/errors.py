"""One error root for cachebuild; each subclass knows its phase and exit code.

Every error carries a message that names the input at fault and a remedy for
the operator.  Messages must never contain secrets (API keys, tokens, key
bytes): build them from names and paths, never from secret values.

Exit codes are a stable, documented contract (docs/exit-codes.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_DOWNLOAD",
    "EXIT_BUILD",
    "EXIT_COVERAGE",
    "EXIT_VERIFY",
    "EXIT_COMPANION",
    "EXIT_LOCK_HELD",
    "EXIT_DISK_FULL",
    "CacheBuildWarning",
    "CacheBuildError",
    "UsageError",
    "AreaTooLargeError",
    "FlightError",
    "FlightNotFoundError",
    "FlightUnauthorizedError",
    "FlightNetworkError",
    "FlightInvalidAnswerError",
    "FlightFileMissingError",
    "FlightFileInvalidError",
    "DownloadError",
    "BuildError",
    "EngineError",
    "StoreObjectError",
    "DiskFullError",
    "CoverageError",
    "VerifyError",
    "LockHeldError",
    "did_you_mean",
]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DOWNLOAD = 20
EXIT_BUILD = 21
EXIT_COVERAGE = 22
EXIT_VERIFY = 23
EXIT_COMPANION = 30
EXIT_LOCK_HELD = 50
EXIT_DISK_FULL = 24


class CacheBuildWarning(UserWarning):
    """A soft problem the build worked around (a damaged file rebuilt, say).

    The wrapper passes these to the report's ``warnings``.
    """


class CacheBuildError(Exception):
    """Root of every error cachebuild reports to the operator.

    Parameters
    ----------
    message
        What went wrong, naming the input (file, variable, tile, URL without
        secrets).
    remedy
        What the operator can do about it; defaults to the class's remedy.
    phase
        Overrides the class's phase (e.g. a BuildError in ``index``).
    """

    phase: str = "build"
    exit_code: int = EXIT_BUILD
    remedy: str = ""

    def __init__(self, message: str, *, remedy: str | None = None, phase: str | None = None):
        super().__init__(message)
        self.message = message
        if remedy is not None:
            self.remedy = remedy
        if phase is not None:
            self.phase = phase

    def __str__(self) -> str:
        if self.remedy:
            return f"{self.message}\n  remedy: {self.remedy}"
        return self.message


class UsageError(CacheBuildError):
    """A variable or argument is missing or malformed."""

    phase = "arguments"
    exit_code = EXIT_USAGE
    remedy = "see `doit help build-cache` and docs/configuration.md"


class AreaTooLargeError(UsageError):
    """The flight's area has more tiles than ``MAX_TILES``, or more than the disk holds."""

    phase = "area"
    remedy = "check the flight's waypoints, BUFFER_M and ZOOM, or raise MAX_TILES"


class FlightError(CacheBuildError):
    """The flight could not be resolved (exit codes 90-95)."""

    phase = "flight"


class FlightNotFoundError(FlightError):
    """The Flights API has no flight with that id."""

    exit_code = 90
    remedy = "check the flight id"


class FlightUnauthorizedError(FlightError):
    """The Flights API refused the token."""

    exit_code = 91
    remedy = "set FLIGHTS_API_TOKEN to a valid token"


class FlightNetworkError(FlightError):
    """The Flights API could not be reached."""

    exit_code = 92
    remedy = "check FLIGHTS_API_URL and the network, or build from a flight file"


class FlightInvalidAnswerError(FlightError):
    """The Flights API answered something that is not a valid flight."""

    exit_code = 93
    remedy = "report the flight id to whoever runs the Flights API"


class FlightFileMissingError(FlightError):
    """The flight file does not exist."""

    exit_code = 94
    remedy = "check the FLIGHT path"


class FlightFileInvalidError(FlightError):
    """The flight file is not a valid flight (docs/flight-schema.md)."""

    exit_code = 95
    remedy = "fix the file; the schema is in docs/flight-schema.md"


class DownloadError(CacheBuildError):
    """Tiles could not be fetched."""

    phase = "tiles"
    exit_code = EXIT_DOWNLOAD
    remedy = "check PROVIDER and the network, then run build-cache again (fetched tiles are kept)"


class BuildError(CacheBuildError):
    """Building an artifact (engine, descriptors, index, manifest) failed."""

    phase = "build"
    exit_code = EXIT_BUILD


class EngineError(BuildError):
    """The descriptor network could not be compiled or loaded."""

    phase = "engine"
    remedy = "check MODEL, CALIBRATION, PRECISION and BACKEND"


class StoreObjectError(BuildError):
    """A tile image in the store is missing or does not hash to its name.

    Raised by the phase that read it, after removing a corrupt object; the
    wrapper then fetches it again (:mod:`cachebuild.cli.repair`).  ``digest``
    names the object.
    """

    remedy = "run build-cache again: the tiles phase fetches the image again"

    def __init__(
        self,
        message: str,
        *,
        digest: str,
        path: str | None = None,
        remedy: str | None = None,
        phase: str | None = None,
    ):
        super().__init__(message, remedy=remedy, phase=phase)
        self.digest = digest
        self.path = path  # the object's file, when known


class DiskFullError(CacheBuildError):
    """A write failed for lack of space (ENOSPC, EDQUOT, SQLite's SQLITE_FULL)."""

    exit_code = EXIT_DISK_FULL
    remedy = (
        "free space on that filesystem, or set STORE and CACHE_DIR to one with room; "
        "then run build-cache again (completed work is kept)"
    )


class CoverageError(CacheBuildError):
    """Planned tiles are missing or undescribed (strict mode)."""

    phase = "coverage"
    exit_code = EXIT_COVERAGE
    remedy = "fix the provider's gaps, or build with STRICT=0 to publish a partial cache"


class VerifyError(CacheBuildError):
    """The published cache does not verify (signature or artifact hash)."""

    phase = "verify"
    exit_code = EXIT_VERIFY
    remedy = "rebuild the cache with `doit build-cache`"
    #: Why, in one word (``signature``, ``untrusted-key``, ``expired``,
    #: ``rollback``, ``artifact`` ...: cachebuild.release.manifest.VERIFY_REASONS).
    reason: str | None = None


class LockHeldError(CacheBuildError):
    """Another build holds the cache lock."""

    phase = "lock"
    exit_code = EXIT_LOCK_HELD
    remedy = "wait for the other build to finish, or stop it"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean ZOOM?)`` for a misspelt name, or ``""`` when nothing is close.

    >>> did_you_mean("ZOM", ["ZOOM", "BUFFER_M"]), did_you_mean("XYZZY", ["ZOOM"])
    (' (did you mean ZOOM?)', '')
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(word.upper(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""

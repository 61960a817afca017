"""Errors of companion mode, under the one :class:`~cachebuild.errors.CacheBuildError` root.

Each knows its phase, exit code and a remedy.  Messages name the companion
(``user@host:port``), files and commands, never a secret.
"""

from __future__ import annotations

from cachebuild.errors import EXIT_BUILD, EXIT_COMPANION, BuildError, CacheBuildError

__all__ = [
    "CompanionError",
    "CompanionUnreachableError",
    "HostKeyError",
    "AuthenticationError",
    "CompanionNotReadyError",
    "ConnectionDroppedError",
    "RemoteReportError",
    "RemoteBuildError",
]


class CompanionError(CacheBuildError):
    """The companion cannot be used: unreachable, untrusted or not ready (exit 30)."""

    phase = "companion"
    exit_code = EXIT_COMPANION
    remedy = "see docs/companion.md"


class CompanionUnreachableError(CompanionError):
    """No SSH connection could be made (refused, timed out, no route, name unknown)."""

    remedy = (
        "check that the companion is powered and on the network, and the COMPANION host and port"
    )


class HostKeyError(CompanionError):
    """The companion's host key is unknown (under ``HOST_KEY_POLICY=reject``) or changed."""


class AuthenticationError(CompanionError):
    """The companion refused the key, or the key could not be read."""


class CompanionNotReadyError(CompanionError):
    """Connected, but the companion cannot build: cachebuild missing or
    incompatible, COMPANION_DIR unusable, not enough disk, backend missing."""


class ConnectionDroppedError(CompanionError):
    """The SSH connection was lost during the push or the remote build."""

    remedy = (
        "check the link to the companion and run build-cache again: what was pushed is kept "
        "and the push resumes; the companion's published cache is untouched by a cut-off build"
    )


class RemoteReportError(BuildError):
    """The remote build's last output line is not its JSON report (exit 21)."""

    phase = "companion"
    exit_code = EXIT_BUILD
    remedy = "read the companion's output above; run `doit build-cache` there by hand to see the whole of it"


class RemoteBuildError(CacheBuildError):
    """The build on the companion failed; carries the remote exit code and phase.

    Parameters
    ----------
    message
        The remote error, prefixed with the companion's name.
    exit_code
        The remote build's exit code (21, 22, 50, ...).
    phase
        The remote build's failure phase.
    remedy
        The remote build's remedy.
    """

    def __init__(
        self, message: str, *, exit_code: int, phase: str | None, remedy: str | None = None
    ):
        super().__init__(message, remedy=remedy or "", phase=phase or "companion")
        self.exit_code = exit_code

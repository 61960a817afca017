"""How to reach the companion: its address and SSH options from the settings and
``~/.ssh/config`` (:mod:`.sshconfig`), its ``COMPANION_DIR`` as an absolute path there, and the
free disk a push leaves it.  Used by the flow, the pre-push and ``cache-info``."""

from __future__ import annotations

import posixpath
from typing import Any

from cachebuild.companion.errors import AuthenticationError
from cachebuild.companion.ssh import (
    PASSPHRASE_ENV,
    SshOptions,
    default_key_path,
    default_known_hosts,
)
from cachebuild.companion.sshconfig import resolve_target
from cachebuild.inputs.companion import CompanionTarget

__all__ = ["DEFAULT_COMPANION_DIR", "DISK_RESERVE_BYTES", "companion_options", "resolve_root"]

#: The companion's cache root: cachebuild's own default home there.
DEFAULT_COMPANION_DIR = "~/.cache/cachebuild"
#: Free disk the push must leave on the companion.
DISK_RESERVE_BYTES = 256 << 20


def companion_options(settings: Any) -> tuple[CompanionTarget, SshOptions]:
    """The companion and how to reach it, from validated settings and ``~/.ssh/config``
    (:mod:`.sshconfig`: what ``COMPANION`` and ``SSH_KEY`` say explicitly wins)."""

    resolved = resolve_target(settings.companion, settings.ssh_key)
    key = resolved.key_path or default_key_path()
    if key is None:
        raise AuthenticationError(
            "no SSH key: SSH_KEY is not set, ~/.ssh/config names no IdentityFile for "
            f"{settings.companion}, and there is no ~/.ssh/id_ed25519, id_ecdsa or id_rsa",
            remedy="set SSH_KEY=<private key the companion accepts>; docs/companion.md shows how to make one",
        )
    return resolved.target, SshOptions(
        key_path=key,
        known_hosts=settings.known_hosts or default_known_hosts(),
        host_key_policy=settings.host_key_policy,
        passphrase=settings.env.get(PASSPHRASE_ENV) or None,
        jumps=resolved.jumps,
    )


def resolve_root(sftp: Any, spec: str | None) -> str:
    """``COMPANION_DIR`` as an absolute path on the companion (``~`` and relative paths
    are taken from the login directory)."""
    spec = (spec or DEFAULT_COMPANION_DIR).strip()
    if spec.startswith("/"):
        return posixpath.normpath(spec)
    home = sftp.normalize(".")
    if spec == "~" or spec.startswith("~/"):
        spec = spec[2:]
    return posixpath.normpath(posixpath.join(home, spec))

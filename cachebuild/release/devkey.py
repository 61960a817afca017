"""The development signing key: where it lives, and what it may sign.

It lives in the user's data dir (``$XDG_DATA_HOME/cachebuild/keys``), not
with the caches: purging ``~/.cache`` must not replace the key that signed
the caches already flown.  A key left in the old place
(``$CACHEBUILD_HOME/keys``) is moved there once, with a message.

A build without ``KEY`` does not re-sign with the development key a
published cache that another key signed (an operator's key, or a
development key since replaced) unless ``ALLOW_DEV_KEY=1`` says so: that
would silently turn an operator-signed cache into one the drone may not
trust.  Both are decided before the lock, from the published manifest's
signature key id; nothing here imports cryptography.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cachebuild._util.fs import write_exclusive
from cachebuild._util.warn import warning_line
from cachebuild.errors import UsageError
from cachebuild.inputs.config import DEV_KEY_NAME, Settings, cachebuild_data_home
from cachebuild.release.publish import published_manifest_bytes

__all__ = ["dev_key_home", "published_signer", "refuse_resign"]


def dev_key_home(settings: Settings) -> Path:
    """The development key's path in the data dir, after moving one left in the old place.

    The move copies the bytes into a new file of mode 0600 created
    exclusively (a concurrent build moves it once), then removes the old
    file only if the new one holds the same bytes.  Nothing is created when
    there is no old key: :func:`cachebuild.release.signing.ensure_dev_key` makes one.
    The message goes to stderr at once, not with the signing key's notes
    (those wait until a manifest is signed, and a no-op signs nothing).
    """
    new = cachebuild_data_home(settings.env) / "keys" / DEV_KEY_NAME
    old = settings.legacy_dev_key
    try:
        if new.exists() or not old.is_file():
            return new
    except OSError as exc:  # a directory on the way this user may not enter
        raise UsageError(
            f"cannot look for the development signing key in {new.parent} "
            f"({exc.strerror or type(exc).__name__})",
            remedy=f"make {new.parent} readable by this user, set XDG_DATA_HOME, or give KEY=<key file>",
        ) from None
    try:
        data = old.read_bytes()
        if not new.parent.is_dir():
            new.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(new.parent, 0o700)
        write_exclusive(new, data)
        if new.read_bytes() == data:
            old.unlink(missing_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot move the development signing key {old} to {new} ({exc.strerror or type(exc).__name__})",
            remedy=f"make {new.parent} writable, or move the file there yourself (mode 0600)",
        ) from None
    if not old.exists():
        msg = (
            f"moved the development signing key from {old} to {new}: keys live in the data directory, "
            "which purging caches does not touch"
        )
        sys.stderr.write(warning_line(msg) + "\n")
    return new


def published_signer(settings: Settings) -> str | None:
    """The key id that signed the published cache, or None (no cache, or a manifest that does not say)."""
    data = published_manifest_bytes(settings.paths)
    if data is None:
        return None
    try:
        kid = json.loads(data)["signatures"][0]["keyid"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # damaged: verify-cache and the build's own checks name that
    return kid if isinstance(kid, str) else None


def refuse_resign(settings: Settings, path: Path, dev_keyid: str | None) -> None:
    """Raise :class:`UsageError` (exit 2) if another key than the development key signed the published cache.

    ``dev_keyid`` is None when the development key does not exist yet (then
    any signed cache is another key's).  ``ALLOW_DEV_KEY=1`` lets it through.
    """
    if settings.allow_dev_key:
        return
    signer = published_signer(settings)
    if signer is None or signer == dev_keyid:
        return
    on_companion = settings.provider.startswith(
        "pushed:"
    )  # the companion's build: its key is COMPANION_KEY
    if on_companion:
        key_var = "COMPANION_KEY=<path of that key on the companion>"
    else:
        key_var = "KEY=<the key that signed it>"
    dev = f"a new development key at {path}"
    if dev_keyid:
        dev = f"the development key {path} ({dev_keyid[:16]}…)"
    raise UsageError(
        f"the published cache {settings.paths.current} is signed by key {signer[:16]}…; "
        f"no {'COMPANION_KEY' if on_companion else 'KEY'} given, "
        f"so it would be re-signed with {dev}: refused",
        remedy=f"pass {key_var}, or ALLOW_DEV_KEY=1 to re-sign it with the development key",
    )

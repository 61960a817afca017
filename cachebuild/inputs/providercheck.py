"""The provider's arguments, checked before the lock.

A URL template's placeholders, ``{key}`` and its ``CACHEBUILD_API_KEY``,
``SUBDOMAINS`` and the extra headers; a directory template's placeholders.
A mistake there is exit 2 before doit runs (:func:`cachebuild.inputs.area.check_area`
calls this), so a refused build leaves doit's state as it was and the next
correct build is a no-op.  Nothing is opened or fetched here.
"""

from __future__ import annotations

from typing import Any

from cachebuild.providers import provider_kind
from cachebuild.providers.base import template_placeholders
from cachebuild.providers.local import DIRECTORY_PLACEHOLDERS
from cachebuild.providers.xyzconfig import (
    API_KEY_ENV,
    HEADERS_ENV,
    HttpConfig,
    check_template,
    parse_headers,
)

__all__ = ["check_provider"]


def check_provider(settings: Any) -> None:
    """What the provider needs from the arguments and the environment, checked before the lock.

    ``settings`` is a :class:`~cachebuild.inputs.config.Settings`.  Raises
    :class:`~cachebuild.errors.UsageError` (exit 2, phase ``arguments``).
    """

    kind, spec = provider_kind(settings.provider), settings.provider.strip()
    if kind == "dir":  # (a directory that does not exist is refused before any task runs)
        text = spec[4:] if spec.lower().startswith("dir:") else spec
        if "{" in text:
            template_placeholders(text, DIRECTORY_PLACEHOLDERS, what="PROVIDER directory template")
    if kind != "xyz":
        return

    env = {**settings.env, **settings.http}
    check_template(
        spec,
        api_key=env.get(API_KEY_ENV) or None,
        headers=parse_headers(env.get(HEADERS_ENV)),
        config=HttpConfig.from_env(env),
    )

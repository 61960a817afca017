"""``COMPANION=[user@]host[:port]``: who the companion is, read from the argument alone.

Parsed before the lock (a mistyped companion must not block anyone), so it
lives with the other inputs; :mod:`cachebuild.companion.ssh` connects to it.
"""

from __future__ import annotations

import getpass
import re
from typing import NamedTuple

from cachebuild.errors import UsageError

__all__ = ["DEFAULT_PORT", "CompanionTarget", "parse_companion"]

DEFAULT_PORT = 22
_TARGET_RE = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:@\s\[\]]+))(?::(?P<port>\d+))?$"
)


class CompanionTarget(NamedTuple):
    """Who to log in as, where.

    >>> parse_companion("nvidia@jetson.local:2222")
    CompanionTarget(user='nvidia', host='jetson.local', port=2222)
    >>> str(parse_companion("op@[fe80::1]"))
    'op@[fe80::1]:22'
    """

    user: str
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_companion(spec: str) -> CompanionTarget:
    """Read ``COMPANION=[user@]host[:port]`` (``[v6addr]`` in brackets).

    The user defaults to the local user, the port to 22, as with ``ssh``.

    Raises
    ------
    UsageError
        For anything else.
    """
    m = _TARGET_RE.match(spec.strip())
    if not m:
        raise UsageError(
            f"COMPANION={spec!r} is not user@host[:port]",
            remedy="e.g. COMPANION=nvidia@jetson.local or COMPANION=nvidia@192.168.55.1:22",
        )
    port = int(m["port"]) if m["port"] else DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise UsageError(f"COMPANION={spec!r}: port {port} is outside 1..65535")
    return CompanionTarget(m["user"] or getpass.getuser(), m["v6"] or m["host"], port)

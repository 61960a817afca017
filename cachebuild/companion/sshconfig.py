"""``~/.ssh/config`` for companion mode: ``COMPANION=jetson`` as ``ssh jetson`` means it.

:func:`resolve_target` reads the operator's ``~/.ssh/config`` (with
paramiko's :class:`~paramiko.config.SSHConfig`, tokens and ``~`` expanded)
for the host named in ``COMPANION``: ``HostName``, ``User``, ``Port``,
``IdentityFile`` and ``ProxyJump``.  What the operator set explicitly wins,
as on ssh's command line: the user and port written in ``COMPANION``, and
``SSH_KEY``.  Each ``ProxyJump`` hop is looked up the same way (its own
``HostName``, ``User``, ``Port``, ``IdentityFile``); a hop's own
``ProxyJump`` is not followed: list the whole chain in the companion's.

:func:`open_jumps` connects through the hops in turn (each one's host key
checked like the companion's), and returns the channel to the companion.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebuild.errors import UsageError
from cachebuild.inputs.companion import _TARGET_RE, DEFAULT_PORT, CompanionTarget, parse_companion

__all__ = ["SSH_CONFIG", "Hop", "Resolved", "resolve_target", "open_jumps"]

#: The operator's OpenSSH client configuration, under the home directory.
SSH_CONFIG = Path(".ssh") / "config"


@dataclass(frozen=True)
class Hop:
    """A ``ProxyJump`` host: where, and the key it takes (None: the companion's)."""

    target: CompanionTarget
    key_path: Path | None = None

    def __str__(self) -> str:
        return str(self.target)


@dataclass(frozen=True)
class Resolved:
    """The companion after ``~/.ssh/config``: target, key, hops, and where it came from."""

    target: CompanionTarget
    key_path: Path | None
    jumps: tuple[Hop, ...] = ()
    config: Path | None = None


def _lookup(config: Any, alias: str) -> dict[str, Any]:
    return dict(config.lookup(alias)) if config is not None else {"hostname": alias}


def _load(home: Path) -> tuple[Any, Path | None]:
    import paramiko

    path = home / SSH_CONFIG
    if not path.is_file():
        return None, None
    try:
        return paramiko.SSHConfig.from_path(str(path)), path
    except (OSError, UnicodeError, ValueError) as exc:  # paramiko.ConfigParseError is an Exception
        raise UsageError(
            f"{path} cannot be read ({type(exc).__name__}: {exc})", remedy=f"fix {path}"
        ) from None
    except Exception as exc:
        if type(exc).__module__.startswith("paramiko"):
            raise UsageError(
                f"{path}: {exc}", remedy=f"fix {path} (as `ssh -G HOST` reads it)"
            ) from None
        raise


def _port(raw: Any, where: str) -> int:
    try:
        port = int(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: Port {raw!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"{where}: Port {port} is outside 1..65535")
    return port


def _first_key(entry: dict[str, Any]) -> Path | None:
    for raw in entry.get("identityfile") or []:
        path = Path(raw).expanduser()
        if path.is_file():
            return path
    return None


def _hop(config: Any, spec: str, where: str) -> Hop:
    m = _TARGET_RE.match(spec.strip())
    if not m:
        raise UsageError(f"{where}: ProxyJump {spec!r} is not [user@]host[:port]")
    alias = m["v6"] or m["host"]
    entry = _lookup(config, alias)
    port = _port(m["port"], where) if m["port"] else _port(entry.get("port", DEFAULT_PORT), where)
    user = m["user"] or entry.get("user") or getpass.getuser()
    return Hop(CompanionTarget(user, entry.get("hostname") or alias, port), _first_key(entry))


def resolve_target(spec: str, ssh_key: Path | None, *, home: Path | None = None) -> Resolved:
    """``COMPANION`` through ``~/.ssh/config``; explicit user, port and ``SSH_KEY`` win.

    Raises
    ------
    UsageError
        ``COMPANION`` malformed, or the config unreadable or naming a bad port or hop.
    """

    parse_companion(spec)  # the same refusals as without a config
    m = _TARGET_RE.match(spec.strip())
    assert m is not None
    alias = m["v6"] or m["host"]
    config, path = _load(home or Path.home())
    entry = _lookup(config, alias)
    where = f"{path} (Host {alias})"
    port = int(m["port"]) if m["port"] else _port(entry.get("port", DEFAULT_PORT), where)
    user = m["user"] or entry.get("user") or getpass.getuser()
    target = CompanionTarget(user, entry.get("hostname") or alias, port)
    jumps: tuple[Hop, ...] = ()
    raw_jump = str(entry.get("proxyjump") or "").strip()
    if raw_jump and raw_jump.lower() != "none":
        jumps = tuple(_hop(config, part, where) for part in raw_jump.split(",") if part.strip())
    used = path if (set(entry) - {"hostname"} or entry.get("hostname") != alias) else None
    return Resolved(target, ssh_key or _first_key(entry), jumps, used)


def open_jumps(
    jumps: tuple[Hop, ...],
    target: CompanionTarget,
    connect_one: Callable[[CompanionTarget, Any, Path | None], Any],
    timeout_s: float,
) -> tuple[list[Any], Any]:
    """Connect through ``jumps`` in order; the clients opened and a channel to ``target``.

    ``connect_one(hop_target, sock, key_path)`` returns a connected paramiko
    ``SSHClient`` (``sock`` None for the first hop).  On failure every
    client opened so far is closed and the error is raised as it came.
    """
    clients: list[Any] = []
    sock = None
    try:
        for i, hop in enumerate(jumps):
            client = connect_one(hop.target, sock, hop.key_path)
            clients.append(client)
            nxt = jumps[i + 1].target if i + 1 < len(jumps) else target
            sock = client.get_transport().open_channel(
                "direct-tcpip", (nxt.host, nxt.port), ("127.0.0.1", 0), timeout=timeout_s
            )
    except BaseException:
        for c in reversed(clients):
            c.close()
        raise
    return clients, sock

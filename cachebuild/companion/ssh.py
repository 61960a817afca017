"""The SSH side of companion mode: who the companion is, trusting it, connecting.

:func:`parse_companion` reads ``COMPANION=user@host[:port]``.
:func:`connect` opens a :class:`Connection` with key authentication only
(``allow_agent=False, look_for_keys=False``: the key used is the one
named, never whatever an agent offers), trusting the host key only if
``KNOWN_HOSTS`` (and ``/etc/ssh/ssh_known_hosts``) list it — an unknown key
is refused unless ``HOST_KEY_POLICY=accept-new``, which records it; a
*changed* key is refused always.  Every paramiko and socket error is
translated at this boundary into a :class:`~.errors.CompanionError`
(exit 30) that says what to do.

The connection is made by a *factory* (paramiko's ``SSHClient`` by
default); tests inject their own.  paramiko is imported when connecting.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachebuild.companion.errors import (
    AuthenticationError,
    CompanionNotReadyError,
    CompanionUnreachableError,
    ConnectionDroppedError,
    HostKeyError,
)
from cachebuild.companion.sshconfig import open_jumps
from cachebuild.errors import CacheBuildError
from cachebuild.inputs.companion import DEFAULT_PORT, CompanionTarget, parse_companion

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_KEEPALIVE_S",
    "DEFAULT_DEAD_AFTER_S",
    "HOST_KEY_POLICIES",
    "GLOBAL_KNOWN_HOSTS",
    "PASSPHRASE_ENV",
    "CompanionTarget",
    "SshOptions",
    "Connection",
    "Factory",
    "parse_companion",
    "default_key_path",
    "default_known_hosts",
    "fingerprint",
    "load_key",
    "paramiko_factory",
    "connect",
    "translate",
]

DEFAULT_CONNECT_TIMEOUT_S = 15.0
#: Seconds of silence on a command before the connection is checked...
DEFAULT_KEEPALIVE_S = 15.0
#: ...and how long the check may go unanswered before the link counts as dead.
DEFAULT_DEAD_AFTER_S = 45.0
HOST_KEY_POLICIES = ("reject", "accept-new")
GLOBAL_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
#: Environment variable holding the passphrase of an encrypted ``SSH_KEY``.
PASSPHRASE_ENV = "CACHEBUILD_SSH_KEY_PASSPHRASE"
_KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")


def default_key_path(home: Path | None = None) -> Path | None:
    """The first of ``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa`` that exists."""
    ssh = (home or Path.home()) / ".ssh"
    for name in _KEY_NAMES:
        if (ssh / name).is_file():
            return ssh / name
    return None


def default_known_hosts(home: Path | None = None) -> Path:
    """``~/.ssh/known_hosts``."""
    return (home or Path.home()) / ".ssh" / "known_hosts"


@dataclass(frozen=True)
class SshOptions:
    """How to connect: key, trust, timeouts.

    Attributes
    ----------
    key_path
        The private key (``SSH_KEY``).
    known_hosts
        The OpenSSH known_hosts file trusted (``KNOWN_HOSTS``); under
        ``accept-new`` an unknown host's key is appended to it.
    host_key_policy
        ``reject`` (default) or ``accept-new``.
    passphrase
        For an encrypted key (from :data:`PASSPHRASE_ENV`); never shown.
    """

    key_path: Path
    known_hosts: Path
    host_key_policy: str = "reject"
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    dead_after_s: float = DEFAULT_DEAD_AFTER_S
    passphrase: str | None = field(default=None, repr=False)
    #: ``ProxyJump`` hosts, in order (:mod:`.sshconfig`).
    jumps: tuple[Any, ...] = ()


def fingerprint(key: Any) -> str:
    """OpenSSH's ``SHA256:…`` fingerprint of a paramiko public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _known_host_name(target: CompanionTarget) -> str:
    return target.host if target.port == DEFAULT_PORT else f"[{target.host}]:{target.port}"


def _keyscan_hint(target: CompanionTarget, known_hosts: Path) -> str:
    port = "" if target.port == DEFAULT_PORT else f"-p {target.port} "
    return (
        f"check the fingerprint on the companion (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), "
        f"then add its key: `ssh-keyscan {port}{target.host} >> {known_hosts}` "
        "(or run once with HOST_KEY_POLICY=accept-new on a network you trust)"
    )


def load_key(options: SshOptions) -> Any:
    """The private key ``SSH_KEY`` names, as a paramiko key.

    Raises
    ------
    AuthenticationError
        Missing, unreadable, encrypted without a passphrase, or not a key.
    """
    import paramiko

    path = options.key_path
    try:
        # positional: "passphrase=" in paramiko 3.x, "password=" in 5.x; bytes for cryptography
        secret = options.passphrase.encode() if options.passphrase else None
        return paramiko.PKey.from_path(str(path), secret)
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        if isinstance(exc, TypeError) and "password" not in str(
            exc
        ):  # cryptography's way of saying it
            raise
        raise AuthenticationError(
            f"SSH_KEY={path} is encrypted",
            remedy=f"put its passphrase in the {PASSPHRASE_ENV} environment variable, "
            "or use an unencrypted key made for the companion",
        ) from None
    except OSError as exc:
        raise AuthenticationError(
            f"SSH_KEY={path}: cannot read the key ({exc.strerror or exc})",
            remedy="check the SSH_KEY path; make a key with `ssh-keygen -t ed25519`",
        ) from None
    except (paramiko.SSHException, ValueError) as exc:
        raise AuthenticationError(
            f"SSH_KEY={path} is not a private key paramiko can read ({type(exc).__name__})",
            remedy="use an OpenSSH or PEM private key (ed25519, ECDSA or RSA); a wrong passphrase gives this too",
        ) from None


def _policies(target: CompanionTarget, options: SshOptions, warn: Callable[[str], None]) -> Any:
    import paramiko

    class RejectUnknown(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            raise HostKeyError(
                f"the host key of {target} ({key.get_name()} {fingerprint(key)}) is not in "
                f"KNOWN_HOSTS={options.known_hosts}; refused (HOST_KEY_POLICY=reject)",
                remedy=_keyscan_hint(target, options.known_hosts),
            )

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            path = options.known_hosts
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as fh:
                    fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            except OSError as exc:
                raise HostKeyError(
                    f"cannot record the host key of {target} in KNOWN_HOSTS={path} ({exc.strerror})",
                    remedy="make KNOWN_HOSTS writable, or add the key yourself: "
                    + _keyscan_hint(target, path),
                ) from None
            client.get_host_keys().add(hostname, key.get_name(), key)
            warn(
                f"the companion {target} was not known: trusted its host key {key.get_name()} "
                f"{fingerprint(key)} and recorded it in {path} (HOST_KEY_POLICY=accept-new)"
            )

    return AcceptNew() if options.host_key_policy == "accept-new" else RejectUnknown()


#: Makes a connected paramiko ``SSHClient`` (or something with its
#: ``exec_command``-level interface: ``get_transport()``, ``open_sftp()``,
#: ``close()``).
Factory = Callable[[CompanionTarget, SshOptions, Callable[[str], None]], Any]


def paramiko_factory(
    target: CompanionTarget, options: SshOptions, warn: Callable[[str], None]
) -> Any:
    """Connect with paramiko: key auth only, host key checked against known_hosts;
    through the ``ProxyJump`` hosts of ``options.jumps`` first, if any."""
    if not options.jumps:
        return _client(target, options, warn, load_key(options))
    from dataclasses import replace

    def hop(hop_target: CompanionTarget, sock: Any, key_path: Path | None) -> Any:
        hop_options = replace(options, key_path=key_path or options.key_path, jumps=())
        try:
            return _client(hop_target, hop_options, warn, load_key(hop_options), sock=sock)
        except CacheBuildError as exc:
            exc.message = f"the jump host {hop_target} (ProxyJump): {exc.message}"
            raise
        except Exception as exc:
            raise translate(exc, hop_target, hop_options, what="the jump host ") from exc

    jump_clients, sock = open_jumps(options.jumps, target, hop, options.timeout_s)
    try:
        client = _client(target, options, warn, load_key(options), sock=sock)
    except BaseException:
        for c in reversed(jump_clients):
            c.close()
        raise
    client._cachebuild_jumps = jump_clients  # closed with it (Connection.close)
    return client


def _client(
    target: CompanionTarget,
    options: SshOptions,
    warn: Callable[[str], None],
    pkey: Any,
    sock: Any = None,
) -> Any:
    import paramiko

    client = paramiko.SSHClient()
    try:
        if GLOBAL_KNOWN_HOSTS.is_file():
            client.load_system_host_keys(str(GLOBAL_KNOWN_HOSTS))
        if options.known_hosts.is_file():
            # into the system set: paramiko then never writes the file back
            client.load_system_host_keys(str(options.known_hosts))
        client.set_missing_host_key_policy(_policies(target, options, warn))
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            pkey=pkey,
            allow_agent=False,
            look_for_keys=False,
            timeout=options.timeout_s,
            banner_timeout=options.timeout_s,
            auth_timeout=options.timeout_s,
            sock=sock,
        )
    except BaseException:
        client.close()
        raise
    return client


def connect(
    target: CompanionTarget,
    options: SshOptions,
    *,
    factory: Factory | None = None,
    warn: Callable[[str], None] | None = None,
) -> Connection:
    """Open an SSH connection to the companion.

    Raises
    ------
    CompanionUnreachableError, HostKeyError, AuthenticationError
        With the companion's name and a remedy (exit 30).
    """
    warn = warn or (lambda msg: None)
    try:
        client = (factory or paramiko_factory)(target, options, warn)
    except CacheBuildError:
        raise
    except Exception as exc:
        raise translate(exc, target, options) from exc
    return Connection(client, target, options)


def translate(
    exc: BaseException, target: CompanionTarget, options: SshOptions, *, what: str = ""
) -> Exception:
    """A paramiko or socket error met connecting to ``target`` (``what``: "the jump host "),
    as the :class:`~.errors.CompanionError` that says what to do; ``exc`` itself when it is none of those."""
    import paramiko

    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"the host key of {what}{target} has CHANGED: it offered {exc.key.get_name()} "
            f"{fingerprint(exc.key)}, KNOWN_HOSTS={options.known_hosts} has {fingerprint(exc.expected_key)}; "
            "refused (someone may be impersonating it, or it was reinstalled)",
            remedy="if it was reinstalled, remove its old line "
            f"(`ssh-keygen -R '{_known_host_name(target)}' -f {options.known_hosts}`) and add the new key: "
            + _keyscan_hint(target, options.known_hosts),
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthenticationError(
            f"{what}{target} refused the key {options.key_path} ({exc})",
            remedy=f"add {options.key_path}.pub to ~{target.user}/.ssh/authorized_keys there "
            f"(`ssh-copy-id -i {options.key_path} -p {target.port} {target.user}@{target.host}`), "
            "or check the user name, SSH_KEY and IdentityFile in ~/.ssh/config",
        )
    if isinstance(exc, (socket.gaierror, paramiko.ssh_exception.NoValidConnectionsError, OSError)):
        why = (
            exc.strerror
            if isinstance(exc, OSError) and exc.strerror
            else str(exc) or type(exc).__name__
        )
        return CompanionUnreachableError(f"cannot connect to {what}{target}: {why}")
    if isinstance(exc, paramiko.ChannelException):  # a jump host could not reach the next one
        return CompanionUnreachableError(
            f"cannot connect to {target} through the jump host (ProxyJump): {exc}",
            remedy="check the companion's HostName and Port as the jump host sees them (~/.ssh/config)",
        )
    if isinstance(exc, paramiko.SSHException):
        return CompanionUnreachableError(
            f"SSH handshake with {what}{target} failed: {exc}",
            remedy="check that an SSH server listens on that port (`ssh -p PORT user@host true`)",
        )
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


class Connection:
    """An open SSH connection: run commands, open SFTP.

    Parameters
    ----------
    client
        A connected paramiko ``SSHClient`` (or a test double).
    target
        Whom it is connected to (for messages).
    options
        Keepalive settings.
    """

    def __init__(self, client: Any, target: CompanionTarget, options: SshOptions):
        self.client = client
        self.target = target
        self.options = options
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(int(max(1, options.keepalive_s)))

    @property
    def transport(self) -> Any:
        return self.client.get_transport()

    def alive(self) -> bool:
        t = self.transport
        return t is not None and t.is_active()

    def close(self) -> None:
        self.client.close()
        for jump in reversed(getattr(self.client, "_cachebuild_jumps", None) or []):
            jump.close()

    def _link_lost(self, grace_s: float = 1.0) -> bool:
        """True once the transport is down; waits ``grace_s`` for paramiko to notice."""
        deadline = time.monotonic() + grace_s
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dropped(self, during: str, exc: BaseException | None = None) -> ConnectionDroppedError:
        """The error to raise when the link went away ``during`` something."""
        why = f" ({type(exc).__name__}: {exc})" if exc is not None and str(exc) else ""
        return ConnectionDroppedError(
            f"the connection to {self.target} was lost during {during}{why}"
        )

    def open_sftp(self) -> Any:
        """An SFTP client on this connection."""
        import paramiko

        try:
            sftp = self.client.open_sftp()
            # a silent link fails an SFTP call instead of hanging it
            sftp.get_channel().settimeout(self.options.dead_after_s)
            return sftp
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if not self.alive():
                raise self.dropped("opening SFTP", exc) from exc
            raise CompanionNotReadyError(
                f"{self.target} offers no SFTP ({exc})",
                remedy="enable it in the companion's sshd_config: `Subsystem sftp internal-sftp`",
            ) from exc

    def pump(
        self,
        command: str,
        *,
        stdin: bytes = b"",
        on_stdout: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
        during: str,
        cancel: threading.Event | None = None,
    ) -> int:
        """Run ``command``, feed it ``stdin``, pass its output on as it comes; its exit status.

        Silence longer than ``keepalive_s`` sends an OpenSSH keepalive; no
        answer within ``dead_after_s`` counts as a dropped link.  Setting
        ``cancel`` closes the channel and returns -1 (the command sees its
        output pipe close).

        Raises
        ------
        ConnectionDroppedError
            When the link goes away before the command's exit status came.
        """
        import paramiko

        try:
            chan = self.transport.open_session()
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError, AttributeError) as exc:
            raise self.dropped(during, exc) from exc
        try:
            return self._pump(chan, stdin, on_stdout, on_stderr, during, cancel)
        finally:
            chan.close()

    def _pump(
        self,
        chan: Any,
        stdin: bytes,
        on_stdout: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
        during: str,
        cancel: threading.Event | None = None,
    ) -> int:
        view = memoryview(stdin)
        sent = 0
        if not stdin:
            chan.shutdown_write()
        # (has data, read it, hand it on) for stdout, then stderr; read only when it has data
        streams = (
            (chan.recv_ready, lambda n: chan.recv(n), on_stdout),
            (chan.recv_stderr_ready, lambda n: chan.recv_stderr(n), on_stderr),
        )
        last_data = time.monotonic()
        checking: _LivenessCheck | None = None
        while True:
            if cancel is not None and cancel.is_set():
                return -1
            progressed = False
            while sent < len(view) and chan.send_ready():
                try:
                    sent += chan.send(view[sent : sent + 32768])
                    if sent >= len(view):
                        chan.shutdown_write()
                except OSError:  # the command stopped reading: its exit status says why
                    sent = len(view)
                progressed = True
            for ready, recv, sink in streams:  # all that has arrived
                while ready():
                    data = recv(65536)
                    if not data:
                        break
                    sink(data)
                    progressed = True
            drained = chan.eof_received or chan.closed
            if (
                chan.exit_status_ready()
                and drained
                and not chan.recv_ready()
                and not chan.recv_stderr_ready()
            ):
                code = int(chan.recv_exit_status())
                # -1: no exit status came: the link went, or a signal killed the command
                if code == -1 and self._link_lost():
                    raise self.dropped(during)
                return code
            if progressed:
                last_data = time.monotonic()
                checking = None
                continue
            if not self.alive() or chan.closed and not chan.exit_status_ready():
                raise self.dropped(during)
            silent = time.monotonic() - last_data
            if silent >= self.options.keepalive_s and checking is None:
                checking = _LivenessCheck(self.transport)
            if checking is not None and checking.dead(
                self.options.dead_after_s - self.options.keepalive_s
            ):
                self.transport.close()
                raise self.dropped(during, TimeoutError(f"no answer for {silent:.0f} s"))
            if checking is not None and checking.answered:
                last_data = time.monotonic()
                checking = None
            # the pipe wakes on output only, not on the exit status: poll briefly
            select.select([chan], [], [], 0.02)


class _LivenessCheck:
    """One keepalive request (answered even by a refusal), sent from a thread:
    paramiko's ``global_request`` has no timeout of its own."""

    def __init__(self, transport: Any):
        self.started = time.monotonic()
        self.answered = False
        self._thread = threading.Thread(target=self._run, args=(transport,), daemon=True)
        self._thread.start()

    def _run(self, transport: Any) -> None:
        try:
            transport.global_request("keepalive@openssh.com", wait=True)
            self.answered = transport.is_active()
        except Exception:  # a dead transport: dead() will say so
            pass

    def dead(self, grace_s: float) -> bool:
        return not self.answered and time.monotonic() - self.started > max(1.0, grace_s)

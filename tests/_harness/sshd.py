"""A real OpenSSH ``sshd`` on 127.0.0.1 with throwaway keys, for companion tests.

Started exactly as docs/companion.md (and REFERENCE.md) describe: a host
key and a client key made with ``ssh-keygen``, a minimal ``sshd_config``
(key authentication only, ``StrictModes no`` so keys under /tmp are
accepted, the internal SFTP server), ``/usr/sbin/sshd -D -e``.  The bench
(``bench/bench_push.py``) uses it too.

Logging in needs a user the server may run commands as: root (the CI
container) logs in as itself; as another user, sshd must be able to switch
to that user, which an unprivileged sshd can (it is that user), provided the
account has a shell.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["SSHD", "SshdUnavailable", "Sshd", "keygen", "free_port", "start_or_skip"]

SSHD = "/usr/sbin/sshd"


class SshdUnavailable(RuntimeError):
    """sshd or ssh-keygen is not installed (tests skip with this reason)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A new unencrypted key pair at ``path`` (and ``path.pub``), mode 0600."""
    keygen_bin = shutil.which("ssh-keygen")
    if keygen_bin is None:
        raise SshdUnavailable("ssh-keygen is not installed (apt-get install openssh-client)")
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run([keygen_bin, "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    path.chmod(0o600)
    return path


class Sshd:
    """One sshd on a free loopback port, configured under ``root``.

    Attributes
    ----------
    port
        Where it listens.
    host_key, client_key
        Private key files; ``.pub`` beside each.
    known_hosts
        A known_hosts file that trusts this server's host key.
    user
        The user to log in as (the one running the tests).
    """

    def __init__(self, root: Path):
        if not os.path.exists(SSHD):
            raise SshdUnavailable(f"{SSHD} is not installed (apt-get install openssh-server)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.host_key = keygen(self.root / "host_ed25519")
        self.client_key = keygen(self.root / "client_key")
        self.port = free_port()
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line())
        self.pid_file = self.root / "sshd.pid"
        self.log = self.root / "sshd.log"
        self.config = self.root / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.pid_file}",
                    f"AuthorizedKeysFile {self.client_key}.pub",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "MaxSessions 32",
                    "MaxStartups 32",
                    "Subsystem sftp internal-sftp",
                    # Debian's bash sources ~/.bashrc for any command sshd
                    # runs when SHLVL is below 2. The test user's rc files are
                    # not ours: on the CI image root's .bashrc runs `pyenv
                    # rehash`, which waits 60 s on a lock file that a session
                    # killed mid-rehash leaves behind, so every later SSH
                    # command took a minute (issue 5's CI run: 34 min).
                    "SetEnv SHLVL=1",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """``user@127.0.0.1:port``, the COMPANION value for this server."""
        return f"{self.user}@127.0.0.1:{self.port}"

    def known_hosts_line(self) -> str:
        kind, blob = (self.root / "host_ed25519.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def start(self, timeout_s: float = 10.0) -> Sshd:
        """Start the server and wait until it accepts connections."""
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        self.pid_file.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SshdUnavailable(
                    f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise SshdUnavailable(
            f"sshd did not answer on port {self.port}: {self.log.read_text()[-2000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the server and every process it forked: connections drop at once.

        sshd puts each connection in a session of its own (``setsid``), so
        the children are found by parentage, not by process group.
        """
        if self.proc is None:
            return
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for p in [psutil.Process(self.proc.pid), *children]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(children, timeout=5)
        self.proc = None

    def stop(self) -> None:
        self.kill()


def start_or_skip(root: Path) -> Sshd:
    """A started :class:`Sshd` under ``root``; where none can run here, a pytest skip that says why."""
    import pytest

    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} (openssh-server) is not installed")
    try:
        return Sshd(root).start()
    except SshdUnavailable as exc:
        pytest.skip(f"sshd could not be started: {exc}")

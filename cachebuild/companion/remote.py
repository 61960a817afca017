"""Running cachebuild on the companion: the agent, and the remote build.

Commands are ``COMPANION_CMD`` (a shell fragment the operator chose, e.g.
``/opt/cachebuild/.venv/bin/doit``) followed by the command and its
``NAME=value`` variables, each quoted for the remote shell.

The remote build's output is passed on line by line as it arrives
(:class:`LineSplitter` holds at most one line, cut at :data:`MAX_LINE`
bytes, so memory stays bounded however long the build runs), every line
through :func:`cachebuild._util.report.redact`: the companion is never given a
secret, but a line that somehow carried one would still not show it.  The
last stdout line is the remote JSON report (:func:`parse_report`).
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from cachebuild._util.report import redact
from cachebuild.companion.errors import CompanionNotReadyError, RemoteReportError
from cachebuild.companion.messages import (
    COMPANION_PASSPHRASE_ENV,
    as_workstation,
    command_values,
    shown_command,
)
from cachebuild.errors import UsageError
from cachebuild.release.signing import PASSPHRASE_ENV

__all__ = [
    "MAX_LINE",
    "MAX_REPORT",
    "TAIL_LINES",
    "PREFIX",
    "remote_command",
    "with_passphrase",
    "LineSplitter",
    "parse_report",
    "call_agent",
    "Pending",
    "start_agent",
    "run_remote_build",
]

#: Longest output line passed on; longer ones are cut (with a marker).
MAX_LINE = 8192
#: Longest line accepted as the JSON report.
MAX_REPORT = 4 << 20
#: Lines of output kept for an error message.
TAIL_LINES = 30
#: Put before every line of the companion's output on the operator's stderr.
PREFIX = "companion| "


def with_passphrase(command: str, passphrase: str | None) -> tuple[str, bytes]:
    """``command`` taking the signing key's passphrase from its stdin, and that stdin.

    The remote shell reads the first line of stdin into the remote build's
    passphrase variable (:data:`cachebuild.release.signing.PASSPHRASE_ENV`) with its
    ``read`` builtin and exports it: the passphrase travels inside the
    encrypted SSH channel and is in no argv on either machine, nor in
    sshd's logs.  Without a passphrase, ``command`` is unchanged.

    Raises
    ------
    UsageError
        A passphrase with a line break or NUL (it could not be read as one line).
    """
    if not passphrase:
        return command, b""

    if "\n" in passphrase or "\r" in passphrase or "\0" in passphrase:
        raise UsageError(
            f"{COMPANION_PASSPHRASE_ENV} holds a line break or NUL",
            remedy="give the COMPANION_KEY passphrase as one line",
        )
    name = PASSPHRASE_ENV
    return f"IFS= read -r {name} && export {name} && {command}", (passphrase + "\n").encode()


def remote_command(base: str, command: str, variables: Mapping[str, str | None]) -> str:
    """``base command NAME=value …``, the variables quoted for a POSIX shell.

    >>> remote_command("doit", "build-cache", {"FLIGHT": "/a b/f.json", "MODEL": None})
    "doit build-cache 'FLIGHT=/a b/f.json'"
    """
    args = [shlex.quote(f"{k}={v}") for k, v in variables.items() if v is not None]
    return " ".join([base, command, *args])


class LineSplitter:
    """Bytes in, complete decoded lines out, holding at most ``max_line`` bytes.

    >>> out = []
    >>> s = LineSplitter(out.append, max_line=8)
    >>> s.feed(b"ab\\ncd"); s.feed(b"0123456789\\nx"); s.close()
    >>> out
    ['ab', 'cd012345 […cut]', 'x']
    """

    def __init__(self, emit: Callable[[str], None], max_line: int = MAX_LINE):
        self.emit = emit
        self.max_line = max_line
        self._buf = bytearray()
        self._cut = False

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl]
            room = self.max_line - len(self._buf)
            if len(piece) > room:
                self._buf += piece[: max(room, 0)]
                self._cut = True
            else:
                self._buf += piece
            if nl < 0:
                return
            self._flush()
            start = nl + 1

    def _flush(self) -> None:
        line = self._buf.decode("utf-8", "replace").rstrip("\r")
        if self._cut:
            line += " […cut]"
        self._buf = bytearray()
        self._cut = False
        self.emit(line)

    def close(self) -> None:
        if self._buf or self._cut:
            self._flush()


def _json_object(line: str | None) -> dict[str, Any] | None:
    """``line`` read as one JSON object, or None if it is not one."""
    if not line or not line.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_report(line: str | None) -> dict[str, Any] | None:
    """The remote JSON report from its last stdout line, or None if it is not one."""
    obj = _json_object(line)
    if obj is None or not isinstance(obj.get("exit_code"), int) or "outcome" not in obj:
        return None
    return obj


def _tail_text(tail: deque[str]) -> str:
    return "\n".join(f"    {ln}" for ln in tail) if tail else "    (no output)"


def call_agent(
    conn: Any,
    base: str,
    op: str,
    root: str,
    *,
    wanted: list[str] | None = None,
    backend: str | None = None,
    watch: str | None = None,
    during: str = "the companion probe",
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Run ``companion-agent OP=op`` on the companion; its JSON answer.

    Raises
    ------
    CompanionNotReadyError
        ``COMPANION_CMD`` not found, not a cachebuild with companion mode,
        or the agent's own error (``COMPANION_DIR`` unwritable, ...).
    """
    variables = {
        "OP": op,
        "DIR": root,
        "WANT": "stdin" if wanted is not None else None,
        "BACKEND": backend,
        "WATCH": watch,
    }
    command = remote_command(base, "companion-agent", variables)
    stdin = ("\n".join(wanted) + "\n").encode() if wanted else b""
    last: list[str] = []
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    hide = command_values(base)

    def clean(line: str) -> str:
        for value in hide:
            line = line.replace(value, "***")
        return redact(line)

    def on_out(line: str) -> None:
        if last:
            tail.append(clean(last[0]))
        last[:] = [line]

    out = LineSplitter(on_out, max_line=MAX_REPORT)
    err = LineSplitter(lambda ln: tail.append(clean(ln)))
    extra = {"cancel": cancel} if cancel is not None else {}
    code = conn.pump(
        command, stdin=stdin, on_stdout=out.feed, on_stderr=err.feed, during=during, **extra
    )
    out.close()
    err.close()
    answer = _json_object(last[0] if last else None)
    if answer is None:
        if last:
            tail.append(clean(last[0]))
        shown = shown_command(base)
        if code == 127:
            raise CompanionNotReadyError(
                f"COMPANION_CMD={shown!r} was not found on {conn.target} (exit 127):\n{_tail_text(tail)}",
                remedy="install cachebuild on the companion (docs/companion.md), or set COMPANION_CMD to its "
                "doit, e.g. COMPANION_CMD=/opt/cachebuild/.venv/bin/doit",
            )
        raise CompanionNotReadyError(
            f"COMPANION_CMD={shown!r} on {conn.target} did not answer as cachebuild's companion agent "
            f"(exit {code}); it may be another program or a cachebuild without companion mode:\n{_tail_text(tail)}",
            remedy="install the same cachebuild version on the companion as here "
            "(`pip install cachebuild==<version>`), and check `COMPANION_CMD companion-agent OP=probe DIR=/tmp` there",
        )
    if "error" in answer:
        raise CompanionNotReadyError(
            f"{conn.target}: {clean(str(answer['error']))}",
            remedy=answer.get("remedy") or "see docs/companion.md",
        )
    return answer


class Pending:
    """A :func:`call_agent` running in a thread (its own SSH channel).

    :meth:`result` waits and returns the answer or raises its error;
    :meth:`cancel` closes its channel (the agent sees its output pipe close
    and stops) and drops whatever it would have said.
    """

    def __init__(self, fn: Callable[[threading.Event], dict[str, Any]]):
        self._cancel = threading.Event()
        self._answer: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn,), daemon=True, name="cachebuild-agent"
        )
        self._thread.start()

    def _run(self, fn: Callable[[threading.Event], dict[str, Any]]) -> None:
        try:
            self._answer = fn(self._cancel)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join(timeout=10)


def start_agent(conn: Any, base: str, op: str, root: str, **kw: Any) -> Pending:
    """:func:`call_agent` in the background: returns at once."""
    return Pending(lambda cancel: call_agent(conn, base, op, root, cancel=cancel, **kw))


def run_remote_build(
    conn: Any,
    command: str,
    *,
    out: TextIO | None = None,
    prefix: str = PREFIX,
    env: Mapping[str, str] | None = None,
    stdin: bytes = b"",
    hide: tuple[str, ...] = (),
) -> tuple[int, dict[str, Any]]:
    """Run the remote build, pass its output on, and return ``(exit status, report)``.

    Every stderr line, and every stdout line but the last, goes to ``out``
    (default stderr) as it arrives, redacted (the secrets of ``env`` and the
    strings in ``hide``), with its variables named as the operator sets them
    here (:func:`.messages.as_workstation`), and prefixed.  ``stdin`` is
    fed to the command (a passphrase travels so, never in its argv).

    Raises
    ------
    RemoteReportError
        The last stdout line is not a JSON report (exit 21), with the tail.
    ConnectionDroppedError
        The link went away before the build ended.
    """
    stream = out or sys.stderr
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    last: list[str] = []

    def clean(line: str) -> str:
        for value in hide:
            line = line.replace(value, "***")
        return redact(line, env)

    def show(line: str) -> None:
        line = as_workstation(clean(line))
        tail.append(line)
        stream.write(f"{prefix}{line}\n")
        stream.flush()

    def on_out(line: str) -> None:
        if last and last[0].strip():
            show(last[0][:MAX_LINE])
        last[:] = [line]

    stdout = LineSplitter(on_out, max_line=MAX_REPORT)
    stderr = LineSplitter(show)
    code = conn.pump(
        command,
        stdin=stdin,
        on_stdout=stdout.feed,
        on_stderr=stderr.feed,
        during="the remote build",
    )
    stdout.close()
    stderr.close()
    report = parse_report(last[0] if last else None)
    if report is None:
        if last and last[0].strip():
            tail.append(clean(last[0][:MAX_LINE]))
        how = "was killed by a signal" if code == -1 else f"exited {code}"
        raise RemoteReportError(
            f"the build on {conn.target} {how} without a JSON report as its last line; "
            f"the end of its output:\n{_tail_text(tail)}"
        )
    return code, report

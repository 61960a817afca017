"""What the companion says, told in the workstation's terms, and nothing secret.

The remote build runs with the variables the flow gave it: its ``KEY`` is
the operator's ``COMPANION_KEY``, and its key passphrase variable is filled
from :data:`COMPANION_PASSPHRASE_ENV` here.  Its errors, remedies and
warnings are rewritten to name what the operator sets on this workstation
(:func:`as_workstation`).

``COMPANION_CMD`` is the operator's shell fragment; an ``env NAME=value``
in it may hold anything, so messages show it with every value masked
(:func:`shown_command`) and every such value is redacted from the
companion's output (:func:`command_values`).
"""

from __future__ import annotations

import re
import shlex

__all__ = [
    "COMPANION_PASSPHRASE_ENV",
    "as_workstation",
    "names_companion_key",
    "shown_command",
    "command_values",
]

#: Environment variable (on the workstation) holding the passphrase of an
#: encrypted ``COMPANION_KEY``; it travels over the SSH channel, never in argv.
COMPANION_PASSPHRASE_ENV = "CACHEBUILD_COMPANION_KEY_PASSPHRASE"

# the remote build's passphrase variable, whatever its spelling (KEY_PASSPHRASE, CACHEBUILD_KEY_PASSPHRASE)
_PASSPHRASE = re.compile(r"(?<![A-Za-z0-9_])(?:CACHEBUILD_)?KEY_PASSPHRASE(?![A-Za-z0-9_])")
# KEY as a variable of its own: not COMPANION_KEY, CACHEBUILD_KEY, KEY_PASSPHRASE, SSH_KEY
_KEY = re.compile(r"(?<![A-Za-z0-9_])KEY(?=[=\s),;:]|$)")
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


def as_workstation(text: str | None) -> str:
    """``text`` from the remote build with its variables named as the operator sets them here.

    >>> as_workstation("KEY=/k.pem: no such file; check the KEY path")
    'COMPANION_KEY=/k.pem: no such file; check the COMPANION_KEY path'
    >>> as_workstation("set KEY_PASSPHRASE to the key's passphrase")
    "set CACHEBUILD_COMPANION_KEY_PASSPHRASE to the key's passphrase"
    """
    if not text:
        return ""
    text = _PASSPHRASE.sub(COMPANION_PASSPHRASE_ENV, text)
    return _KEY.sub("COMPANION_KEY", text)


def names_companion_key(text: str | None) -> bool:
    """Whether a remote message is about its ``KEY`` (the operator's ``COMPANION_KEY``)."""
    if not text:
        return False
    return _KEY.search(text) is not None or "signing key" in text


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # unbalanced quotes: the remote shell will say so
        return command.split()


def command_values(command: str) -> list[str]:
    """The values of the ``NAME=value`` words of ``COMPANION_CMD`` (redacted from output)."""
    out = []
    for word in _words(command):
        m = _ASSIGNMENT.match(word)
        if m and len(m[2]) >= 4:
            out.append(m[2])
    return out


def shown_command(command: str) -> str:
    """``COMPANION_CMD`` for a message: every ``NAME=value`` shown as ``NAME=***``.

    >>> shown_command("env KEY_PASSPHRASE='s3 cr3t' /opt/cb/bin/doit")
    'env KEY_PASSPHRASE=*** /opt/cb/bin/doit'
    """
    words = []
    for word in _words(command):
        m = _ASSIGNMENT.match(word)
        words.append(f"{m[1]}=***" if m else shlex.quote(word))
    return " ".join(words)

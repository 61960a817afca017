"""Ed25519 keys and TUF-style signed envelopes.

An envelope is ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``: the
signature is Ed25519 over :func:`~cachebuild._util.hashing.canonical_json` of
``signed``, and the keyid is the hex SHA-256 of the raw 32-byte public key.

Private keys are read from PEM PKCS#8 or OpenSSH files (``ssh-keygen -t
ed25519``); an encrypted one's passphrase from the ``CACHEBUILD_KEY_PASSPHRASE``
environment variable (``KEY_PASSPHRASE``, deprecated, when it is unset), never
the command line.  Nothing derived from a key's bytes or its passphrase is put
in an exception, a log record or any file but the key file: messages name the
path and what is wrong with it.  ``cryptography`` is imported inside the
functions that use it, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachebuild._util.diskspace import disk_full_error, is_disk_full
from cachebuild._util.fs import atomic_write, write_exclusive
from cachebuild._util.hashing import canonical_json
from cachebuild.errors import UsageError, VerifyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "PASSPHRASE_ENV",
    "LEGACY_PASSPHRASE_ENV",
    "KeyPermissionWarning",
    "load_private_key",
    "ensure_dev_key",
    "load_public_key",
    "public_key_raw",
    "keyid",
    "write_public_key",
    "sign_envelope",
    "verify_envelope",
]

log = logging.getLogger(__name__)

#: Environment variable holding the passphrase of an encrypted private key (never the command line).
PASSPHRASE_ENV = "CACHEBUILD_KEY_PASSPHRASE"
#: Its old name: read when PASSPHRASE_ENV is unset; deprecated.
LEGACY_PASSPHRASE_ENV = "KEY_PASSPHRASE"

_KEY_REMEDY = (
    "point the signing key setting at an Ed25519 private key "
    "(PEM PKCS#8 or OpenSSH, e.g. from `ssh-keygen -t ed25519`)"
)
_PUB_REMEDY = (
    "give an Ed25519 public key: an OpenSSH `ssh-ed25519 AAAA…` line, "
    "a PEM `BEGIN PUBLIC KEY` file, or the private key file"
)
_OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_PEM_ENCRYPTED = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_PEM_PUBLIC = b"-----BEGIN PUBLIC KEY-----"
_PEM_PRIVATE = b"-----BEGIN PRIVATE KEY-----"  # what the dev key is written as (_private_pem)
_SIG_HEX_LEN = 128  # 64-byte Ed25519 signature
_DEV_KEY_WAIT_S = 5.0


class KeyPermissionWarning(UserWarning):
    """A private key file is accessible to its group or to other users."""


# -- loading ---------------------------------------------------------------


def _read_key_file(path: Path, what: str, remedy: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {path} does not exist", remedy=remedy) from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{what} {path} is a directory, not a key file", remedy=remedy) from exc
    except PermissionError as exc:
        raise UsageError(
            f"{what} {path} cannot be read (permission denied)", remedy=remedy
        ) from exc
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read ({exc.strerror})", remedy=remedy) from exc


def _check_permissions(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if stat.S_IMODE(mode) & 0o077:
        warnings.warn(
            KeyPermissionWarning(
                f"signing key {path} is accessible to other users "
                f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
            ),
            stacklevel=3,
        )


@contextlib.contextmanager
def _deprecations_quiet() -> Iterator[None]:
    """Silence cryptography's deprecation warnings while a key is parsed.

    Only Ed25519 is accepted; a deprecated kind (DSA from cryptography 51 on)
    is refused by name right after, so its warning would only be noise.
    """
    from cryptography.utils import CryptographyDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def _key_kind(key: object) -> str:
    """Name a refused key's kind ("an RSA") for the error message.

    DSA is recognised by its class name, not by ``dsa.DSAPrivateKey``: reading
    that attribute warns from cryptography 51 on (DSA is deprecated there).
    """
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa

    kinds: list[tuple[tuple[type, ...], str]] = [
        ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA"),
        ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an ECDSA"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448"),
    ]
    for types, name in kinds:
        if isinstance(key, types):
            return name
    if type(key).__name__.startswith("DSA"):
        return "a DSA"
    return "a non-Ed25519"


def _passphrase_env() -> str:
    """The variable the passphrase is read from: PASSPHRASE_ENV, else the deprecated name if only it is set."""
    legacy = os.environ.get(LEGACY_PASSPHRASE_ENV) and not os.environ.get(PASSPHRASE_ENV)
    return LEGACY_PASSPHRASE_ENV if legacy else PASSPHRASE_ENV


def _passphrase(path: Path) -> bytes:
    value = os.environ.get(_passphrase_env(), "")
    if not value:
        raise UsageError(
            f"signing key {path} is encrypted and {PASSPHRASE_ENV} is not set",
            remedy=f"export {PASSPHRASE_ENV}=<the key's passphrase> "
            "(the environment only: the command line shows in ps and shell history)",
        )
    return value.encode("utf-8")


def _load_private_bytes(data: bytes, path: Path) -> Any:
    """Parse ``data`` (the file at ``path``) as a private key of any type."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    stripped = data.lstrip()
    loader: Callable[..., Any]
    if stripped.startswith(_OPENSSH_PRIVATE):
        loader = serialization.load_ssh_private_key
        fmt = "OpenSSH"
    elif stripped.startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in stripped[:64]:
        loader = serialization.load_pem_private_key
        fmt = "PEM"
    elif stripped.startswith((b"ssh-", b"ecdsa-", b"sk-", _PEM_PUBLIC)):
        raise UsageError(
            f"signing key {path} is a public key, not a private key", remedy=_KEY_REMEDY
        )
    else:
        raise UsageError(
            f"signing key {path} is not a PEM or OpenSSH private key", remedy=_KEY_REMEDY
        )

    password: bytes | None = _passphrase(path) if stripped.startswith(_PEM_ENCRYPTED) else None
    try:
        try:
            with _deprecations_quiet():
                return loader(data, password)
        except TypeError:
            if password is not None:
                raise
            # The OpenSSH format says it is encrypted only inside the blob.
            password = _passphrase(path)
            with _deprecations_quiet():
                return loader(data, password)
    except UnsupportedAlgorithm as exc:
        if password is None:
            raise UsageError(
                f"signing key {path} is a {fmt} key of an unsupported type", remedy=_KEY_REMEDY
            ) from exc
        raise UsageError(
            f"signing key {path} is an encrypted {fmt} key, which needs the `bcrypt` package",
            remedy="install bcrypt, or convert the key to encrypted PEM PKCS#8",
        ) from exc
    except TypeError as exc:
        raise UsageError(
            f"signing key {path} is not encrypted but {_passphrase_env()} is set",
            remedy=f"unset {_passphrase_env()}",
        ) from exc
    except ValueError as exc:
        if password is not None:
            problem = (
                f"cannot be decrypted: wrong passphrase in {_passphrase_env()}, or a damaged file"
            )
        else:
            problem = f"is not a valid {fmt} private key (damaged or unsupported)"
        raise UsageError(f"signing key {path} {problem}", remedy=_KEY_REMEDY) from exc


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the Ed25519 signing key at ``path``.

    Parameters
    ----------
    path
        A PEM PKCS#8 file (``BEGIN PRIVATE KEY``, or ``BEGIN ENCRYPTED
        PRIVATE KEY`` with the passphrase in :data:`PASSPHRASE_ENV`) or an
        OpenSSH private key (``BEGIN OPENSSH PRIVATE KEY``).

    Returns
    -------
    Ed25519PrivateKey

    Raises
    ------
    UsageError
        The file is missing or unreadable, is not a private key, is not
        Ed25519, or cannot be decrypted.  The message names the path and
        the problem, never the file's contents.

    Warns
    -----
    KeyPermissionWarning
        The file is readable or writable by its group or by others.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    data = _read_key_file(p, "signing key", _KEY_REMEDY)
    _check_permissions(p)
    key = _load_private_bytes(data, p)
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(
            f"signing key {p} is {_key_kind(key)} key; manifests are signed with Ed25519",
            remedy="generate one with `ssh-keygen -t ed25519`",
        )
    return key


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ensure_dev_key(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, bool]:
    """Load the development signing key at ``path``, creating it the first time.

    A new key is written as unencrypted PEM PKCS#8 in a file created with
    mode 0600 (``O_CREAT | O_EXCL``); a parent directory this call creates
    gets mode 0700 (an existing one is left alone).  Safe against concurrent
    callers: exactly one creates the key, the others load it.

    Returns the key and whether this call created it.  Raises
    :class:`UsageError` where ``path`` holds no usable Ed25519 key (see
    :func:`load_private_key`) or its directory cannot be written.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    parent = p.parent
    try:
        if p.exists():  # maybe still being written by a racing caller (the in-place fallback)
            return _load_settled(p), False
        if not parent.is_dir():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(parent, 0o700)
        key = Ed25519PrivateKey.generate()
        created = write_exclusive(p, _private_pem(key))
    except OSError as exc:
        if is_disk_full(exc):  # a full disk is exit 24 with its own remedy, not a usage error
            raise disk_full_error(exc, "signing-key", {"the key directory": parent}) from exc
        raise UsageError(
            f"cannot create signing key {p} ({exc.strerror or type(exc).__name__})",
            remedy=f"make {parent} writable, or give an existing key",
        ) from exc
    if created:
        log.info("created development signing key %s (keyid %s)", p, keyid(key.public_key()))
        return key, True
    # Another process won the race; with the in-place fallback its file may
    # still be being written, so retry briefly.
    return _load_settled(p, wait=True), False


def _load_settled(p: Path, wait: bool = False) -> Ed25519PrivateKey:
    """Load the key at ``p``, retrying for a while if it fails while the file is new (or ``wait``).

    A racing caller without hard links writes the key in place after
    creating the file: for a moment it exists and is empty or the start of a
    PEM key.  Anything else that does not load (or such a file older than
    the wait) is an error at once.
    """
    deadline = time.monotonic() + _DEV_KEY_WAIT_S
    read_again = True  # the writer may finish between a failed read and the check: one more read
    while True:
        try:
            return load_private_key(p)
        except UsageError:
            if time.monotonic() > deadline:
                raise
            if wait or _being_written(p):
                time.sleep(0.01)
            elif read_again:
                read_again = False
            else:
                raise


def _being_written(p: Path) -> bool:
    """Whether ``p`` looks like a dev key caught mid-write: new, and empty or an unfinished PEM."""
    begin = _PEM_PRIVATE
    try:
        if time.time() - p.stat().st_mtime > _DEV_KEY_WAIT_S:
            return False
        head = p.read_bytes()[:4096]
    except OSError:
        return False
    return (head[: len(begin)] == begin[: len(head)]) and b"-----END" not in head


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a trusted Ed25519 public key.

    Parameters
    ----------
    path
        An OpenSSH public key (``ssh-ed25519 AAAA… comment``, the first
        non-comment line is used), a PEM SubjectPublicKeyInfo file
        (``BEGIN PUBLIC KEY``), or a private key file of a format
        :func:`load_private_key` reads (the public half is derived).

    Returns
    -------
    Ed25519PublicKey

    Raises
    ------
    UsageError
        Missing or unreadable file, not a public key, or not Ed25519.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    p = Path(path)
    data = _read_key_file(p, "public key", _PUB_REMEDY)
    stripped = data.lstrip()
    if stripped.startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in stripped[:64]:
        return load_private_key(p).public_key()
    pub: Any
    try:
        with _deprecations_quiet():
            if stripped.startswith(b"-----BEGIN"):
                pub = serialization.load_pem_public_key(data)
            else:
                lines = [ln.strip() for ln in data.splitlines()]
                line = next((ln for ln in lines if ln and not ln.startswith(b"#")), b"")
                pub = serialization.load_ssh_public_key(line)
    except UnsupportedAlgorithm as exc:
        if stripped.startswith((b"ssh-", b"ecdsa-", b"sk-")):
            problem = "has an unsupported key type"
        else:
            problem = "is not a PEM or OpenSSH public key"
        raise UsageError(f"public key {p} {problem}", remedy=_PUB_REMEDY) from exc
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"public key {p} is not a PEM or OpenSSH public key", remedy=_PUB_REMEDY
        ) from exc
    if not isinstance(pub, Ed25519PublicKey):
        raise UsageError(
            f"public key {p} is {_key_kind(pub)} key; manifests are signed with Ed25519",
            remedy=_PUB_REMEDY,
        )
    return pub


def public_key_raw(pub: Ed25519PublicKey) -> bytes:
    """The raw 32-byte encoding of ``pub`` (RFC 8032)."""
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid(pub: Ed25519PublicKey) -> str:
    """The TUF key id of ``pub``: hex SHA-256 of its raw 32 bytes."""
    return hashlib.sha256(public_key_raw(pub)).hexdigest()


def _openssh_line(pub: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    blob = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{blob.decode('ascii')} cachebuild-{keyid(pub)[:16]}\n"


def write_public_key(path: str | os.PathLike[str], pub: Ed25519PublicKey) -> None:
    """Write ``pub`` to ``path`` as one OpenSSH line, atomically.

    The line is ``ssh-ed25519 AAAA… cachebuild-<first 16 hex of keyid>``;
    the file is written to a temporary name and renamed over ``path``.
    """

    atomic_write(Path(path), _openssh_line(pub).encode("ascii"), durable=True)


# -- envelopes ---------------------------------------------------------------


def sign_envelope(signed: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Sign ``signed`` with ``key`` into a TUF-style envelope.

    Parameters
    ----------
    signed
        The JSON-able payload; the signature covers its canonical JSON.
    key
        The Ed25519 signing key.

    Returns
    -------
    dict
        ``{"signed": signed, "signatures": [{"keyid": <hex>, "sig": <hex>}]}``.

    Raises
    ------
    UsageError
        ``key`` is not an Ed25519 private key.
    ValueError, TypeError
        ``signed`` is not representable as canonical JSON.

    Examples
    --------
    >>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    >>> k = Ed25519PrivateKey.generate()
    >>> env = sign_envelope({"hello": "drone"}, k)
    >>> verify_envelope(env, [k.public_key()])
    {'hello': 'drone'}
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"cannot sign with {type(key).__name__}: an Ed25519 private key is needed")
    if not isinstance(signed, dict):
        raise TypeError(f"the signed part must be a dict, not {type(signed).__name__}")
    sig = key.sign(canonical_json(signed))
    return {"signed": signed, "signatures": [{"keyid": keyid(key.public_key()), "sig": sig.hex()}]}


def _malformed(why: str) -> VerifyError:
    err = VerifyError(f"malformed signed envelope: {why}")
    err.reason = "malformed"
    return err


def _is_hex(value: object, length: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    )


def verify_envelope(
    envelope: dict[str, Any], trusted: Sequence[Ed25519PublicKey]
) -> dict[str, Any]:
    """Return ``envelope["signed"]`` if a trusted key signed it.

    Parameters
    ----------
    envelope
        ``{"signed": {...}, "signatures": [{"keyid", "sig"}, ...]}``.
    trusted
        The public keys whose signature is accepted; one valid signature by
        any of them suffices.

    Returns
    -------
    dict
        The ``signed`` part, unchanged.

    Raises
    ------
    VerifyError
        The envelope is malformed; no signature is by a trusted key (the
        message lists the keyids found and trusted); or a signature by a
        trusted key does not match the content (it was modified after
        signing).
    UsageError
        ``trusted`` is empty.
    """
    from cryptography.exceptions import InvalidSignature

    if not trusted:
        raise UsageError(
            "no trusted public keys to verify the manifest with",
            remedy="give the operator's public key (OpenSSH or PEM)",
        )
    if not isinstance(envelope, dict):
        raise _malformed(f"expected a JSON object, got {type(envelope).__name__}")
    if set(envelope) != {"signed", "signatures"}:
        raise _malformed(f"expected keys 'signed' and 'signatures', got {sorted(envelope)}")
    signed, signatures = envelope["signed"], envelope["signatures"]
    if not isinstance(signed, dict):
        raise _malformed("'signed' is not an object")
    if not isinstance(signatures, list) or not signatures:
        raise _malformed("'signatures' is not a non-empty list")
    for i, entry in enumerate(signatures):
        if not isinstance(entry, dict) or not _is_hex(entry.get("keyid"), 64):
            raise _malformed(f"signature {i} has no valid 'keyid' (64 lower-case hex)")
        if not _is_hex(entry.get("sig"), _SIG_HEX_LEN):
            raise _malformed(f"signature {i} has no valid 'sig' ({_SIG_HEX_LEN} lower-case hex)")
    try:
        payload = canonical_json(signed)
    except (ValueError, TypeError) as exc:
        raise _malformed(f"'signed' is not canonical-JSON representable ({exc})") from exc

    by_id = {keyid(pub): pub for pub in trusted}
    bad: list[str] = []
    for entry in signatures:
        pub = by_id.get(entry["keyid"])
        if pub is None:
            continue
        try:
            pub.verify(bytes.fromhex(entry["sig"]), payload)
        except InvalidSignature:
            bad.append(entry["keyid"])
            continue
        return signed
    if bad:
        err = VerifyError(
            f"bad signature by trusted key {', '.join(bad)}: "
            "the signed content was modified after signing, or the signature is corrupt"
        )
        err.reason = "signature"
        raise err
    found = ", ".join(sorted({e["keyid"] for e in signatures}))
    err = VerifyError(
        f"no signature by a trusted key: signed by [{found}], trusted [{', '.join(sorted(by_id))}]",
        remedy="rebuild the cache with the operator's key, or trust the key that signed it",
    )
    err.reason = "untrusted-key"
    raise err

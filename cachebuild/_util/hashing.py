"""Canonical JSON (RFC 8785, JCS) and streaming file hashes.

The manifest signature is computed over :func:`canonical_json` of the
``signed`` part, so any verifier (the drone's, in whatever language) must
produce the same bytes from the same JSON value.  RFC 8785 fixes them:

* object members sorted by the UTF-16 code units of their names (not by
  code points: ``"\\U0001F600"`` sorts *before* ``"\\uFB33"``);
* no whitespace; strings in UTF-8, escaping only ``"``, ``\\`` and the
  control characters below U+0020 (``\\b \\f \\n \\r \\t`` short forms, the
  rest as ``\\u00xx``, lower-case hex);
* numbers in the ECMAScript ``Number.prototype.toString`` format.

Python's ``json.dumps`` formats floats with ``repr``: the same shortest
round-trip digits as ECMAScript, but laid out differently (``1e+21`` in
both, yet ``1e+16`` vs ``10000000000000000``, ``1e-05`` vs ``0.00001``,
``4.0`` vs ``4``).  :func:`es_number` converts ``repr``'s digits to the
ECMAScript layout, so floats are canonical here.  Two deliberate
departures from RFC 8785, both documented on :func:`canonical_json`:
Python ``int`` values are written exactly (RFC 8785 would first round them
to an IEEE double; keep integers below 2**53 for portable signatures), and
strings with lone surrogates are rejected (as the RFC requires).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

__all__ = ["canonical_json", "es_number", "is_sha256_hex", "sha256_file"]

_encode_string = json.encoder.encode_basestring


def es_number(value: float) -> str:
    """Format ``value`` as ECMAScript's ``Number.prototype.toString`` does.

    Parameters
    ----------
    value
        A finite float.

    Returns
    -------
    str
        The shortest round-trip digits, in plain notation for decimal
        exponents -6 < n <= 21 and ``d.ddde±x`` notation otherwise.

    Raises
    ------
    ValueError
        ``value`` is NaN or infinite (JSON has no representation for them).

    Examples
    --------
    >>> [es_number(x) for x in (4.0, -0.0, 1e21, 1e20, 1e-7, 0.000001, 1.5e300)]
    ['4', '0', '1e+21', '100000000000000000000', '1e-7', '0.000001', '1.5e+300']
    """
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not allowed in canonical JSON")
    if value == 0:
        return "0"  # -0 too, as ECMAScript does
    if value < 0:
        return "-" + es_number(-value)
    # repr() gives the shortest digits that round-trip (the same digits
    # ECMAScript chooses); Decimal splits them into digits and exponent.
    sign, digit_tuple, exp = Decimal(repr(value)).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    assert isinstance(exp, int) and not sign
    exp += len(digit_tuple) - len(digits)
    k = len(digits)
    n = exp + k  # value = 0.<digits> * 10**n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"


def _utf16_key(name: str) -> bytes:
    # Big-endian UTF-16 bytes compare exactly as UTF-16 code unit sequences.
    return name.encode("utf-16-be", "surrogatepass")


def _encode(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_encode_string(obj))
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        out.append(es_number(obj))
    elif isinstance(obj, Mapping):
        for name in obj:
            if not isinstance(name, str):
                raise TypeError(
                    f"canonical JSON object names must be str, not {type(name).__name__}"
                )
        out.append("{")
        for i, name in enumerate(sorted(obj, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(_encode_string(name))
            out.append(":")
            _encode(obj[name], out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` as RFC 8785 canonical JSON, UTF-8 encoded.

    Parameters
    ----------
    obj
        ``None``, ``bool``, ``int``, ``float``, ``str``, a list or tuple, or
        a mapping with ``str`` keys, nested freely.

    Returns
    -------
    bytes
        Sorted members (by UTF-16 code units), no whitespace, ECMAScript
        number format.  ``int`` values are written exactly, where RFC 8785
        would round them to the nearest double: identical below 2**53.

    Raises
    ------
    ValueError
        A float is NaN or infinite, or a string holds a lone surrogate.
    TypeError
        A value or object name has a type JSON cannot represent.

    Examples
    --------
    >>> canonical_json({"b": [1.0, 2.5, None], "a": "é"})
    b'{"a":"\\xc3\\xa9","b":[1,2.5,null]}'
    """
    out: list[str] = []
    _encode(obj, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("canonical JSON cannot hold a lone surrogate in a string") from exc


_SHA256_HEX = re.compile("[0-9a-f]{64}")


def is_sha256_hex(value: object) -> bool:
    """Whether ``value`` is a SHA-256 in lower-case hex: how objects, keys and hashes are named.

    >>> is_sha256_hex("ab" * 32), is_sha256_hex("AB" * 32), is_sha256_hex(("ab" * 32) + "\\n"), is_sha256_hex(7)
    (True, False, False, False)
    """
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> tuple[str, int]:
    """Hex SHA-256 and size in bytes of the file at ``path``, read in chunks.

    Parameters
    ----------
    path
        The file to hash.
    bufsize
        Bytes read per chunk; memory use stays at one chunk.

    Returns
    -------
    tuple[str, int]
        ``(hex digest, number of bytes read)``; the size is what was hashed,
        not a separate ``stat``, so the two always agree.
    """
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size

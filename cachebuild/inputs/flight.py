"""The flight record: parse, validate and normalise a flight; derive its area.

A flight is JSON (a file, or a Flights API answer with the same schema,
docs/flight-schema.md)::

    {"flight_id": "3f2b8c1e-…", "takeoff_origin": {"lat": …, "lon": …, "alt_m": …},
     "waypoints": [{"lat": …, "lon": …, "alt_m": …}, …]}

Validation is strict: unknown keys, wrong types, NaN/Infinity and values out
of range are errors.  Every error is a :class:`~cachebuild.errors.FlightError`
whose message names the source (path or URL), the field as a JSON path and
what is wrong, e.g. ``examples/x.json: waypoints[3].lat: 95.0 is outside
-90..90``.  No input, however malformed, produces a traceback.

Only the standard library is imported: this module is on the no-op path.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cachebuild.errors import FlightError, FlightFileInvalidError, FlightFileMissingError
from cachebuild.tilemath import LatLonAlt, LngLatBbox, bbox_of_points, buffer_bbox

__all__ = [
    "MAX_WAYPOINTS",
    "MAX_FLIGHT_BYTES",
    "ALT_RANGE_M",
    "Flight",
    "parse_flight",
    "load_flight_file",
    "flight_record",
    "flight_from_record",
    "flight_area",
    "looks_like_uuid",
]

MAX_WAYPOINTS = 10_000
MAX_FLIGHT_BYTES = 16 * 1024 * 1024
"""Larger flight documents are refused before parsing."""
ALT_RANGE_M = (-1000.0, 100_000.0)
"""The altitudes, in metres, a flight may name (inclusive)."""

_TOP_KEYS = ("flight_id", "takeoff_origin", "waypoints")
_POINT_KEYS = ("lat", "lon", "alt_m")
_HEX = "[0-9a-fA-F]"
_UUID_RE = re.compile(f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}|{_HEX}{{32}}")
# Python's int() refuses more than 4300 digits with a bare ValueError; a
# longer integer literal is parsed as a float (and then found not finite).
_MAX_INT_DIGITS = 300


@dataclass(frozen=True)
class Flight:
    """A validated flight.

    Attributes
    ----------
    flight_id
        Lowercase canonical hyphenated UUID, or None when the source gave
        none.
    takeoff_origin
        Where the drone takes off, or None.
    waypoints
        The route, at least one point.
    """

    flight_id: str | None
    takeoff_origin: LatLonAlt | None
    waypoints: tuple[LatLonAlt, ...]


class _NonFinite:
    """Stands in for a ``NaN``/``Infinity`` literal until validation names its field."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


class _Invalid(Exception):
    """A validation failure at a JSON path; turned into ``error_cls`` by the caller."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def looks_like_uuid(s: str) -> bool:
    """Whether ``s`` is a UUID: 8-4-4-4-12 hex digits with hyphens, or 32 without.

    Either case; no braces, prefixes or surrounding spaces.

    Examples
    --------
    >>> looks_like_uuid("3F2B8C1E-5A7D-4E6F-9B0A-1C2D3E4F5A6B")
    True
    >>> looks_like_uuid("examples/flights/demo.json")
    False
    """
    return isinstance(s, str) and _UUID_RE.fullmatch(s) is not None


def _normalise_uuid(s: str) -> str:
    h = s.replace("-", "").lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _describe(value: Any) -> str:
    """A short JSON-ish rendering of a value for an error message."""
    if isinstance(value, _NonFinite):
        return value.literal
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (dict, Mapping)):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return type(value).__name__


def _wrong_type(value: Any, expected: str) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        return f"expected {expected}, got {_type_name(value)}"
    return f"{_describe(value)} is {_type_name(value)}, expected {expected}"


def _number(value: Any, path: str, lo: float, hi: float, unit: str = "") -> float:
    if isinstance(value, _NonFinite):
        raise _Invalid(path, f"{value.literal} is not allowed; numbers must be finite JSON numbers")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(path, _wrong_type(value, "a number"))
    x = float(value)
    if not math.isfinite(x):
        raise _Invalid(path, f"{_describe(value)} is not a finite number")
    if not lo <= x <= hi:
        raise _Invalid(path, f"{_describe(value)} is outside {lo:g}..{hi:g}{unit}")
    return x


def _check_keys(obj: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in obj:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise _Invalid(where, f"unknown key (allowed: {', '.join(allowed)})")


def _point(value: Any, path: str) -> LatLonAlt:
    if not isinstance(value, Mapping):
        raise _Invalid(path, _wrong_type(value, "an object with lat, lon, alt_m"))
    _check_keys(value, _POINT_KEYS, path)
    for key in _POINT_KEYS:
        if key not in value:
            raise _Invalid(f"{path}.{key}", "missing (required)")
    return LatLonAlt(
        _number(value["lat"], f"{path}.lat", -90.0, 90.0),
        _number(value["lon"], f"{path}.lon", -180.0, 180.0),
        _number(value["alt_m"], f"{path}.alt_m", ALT_RANGE_M[0], ALT_RANGE_M[1], " m"),
    )


def _flight_from_obj(obj: Any) -> Flight:
    if not isinstance(obj, Mapping):
        raise _Invalid("", f"the flight must be a JSON object, got {_type_name(obj)}")
    _check_keys(obj, _TOP_KEYS, "")

    flight_id = obj.get("flight_id")
    if flight_id is not None:
        if not isinstance(flight_id, str):
            raise _Invalid("flight_id", _wrong_type(flight_id, "a UUID string"))
        if not looks_like_uuid(flight_id):
            raise _Invalid(
                "flight_id", f"{_describe(flight_id)} is not a UUID (8-4-4-4-12 hex digits)"
            )
        flight_id = _normalise_uuid(flight_id)

    origin_value = obj.get("takeoff_origin")
    origin = None if origin_value is None else _point(origin_value, "takeoff_origin")

    if "waypoints" not in obj:
        raise _Invalid("waypoints", "missing (required)")
    wps = obj["waypoints"]
    if not isinstance(wps, (list, tuple)):
        raise _Invalid("waypoints", _wrong_type(wps, "an array"))
    if not wps:
        raise _Invalid("waypoints", "empty; a flight needs at least 1 waypoint")
    if len(wps) > MAX_WAYPOINTS:
        raise _Invalid("waypoints", f"{len(wps)} waypoints; at most {MAX_WAYPOINTS} are allowed")
    waypoints = tuple(_point(w, f"waypoints[{i}]") for i, w in enumerate(wps))
    return Flight(flight_id=flight_id, takeoff_origin=origin, waypoints=waypoints)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Invalid("", f"duplicate key {json.dumps(key)} in an object")
        obj[key] = value
    return obj


def _parse_int(literal: str) -> int | float:
    return int(literal) if len(literal) <= _MAX_INT_DIGITS else float(literal)


def _decode_json(text: str | bytes | bytearray | memoryview) -> Any:
    """JSON text to Python values, NaN/Infinity kept as :class:`_NonFinite`."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > MAX_FLIGHT_BYTES:
            raise _Invalid(
                "", f"{len(raw)} bytes; a flight may be at most {MAX_FLIGHT_BYTES} bytes"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : exc.start + 1].hex()
            raise _Invalid("", f"not UTF-8 text (byte 0x{bad} at offset {exc.start})") from None
    elif len(text) > MAX_FLIGHT_BYTES:
        raise _Invalid(
            "", f"{len(text)} characters; a flight may be at most {MAX_FLIGHT_BYTES} bytes"
        )
    if text.startswith("\ufeff"):  # a byte-order mark, as some editors write
        text = text[1:]
    try:
        return json.loads(
            text,
            parse_constant=_NonFinite,
            parse_int=_parse_int,
            object_pairs_hook=_reject_duplicates,
        )
    except json.JSONDecodeError as exc:
        raise _Invalid(
            "", f"line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    except RecursionError:
        raise _Invalid("", "invalid JSON: nested too deeply") from None


def parse_flight(
    text: str | bytes,
    source: str,
    *,
    error_cls: type[FlightError] = FlightFileInvalidError,
) -> Flight:
    """Parse and validate a flight document.

    Parameters
    ----------
    text
        The JSON document, as text or UTF-8 bytes (a leading byte-order
        mark is ignored).
    source
        Where it came from (a path or a URL without secrets); every error
        message starts with it.
    error_cls
        The error to raise: :class:`~cachebuild.errors.FlightFileInvalidError`
        for files, :class:`~cachebuild.errors.FlightInvalidAnswerError` for
        API answers.

    Returns
    -------
    Flight

    Raises
    ------
    FlightError
        ``error_cls(message)`` for any invalid input: bad UTF-8, bad JSON
        (with line and column), wrong shape, unknown or duplicate keys,
        non-numbers, NaN/Infinity, values out of range, a bad UUID.

    Examples
    --------
    >>> f = parse_flight('{"waypoints": [{"lat": 47.37, "lon": 8.54, "alt_m": 120}]}', "inline")
    >>> f.waypoints
    (LatLonAlt(lat=47.37, lon=8.54, alt_m=120.0),)
    >>> parse_flight('{"waypoints": [{"lat": 95.0, "lon": 8.54, "alt_m": 120}]}', "x.json")
    Traceback (most recent call last):
    ...
    cachebuild.errors.FlightFileInvalidError: x.json: waypoints[0].lat: 95.0 is outside -90..90
      remedy: fix the file; the schema is in docs/flight-schema.md
    """
    try:
        return _flight_from_obj(_decode_json(text))
    except _Invalid as exc:
        where = f"{exc.path}: " if exc.path else ""
        raise error_cls(f"{source}: {where}{exc.problem}") from None
    except Exception as exc:  # never a traceback for any input
        raise error_cls(
            f"{source}: could not be read as a flight: {type(exc).__name__}: {exc}"
        ) from exc


def load_flight_file(path: str | os.PathLike[str]) -> Flight:
    """Read and validate a flight file.

    Raises
    ------
    FlightFileMissingError
        ``flight file not found: <path>`` when the path does not exist, is a
        directory or another non-regular file, or cannot be read (exit 94).
    FlightFileInvalidError
        When the file is not a valid flight (exit 95).
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
        if stat.S_ISDIR(st.st_mode):
            raise FlightFileMissingError(f"flight file not found: {name} (it is a directory)")
        if not stat.S_ISREG(st.st_mode):
            raise FlightFileMissingError(f"flight file not found: {name} (not a regular file)")
        with open(name, "rb") as fh:
            data = fh.read(MAX_FLIGHT_BYTES + 1)
    except FlightFileMissingError:
        raise
    except FileNotFoundError:
        raise FlightFileMissingError(f"flight file not found: {name}") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise FlightFileMissingError(
            f"flight file not found: {name} (cannot read it: {reason})"
        ) from exc
    return parse_flight(data, name)


def _point_record(p: LatLonAlt) -> dict[str, float]:
    return {"lat": float(p.lat), "lon": float(p.lon), "alt_m": float(p.alt_m)}


def flight_record(f: Flight) -> dict[str, Any]:
    """The normalised JSON-able record of a flight (the schema's own shape).

    Examples
    --------
    >>> f = Flight(None, None, (LatLonAlt(47.37, 8.54, 120),))
    >>> flight_record(f)
    {'flight_id': None, 'takeoff_origin': None, 'waypoints': [{'lat': 47.37, 'lon': 8.54, 'alt_m': 120.0}]}
    """
    return {
        "flight_id": f.flight_id,
        "takeoff_origin": None if f.takeoff_origin is None else _point_record(f.takeoff_origin),
        "waypoints": [_point_record(p) for p in f.waypoints],
    }


def flight_from_record(
    d: Mapping[str, Any],
    *,
    source: str = "flight record",
    error_cls: type[FlightError] = FlightFileInvalidError,
) -> Flight:
    """The flight a :func:`flight_record` describes, validated as in :func:`parse_flight`.

    ``flight_from_record(flight_record(f)) == f`` for every valid flight.
    """
    try:
        return _flight_from_obj(d)
    except _Invalid as exc:
        where = f"{exc.path}: " if exc.path else ""
        raise error_cls(f"{source}: {where}{exc.problem}") from None
    except Exception as exc:
        raise error_cls(
            f"{source}: could not be read as a flight: {type(exc).__name__}: {exc}"
        ) from exc


def flight_area(f: Flight, buffer_m: float) -> LngLatBbox:
    """The area the cache must cover: the flight's box grown by ``buffer_m``.

    The box holds every waypoint and the takeoff origin (antimeridian-aware,
    :func:`~cachebuild.tilemath.bbox_of_points`), then
    :func:`~cachebuild.tilemath.buffer_bbox` grows it by at least ``buffer_m``
    metres on every side, clamping latitude to the Web-Mercator limit.

    Raises
    ------
    ValueError
        If ``buffer_m`` is negative or not finite.

    Examples
    --------
    >>> f = Flight(None, None, (LatLonAlt(0.0, 0.0, 100.0),))
    >>> b = flight_area(f, 500.0)
    >>> round(b.north - b.south, 4), round(b.east - b.west, 4)
    (0.009, 0.009)
    """
    points = [(p.lat, p.lon) for p in f.waypoints]
    if f.takeoff_origin is not None:
        points.append((f.takeoff_origin.lat, f.takeoff_origin.lon))
    return buffer_bbox(bbox_of_points(points), buffer_m)

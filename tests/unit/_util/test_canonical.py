"""Tests for cachebuild._util.hashing: RFC 8785 canonical JSON and file hashing."""

from __future__ import annotations

import doctest
import hashlib
import json
import math
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachebuild._util.hashing as canonical
from cachebuild._util.hashing import canonical_json, es_number, sha256_file


def test_docstring_examples() -> None:
    result = doctest.testmod(canonical, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_all_is_complete() -> None:
    public = {
        n for n in vars(canonical) if not n.startswith("_") and callable(getattr(canonical, n))
    }
    public = {n for n in public if getattr(canonical, n).__module__ == canonical.__name__}
    assert public == set(canonical.__all__)


# -- RFC 8785 examples --------------------------------------------------------

# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
RFC8785_NUMBERS = {
    "0000000000000000": "0",
    "8000000000000000": "0",
    "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308",
    "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992",
    "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22",
    "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23",
    "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000",
    "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
    "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332",
    "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333",
    "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343",
    "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


def _double(bits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(bits))[0]


@pytest.mark.parametrize(("bits", "text"), sorted(RFC8785_NUMBERS.items()))
def test_rfc8785_number_table(bits: str, text: str) -> None:
    assert es_number(_double(bits)) == text
    assert canonical_json([_double(bits)]) == f"[{text}]".encode()


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_rfc8785_nan_and_infinity_rejected(bits: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        canonical_json({"x": _double(bits)})


def test_rfc8785_main_example() -> None:
    # RFC 8785 section 3.2.2, parsed with an ordinary JSON parser.
    source = r"""{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"""
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(json.loads(source)) == expected.encode("utf-8")


def test_rfc8785_sorting_by_utf16_code_units() -> None:
    # RFC 8785 section 3.2.3: U+1F600 (surrogates D83D DE00) sorts before
    # U+FB33, although its code point is larger.
    obj = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    names = list(json.loads(canonical_json(obj)))
    assert names == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert sorted(obj) != names  # code-point order would differ


# -- layout ---------------------------------------------------------------------


def test_sorted_keys_nested_and_no_whitespace() -> None:
    out = canonical_json({"b": {"z": 1, "a": [1, 2, {"y": None, "x": True}]}, "a": False})
    assert out == b'{"a":false,"b":{"a":[1,2,{"x":true,"y":null}],"z":1}}'
    assert b" " not in out and b"\n" not in out


def test_insertion_order_does_not_matter() -> None:
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})


def test_unicode_is_utf8_not_escaped() -> None:
    out = canonical_json({"name": "Zürich ✈ 東京 \U0001f681"})
    assert out == '{"name":"Zürich ✈ 東京 \U0001f681"}'.encode("utf-8")
    assert b"\\u" not in out


def test_string_escapes() -> None:
    s = '"\\\b\f\n\r\t\x00\x1f\x7f\u2028/'
    assert canonical_json(s) == b'"\\"\\\\\\b\\f\\n\\r\\t\\u0000\\u001f\x7f\xe2\x80\xa8/"'


def test_lone_surrogate_rejected() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        canonical_json({"x": "\ud800"})


def test_ints_stay_ints_and_bools_are_not_ints() -> None:
    assert canonical_json([0, -1, 2**53, True, False]) == b"[0,-1,9007199254740992,true,false]"
    assert canonical_json(10**30) == b"1000000000000000000000000000000"


def test_tuples_are_arrays() -> None:
    assert canonical_json((1, (2, "x"))) == b'[1,[2,"x"]]'


@pytest.mark.parametrize("bad", [{1: "a"}, {("a",): 1}, {"x": {1, 2}}, {"x": b"bytes"}, object()])
def test_unrepresentable_rejected(bad: object) -> None:
    with pytest.raises(TypeError):
        canonical_json(bad)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (4.0, "4"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (-1.25, "-1.25"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e21, "1.5e+21"),
        (123456789012345680000.0, "123456789012345680000"),
        (1e16, "10000000000000000"),
        (1e-6, "0.000001"),
        (1.5e-6, "0.0000015"),
        (1e-7, "1e-7"),
        (1.25e-7, "1.25e-7"),
        (0.1 + 0.2, "0.30000000000000004"),
        (47.123456789, "47.123456789"),
        (5e-324, "5e-324"),
    ],
)
def test_float_format(value: float, text: str) -> None:
    assert es_number(value) == text
    # and it reads back as the same double
    assert float(text) == value


def test_python_json_differs_where_documented() -> None:
    # The reason es_number exists: json.dumps would not be canonical.
    assert json.dumps(1e16) == "1e+16" and es_number(1e16) == "10000000000000000"
    assert json.dumps(1e-5) == "1e-05" and es_number(1e-5) == "0.00001"
    assert json.dumps(4.0) == "4.0" and es_number(4.0) == "4"


# -- properties -------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


def _no_lone_surrogates(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(json_values)
@example({"a": [1e21, 1e-7, -0.0, 4.0, 2**53]})
@example({"\U0001f600": 1, "\ufb33": 2})
def test_round_trip_through_a_json_parser(value: object) -> None:
    if not _no_lone_surrogates(value):
        with pytest.raises(ValueError):
            canonical_json(value)
        return
    once = canonical_json(value)
    assert canonical_json(json.loads(once)) == once
    # the same value, only laid out differently (numbers compared as doubles)
    assert json.loads(once, parse_int=float) == json.loads(json.dumps(value), parse_int=float)


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
@example(1e21)
@example(9.999999999999999e20)
@example(1e-7)
def test_es_number_round_trips_exactly(x: float) -> None:
    text = es_number(x)
    assert float(text) == x
    assert " " not in text and "+" not in text.split("e")[0]
    # same digits as the shortest repr: nothing longer than needed
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").strip("0")
    assert len(mantissa) <= 17


@pytest.mark.skipif(
    shutil.which("node") is None, reason="node (the ECMAScript oracle) is not installed"
)
def test_es_number_matches_javascript() -> None:
    rng = random.Random(8785)
    values = [_double(bits) for bits in RFC8785_NUMBERS]
    while len(values) < 3000:
        x = struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))[0]
        if math.isfinite(x):
            values.append(x)
    values += [rng.uniform(-180, 180) for _ in range(500)]
    values += [10.0**e for e in range(-12, 25)] + [1.5 * 10.0**e for e in range(-12, 25)]
    hexes = [struct.pack(">d", v).hex() for v in values]
    script = (
        "const hs = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "const out = hs.map(h => String(Buffer.from(h, 'hex').readDoubleBE(0)));"
        "process.stdout.write(JSON.stringify(out));"
    )
    res = subprocess.run(
        ["node", "-e", script], input=json.dumps(hexes), capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    js = json.loads(res.stdout)
    mismatches = [
        (v, ours, theirs)
        for v, ours, theirs in zip(values, map(es_number, values), js)
        if ours != theirs
    ]
    assert mismatches == []


# -- sha256_file ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 100_000])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p, bufsize=4096) == (hashlib.sha256(data).hexdigest(), size)
    assert sha256_file(str(p)) == (hashlib.sha256(data).hexdigest(), size)


def test_sha256_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "nope")

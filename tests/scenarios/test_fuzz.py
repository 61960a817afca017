"""Fuzzing the parsers of hostile input, in-process, with hypothesis.

Every input must end in a value or in one of the project's own errors
(:class:`cachebuild.errors.CacheBuildError`: a clean exit code and a message
naming the input), never in any other exception: the flight parser
(``cachebuild/inputs/flight.py``), flight resolution and the area check
(``cachebuild/inputs/plan.py``, ``cachebuild/inputs/area.py``), and the provider specs,
URL/path templates and HTTP settings (``cachebuild/providers/``).

A few hundred examples per test in CI (seconds); ``CACHEBUILD_LONG=1``
raises it to 20,000 (docs/reliability.md, section 4, has the figures of a
long run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cachebuild.errors import CacheBuildError, FlightFileInvalidError, UsageError
from cachebuild.inputs.flight import (
    MAX_WAYPOINTS,
    Flight,
    flight_area,
    flight_from_record,
    flight_record,
    parse_flight,
)
from cachebuild.providers import open_provider, provider_kind
from cachebuild.providers.base import PLACEHOLDERS, fill_template, template_placeholders
from cachebuild.providers.local import DIRECTORY_PLACEHOLDERS
from cachebuild.providers.xyzconfig import HttpConfig, parse_headers, parse_subdomains
from cachebuild.tilemath import MAX_ZOOM, Tile

LONG = os.environ.get("CACHEBUILD_LONG") == "1"
EXAMPLES = 20_000 if LONG else 300

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
    derandomize=not LONG,  # CI: the same inputs every run; the long run explores
)


def only_project_errors(fn: Any, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``, or None if it raised a project error (with a usable message)."""
    try:
        return fn(*args, **kw)
    except CacheBuildError as exc:
        text = str(exc)
        assert exc.message and isinstance(exc.exit_code, int) and exc.phase
        assert "Traceback" not in text
        return None


# -- JSON-shaped inputs ---------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
JSON = st.recursive(
    SCALARS,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
COORD = st.floats(min_value=-200, max_value=200) | st.integers(-200, 200) | JSON
POINT = st.fixed_dictionaries(
    {},
    optional={
        "lat": COORD,
        "lon": COORD,
        "alt_m": st.floats(min_value=-2000, max_value=200_000) | JSON,
        "extra": JSON,
    },
)
UUIDISH = st.uuids().map(str) | st.uuids().map(lambda u: u.hex.upper()) | st.text(max_size=40)
FLIGHT_DOC = (
    st.fixed_dictionaries(
        {"waypoints": st.lists(POINT | JSON, max_size=6) | JSON},
        optional={"flight_id": UUIDISH | JSON, "takeoff_origin": POINT | JSON, "nope": JSON},
    )
    | JSON
)

VALID = json.dumps(
    {
        "flight_id": "3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b",
        "takeoff_origin": {"lat": 47.37, "lon": 8.54, "alt_m": 410.0},
        "waypoints": [
            {"lat": 47.371, "lon": 8.541, "alt_m": 120},
            {"lat": 47.372, "lon": 8.543, "alt_m": 120},
        ],
    }
)


@st.composite
def mutated(draw: Any, base: str = VALID) -> str:
    """``base`` with a few characters deleted, replaced or inserted."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(("del", "ins", "rep")))
        piece = draw(
            st.text(max_size=4)
            | st.sampled_from(['"', "{", "]", ",", "1e999", "NaN", "-", "\\u", "\ufeff"])
        )
        if op == "del":
            text = text[:i] + text[i + draw(st.integers(1, 8)) :]
        elif op == "ins":
            text = text[:i] + piece + text[i:]
        else:
            text = text[:i] + piece + text[i + len(piece) :]
    return text


def check_flight(f: Flight) -> None:
    """What every accepted flight satisfies."""
    assert 1 <= len(f.waypoints) <= MAX_WAYPOINTS
    for p in f.waypoints + ((f.takeoff_origin,) if f.takeoff_origin else ()):
        assert -90 <= p.lat <= 90 and -180 <= p.lon <= 180
    if f.flight_id is not None:
        assert len(f.flight_id) == 36 and "/" not in f.flight_id and "." not in f.flight_id
    assert flight_from_record(flight_record(f)) == f
    west, south, east, north = flight_area(f, 500.0)
    assert -85.06 <= south <= north <= 85.06
    assert -180 <= west <= 180 and -180 <= east <= 180


def parse_or_refuse(data: str | bytes) -> None:
    try:
        f = parse_flight(data, "fuzz.json")
    except FlightFileInvalidError as exc:
        assert exc.message.startswith("fuzz.json: "), exc.message
        assert exc.exit_code == 95
        return
    check_flight(f)


# -- the flight parser ------------------------------------------------------------------


@fuzz
@given(FLIGHT_DOC)
@example({"waypoints": [{"lat": 1e400, "lon": 0, "alt_m": 0}]})
@example({"waypoints": [{"lat": 0, "lon": 0, "alt_m": 0}], "flight_id": "../../etc/passwd"})
def test_flight_documents(doc: Any) -> None:
    parse_or_refuse(json.dumps(doc, allow_nan=True))


@fuzz
@given(mutated())
@example('{"waypoints": ' + "[" * 100_000 + "]" * 100_000 + "}")
@example('{"waypoints": [{"lat": 1' + "0" * 5000 + ', "lon": 0, "alt_m": 0}]}')
def test_mutated_flight_text(text: str) -> None:
    parse_or_refuse(text)
    parse_or_refuse(text.encode("utf-8", "surrogatepass"))


@fuzz
@given(st.binary(max_size=300))
@example(b"\xff\xfe{\x00")
@example(b"\xef\xbb\xbf" + VALID.encode())
def test_flight_bytes(data: bytes) -> None:
    parse_or_refuse(data)


@fuzz
@given(FLIGHT_DOC)
def test_flight_records(doc: Any) -> None:
    f = only_project_errors(
        flight_from_record, doc if isinstance(doc, dict) else {"waypoints": doc}
    )
    if f is not None:
        check_flight(f)


# -- flight resolution and the area (plan.py, area.py) ----------------------------------------


@pytest.fixture(scope="module")
def plan_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cachebuild.release.signing import ensure_dev_key

    home = tmp_path_factory.mktemp("fuzzplan")
    ensure_dev_key(home / "key.pem")
    return home


@fuzz
@given(
    doc=FLIGHT_DOC | mutated(),
    buffer_m=st.sampled_from(["0", "200", "1e6", "-1", "nan", "inf", "1e400", "", "x"])
    | st.text(max_size=8),
    zoom=st.sampled_from(["0", "17", "22", "23", "16,17", ",", "-1", "1" * 5000])
    | st.text(max_size=8),
    max_tiles=st.sampled_from([None, "1", "1000000", "0", "1e3", "9" * 30]),
)
def test_resolve_plan(
    plan_home: Path, doc: Any, buffer_m: str, zoom: str, max_tiles: str | None
) -> None:
    from cachebuild.inputs.config import load_settings
    from cachebuild.inputs.plan import resolve_plan

    path = plan_home / "flight.json"
    path.write_text(
        doc if isinstance(doc, str) else json.dumps(doc, allow_nan=True),
        encoding="utf-8",
        errors="surrogatepass",
    )
    vars = {
        "FLIGHT": str(path),
        "BUFFER_M": buffer_m,
        "ZOOM": zoom,
        "KEY": str(plan_home / "key.pem"),
    }
    if max_tiles is not None:
        vars["MAX_TILES"] = max_tiles
    env = {"CACHEBUILD_HOME": str(plan_home / "home")}
    settings_ = only_project_errors(load_settings, vars, env)
    if settings_ is None:
        return
    plan = only_project_errors(resolve_plan, settings_)
    if plan is not None:
        from cachebuild.tilemath import LngLatBbox, count_tiles

        assert count_tiles(LngLatBbox(*plan.bbox), settings_.zooms) <= settings_.max_tiles


@fuzz
@given(st.text(max_size=60) | st.uuids().map(str))
@example("../../../../etc/passwd")
@example("/etc/passwd")
@example("3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b")
@example("3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b/../../x")
def test_flight_values(plan_home: Path, raw: str) -> None:
    """Any FLIGHT value: a file, a flight id, or a clean refusal (OFFLINE, no API: no network)."""
    from cachebuild.inputs.config import load_settings
    from cachebuild.inputs.plan import resolve_flight

    for offline in ("0", "1"):
        settings_ = load_settings(
            {"FLIGHT": raw, "OFFLINE": offline}, {"CACHEBUILD_HOME": str(plan_home / "h")}
        )
        only_project_errors(resolve_flight, settings_)


@fuzz
@given(st.text(max_size=60))
@example("../../x")
@example("/abs/path")
@example("3f2b8c1e-5a7d-4e6f-9b0a-1c2d3e4f5a6b")
def test_saved_answers_stay_in_their_directory(
    tmp_path_factory: pytest.TempPathFactory, flight_id: str
) -> None:
    """A flight id becomes a file name only as a checked UUID, under state/flights."""
    from cachebuild.inputs.flights_api import _saved_path

    state = Path("/nonexistent/state")
    p = only_project_errors(_saved_path, state, flight_id)
    if p is not None:
        assert p.parent == state / "flights" and p.name.count(".") == 1 and "/" not in p.name


# -- provider specs, templates, headers ------------------------------------------------------------

TEMPLATE_TEXT = st.lists(
    st.sampled_from(
        [*(f"{{{p}}}" for p in PLACEHOLDERS), "{", "}", "{zz}", "/", ".", "..", "?", "&", "%", ":"]
    )
    | st.text(max_size=6),
    max_size=10,
).map("".join)


@fuzz
@given(TEMPLATE_TEXT, st.sampled_from([PLACEHOLDERS, DIRECTORY_PLACEHOLDERS]))
def test_template_placeholders(text: str, allowed: tuple[str, ...]) -> None:
    found = only_project_errors(template_placeholders, text, allowed)
    if found is not None:
        assert found <= set(allowed)


@fuzz
@given(
    st.sampled_from(["http://", "https://", "HTTP://", "https://u:p@"]),
    TEMPLATE_TEXT,
    st.sampled_from([None, "k3y-Secret-value", "a/b?c=d&e", "ünï"]),
)
@example("https://", "t.example/{z}/{x}/{y}.png?key={key}", None)
@example("https://", "[::1/{z}/{x}/{y}", None)
@example("https://", "\udcff.example/{z}/{x}/{y}", None)
@example("https://", "xn--a.example/{z}/{x}/{y}", None)
def test_url_templates(scheme: str, rest: str, key: str | None) -> None:
    env = {"CACHEBUILD_API_KEY": key} if key else {}
    provider = only_project_errors(open_provider, scheme + rest, env=env)
    if provider is None:
        return
    try:
        assert provider.identity == "xyz:" + (scheme + rest).strip()
        if key:
            assert key not in provider.identity
        t = Tile(3, 5, 4)
        assert key is None or key not in provider.shown_url(t)
    finally:
        provider.close()


@fuzz
@given(TEMPLATE_TEXT, st.integers(0, MAX_ZOOM), st.data())
@example(
    "{q}..", 0, None
)  # found by the long run: the quadkey of zoom 0 is empty, so this was ".."
@example("{z}/../../{x}/{y}", 3, None)
def test_directory_templates_never_leave_their_root(
    tmp_path_factory: pytest.TempPathFactory, rest: str, z: int, data: Any
) -> None:
    """A tile's coordinates fill a directory template; a path outside its tree is never read."""
    from cachebuild.providers.base import TileFetchError
    from cachebuild.providers.local import DirectoryProvider

    root = tmp_path_factory.getbasetemp() / "tiles-parent" / "tiles-root"
    root.mkdir(parents=True, exist_ok=True)
    template = f"{root}/{rest}"
    if only_project_errors(template_placeholders, template, DIRECTORY_PLACEHOLDERS) is None:
        return
    provider = only_project_errors(DirectoryProvider, template)
    if provider is None:  # the directory above the first placeholder does not exist
        return
    n = 1 << z
    t = (
        Tile(data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1)), z)
        if data
        else Tile(0, 0, z)
    )
    path = os.path.normpath(fill_template(provider.template, t))
    inside = path.startswith(os.path.normpath(str(provider.root)) + os.sep)
    try:
        assert provider.fetch(t) is None  # nothing is there: no image read from anywhere
        assert inside, f"{path} read though outside {provider.root}"
    except TileFetchError as exc:
        assert inside or "outside the tile directory" in exc.message, exc.message
    finally:
        provider.close()


@fuzz
@given(
    st.text(max_size=80)
    | st.sampled_from(["synthetic", "x.mbtiles", "dir:", "geotiff:", "ftp://x", "pushed:"])
)
@example("~\x00")  # found by the long run: os.path.expanduser raised on the NUL
@example("~\x00.mbtiles")
@example("dir:/nowhere/{z}/{x}/{y}\x00")
def test_provider_specs(tmp_path_factory: pytest.TempPathFactory, spec: str) -> None:
    kind = provider_kind(spec)  # never raises
    assert kind in ("synthetic", "xyz", "mbtiles", "dir", "geotiff", "pushed", "unknown")
    # only what cannot name a real directory tree (a walk of `/` is the operator's to ask for)
    local = spec.strip()
    for prefix in ("dir:", "geotiff:", "pushed:"):
        if local.lower().startswith(prefix):
            local = local[len(prefix) :]
    assume(kind in ("unknown", "mbtiles", "xyz", "synthetic") or "{" in local)
    assume("\0" in local or not os.path.exists(os.path.expanduser(local.split("{", 1)[0]) or "."))
    provider = only_project_errors(open_provider, spec, env={})
    if provider is not None:
        provider.close()


@fuzz
@given(
    st.text(max_size=80)
    | st.dictionaries(st.text(max_size=10), JSON, max_size=3).map(json.dumps)
    | st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=4).map(
        lambda items: "\n".join(f"{a}: {b}" for a, b in items)
    )
)
def test_http_headers(raw: str) -> None:
    try:
        headers = parse_headers(raw)
    except UsageError as exc:
        names, values = _header_parts(raw)
        for value in values:
            if len(value) >= 8 and not any(value in n for n in names):
                assert value not in str(exc), "a header value (maybe a token) in the error"
        return
    for name, value in headers.items():
        assert "\n" not in value and "\r" not in value and name.strip() == name


def _header_parts(raw: str) -> tuple[list[str], list[str]]:
    """The names and values a header text holds, roughly, as the parser would see them."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return [str(k) for k in obj], [v for v in obj.values() if isinstance(v, str)]
    pairs = [ln.partition(":") for ln in raw.splitlines()]
    return [a for a, _, _ in pairs], [c.strip() for _, _, c in pairs]


@fuzz
@given(
    st.dictionaries(
        st.sampled_from(
            ["HTTP_TIMEOUT", "HTTP_RETRIES", "HTTP_BACKOFF", "RATE_LIMIT", "SUBDOMAINS"]
        ),
        st.text(max_size=12) | st.sampled_from(["nan", "inf", "-0", "1e400", "3.5", "a,,b", " "]),
    )
)
def test_http_settings(env: dict[str, str]) -> None:
    only_project_errors(HttpConfig.from_env, env)
    only_project_errors(parse_subdomains, env.get("SUBDOMAINS"))


# -- atheris (libFuzzer), where it is installed -------------------------------------------------


def test_atheris_finds_nothing() -> None:
    """Coverage-guided fuzzing of the same parsers (tests/_harness/fuzz_atheris.py), seeded."""
    import subprocess
    import sys

    pytest.importorskip(
        "atheris", reason="atheris is not installed (pip install 'cachebuild[fuzz]')"
    )
    runs = 1_000_000 if LONG else 5_000
    script = Path(__file__).with_name("fuzz_atheris.py")
    p = subprocess.run(
        [sys.executable, str(script), f"-runs={runs}", "-seed=1", "-max_len=4096"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"Done {runs} runs" in p.stderr
    assert "Uncaught Python exception" not in p.stderr

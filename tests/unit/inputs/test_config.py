from __future__ import annotations

from pathlib import Path

import pytest

from cachebuild.errors import UsageError
from cachebuild.inputs.config import VARIABLES, load_settings

ENV = {"CACHEBUILD_HOME": "/tmp/cb-home"}


def test_defaults() -> None:
    s = load_settings({}, ENV)
    assert s.zooms == (17,) and s.buffer_m == 500 and s.provider == "synthetic"
    assert s.cache_dir == Path("/tmp/cb-home/cache") and s.store == Path("/tmp/cb-home/store")
    assert s.strict and s.report == "text" and s.precision == "fp32"
    assert s.paths.dep_file == Path("/tmp/cb-home/cache/state/doit.sqlite3")


def test_home_falls_back_to_xdg_cache() -> None:
    assert load_settings({}, {"XDG_CACHE_HOME": "/x"}).store == Path("/x/cachebuild/store")


def test_command_line_beats_environment() -> None:
    s = load_settings(
        {"ZOOM": "16,17,16"}, {**ENV, "CACHEBUILD_ZOOM": "12", "CACHEBUILD_BUFFER_M": "800"}
    )
    assert s.zooms == (16, 17) and s.buffer_m == 800


@pytest.mark.parametrize(
    "vars, needle",
    [
        ({"ZOOM": "x"}, "ZOOM"),
        ({"ZOOM": "23"}, "ZOOM"),
        ({"ZOOM": ","}, "ZOOM"),
        ({"BUFFER_M": "-1"}, "BUFFER_M"),
        ({"BUFFER_M": "wide"}, "BUFFER_M"),
        ({"STRICT": "maybe"}, "STRICT"),
        ({"REPORT": "xml"}, "REPORT"),
        ({"PRECISION": "fp8"}, "PRECISION"),
        ({"MODEL": "/no/such.onnx"}, "MODEL"),
        ({"KEY": "/no/such.pem"}, "KEY"),
        ({"CONCURRENCY": "0"}, "CONCURRENCY"),
        ({"FLIHGT": "x.json"}, "FLIHGT"),
        ({"FETCH_DEADLINE": "soon"}, "FETCH_DEADLINE"),
        ({"TILE_MAX_AGE": "-1d"}, "TILE_MAX_AGE"),
        ({"TILE_MAX_AGE": "30 days"}, "TILE_MAX_AGE"),
    ],
)
def test_bad_values_name_the_variable(vars: dict[str, str], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        load_settings(vars, ENV)
    assert needle in str(info.value)
    assert info.value.exit_code == 2


def test_every_variable_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "configuration.md").read_text()
    for name in VARIABLES:
        assert f"`{name}`" in doc, name


def test_index_selftest_and_store_variables() -> None:
    s = load_settings(
        {"INDEX": "HNSW", "MIN_RECALL": "0.9", "SELFTEST_QUERIES": "0", "MAX_STORE_BYTES": "1.5G"},
        ENV,
    )
    assert (s.index_kind, s.min_recall, s.selftest_queries) == ("hnsw", 0.9, 0)
    assert s.max_store_bytes == 1536 * 1024 * 1024
    d = load_settings({}, ENV)
    assert (d.index_kind, d.min_recall, d.selftest_queries, d.max_store_bytes) == (
        "auto",
        None,
        200,
        None,
    )
    for vars, needle in [
        ({"INDEX": "lsh"}, "INDEX"),
        ({"MIN_RECALL": "1.5"}, "MIN_RECALL"),
        ({"MIN_RECALL": "high"}, "MIN_RECALL"),
        ({"SELFTEST_QUERIES": "-1"}, "SELFTEST_QUERIES"),
        ({"MAX_STORE_BYTES": "big"}, "MAX_STORE_BYTES"),
        ({"MAX_STORE_BYTES": "-5G"}, "MAX_STORE_BYTES"),
    ]:
        with pytest.raises(UsageError, match=needle):
            load_settings(vars, ENV)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("0", 0),
        ("4096", 4096),
        ("500M", 500 << 20),
        ("20G", 20 << 30),
        ("2TiB", 2 << 40),
        ("1k", 1024),
    ],
)
def test_parse_size(raw: str, expected: int) -> None:
    from cachebuild.inputs.config import parse_size

    assert parse_size("MAX_STORE_BYTES", raw) == expected


def test_fetch_deadline_and_tile_max_age_reach_the_tiles_phase_as_given() -> None:
    s = load_settings({"FETCH_DEADLINE": "2h", "TILE_MAX_AGE": "30d"}, ENV)
    assert s.http["FETCH_DEADLINE"] == "2h" and s.http["TILE_MAX_AGE"] == "30d"
    assert "TILE_MAX_AGE" not in load_settings({}, ENV).http

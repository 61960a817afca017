"""The tile-acquisition variables: validated in cachebuild.inputs.config, passed to the
tiles task, and part of its dependencies exactly when they change the tiles."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

from cachebuild.errors import UsageError
from cachebuild.inputs.config import VARIABLES, load_settings

ENV = {"CACHEBUILD_HOME": "/tmp/cb-home"}
TOKEN = "tok-abcdef-123456"


def tiles_task(vars: dict[str, str], env: dict[str, str] | None = None) -> dict[str, Any]:
    import targets.tiles

    s = load_settings(vars, {**ENV, **(env or {})})
    plan = types.SimpleNamespace(
        settings=s, paths=s.paths, bbox=(8.5, 47.3, 8.6, 47.4), provider_key=s.provider
    )
    return targets.tiles.task(plan)


def dependency(task: dict[str, Any]) -> dict[str, Any]:
    return task["uptodate"][0].config


def test_new_variables_are_known() -> None:
    for name in ("RATE_LIMIT", "SUBDOMAINS", "NODATA", "NODATA_SHA256"):
        assert name in VARIABLES


@pytest.mark.parametrize(
    "vars, needle",
    [
        ({"RATE_LIMIT": "fast"}, "RATE_LIMIT"),
        ({"RATE_LIMIT": "-2"}, "RATE_LIMIT"),
        ({"SUBDOMAINS": "a,,b"}, "SUBDOMAINS"),
        ({"NODATA": "white"}, "NODATA"),
        ({"NODATA_SHA256": "123"}, "NODATA_SHA256"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(vars: dict[str, str], needle: str) -> None:
    with pytest.raises(UsageError, match=needle) as info:
        load_settings(vars, ENV)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "name, env_name",
    [("HTTP_HEADERS", "CACHEBUILD_HTTP_HEADERS"), ("API_KEY", "CACHEBUILD_API_KEY")],
)
def test_secrets_on_the_command_line_are_refused_without_echo(name: str, env_name: str) -> None:
    with pytest.raises(UsageError, match=env_name) as info:
        load_settings({name: f"Authorization: Bearer {TOKEN}"}, ENV)
    assert TOKEN not in str(info.value)


def test_malformed_headers_in_the_environment_are_refused_early() -> None:
    with pytest.raises(UsageError, match="CACHEBUILD_HTTP_HEADERS") as info:
        load_settings({}, {**ENV, "CACHEBUILD_HTTP_HEADERS": f"Authorization Bearer {TOKEN}"})
    assert TOKEN not in str(info.value)
    load_settings({}, {**ENV, "CACHEBUILD_HTTP_HEADERS": f"Authorization: Bearer {TOKEN}"})


def test_settings_carry_the_values() -> None:
    s = load_settings(
        {
            "RATE_LIMIT": "5",
            "SUBDOMAINS": "a,b",
            "NODATA": "Uniform",
            "NODATA_SHA256": ("CD" * 32) + "," + "ab" * 32,
        },
        {**ENV, "CACHEBUILD_HTTP_RETRIES": "1"},
    )
    assert s.http == {"RATE_LIMIT": "5", "SUBDOMAINS": "a,b", "HTTP_RETRIES": "1"}
    assert s.nodata == {"NODATA": "uniform", "NODATA_SHA256": "ab" * 32 + "," + "cd" * 32}
    assert load_settings({"NODATA": "off"}, ENV).nodata == {}


def test_the_tiles_task_gets_them_and_depends_on_what_changes_tiles() -> None:
    base = tiles_task({})
    kwargs = base["actions"][0][2]
    assert kwargs["nodata"] == {} and kwargs["http"] == {}
    assert "nodata" not in dependency(base) and "source" not in dependency(
        base
    )  # older states stay valid

    # how tiles are asked for: not a dependency
    polite = tiles_task(
        {"RATE_LIMIT": "2", "SUBDOMAINS": "x,y", "HTTP_RETRIES": "9"},
        {"CACHEBUILD_HTTP_HEADERS": f"Authorization: Bearer {TOKEN}"},
    )
    assert dependency(polite) == dependency(base)
    assert polite["actions"][0][2]["http"]["RATE_LIMIT"] == "2"
    assert TOKEN not in repr(polite)  # the token never goes through doit

    # which tiles end up in the cache: a dependency
    blank = tiles_task({"NODATA": "uniform"})
    assert dependency(blank)["nodata"] == {"NODATA": "uniform"}
    assert blank["actions"][0][2]["nodata"] == {"NODATA": "uniform"}


def test_local_sources_are_stamped(tmp_path: Path) -> None:
    tree = tmp_path / "tiles" / "17" / "1"
    tree.mkdir(parents=True)
    first = dependency(tiles_task({"PROVIDER": str(tmp_path / "tiles")}))["source"]
    (tree / "2.png").write_bytes(b"x")
    assert dependency(tiles_task({"PROVIDER": str(tmp_path / "tiles")}))["source"] != first
    tif = tmp_path / "o.tif"
    tif.write_bytes(b"x")
    assert dependency(tiles_task({"PROVIDER": str(tif)}))["source"].startswith(f"geotiff:{tif}:1:")

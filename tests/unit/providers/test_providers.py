"""Tests for cachebuild.providers (the package and its XYZ provider), against
the real HTTP server of tests/_harness/tileserver.py on 127.0.0.1.

Local providers are in test_providers_local.py, the GeoTIFF cutter in
test_providers_geotiff.py.
"""

from __future__ import annotations

import doctest
import io
import traceback
import types
from contextlib import closing
from typing import Any

import pytest
from PIL import Image

from cachebuild import __version__, providers
from cachebuild.errors import EXIT_USAGE, CacheBuildError, DownloadError, UsageError
from cachebuild.providers import base, geotiff, local, open_provider, provider_kind, pushed
from cachebuild.providers import xyz as xyz_module
from cachebuild.providers.base import (
    USER_AGENT,
    Provider,
    TileFetchError,
    check_image,
    template_placeholders,
)
from cachebuild.providers.local import SyntheticProvider
from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.providers.xyz import XyzProvider
from cachebuild.providers.xyzconfig import API_KEY_ENV, HttpConfig
from cachebuild.tilemath import Tile
from tests._harness.surface import defined_names
from tests._harness.tileserver import (
    KEY,
    KEY_FORMS,
    TileServer,
    tile_bytes,
)

T = Tile(68645, 45903, 17)
TOKEN = "tok-9f8e7d6c5b4a-secret"


def fast_env(**extra: str) -> dict[str, str]:
    """The key, and retries with no waiting."""
    return {
        API_KEY_ENV: KEY,
        "HTTP_BACKOFF": "0",
        "HTTP_RETRIES": "2",
        "HTTP_TIMEOUT": "5",
        **extra,
    }


def xyz(server: TileServer, **config: Any) -> XyzProvider:
    cfg = {"retries": 2, "backoff_s": 0.0, "timeout_s": 5.0, **config}
    return XyzProvider(server.template(), api_key=KEY, config=HttpConfig(**cfg))


def assert_no_key(text: str) -> None:
    for form in KEY_FORMS:
        assert form not in text


def full_text(exc: BaseException) -> str:
    """Everything an operator could see of an exception: message, traceback, causes."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(vars(exc))


def public_names(mod: types.ModuleType) -> set[str]:
    """The public names a module defines itself (not the ones it imports), read from its source."""
    return {n for n in defined_names(mod) if not n.startswith("_") and n != "TYPE_CHECKING"}


# ------------------------------------------------------------------ module


@pytest.mark.parametrize(
    "mod", [base, xyz_module, local, geotiff, pushed], ids=lambda m: m.__name__
)
def test_all_is_complete(mod: types.ModuleType) -> None:
    assert set(mod.__all__) == public_names(mod)


def test_the_package_exports_its_own_names_and_the_providers() -> None:
    own = public_names(providers)
    assert own <= set(providers.__all__)
    for name in providers.__all__:
        assert hasattr(providers, name), name
    for cls in (
        "SyntheticProvider",
        "XyzProvider",
        "MBTilesProvider",
        "DirectoryProvider",
        "GeoTiffProvider",
    ):
        assert cls in providers.__all__


@pytest.mark.parametrize(
    "mod", [providers, base, xyz_module, local, geotiff], ids=lambda m: m.__name__
)
def test_doctests(mod: types.ModuleType) -> None:
    assert doctest.testmod(mod).failed == 0


def test_modules_stay_small() -> None:
    from pathlib import Path

    for path in Path(providers.__file__).parent.glob("*.py"):
        assert len(path.read_text().splitlines()) < 600, path


def test_user_agent_names_the_version() -> None:
    assert USER_AGENT == f"cachebuild/{__version__} (+https://example.invalid/cachebuild)"


# ------------------------------------------------------------------ specs


def test_synthetic_is_the_default(server: TileServer) -> None:
    for spec in ("synthetic", "", "  synthetic "):
        p = open_provider(spec, env={})
        assert isinstance(p, SyntheticProvider)
        assert isinstance(p, Provider)
        assert p.identity == "synthetic:v1"
        assert p.concurrency >= 1
        assert p.fetch(T) == synthetic_tile_bytes(T)
        p.close()


@pytest.mark.parametrize(
    "spec", ["ftp://host/{z}/{x}/{y}", "no-such-dir/", "bing", "C:/maps/area.sqlite"]
)
def test_unknown_spec_lists_the_accepted_forms(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        open_provider(spec, env={})
    text = str(info.value)
    assert repr(spec) in text
    for form in ("synthetic", "http", "{z}", "{s}", ".mbtiles", "dir:", "GeoTIFF"):
        assert form in text
    assert info.value.exit_code == EXIT_USAGE


def test_unknown_spec_does_not_echo_the_key() -> None:
    with pytest.raises(UsageError) as info:
        open_provider(f"htps://host/{{z}}/{{x}}/{{y}}?key={KEY}", env={API_KEY_ENV: KEY})
    assert_no_key(full_text(info.value))


def test_identity_is_the_template_without_the_key(server: TileServer) -> None:
    with closing(open_provider(server.template(), env=fast_env())) as p:
        assert isinstance(p, XyzProvider)
        assert isinstance(p, Provider)
        assert p.identity == "xyz:" + server.template()
        assert "{key}" in p.identity
        assert_no_key(p.identity)


@pytest.mark.parametrize(
    "template, names",
    [
        ("https://t/{z}/{x}/{y}.png", {"z", "x", "y"}),
        ("https://t/{z}/{x}/{-y}.png", {"z", "x", "-y"}),
        ("https://t/a{q}.jpeg?g=1&k={key}", {"q", "key"}),
    ],
)
def test_template_placeholders(template: str, names: set[str]) -> None:
    assert template_placeholders(template) == names


@pytest.mark.parametrize(
    "template, message",
    [
        ("/{z}/{x}/{y}.jpg?t={t}", "{t}"),
        ("/{z}/{x}/{y}.jpg?{KEY}", "{KEY}"),
        ("/{z}/{x}/{y}.jpg?r={r}&v={ver}", "{r}, {ver}"),
        ("/{z}/{x}/{y.jpg", "unbalanced"),
        ("/{z}/{x}/tile.jpg", "names no tile"),
    ],
)
def test_bad_templates_are_refused_before_any_request(
    server: TileServer, template: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}")):
        open_provider(f"http://127.0.0.1:{server.port}{template}", env=fast_env())
    assert server.count() == 0


def test_key_placeholder_without_the_variable_is_refused(server: TileServer) -> None:
    with pytest.raises(UsageError, match=API_KEY_ENV):
        open_provider(server.template(), env={})
    with pytest.raises(UsageError, match=API_KEY_ENV):
        open_provider(server.template(), env={API_KEY_ENV: ""})
    assert server.count() == 0


def test_a_key_written_into_the_template_is_refused(server: TileServer) -> None:
    for form in KEY_FORMS:
        with pytest.raises(UsageError, match=r"\{key\}") as info:
            open_provider(server.template(query=f"?key={form}"), env=fast_env())
        assert_no_key(full_text(info.value))
    assert server.count() == 0


def test_a_template_without_a_host_is_refused() -> None:
    with pytest.raises(UsageError, match="host"):
        open_provider("http:///{z}/{x}/{y}.png", env={})


def test_http_settings_from_the_environment() -> None:
    cfg = HttpConfig.from_env({})
    assert (cfg.timeout_s, cfg.retries, cfg.backoff_s) == (20.0, 3, 0.2)
    cfg = HttpConfig.from_env({"HTTP_TIMEOUT": "2.5", "HTTP_RETRIES": "0", "HTTP_BACKOFF": "0.01"})
    assert (cfg.timeout_s, cfg.retries, cfg.backoff_s) == (2.5, 0, 0.01)
    for name, bad in [
        ("HTTP_TIMEOUT", "soon"),
        ("HTTP_TIMEOUT", "0"),
        ("HTTP_RETRIES", "1.5"),
        ("HTTP_RETRIES", "-1"),
        ("HTTP_BACKOFF", "nan"),
    ]:
        with pytest.raises(UsageError, match=name):
            HttpConfig.from_env({name: bad})


@pytest.mark.parametrize(
    "spec, kind",
    [
        ("synthetic", "synthetic"),
        ("HTTPS://t.example/{z}/{x}/{y}.png", "xyz"),
        ("/data/a.MBTiles", "mbtiles"),
        ("/data/ortho.tif", "geotiff"),
        ("geotiff:/data/ortho.vrt", "geotiff"),
        ("dir:/data/tiles", "dir"),
        ("/data/tiles/{z}/{x}/{-y}.png", "dir"),
        ("file:///data/{z}/{x}/{y}.png", "unknown"),
        ("pushed:/srv/cachebuild/pushed/abc", "pushed"),
    ],
)
def test_provider_kind(spec: str, kind: str) -> None:
    assert provider_kind(spec) == kind


# ------------------------------------------------------------------ images


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_check_image() -> None:
    assert check_image(tile_bytes(T)) is None
    assert check_image(_png(512), None) is None
    assert check_image(_png(512)) == "image is 512x512, not 256x256"
    assert check_image(b"") == "empty body"
    assert (check_image(tile_bytes(T)[:-200]) or "").startswith("broken image")


def test_every_error_is_a_cachebuild_error() -> None:
    assert issubclass(TileFetchError, DownloadError)
    assert issubclass(DownloadError, CacheBuildError)

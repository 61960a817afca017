"""The tiles phase end to end: real `doit build-cache` processes against the real
tile server of tests/_harness/tileserver.py, counting what it served server-side."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cachebuild.inputs.flight import flight_area, load_flight_file
from cachebuild.store.objects import TileStore, sha256_hex
from cachebuild.tilemath import LngLatBbox, Tile, tiles
from tests._harness.procs import sigkill_when
from tests._harness.tileserver import DROP, DROP_MID_BODY, HTML, TRUNCATED, Reply, Slow, too_many
from tests.conftest import Cb, TileServer, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17")
WIDE = ("BUFFER_M=1000", "ZOOM=17")  # ~120 tiles
TOKEN = "tok-Zq81-very-secret-bearer"
API_KEY = "sk-e2e-4f9a2c-secret"


def planned(flight: Path, buffer_m: float) -> list[Tile]:
    return list(tiles(flight_area(load_flight_file(flight), buffer_m), [17]))


def summary_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("tiles: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_sigkill_mid_download_then_restart_fetches_each_tile_once(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    wanted = planned(f, 1000)
    tile_server.latency_s = 0.02
    args = (f"FLIGHT={f}", *WIDE, f"PROVIDER={tile_server.template()}", "CONCURRENCY=2")
    p = cb.popen("build-cache", *args)
    sigkill_when(p, lambda: sum(tile_server.served_ok.values()) >= 25, timeout_s=60)
    served_before = sum(tile_server.served_ok.values())
    assert 25 <= served_before < len(wanted)
    tile_server.latency_s = 0.0

    requests_before = len(tile_server.requests)
    r = cb.build(*args)
    assert r.code == 0, r.stderr
    t = r.report["tiles"]
    assert t["planned"] == len(wanted) and t["missing"] == 0
    # what was on the wire at the kill (2 requests) is all that is asked for twice
    assert (
        len(tile_server.requests) - requests_before
        == t["fetched"]
        <= len(wanted) - served_before + 2
    )
    assert t["reused"] >= served_before - 2
    assert all(tile_server.served(x) <= 2 for x in wanted)
    assert sum(tile_server.served_ok.values()) <= len(wanted) + 2
    assert list((cb.home / "store" / "tmp").iterdir()) == []
    assert cb.run("verify-cache").code == 0


def test_two_builds_on_different_caches_fetch_one_area_at_once(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    wanted = planned(f, 1000)
    tile_server.latency_s = 0.005
    args = (f"FLIGHT={f}", *WIDE, f"PROVIDER={tile_server.template()}")
    procs = [cb.popen("build-cache", *args, f"CACHE_DIR={tmp_path / name}") for name in ("a", "b")]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    a, b = reports
    assert a["tiles"]["planned"] == b["tiles"]["planned"] == len(wanted)
    assert a["tiles"]["missing"] == b["tiles"]["missing"] == 0
    assert all(1 <= tile_server.served(x) <= 2 for x in wanted)
    for name in ("a", "b"):
        v = cb.run("verify-cache", f"CACHE_DIR={tmp_path / name}")
        assert v.code == 0, v.stderr
    ts = [json.loads((tmp_path / n / "current" / "tileset.json").read_text()) for n in ("a", "b")]
    assert ts[0]["aggregate_sha256"] == ts[1]["aggregate_sha256"]
    with TileStore(cb.home / "store") as store:
        for obj in store.iter_objects():
            assert sha256_hex(obj.read_bytes()) == obj.name
        assert list(store.tmp.iterdir()) == [] and list(store.journals.iterdir()) == []


def test_a_hostile_server_loses_nothing_and_stores_nothing_bad(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    wanted = planned(f, 1000)
    for i, fault in enumerate(
        (DROP, DROP_MID_BODY, TRUNCATED, HTML, too_many("0"), Reply(500), Reply(503), Slow(3.0))
    ):
        tile_server.fault_rate(fault, 0.03, seed=i)
    r = cb.build(
        f"FLIGHT={f}",
        *WIDE,
        f"PROVIDER={tile_server.template()}",
        "HTTP_TIMEOUT=1",
        "HTTP_BACKOFF=0.01",
        "HTTP_RETRIES=5",
    )
    assert r.code == 0, r.stderr
    assert r.report["tiles"]["fetched"] == len(wanted)
    retries = len(tile_server.requests) - len(wanted)
    assert retries > 0
    line = summary_line(r.stderr)
    assert line.startswith(
        f"tiles: {len(wanted)} planned, {len(wanted)} fetched, 0 reused, 0 missing, {retries} retries"
    )
    assert all(tile_server.served(x) == 1 for x in wanted)
    from tests._harness.tileserver import tile_bytes

    with TileStore(cb.home / "store") as store:
        assert {o.name for o in store.iter_objects()} == {sha256_hex(tile_bytes(x)) for x in wanted}


def test_retries_run_out_exit_20_naming_the_count_and_a_tile(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    bad = sorted(planned(f, 200))[2]
    tile_server.script(bad, *[Reply(502)] * 3)
    r = cb.build(
        f"FLIGHT={f}",
        *SMALL,
        f"PROVIDER={tile_server.template()}",
        "HTTP_RETRIES=2",
        "HTTP_BACKOFF=0",
    )
    assert r.code == 20
    rep = r.report
    assert rep["failure_phase"] == "tiles"
    assert rep["error"].startswith("1 tile(s) could not be fetched; e.g. tile ")
    assert f"{bad.z}/{bad.x}/{bad.y}: HTTP 502 after 3 attempt(s)" in rep["error"]
    assert "1 failed" in summary_line(r.stderr)
    # fixed: the rest was kept, only that tile is asked for
    before = len(tile_server.requests)
    again = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template()}")
    assert again.code == 0, again.stderr
    assert len(tile_server.requests) - before == 1


def test_bad_template_exit_2_names_the_placeholder_and_asks_nothing(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template('?v={version}')}")
    assert r.code == 2
    assert "{version}" in r.report["error"]
    assert tile_server.requests == []


def test_bearer_token_and_key_never_show_anywhere(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    tile_server.key = API_KEY
    tile_server.require_headers = {"Authorization": f"Bearer {TOKEN}"}
    env = cb.env(
        CACHEBUILD_API_KEY=API_KEY, CACHEBUILD_HTTP_HEADERS=f"Authorization: Bearer {TOKEN}"
    )
    template = tile_server.template("?key={key}")
    ok = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={template}", env=env)
    assert ok.code == 0, ok.stderr
    tile_server.require_headers = {"Authorization": "Bearer another"}
    refused = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={template}&v=2", env=env)
    assert refused.code == 20
    assert "refused the credentials" in refused.report["error"]
    assert "CACHEBUILD_HTTP_HEADERS" in refused.report["remedy"]
    on_cmdline = cb.build(f"FLIGHT={f}", *SMALL, f"HTTP_HEADERS=Authorization: Bearer {TOKEN}")
    assert on_cmdline.code == 2 and "environment only" in on_cmdline.report["error"]
    for r in (ok, refused, on_cmdline):
        for secret in (TOKEN, API_KEY):
            assert secret not in r.stdout and secret not in r.stderr
    for path in cb.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and API_KEY.encode() not in data, path


def test_nodata_rebuilds_tiles_politeness_settings_do_not(
    cb: Cb, tmp_path: Path, tile_server: TileServer
) -> None:
    import io

    from PIL import Image

    f = write_flight(tmp_path / "f.json")
    wanted = sorted(planned(f, 200))
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (250, 250, 250)).save(buf, format="JPEG")
    tile_server.script(wanted[0], Reply(200, buf.getvalue(), {"Content-Type": "image/jpeg"}))
    base = (f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template()}")
    assert cb.build(*base).code == 0
    polite = cb.build(*base, "RATE_LIMIT=50", "CONCURRENCY=3", "HTTP_RETRIES=5")
    assert polite.code == 0 and polite.report["outcome"] == "up_to_date"
    blank = cb.build(*base, "NODATA=uniform", "STRICT=0")
    assert blank.code == 0, blank.stderr
    assert "tiles" in blank.report["tasks"]["run"]
    assert blank.report["tiles"]["missing"] == 1
    assert any("1 of" in w and "missing" in w for w in blank.report["warnings"])


def _ortho(tmp_path: Path, flight: Path) -> Path:
    """A GeoTIFF in UTM 32N over the flight's area, with a pattern."""
    rasterio = pytest.importorskip("rasterio", reason="the GeoTIFF provider needs rasterio")
    import numpy as np
    from affine import Affine
    from rasterio.warp import transform

    area: LngLatBbox = flight_area(load_flight_file(flight), 300)
    xs, ys = transform("EPSG:4326", "EPSG:32632", [area.west, area.east], [area.north, area.south])
    e0, n0, res = xs[0] - 50, ys[0] + 50, 1.0
    w, h = int((xs[1] - xs[0]) / res) + 100, int((ys[0] - ys[1]) / res) + 100
    yy, xx = np.mgrid[0:h, 0:w]
    data = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256]).astype("uint8")
    path = tmp_path / "ortho.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=3,
        dtype="uint8",
        crs="EPSG:32632",
        transform=Affine(res, 0.0, e0, 0.0, -res, n0),
    ) as ds:
        ds.write(data)
    return path


def test_a_geotiff_orthophoto_builds_a_cache_gdal_reads(cb: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    ortho = _ortho(tmp_path, f)
    r = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={ortho}")
    assert r.code == 0, r.stderr
    t = r.report["tiles"]
    assert t["fetched"] == t["planned"] == len(planned(f, 200)) and t["missing"] == 0
    assert cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={ortho}").report["outcome"] == "up_to_date"
    mbtiles = cb.current / "tiles.mbtiles"
    exe = shutil.which("gdalinfo")
    if exe is None:
        pytest.skip("gdalinfo (GDAL) is not installed")
    info = subprocess.run([exe, str(mbtiles)], capture_output=True, text=True, check=True).stdout
    assert "Driver: MBTiles/MBTiles" in info
    size = re.search(r"Size is (\d+), (\d+)", info)
    assert size is not None
    # the raster spans the bounds metadata (the flight's area) at zoom 17
    area = flight_area(load_flight_file(f), 200)
    world = 2**17 * 256

    def merc_y(lat: float) -> float:
        s = math.sin(math.radians(lat))
        return (0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)) * world

    assert abs(int(size.group(1)) - (area.east - area.west) / 360 * world) <= 2
    assert abs(int(size.group(2)) - (merc_y(area.south) - merc_y(area.north))) <= 2


def test_a_directory_of_tiles_is_a_provider(cb: Cb, tmp_path: Path) -> None:
    from tests._harness.tileserver import tile_bytes

    f = write_flight(tmp_path / "f.json")
    wanted = planned(f, 200)
    for x in wanted[1:]:
        path = tmp_path / "tree" / str(x.z) / str(x.x) / f"{(1 << x.z) - 1 - x.y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tile_bytes(x))
    spec = f"dir:{tmp_path / 'tree'}/{{z}}/{{x}}/{{-y}}.jpg"
    r = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={spec}", "STRICT=0")
    assert r.code == 0, r.stderr
    assert r.report["tiles"]["missing"] == 1
    # the missing tile appears in the tree: the tiles task sees the change
    x = wanted[0]
    (tmp_path / "tree" / str(x.z) / str(x.x) / f"{(1 << x.z) - 1 - x.y}.jpg").write_bytes(
        tile_bytes(x)
    )
    r2 = cb.build(f"FLIGHT={f}", *SMALL, f"PROVIDER={spec}")
    assert r2.code == 0, r2.stderr
    assert "tiles" in r2.report["tasks"]["run"] and r2.report["tiles"]["missing"] == 0

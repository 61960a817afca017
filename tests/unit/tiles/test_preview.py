"""The coverage map and cache-info, on real published caches."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachebuild.tilemath import tile_from_id
from cachebuild.tiles.preview import MISSING_RGB, ORIGIN_RGB, ROUTE_RGB, render_preview
from tests.conftest import Cb, write_flight

WPS = [(47.3700, 8.5400), (47.3730, 8.5440), (47.3715, 8.5470)]


@pytest.fixture
def holey_cache(cb: Cb, tmp_path: Path, tile_server) -> tuple[Cb, Path, list]:
    from cachebuild.inputs.flight import flight_area, load_flight_file
    from cachebuild.tilemath import tiles

    f = write_flight(
        tmp_path / "f.json",
        waypoints=WPS,
        origin=(47.3702, 8.5401),
        flight_id="0f0f0f0f-1111-4111-8111-111111111111",
    )
    planned = sorted(tiles(flight_area(load_flight_file(f), 200), [17]))
    holes = [planned[0], planned[len(planned) // 2]]
    tile_server.missing = {(t.z, t.x, t.y) for t in holes}
    r = cb.build(f"FLIGHT={f}", "BUFFER_M=200", f"PROVIDER={tile_server.template()}", "STRICT=0")
    assert r.code == 0, r.stderr
    assert r.report["tiles"]["missing"] == 2
    return cb, f, holes


def _region(img: np.ndarray, box: tuple[int, int, int, int], inset: int = 2) -> np.ndarray:
    left, top, right, bottom = box
    return img[top + inset : bottom - inset, left + inset : right - inset]


@pytest.mark.parametrize(
    "size, mode",
    [
        (1024, "decoded"),  # a few large tiles: each decoded at its box size
        (150, "thumbnails"),  # 30 px a tile, as a 1,200-tile cache at 1024 px: from thumbnails
    ],
)
def test_preview_shows_holes_imagery_and_route(
    holey_cache, tmp_path: Path, size: int, mode: str
) -> None:
    cb, f, holes = holey_cache
    release = cb.current.resolve()
    out = tmp_path / "preview.png"
    store = tmp_path / "store"
    r = render_preview(release, out, size=size, store=store)
    geo = r["geometry"]
    assert r["mode"] == mode
    with Image.open(out) as im:
        img = np.asarray(im.convert("RGB")).astype(int)
    assert img.shape[1] == r["width"] and r["missing"] == 2 and r["present"] == r["planned"] - 2
    if mode == "thumbnails":
        # made once per image and kept; the next preview reuses them and draws the same map
        assert r["thumbnails_made"] == r["present"] and r["thumbnails_reused"] == 0
        again = render_preview(release, tmp_path / "again.png", size=size, store=store)
        assert again["thumbnails_made"] == 0 and again["thumbnails_reused"] == r["present"]
        assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
        # a few missing (new tiles of a shifted area): only those are decoded, by indexed lookup
        from cachebuild.store.thumbs import ThumbStore

        with ThumbStore(store) as ts:
            shas = np.ascontiguousarray(np.load(release / "tiles.npy")["sha256"][:2]).view(np.uint8)
            assert (
                ts.drop(bytes(shas[k * 32 : (k + 1) * 32]) for k in range(2)) == 2
            )  # not .tolist(): it strips NULs
        third = render_preview(release, tmp_path / "third.png", size=size, store=store)
        assert third["thumbnails_made"] == 2 and third["thumbnails_reused"] == r["present"] - 2
        assert (tmp_path / "third.png").read_bytes() == out.read_bytes()
    else:
        assert r["thumbnails_made"] == r["thumbnails_reused"] == 0

    # missing tiles: the red hatch
    for t in holes:
        region = _region(img, geo.tile_box(t.x, t.y))
        red = np.all(np.abs(region - np.array(MISSING_RGB)) < 40, axis=-1).mean()
        assert red > 0.2, f"no hatch at {t}"

    # present tiles: their own pixels, downsampled (those clear of the north
    # arrow, top right, and the scale bar, bottom left: at 150 px they cover tiles)
    conn = sqlite3.connect(release / "tiles.mbtiles")
    ids = np.load(release / "tiles.npy")["id"]
    checked = 0
    for tid in ids.tolist():
        t = tile_from_id(tid)
        box = geo.tile_box(t.x, t.y)
        if (box[2] > geo.width - 36 and box[1] < 52) or (
            box[0] < geo.width / 5 + 20 and box[3] > geo.height - 36
        ):
            continue
        (data,) = conn.execute(
            "SELECT tile_data FROM tiles WHERE zoom_level=? AND tile_column=? AND tile_row=?",
            (t.z, t.x, 2**t.z - 1 - t.y),
        ).fetchone()
        with Image.open(io.BytesIO(data)) as tile_img:
            own = np.asarray(
                tile_img.convert("RGB").resize((box[2] - box[0], box[3] - box[1]))
            ).astype(int)
        shown = img[box[1] : box[3], box[0] : box[2]]
        # overlays (route, bbox) may cover a few pixels: compare the median difference
        assert np.median(np.abs(shown - own)) < 12, f"tile {t} does not show its imagery"
        # and the comparison can tell: the same tile shifted by half is far off
        assert np.median(np.abs(shown - np.roll(own, own.shape[0] // 2, axis=(0, 1)))) > 20
        checked += 1
    conn.close()
    assert checked >= 6

    # the route: its waypoints' projected pixels are the route colour (or, under
    # the takeoff marker, drawn last, the origin's)
    record = json.loads((release / "flight.json").read_text())
    ox, oy = geo.project(record["takeoff_origin"]["lat"], record["takeoff_origin"]["lon"])
    on_route = 0
    for w in record["waypoints"]:
        x, y = geo.project(w["lat"], w["lon"])
        px = img[int(round(y)), int(round(x))]
        want = ORIGIN_RGB if abs(x - ox) < 7 and abs(y - oy) < 7 else ROUTE_RGB
        on_route += want == ROUTE_RGB
        assert np.all(np.abs(px - np.array(want)) < 60), (w, px)
    assert on_route >= 2
    ox_px = img[int(round(oy)), int(round(ox))]
    assert np.all(np.abs(ox_px - np.array(ORIGIN_RGB)) < 60), ox_px


def test_kept_cells_draw_the_same_map_and_only_changed_tiles_are_looked_up(
    holey_cache, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    from cachebuild.store.thumbs import ThumbStore
    from cachebuild.tiles.preview import CELLS_FILE

    cb, _, _ = holey_cache
    cache = tmp_path / "cache"
    shutil.copytree(cb.current.resolve(), cache)  # writable: its tiles.npy is changed below
    store, kept = tmp_path / "store", tmp_path / "kept"
    kept.mkdir()
    asked: list[int] = []
    real_lookup = ThumbStore.lookup
    monkeypatch.setattr(
        ThumbStore,
        "lookup",
        lambda self, d: asked.append(len(d := list(d))) or real_lookup(self, d),
    )

    def draw(name: str, cells: bool) -> tuple[dict, bytes]:
        asked.clear()
        r = render_preview(
            cache, tmp_path / name, size=150, store=store, cells_dir=kept if cells else None
        )
        return r, (tmp_path / name).read_bytes()

    first, png = draw("first.png", True)
    assert (
        first["mode"] == "thumbnails"
        and sum(asked) == first["present"]
        and (kept / CELLS_FILE).exists()
    )
    again, png2 = draw("again.png", True)
    assert sum(asked) == 0 and png2 == png and again["present"] == first["present"]
    # two tiles now show each other's image (a changed tile, as after a new fetch): only they are looked up
    tiles = np.load(cache / "tiles.npy")
    tiles["sha256"][[0, 3]] = tiles["sha256"][[3, 0]]
    np.save(cache / "tiles.npy", tiles)
    _, swapped = draw("swapped.png", True)
    assert sum(asked) == 2
    _, fresh = draw("fresh.png", False)
    assert swapped == fresh != png
    # a damaged file is not used: everything is looked up again, the same map
    data = bytearray((kept / CELLS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (kept / CELLS_FILE).write_bytes(bytes(data))
    _, damaged = draw("damaged.png", True)
    assert sum(asked) == first["present"] and damaged == fresh


@pytest.mark.parametrize("size", [1024, 150])
def test_an_undecodable_tile_is_named(holey_cache, tmp_path: Path, size: int) -> None:
    import shutil

    from cachebuild.errors import BuildError

    cb, _, _ = holey_cache
    copy = tmp_path / "copy"
    shutil.copytree(cb.current.resolve(), copy)
    t = tile_from_id(int(np.load(copy / "tiles.npy")["id"][3]))
    conn = sqlite3.connect(copy / "tiles.mbtiles")
    conn.execute(
        "UPDATE tiles SET tile_data = ? WHERE zoom_level=? AND tile_column=? AND tile_row=?",
        (b"<html>503</html>", t.z, t.x, 2**t.z - 1 - t.y),
    )
    conn.commit()
    conn.close()
    with pytest.raises(BuildError) as err:
        render_preview(copy, tmp_path / "p.png", size=size, store=tmp_path / "store")
    assert f"z={t.z} x={t.x} y={t.y}" in err.value.message and err.value.phase == "preview"
    assert not (tmp_path / "p.png").exists()


def test_preview_cache_command_and_cache_info(holey_cache, tmp_path: Path) -> None:
    cb, f, holes = holey_cache
    out = tmp_path / "p.png"
    p = cb.run("preview-cache", f"OUT={out}")
    assert p.code == 0, p.stderr
    with Image.open(out) as im:
        assert im.size[0] > 100

    info = cb.run("cache-info")
    assert info.code == 0, info.stderr
    d = info.report["cache"]
    signed = json.loads((cb.current / "manifest.json").read_text())["signed"]
    assert d["build_id"] == signed["build_id"] == info.report["build_id"]
    assert d["manifest_version"] == signed["version"] and d["expires"] == signed["expires"]
    assert d["tiles"] == signed["info"]["tiles"]
    assert d["tiles_per_zoom"]["17"]["missing"] == 2
    assert d["artifacts"]["tiles.mbtiles"] == signed["targets"]["tiles.mbtiles"]["length"]
    assert d["verify"] == {"ok": True, "reason": None}

    text = cb.run("cache-info", "REPORT=text")
    assert "passes" in text.stdout and signed["build_id"] in text.stdout

    # tamper: cache-info says it does not verify, and why
    target = cb.current / "descriptors.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.unlink()
    target.write_bytes(bytes(data))
    bad = cb.run("cache-info")
    assert bad.report["cache"]["verify"]["ok"] is False
    assert "descriptors.npy" in bad.report["cache"]["verify"]["reason"]


def test_cache_info_without_a_cache(cb: Cb) -> None:
    r = cb.run("cache-info")
    assert r.code == 2 and "no published cache" in r.report["error"]


# -- thumbnails made by describe: the preview stage of a build decodes nothing ----

#: A build in-process, counting the images Pillow decodes in the preview
#: action and elsewhere (every decode goes through ImageFile.load, with the
#: image's undecoded data in ``tile``).
DECODE_PROBE = """
import json, sys, threading
from PIL import ImageFile
from targets import actions
from cachebuild.cli.console import main

counts = {"preview": 0, "other": 0}
where = {"preview": False}
lock = threading.Lock()
real_load, real_preview = ImageFile.ImageFile.load, actions.preview

def load(self):
    if self.tile:  # image data still to decode (empty once loaded)
        with lock:
            counts["preview" if where["preview"] else "other"] += 1
    return real_load(self)

def preview(**kw):
    where["preview"] = True
    try:
        return real_preview(**kw)
    finally:
        where["preview"] = False

ImageFile.ImageFile.load = load
actions.preview = preview
code = main(sys.argv[1:])
print(json.dumps({"code": code, **counts}))
"""

#: A long thin area (about 40 x 1 tiles at z17): at 1024 px a tile spans < 32
#: px, so the map is drawn from thumbnails, as for a 10k-tile cache.
LONG_WPS = [(47.3700, 8.5400), (47.3700, 8.6500)]
LONG = ("BUFFER_M=40", "ZOOM=17", "SELFTEST_QUERIES=20")


def _probe_build(cb: Cb, *args: str) -> dict:
    import subprocess
    import sys

    from tests.conftest import REPO

    p = subprocess.run(
        [sys.executable, "-c", DECODE_PROBE, "build-cache", *args, "REPORT=json"],
        cwd=REPO, env=cb.env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert lines, p.stderr
    counts = json.loads(lines[-1])
    assert counts["code"] == 0, p.stderr
    return {**counts, "report": json.loads(lines[-2])}


def _digests(cache: Path) -> list[bytes]:
    raw = (
        np.ascontiguousarray(np.load(cache / "tiles.npy")["sha256"]).view(np.uint8).reshape(-1, 32)
    )
    return list(dict.fromkeys(r.tobytes() for r in raw))


def test_a_builds_preview_decodes_no_tile_after_describe_and_falls_back_for_reused_descriptors(
    cb: Cb, tmp_path: Path, tile_server
) -> None:
    import shutil

    from cachebuild.store.thumbs import ThumbStore
    from cachebuild.tiles.preview import CELLS_FILE

    f = write_flight(tmp_path / "f.json", waypoints=LONG_WPS, origin=(47.3700, 8.5401))
    args = (f"FLIGHT={f}", *LONG, f"PROVIDER={tile_server.template()}")
    first = _probe_build(cb, *args)
    rep = first["report"]
    n = rep["tiles"]["planned"] - rep["tiles"]["missing"]
    assert rep["descriptors"]["computed"] == n > 32
    assert {"describe", "preview"} <= set(rep["tasks"]["run"])
    assert first["other"] >= n  # the counter sees decodes: describe's, each image once at least
    assert first["preview"] == 0  # the preview used describe's thumbnails, decoding nothing
    store = cb.home / "store"
    with ThumbStore(store) as ts:
        assert ts.present(_digests(cb.current)) == set(_digests(cb.current))
    # it is the thumbnail path that drew this map, and it finds them all
    r = render_preview(cb.current.resolve(), tmp_path / "p.png", store=store)
    assert r["mode"] == "thumbnails" and r["thumbnails_made"] == 0 and r["thumbnails_reused"] == n

    # descriptors reused, thumbnails gone (a store from before them): the preview decodes, once
    shutil.rmtree(store / "thumbs")
    (
        cb.home / "cache" / "state" / "build" / CELLS_FILE
    ).unlink()  # and no cells kept from the last map
    write_flight(
        f,
        waypoints=LONG_WPS,
        origin=(47.3700, 8.5401),
        flight_id="33333333-3333-4333-8333-333333333333",
    )
    moved = _probe_build(cb, *args)
    assert (
        "describe" not in moved["report"]["tasks"]["run"]
        and "preview" in moved["report"]["tasks"]["run"]
    )
    assert moved["preview"] == n and moved["other"] == 0
    with ThumbStore(store) as ts:
        assert ts.present(_digests(cb.current)) == set(_digests(cb.current))


def test_a_second_machine_gets_the_thumbnails_from_the_bucket(tmp_path: Path, tile_server) -> None:
    """STORE=s3://...: thumbnails travel in per-cell batches; machine B decodes nothing for its map."""
    import hashlib
    import secrets

    pytest.importorskip("moto.server")
    from cachebuild.localize.s3desc import _decode_thumbs
    from cachebuild.store.thumbs import ThumbStore
    from tests._harness.s3server import S3Server

    s3 = S3Server(tmp_path, bucket=f"maps-{secrets.token_hex(4)}")
    try:
        f = write_flight(tmp_path / "f.json", waypoints=LONG_WPS)
        args = (
            f"FLIGHT={f}",
            *LONG,
            f"PROVIDER={tile_server.template()}",
            f"STORE=s3://{s3.bucket}/team",
        )
        machines = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            machines.append(Cb(home=tmp_path / name, env_extra=dict(s3.env)))
        a, b = machines
        first = a.build(*args)
        assert first.code == 0, first.stderr
        digests = set(_digests(a.current))
        keys = s3.keys("team/thumbs/")
        assert keys
        in_bucket: set[bytes] = set()
        for key in keys:
            data = s3.read(key)
            assert hashlib.sha256(data).hexdigest() + ".bin" == key.rsplit("/", 1)[1]
            in_bucket |= {d for d, _ in _decode_thumbs(data) or []}
        assert in_bucket == digests

        second = b.build(*args)
        assert second.code == 0, second.stderr
        assert second.report["descriptors"]["computed"] == 0
        assert second.report["store"]["objects_written"] == 0  # nothing pushed again
        store = b.home / "store"
        with ThumbStore(store) as ts:
            assert ts.present(digests) == digests
            with ThumbStore(a.home / "store") as ta:  # the same thumbnails, byte for byte
                assert ts.lookup(digests) == ta.lookup(digests)
        r = render_preview(b.current.resolve(), tmp_path / "b.png", store=store)
        assert (
            r["mode"] == "thumbnails"
            and r["thumbnails_made"] == 0
            and r["thumbnails_reused"] == r["present"]
        )
    finally:
        s3.close()

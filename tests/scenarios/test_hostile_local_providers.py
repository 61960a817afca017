"""Hostile local providers through real doit builds: bounded time, bounded memory, exit 20.

Each attack is a file an operator could be handed: an MBTiles whose
``tiles`` is a view that never ends or makes a 900 MB blob, tiles of
12000x12000 pixels in an MBTiles file or a directory, a FIFO where a tile
file should be, a GeoTIFF far finer than the zoom needs.  The build must
stop with exit 20 and a one-line message, release the lock (the next build
runs), and the doit process's peak RSS (``/usr/bin/time``) stay under 1 GB.
A provider in WAL mode with a change still in ``-wal`` is refused with the
checkpoint command, and the change is used once checkpointed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.tilemath import Tile
from tests.conftest import CbResult, write_flight

ARGS = ("BUFFER_M=200", "ZOOM=17")
#: Generously around the tiles the default flight plans at z17 (x 68644-68646, y 45901-45904).
XS, YS = range(68636, 68656), range(45893, 45913)
GB = 1 << 30
TIME = "/usr/bin/time"


def measured_build(cb: Any, *args: str, timeout: float = 240) -> tuple[CbResult, int]:
    """A real ``doit build-cache``, and its peak RSS in bytes (GNU time's %M)."""
    argv = [
        TIME,
        "-f",
        "maxrss-kb=%M",
        sys.executable,
        "-m",
        "doit",
        "build-cache",
        *args,
        "REPORT=json",
    ]
    p = subprocess.Popen(
        argv,
        cwd=cb.cwd,
        env=cb.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # time and the doit under it
        p.communicate()
        raise AssertionError(f"the build did not end within {timeout} s (it hangs)") from None
    found = re.findall(r"maxrss-kb=(\d+)", err)
    assert found, err
    return CbResult(p.returncode, out, err), int(found[-1]) * 1024


def assert_refused(result: CbResult, rss: int, *, says: str, code: int = 20) -> None:
    assert result.code == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert rss < GB, f"peak RSS {rss / GB:.2f} GiB"


def assert_lock_released(cb: Any, flight: Path) -> None:
    after = cb.build(f"FLIGHT={flight}", *ARGS)  # the synthetic provider: the lock is free
    assert after.code == 0, after.stderr


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 60)).save(buf, "PNG")
    return buf.getvalue()


def mbtiles(path: Path, *statements: str, rows: Any = (), wal: bool = False) -> Path:
    with sqlite3.connect(path) as c:
        if wal:
            c.execute("PRAGMA journal_mode = WAL")
        c.execute("CREATE TABLE metadata (name text, value text)")
        for sql in statements:
            c.execute(sql)
        if rows:
            c.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
    c.close()
    return path


def merc_grid(res_m: float) -> Any:
    """A north-up EPSG:3857 grid of ``res_m`` pixels from the flight's north-west corner."""
    from affine import Affine
    from rasterio.warp import transform

    (x,), (y,) = transform("EPSG:4326", "EPSG:3857", [8.5395], [47.3715])
    return Affine(res_m, 0.0, x, 0.0, -res_m, y)


def grid() -> list[tuple[int, int, int]]:
    return [(17, x, (1 << 17) - 1 - y) for x in XS for y in YS]


@pytest.fixture
def flight(tmp_path: Path) -> Path:
    return write_flight(tmp_path / "flight.json")


def test_an_endless_view_stops_the_fetch(cb: Any, tmp_path: Path, flight: Path) -> None:
    evil = mbtiles(
        tmp_path / "endless.mbtiles",
        "CREATE VIEW tiles AS WITH RECURSIVE r(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM r) "
        "SELECT 17 AS zoom_level, i % 5 AS tile_column, i % 7 AS tile_row, x'00' AS tile_data FROM r",
    )
    result, rss = measured_build(cb, f"FLIGHT={flight}", f"PROVIDER={evil}", *ARGS)
    assert_refused(result, rss, says="SQLite steps")
    assert_lock_released(cb, flight)


def test_a_view_of_a_900_mb_blob_allocates_nothing(cb: Any, tmp_path: Path, flight: Path) -> None:
    with sqlite3.connect(tmp_path / "blob.mbtiles") as c:
        c.execute("CREATE TABLE cells (z, x, y)")
        c.executemany("INSERT INTO cells VALUES (?, ?, ?)", grid())
        c.execute(
            "CREATE VIEW tiles AS SELECT z AS zoom_level, x AS tile_column, y AS tile_row, "
            "zeroblob(900000000) AS tile_data FROM cells"
        )
    c.close()
    result, rss = measured_build(
        cb, f"FLIGHT={flight}", f"PROVIDER={tmp_path / 'blob.mbtiles'}", *ARGS
    )
    assert_refused(result, rss, says="bytes")


def test_mbtiles_tiles_of_the_wrong_pixel_size_are_refused(
    cb: Any, tmp_path: Path, flight: Path
) -> None:
    big = png(12000)
    evil = mbtiles(
        tmp_path / "huge.mbtiles",
        "CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)",
        rows=[(*cell, big) for cell in grid()],
    )
    result, rss = measured_build(cb, f"FLIGHT={flight}", f"PROVIDER={evil}", *ARGS)
    assert_refused(result, rss, says="12000x12000, not 256x256")
    assert not (cb.cache_dir / "current").exists()


def test_directory_tiles_of_the_wrong_pixel_size_are_refused(
    cb: Any, tmp_path: Path, flight: Path
) -> None:
    big = png(12000)
    for z, x, row in grid():
        path = tmp_path / "tree" / str(z) / str(x) / f"{(1 << z) - 1 - row}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(big)
    result, rss = measured_build(cb, f"FLIGHT={flight}", f"PROVIDER={tmp_path / 'tree'}", *ARGS)
    assert_refused(result, rss, says="12000x12000, not 256x256")


def test_a_fifo_in_a_tile_directory_is_not_waited_on(cb: Any, tmp_path: Path, flight: Path) -> None:
    for _, x, row in grid():
        y = (1 << 17) - 1 - row
        path = tmp_path / "tree" / "17" / str(x) / f"{y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if (x, y) == (68645, 45902):
            os.mkfifo(path)
        else:
            path.write_bytes(synthetic_tile_bytes(Tile(x, y, 17)))
    result, rss = measured_build(cb, f"FLIGHT={flight}", f"PROVIDER={tmp_path / 'tree'}", *ARGS)
    assert_refused(result, rss, says="not a regular file")


def test_a_geotiff_far_finer_than_the_zoom_is_refused_before_it_is_read(
    cb: Any, tmp_path: Path, flight: Path
) -> None:
    rasterio = pytest.importorskip("rasterio", reason="the GeoTIFF provider needs rasterio")
    n = 100_000  # 1 cm pixels over 1 km: 10^10 pixels, written sparse (a small file)
    with rasterio.open(
        tmp_path / "fine.tif",
        "w",
        driver="GTiff",
        width=n,
        height=n,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=merc_grid(1000 / n),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        sparse_ok=True,
        BIGTIFF="YES",
    ):
        pass
    result, rss = measured_build(cb, f"FLIGHT={flight}", f"PROVIDER={tmp_path / 'fine.tif'}", *ARGS)
    assert_refused(result, rss, says="source pixels")


def test_a_geotiff_of_one_giant_block_is_refused_when_opened(
    cb: Any, tmp_path: Path, flight: Path
) -> None:
    rasterio = pytest.importorskip("rasterio", reason="the GeoTIFF provider needs rasterio")
    with rasterio.open(
        tmp_path / "block.tif",
        "w",
        driver="GTiff",
        width=20_000,
        height=20_000,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=merc_grid(0.05),
        tiled=True,
        blockxsize=16384,
        blockysize=16384,
        compress="deflate",
        sparse_ok=True,
    ):
        pass
    result, rss = measured_build(
        cb, f"FLIGHT={flight}", f"PROVIDER={tmp_path / 'block.tif'}", *ARGS
    )
    assert_refused(result, rss, says="blocks of", code=2)


# -- an MBTiles provider in WAL mode ---------------------------------------------------


def commit_in_wal_and_vanish(path: Path, data: bytes) -> None:
    """A writer that commits every tile's new bytes in WAL mode and dies before checkpointing."""
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "c.execute('UPDATE tiles SET tile_data = ?', (open(sys.argv[2], 'rb').read(),))\n"
        "os._exit(0)\n"
    )
    new = path.with_name("new.png")
    new.write_bytes(data)
    subprocess.run([sys.executable, "-c", code, str(path), str(new)], check=True)
    assert os.path.getsize(str(path) + "-wal") > 0


def test_a_change_left_in_the_wal_is_refused_then_used_once_checkpointed(
    cb: Any, tmp_path: Path, flight: Path
) -> None:
    provider = mbtiles(
        tmp_path / "wal.mbtiles",
        "CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)",
        rows=[
            (z, x, row, synthetic_tile_bytes(Tile(x, (1 << z) - 1 - row, z)))
            for z, x, row in grid()
        ],
        wal=True,
    )
    first = cb.build(f"FLIGHT={flight}", f"PROVIDER={provider}", *ARGS)
    assert first.code == 0, first.stderr
    stat = provider.stat()
    commit_in_wal_and_vanish(provider, png(256))
    assert (provider.stat().st_size, provider.stat().st_mtime_ns) == (
        stat.st_size,
        stat.st_mtime_ns,
    )

    refused = cb.build(f"FLIGHT={flight}", f"PROVIDER={provider}", *ARGS)
    assert refused.code == 2, refused.stderr
    assert "wal_checkpoint(TRUNCATE)" in refused.report["remedy"]
    assert "-wal" in refused.report["error"]

    sqlite = shutil.which("sqlite3")
    if sqlite:  # the remedy as printed
        subprocess.run(
            [sqlite, str(provider), "PRAGMA wal_checkpoint(TRUNCATE)"],
            check=True,
            capture_output=True,
        )
    else:
        with sqlite3.connect(provider) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
    used = cb.build(f"FLIGHT={flight}", f"PROVIDER={provider}", *ARGS)
    assert used.code == 0, used.stderr
    assert used.report["outcome"] == "success"
    with sqlite3.connect(f"file:{cb.current / 'tiles.mbtiles'}?mode=ro&immutable=1", uri=True) as c:
        served = {bytes(r[0]) for r in c.execute("SELECT tile_data FROM tiles")}
    c.close()
    assert served == {png(256)}

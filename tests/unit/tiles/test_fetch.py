"""Tests for cachebuild.tiles.fetch: the tiles phase, against a real HTTP server.

The server (:class:`tests._harness.tileserver.TileServer`) counts requests and good
tiles served, server-side, so "every good tile arrives exactly once" and
"nothing was fetched again" are checked where they happen.
"""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import textwrap
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from cachebuild.errors import EXIT_DOWNLOAD, DownloadError, UsageError
from cachebuild.providers.local import SyntheticProvider
from cachebuild.providers.synthetic import synthetic_tile_bytes
from cachebuild.store.objects import TileStore, sha256_hex
from cachebuild.tilemath import LngLatBbox, Tile, count_tiles, tile_from_id, tile_id, tiles
from cachebuild.tiles import fetch as fetch_module
from cachebuild.tiles.fetch import fetch_tiles, fetch_with_provider
from cachebuild.tileset import hex_digests, read_missing, read_summary, read_tiles
from tests._harness.procs import sigkill_when
from tests._harness.surface import own_public_names
from tests._harness.tileserver import KEY, KEY_FORMS, Reply, TileServer, html
from tests.unit.providers.test_providers import fast_env, full_text

#: About a dozen z17 tiles in Zurich.
AREA = LngLatBbox(8.540, 47.370, 8.548, 47.374)
PLANNED = list(tiles(AREA, [17]))
REPO = Path(__file__).resolve().parents[3]


def run(
    tmp: Path, spec: str, *, area: LngLatBbox = AREA, zooms: list[int] | None = None, **kw: Any
) -> dict[str, Any]:
    kw.setdefault("env", fast_env())
    kw.setdefault("concurrency", 4)
    kw.setdefault("progress", False)
    return fetch_tiles(
        bbox=area,
        zooms=zooms or [17],
        provider_spec=spec,
        store_root=tmp / "store",
        out_dir=tmp / "out",
        **kw,
    )


def recorded(tmp: Path, identity: str) -> dict[tuple[int, int, int], str]:
    with TileStore(tmp / "store") as store:
        return store.lookup_refs(identity, [(t.z, t.x, t.y) for t in PLANNED])


def assert_store_sound(root: Path) -> None:
    """Every object is whole (its name is its hash); nothing half-written is left in tmp/."""
    with TileStore(root) as store:
        for obj in store.iter_objects():
            assert sha256_hex(obj.read_bytes()) == obj.name
        store.clean_tmp()
        assert list(store.tmp.iterdir()) == []


def test_all_is_complete() -> None:
    assert set(fetch_module.__all__) == own_public_names(fetch_module)


def test_planned_area_is_a_dozen_tiles() -> None:
    assert 8 <= len(PLANNED) <= 20


# ------------------------------------------------------------------ happy paths


def test_synthetic_fetch_writes_the_tileset_and_reuses_it(tmp_path: Path) -> None:
    first = run(tmp_path, "synthetic")
    n = len(PLANNED)
    assert first["planned"] == first["present"] == first["fetched"] == n
    assert first["reused"] == first["missing"] == 0
    assert first["provider"] == "synthetic:v1"
    assert first["zooms"] == [17]
    assert first["bbox"] == list(AREA)
    assert first["missing_examples"] == []
    # the file describes content, not history: no fetched/reused counts
    written = read_summary(tmp_path / "out")
    assert "fetched" not in written and "reused" not in written
    assert written == {k: v for k, v in first.items() if k not in ("fetched", "reused")}

    present = read_tiles(tmp_path / "out")
    assert sorted(present["id"].tolist()) == sorted(tile_id(t) for t in PLANNED)
    assert list(present["id"]) == sorted(present["id"])
    with TileStore(tmp_path / "store") as store:
        for tid, digest in zip(present["id"].tolist(), hex_digests(present)):
            assert store.get(digest) == synthetic_tile_bytes(tile_from_id(tid))
    assert len(read_missing(tmp_path / "out")) == 0

    second = run(tmp_path, "synthetic")
    assert (second["fetched"], second["reused"]) == (0, n)
    assert second["aggregate_sha256"] == first["aggregate_sha256"]


def test_http_fetch_then_refetch_makes_no_request(tmp_path: Path, server: TileServer) -> None:
    first = run(tmp_path, server.template())
    assert first["fetched"] == len(PLANNED)
    assert server.count() == len(PLANNED)
    assert first["provider"] == "xyz:" + server.template()

    second = run(tmp_path, server.template())
    assert server.count() == len(PLANNED)  # not one more request
    assert (second["fetched"], second["reused"]) == (0, len(PLANNED))
    assert second["aggregate_sha256"] == first["aggregate_sha256"]


def test_same_imagery_hashes_alike_whichever_provider(tmp_path: Path, server: TileServer) -> None:
    # the server serves the synthetic imagery: same tiles, same hashes
    a = run(tmp_path / "a", "synthetic")
    b = run(tmp_path / "b", server.template())
    assert a["aggregate_sha256"] == b["aggregate_sha256"]


def test_missing_tiles_are_listed(tmp_path: Path, server: TileServer) -> None:
    gone = sorted(PLANNED, key=tile_id)[1::4]
    server.missing = set(gone)
    s = run(tmp_path, server.template())
    assert s["missing"] == len(gone)
    assert s["present"] == s["fetched"] == len(PLANNED) - len(gone)
    assert s["missing_examples"] == [f"{t.z}/{t.x}/{t.y}" for t in gone]
    assert read_missing(tmp_path / "out").tolist() == [tile_id(t) for t in gone]

    # the provider is asked again for the missing tiles only (RETRY_MISSING
    # is decided before this phase runs)
    before = server.count()
    again = run(tmp_path, server.template())
    assert server.count() - before == len(gone)
    assert again["reused"] == len(PLANNED) - len(gone)
    assert again["aggregate_sha256"] == s["aggregate_sha256"]


def test_missing_examples_are_capped(tmp_path: Path, server: TileServer) -> None:
    server.missing = set(PLANNED)
    s = run(tmp_path, server.template())
    assert s["missing"] == len(PLANNED) and s["present"] == 0
    ordered = sorted(PLANNED, key=tile_id)[: fetch_module.MISSING_EXAMPLES]
    assert s["missing_examples"] == [f"{t.z}/{t.x}/{t.y}" for t in ordered]


def test_server_errors_and_rate_limits_are_ridden_out(tmp_path: Path, server: TileServer) -> None:
    a, b = PLANNED[0], PLANNED[-1]
    server.script(a, Reply(500), Reply(500))
    server.script(b, Reply(429, b"", {"Retry-After": "0"}), html())
    s = run(tmp_path, server.template())
    assert s["fetched"] == len(PLANNED)
    assert server.count(a) == 3
    assert server.count(b) == 3


def test_antimeridian_area(tmp_path: Path) -> None:
    area = LngLatBbox(179.99, -17.01, -179.99, -17.0)
    s = run(tmp_path, "synthetic", area=area, zooms=[12])
    xs = {tile_from_id(i).x for i in read_tiles(tmp_path / "out")["id"].tolist()}
    assert xs == {0, 4095}
    assert s["planned"] == count_tiles(area, [12])


def test_several_zooms(tmp_path: Path) -> None:
    s = run(tmp_path, "synthetic", zooms=[17, 16, 17])
    assert s["zooms"] == [16, 17]
    assert s["planned"] == count_tiles(AREA, [16, 17])
    zs = {tile_from_id(i).z for i in read_tiles(tmp_path / "out")["id"].tolist()}
    assert zs == {16, 17}


def test_one_summary_line_when_stderr_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(tmp_path, "synthetic", progress=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err
    assert err.startswith(
        f"tiles: {len(PLANNED)} planned, {len(PLANNED)} fetched, 0 reused, 0 missing, 0 retries, "
    )
    assert err.rstrip().endswith("tiles/s")
    run(tmp_path, "synthetic", progress=False)
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_live_line_with_retries_and_eta_on_a_terminal(
    tmp_path: Path, server: TileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    server.script(PLANNED[0], Reply(500), Reply(500))
    s = run(tmp_path, server.template(), progress=True)
    out = term.getvalue()
    assert s["fetched"] == len(PLANNED)
    lines = out.split("\r")
    assert any("ETA" in ln for ln in lines[:-1])
    final = out.rstrip("\n").split("\n")
    assert f"{len(PLANNED)}/{len(PLANNED)}" in final[-2] and "2 retries" in final[-2]
    assert (
        final[-1].startswith(f"tiles: {len(PLANNED)} planned, {len(PLANNED)} fetched")
        and "2 retries" in final[-1]
    )


# ------------------------------------------------------------------ failures


def test_broken_tiles_fail_the_phase_and_the_rest_is_kept(
    tmp_path: Path, server: TileServer
) -> None:
    bad = PLANNED[2]
    server.script(bad, html(), html(), html())
    with pytest.raises(DownloadError) as info:
        run(tmp_path, server.template())
    err = info.value
    assert err.exit_code == EXIT_DOWNLOAD == 20
    assert "1 tile(s) could not be fetched" in str(err)
    assert f"{bad.z}/{bad.x}/{bad.y}" in str(err)
    assert "not an image" in str(err)
    assert not (tmp_path / "out" / "tileset.json").exists()
    assert len(recorded(tmp_path, "xyz:" + server.template())) == len(PLANNED) - 1

    # fixed: only the broken tile is asked for
    before = server.count()
    s = run(tmp_path, server.template())
    assert server.count() - before == 1
    assert (s["fetched"], s["reused"]) == (1, len(PLANNED) - 1)


def test_refused_key_stops_the_fetch_without_showing_it(tmp_path: Path, server: TileServer) -> None:
    server.key = "the-servers-real-key"
    with pytest.raises(DownloadError) as info:
        run(tmp_path, server.template(), concurrency=1)
    assert "refused the credentials" in str(info.value)
    for form in KEY_FORMS:
        assert form not in full_text(info.value)
    assert server.count() <= 3  # stopped at once, not once per tile
    assert list((tmp_path / "store" / "journal").iterdir()) == []  # refs committed, journal gone


def test_a_failing_provider_is_given_up_on(
    tmp_path: Path, server: TileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_module, "MAX_FAILURES", 3)
    area = LngLatBbox(8.50, 47.35, 8.56, 47.39)  # hundreds of tiles
    with pytest.raises(DownloadError, match="stopped early") as info:
        run(tmp_path, server.template(path="/bad/{z}/{x}-{y}.jpg"), area=area, concurrency=1)
    assert "HTTP 400" in str(info.value)
    assert server.count() < 10


def test_unknown_placeholder_is_refused_before_any_request(
    tmp_path: Path, server: TileServer
) -> None:
    with pytest.raises(UsageError, match=r"\{t\}"):
        run(tmp_path, server.template(query="?key={key}&sub={t}"))
    assert server.count() == 0
    assert not (tmp_path / "out").exists()


def test_concurrency_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="CONCURRENCY"):
        run(tmp_path, "synthetic", concurrency=0)


def test_provider_identities_do_not_share_refs(tmp_path: Path, server: TileServer) -> None:
    run(tmp_path, "synthetic")
    s = run(tmp_path, server.template())
    assert server.count() == len(PLANNED)  # nothing reused from synthetic:v1
    assert (s["fetched"], s["reused"]) == (len(PLANNED), 0)
    # ...though the objects are shared: same bytes, same hash, stored once
    with TileStore(tmp_path / "store") as store:
        assert len(list(store.iter_objects())) == len(PLANNED)
    other = run(tmp_path, server.template(query="?key={key}&style=2"))
    assert other["reused"] == 0
    assert server.count() == 2 * len(PLANNED)


def test_the_key_is_written_nowhere(tmp_path: Path, server: TileServer) -> None:
    server.script(PLANNED[0], html(), html(), html())
    with pytest.raises(DownloadError):
        run(tmp_path, server.template())
    run(tmp_path, server.template())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "refs.sqlite" for p in files)
    for p in files:
        data = p.read_bytes()
        for form in KEY_FORMS:
            assert form.encode() not in data, p


# ------------------------------------------------------------------ interruption


class InterruptAfter:
    """Serves synthetic tiles; the call after ``n`` raises KeyboardInterrupt (as Ctrl-C would)."""

    def __init__(self, n: int):
        self.inner = SyntheticProvider()
        self.identity = self.inner.identity
        self.concurrency = 2
        self.n = n
        self.calls = 0
        self.served: set[Tile] = set()
        self.lock = threading.Lock()

    def fetch(self, tile: Tile) -> bytes | None:
        with self.lock:
            self.calls += 1
            if self.calls > self.n:
                raise KeyboardInterrupt
        data = self.inner.fetch(tile)
        with self.lock:
            self.served.add(tile)
        return data

    def close(self) -> None:
        pass


def test_an_interrupted_fetch_keeps_what_it_fetched(tmp_path: Path) -> None:
    provider = InterruptAfter(5)
    with pytest.raises(KeyboardInterrupt):
        fetch_with_provider(
            provider,
            bbox=AREA,
            zooms=[17],
            store_root=tmp_path / "store",
            out_dir=tmp_path / "out",
            concurrency=2,
            progress=False,
        )
    kept = recorded(tmp_path, "synthetic:v1")
    assert {Tile(x, y, z) for z, x, y in kept} == provider.served
    assert len(kept) >= 3
    assert not (tmp_path / "out" / "tileset.json").exists()
    assert_store_sound(tmp_path / "store")

    s = run(tmp_path, "synthetic")
    assert s["reused"] == len(kept)
    assert s["fetched"] == len(PLANNED) - len(kept)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cachebuild.tiles import fetch
    from cachebuild.tilemath import LngLatBbox
    fetch.REF_BATCH = int(sys.argv[9]) if len(sys.argv) > 9 else 5
    fetch.REF_FLUSH_S = 1e9 if len(sys.argv) > 9 else fetch.REF_FLUSH_S
    fetch.fetch_tiles(
        bbox=LngLatBbox(*map(float, sys.argv[2:6])), zooms=[17], provider_spec=sys.argv[1],
        store_root=Path(sys.argv[6]), out_dir=Path(sys.argv[7]),
        env={"CACHEBUILD_API_KEY": sys.argv[8]}, concurrency=2, progress=False,
    )
    """
)


def start_killable_fetch(
    server: TileServer, area: LngLatBbox, store_root: Path, out: Path, *more: str
) -> Any:
    """KILL_SCRIPT's fetch of ``area`` from ``server`` into ``store_root``, as a child process."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            server.template(),
            *map(str, area),
            str(store_root),
            str(out),
            KEY,
            *more,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_killed_fetch_leaves_a_sound_store_and_resumes(
    tmp_path: Path, server: TileServer
) -> None:
    area = LngLatBbox(8.50, 47.35, 8.53, 47.37)  # ~150 tiles
    server.latency_s = 0.01
    store_root, out = tmp_path / "store", tmp_path / "out"
    refs = 0

    def ten_refs() -> bool:
        nonlocal refs
        try:
            with closing(
                sqlite3.connect(f"file:{store_root / 'refs.sqlite'}?mode=ro", uri=True)
            ) as db:
                refs = db.execute("SELECT count(*) FROM tile_refs").fetchone()[0]
        except sqlite3.Error:
            refs = 0
        return refs >= 10

    proc = start_killable_fetch(server, area, store_root, out)
    sigkill_when(proc, ten_refs, timeout_s=30, poll_s=0.02)
    assert refs >= 10
    assert not (out / "tileset.json").exists()
    server.latency_s = 0.0

    # whatever the kill interrupted, objects are whole and recorded refs point at them
    with TileStore(store_root) as store:
        for obj in store.iter_objects():
            assert sha256_hex(obj.read_bytes()) == obj.name
        with closing(sqlite3.connect(store_root / "refs.sqlite")) as db:
            rows = db.execute("SELECT sha256 FROM tile_refs").fetchall()
        assert len(rows) >= 10
        assert all(store.has(d) for (d,) in rows)

    before = server.count()
    s = run(tmp_path, server.template(), area=area)
    assert s["reused"] >= len(rows)
    assert s["fetched"] + s["reused"] == s["planned"] == count_tiles(area, [17])
    assert server.count() - before == s["fetched"]
    assert_store_sound(store_root)
    assert (
        s["aggregate_sha256"] == run(tmp_path / "clean", "synthetic", area=area)["aggregate_sha256"]
    )


def test_a_sigkilled_fetch_resumes_from_its_journal(tmp_path: Path, server: TileServer) -> None:
    """No ref reached the database before the kill: the journal alone saves the work."""
    area = LngLatBbox(8.50, 47.35, 8.52, 47.37)  # ~100 tiles
    planned = list(tiles(area, [17]))
    server.latency_s = 0.01
    store_root, out = tmp_path / "store", tmp_path / "out"
    proc = start_killable_fetch(server, area, store_root, out, str(10**9))
    sigkill_when(proc, lambda: sum(server.served_ok.values()) >= 30, timeout_s=30)
    server.latency_s = 0.0
    served_before = {p: n for p, n in server.served_ok.items()}
    assert 30 <= sum(served_before.values()) < len(planned)
    with closing(sqlite3.connect(store_root / "refs.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM tile_refs").fetchone()[0] == 0  # nothing committed
    assert len(list((store_root / "journal").iterdir())) == 1

    before = server.count()
    s = run(tmp_path, server.template(), area=area)
    asked_again = server.count() - before
    # only what was on the wire when the kill came (2 workers) is asked for again
    assert asked_again <= len(planned) - sum(served_before.values()) + 2
    assert s["reused"] >= sum(served_before.values()) - 2
    assert all(server.served(t) <= 2 for t in planned)
    assert sum(server.served_ok.values()) <= len(planned) + 2
    assert list((store_root / "journal").iterdir()) == []  # replayed, then our own removed
    assert_store_sound(store_root)


# ------------------------------------------------------------------ a hostile server


def test_under_every_fault_each_good_tile_arrives_once_and_nothing_bad_is_stored(
    tmp_path: Path, server: TileServer
) -> None:
    from tests._harness.tileserver import DROP, DROP_MID_BODY, HTML, TRUNCATED, Slow, too_many

    area = LngLatBbox(8.50, 47.35, 8.52, 47.365)  # ~80 tiles
    planned = list(tiles(area, [17]))
    for i, fault in enumerate(
        (DROP, DROP_MID_BODY, TRUNCATED, HTML, too_many("0"), Reply(500), Reply(503), Slow(2.0))
    ):
        server.fault_rate(fault, 0.04, seed=i)
    s = run(
        tmp_path,
        server.template(),
        area=area,
        env=fast_env(HTTP_TIMEOUT="0.5", HTTP_RETRIES="4"),
        concurrency=8,
    )
    assert s["fetched"] == s["planned"] == len(planned) and s["missing"] == 0
    assert server.count() > len(planned)  # faults happened, and were ridden out
    assert {str(t): server.served(t) for t in planned} == {str(t): 1 for t in planned}
    with TileStore(tmp_path / "store") as store:
        objects = {obj.name for obj in store.iter_objects()}
    assert objects == {
        sha256_hex(synthetic_tile_bytes(t)) for t in planned
    }  # no HTML, no half image
    assert_store_sound(tmp_path / "store")


def test_two_fetches_into_one_store_at_once(tmp_path: Path, server: TileServer) -> None:
    """Two processes (two caches) fetch the same area into one store at the same time."""
    area = LngLatBbox(8.50, 47.35, 8.52, 47.365)
    planned = list(tiles(area, [17]))
    server.latency_s = 0.005
    store_root = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                KILL_SCRIPT,
                server.template(),
                *map(str, area),
                str(store_root),
                str(tmp_path / f"out{i}"),
                KEY,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    a, b = read_summary(tmp_path / "out0"), read_summary(tmp_path / "out1")
    assert a["aggregate_sha256"] == b["aggregate_sha256"]
    assert a["present"] == b["present"] == len(planned)
    assert a == b  # content only: which process fetched what is not in it
    assert all(1 <= server.served(t) <= 2 for t in planned)
    assert_store_sound(store_root)
    with TileStore(store_root) as store:
        assert len(
            store.lookup_refs("xyz:" + server.template(), [(t.z, t.x, t.y) for t in planned])
        ) == len(planned)
    # and a third comes after: nothing to fetch
    before = server.count()
    assert run(tmp_path, server.template(), area=area)["reused"] == len(planned)
    assert server.count() == before


# ------------------------------------------------------------------ no data


def _flat(colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), colour).save(buf, format=fmt)
    return buf.getvalue()


def test_blank_tiles_count_as_missing_with_nodata_uniform(
    tmp_path: Path, server: TileServer
) -> None:
    blank = sorted(PLANNED, key=tile_id)[:3]
    server.answers = {
        t: Reply(200, _flat((240, 240, 240)), {"Content-Type": "image/jpeg"}) for t in blank
    }
    s = run(tmp_path, server.template(), env=fast_env(NODATA="uniform"))
    assert s["missing"] == s["nodata"] == 3
    assert s["nodata_rule"] == {"uniform": True, "sha256": []}
    assert s["missing_examples"] == [f"{t.z}/{t.x}/{t.y}" for t in blank]
    with TileStore(tmp_path / "store") as store:
        assert sha256_hex(_flat((240, 240, 240))) not in {
            o.name for o in store.iter_objects()
        }  # not stored
    # like a 404: asked again next time, and now the provider has them
    server.answers = {}
    before = server.count()
    again = run(tmp_path, server.template(), env=fast_env(NODATA="uniform"))
    assert server.count() - before == 3
    assert again["missing"] == 0 and again["fetched"] == 3


def test_without_the_rule_blank_tiles_are_tiles(tmp_path: Path, server: TileServer) -> None:
    server.script(PLANNED[0], Reply(200, _flat((0, 0, 0)), {"Content-Type": "image/jpeg"}))
    assert run(tmp_path, server.template())["missing"] == 0


def test_nodata_by_hash(tmp_path: Path, server: TileServer) -> None:
    # a "no imagery here" picture: not uniform, known by its hash
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (256, 256), (200, 200, 200))
    ImageDraw.Draw(img).text((60, 120), "no imagery", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    placeholder = buf.getvalue()
    server.script(PLANNED[1], Reply(200, placeholder, {"Content-Type": "image/png"}))
    server.script(PLANNED[2], Reply(200, _flat((5, 5, 5)), {"Content-Type": "image/jpeg"}))
    s = run(
        tmp_path, server.template(), env=fast_env(NODATA_SHA256=sha256_hex(placeholder).upper())
    )
    assert s["missing"] == s["nodata"] == 1  # the flat one is a tile: NODATA is off


def test_turning_the_rule_on_later_catches_stored_blank_tiles(
    tmp_path: Path, server: TileServer
) -> None:
    blank = _flat((30, 60, 90))
    server.script(PLANNED[0], Reply(200, blank, {"Content-Type": "image/jpeg"}))
    first = run(tmp_path, server.template())
    assert first["missing"] == 0
    before = server.count()
    s = run(tmp_path, server.template(), env=fast_env(NODATA="uniform"))
    assert server.count() == before  # decided from the store, nothing fetched
    assert (s["missing"], s["nodata"], s["reused"]) == (1, 1, len(PLANNED) - 1)
    from cachebuild.providers.nodata import UNIFORM_CHECK

    with TileStore(tmp_path / "store") as store:
        verdicts = store.lookup_checks(UNIFORM_CHECK, [o.name for o in store.iter_objects()])
    assert (
        len(verdicts) == len(PLANNED) and sum(verdicts.values()) == 1
    )  # cached: not decoded again
    by_hash = run(tmp_path, server.template(), env=fast_env(NODATA_SHA256=sha256_hex(blank)))
    assert by_hash["missing"] == 1 and server.count() == before


def test_a_bad_nodata_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="NODATA"):
        run(tmp_path, "synthetic", env={"NODATA": "white"})
    with pytest.raises(UsageError, match="NODATA_SHA256"):
        run(tmp_path, "synthetic", env={"NODATA_SHA256": "abc"})

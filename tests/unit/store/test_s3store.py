"""STORE=s3://...: one bucket shared by machines, against a real S3 server (moto) on 127.0.0.1.

Two "machines" are two CACHEBUILD_HOMEs building the same flight with one
bucket; the tile server counts what the provider was asked for.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachebuild.errors import BuildError, UsageError
from cachebuild.localize.s3desc import _DESC_MAGIC, _decode_batch, _encode_batch, pull_descriptors
from cachebuild.store.s3 import (
    S3Store,
    StoreURL,
    _decode_pack,
    _encode_pack,
    is_remote,
    parse_store_url,
)
from tests.conftest import REPO, Cb, TileServer, write_flight

pytest.importorskip("moto.server")

SMALL = ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=20")

#: A build in-process; says whether boto3 was imported.
NOOP_PROBE = """
import json, sys
from cachebuild.cli.console import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "boto3": "boto3" in sys.modules}))
"""


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[Any]:
    from tests._harness.s3server import S3Server

    srv = S3Server(tmp_path, bucket=f"maps-{secrets.token_hex(4)}")
    yield srv
    srv.close()


def machine(tmp_path: Path, name: str, s3: Any, **extra: str) -> Cb:
    home = tmp_path / name
    home.mkdir()
    return Cb(home=home, env_extra={**s3.env, **extra})


def everything_written(*roots: Path) -> Iterator[tuple[Path, bytes]]:
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                yield p, p.read_bytes()


def assert_no_secrets(s3: Any, texts: list[str], roots: list[Path]) -> None:
    values = [s3.secret_key, s3.access_key]
    for text in texts:
        for v in values:
            assert v not in text
    for path, data in everything_written(*roots):
        for v in values:
            assert v.encode() not in data, f"{path} holds an AWS credential"


# -- the URL -------------------------------------------------------------------


def test_store_url_is_parsed_and_credentials_are_refused_without_echo() -> None:
    assert parse_store_url("s3://maps/team/store/") == StoreURL("maps", "team/store")
    assert str(parse_store_url("s3://maps")) == "s3://maps"
    assert is_remote("s3://maps") and not is_remote("/srv/store")
    for raw in ("s3://AKIAXX:t0psecr3t@maps/p", "s3://maps/p?X-Amz-Credential=t0psecr3t"):
        with pytest.raises(UsageError) as exc:
            parse_store_url(raw)
        assert "t0psecr3t" not in str(exc.value) and "AWS_ACCESS_KEY_ID" in exc.value.remedy
    with pytest.raises(UsageError, match="only s3://"):
        parse_store_url("gs://maps/p")
    with pytest.raises(UsageError, match="bucket name"):
        parse_store_url("s3://Bad_Bucket/p")


def test_tile_packs_round_trip_and_an_image_that_does_not_match_its_hash_is_dropped() -> None:
    good, bad = b"image one", b"image two"
    rows = [(1, 2, hashlib.sha256(good).hexdigest(), good), (1, 3, "0" * 64, bad)]
    header, tiles = _decode_pack(_encode_pack("xyz:http://t/{z}/{x}/{y}", 17, 5.0, rows))  # type: ignore[misc]
    assert header["provider"] == "xyz:http://t/{z}/{x}/{y}" and header["z"] == 17
    assert tiles == rows[:1]
    assert _decode_pack(b"CBPACK1\n\xff") is None and _decode_pack(b"junk") is None


def test_descriptor_batches_round_trip_and_refuse_another_dim() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    digests = rng.integers(0, 256, (5, 32), dtype=np.uint8)
    vectors = rng.standard_normal((5, 8)).astype(np.float32)
    data = _encode_batch(digests, vectors)
    assert data.startswith(_DESC_MAGIC)
    d, v = _decode_batch(data, 8)  # type: ignore[misc]
    assert (d == digests).all() and (v == vectors).all()
    assert _decode_batch(data, 16) is None
    assert _decode_batch(data[:-1], 8) is None


# -- end to end ----------------------------------------------------------------


def test_a_second_machine_fetches_and_describes_nothing_and_a_corrupt_object_is_replaced(
    tmp_path: Path, s3: Any, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    args = (
        f"FLIGHT={f}",
        *SMALL,
        f"PROVIDER={tile_server.template()}",
        f"STORE=s3://{s3.bucket}/team",
    )
    a, b, c = (machine(tmp_path, n, s3) for n in ("a", "b", "c"))

    first = a.build(*args)
    assert first.code == 0, first.stderr
    ra = first.report
    n = ra["tiles"]["planned"]
    asked = tile_server.count()
    assert ra["tiles"]["fetched"] == n == asked > 0 and ra["descriptors"]["computed"] == n
    assert ra["store"]["url"] == f"s3://{s3.bucket}/team"
    assert ra["store"]["objects_written"] >= 2  # tile packs and descriptor batches, per cell
    assert sum(len(_decode_pack(s3.read(k))[1]) for k in s3.keys("team/tiles/")) == n  # type: ignore[index]

    # another machine: same flight, its own empty local store, the same bucket
    second = b.build(*args)
    assert second.code == 0, second.stderr
    rb = second.report
    assert tile_server.count() == asked  # the provider was asked for nothing
    assert rb["tiles"] == {"planned": n, "fetched": 0, "reused": n, "missing": 0}
    assert rb["descriptors"] == {"computed": 0, "reused": n}
    assert rb["store"]["objects_read"] >= 2 and rb["store"]["objects_written"] == 0
    assert rb["build_id"] == ra["build_id"]  # the same cache, bit for bit where it counts
    assert (b.home / "store" / "objects").is_dir()  # the local read-through copy
    # the index, self-test and coverage map came from the bucket's action cache, byte for byte
    assert sorted(ra["action_cache"]["misses"]) == ["index", "preview", "selftest"]
    assert sorted(rb["action_cache"]["hits"]) == sorted(rb["action_cache"]["from_bucket"])
    assert sorted(rb["action_cache"]["hits"]) == ["index", "preview", "selftest"]
    for name in ("index.faiss", "index.json", "selftest.json", "preview.png"):
        assert (a.current / name).read_bytes() == (b.current / name).read_bytes(), name
    assert len(s3.keys("team/actions/ac/")) == 3
    for key in s3.keys("team/actions/cas/"):
        assert hashlib.sha256(s3.read(key)).hexdigest() == key.rsplit("/", 1)[1]

    # the warm no-op on that machine asks the bucket nothing: boto3 is never imported
    p = subprocess.run(
        [sys.executable, "-c", NOOP_PROBE, "build-cache", *args, "REPORT=json"],
        cwd=REPO, env=b.env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    probe, noop = json.loads(p.stdout.splitlines()[-1]), json.loads(p.stdout.splitlines()[-2])
    assert probe == {"code": 0, "boto3": False} and noop["outcome"] == "up_to_date"
    assert noop["store"] == {
        "url": f"s3://{s3.bucket}/team",
        "objects_read": 0,
        "objects_written": 0,
    }

    # damage one tile pack and every descriptor batch in the bucket: never used, replaced
    victim = min(s3.keys("team/tiles/"))
    lost = len(_decode_pack(s3.read(victim))[1])  # type: ignore[index]
    s3.write(victim, s3.read(victim)[:-1] + b"!")
    batches = s3.keys("team/descriptors/")
    for key in batches:
        s3.write(key, _DESC_MAGIC + b"garbage")
    index_obj = (
        f"team/actions/cas/{hashlib.sha256((a.current / 'index.faiss').read_bytes()).hexdigest()}"
    )
    s3.write(index_obj, s3.read(index_obj)[:-7])  # and truncate the shared index
    third = c.build(*args)
    assert third.code == 0, third.stderr
    rc = third.report
    assert (
        "index" in rc["action_cache"]["misses"] and "selftest" in rc["action_cache"]["from_bucket"]
    )
    assert (c.current / "index.faiss").read_bytes() == (a.current / "index.faiss").read_bytes()
    assert (
        hashlib.sha256(s3.read(index_obj)).hexdigest() == index_obj.rsplit("/", 1)[1]
    )  # shared anew
    assert rc["tiles"]["fetched"] == lost > 0 and tile_server.count() == asked + lost
    assert rc["descriptors"]["computed"] == n
    assert rc["build_id"] == ra["build_id"]
    packs = s3.keys("team/tiles/")  # the damaged pack is gone, its tiles are in a new one
    assert victim not in packs
    for key in packs:
        assert hashlib.sha256(s3.read(key)).hexdigest() + ".pack" == key.rsplit("/", 1)[1]
    assert sum(len(_decode_pack(s3.read(k))[1]) for k in packs) == n  # type: ignore[index]
    fresh = s3.keys("team/descriptors/")  # computed again: the same bytes, so the same names
    assert sorted(fresh) == sorted(batches)
    for key in fresh:
        assert hashlib.sha256(s3.read(key)).hexdigest() == key.rsplit("/", 1)[1].removesuffix(
            ".bin"
        )

    # no credential in anything printed, reported or written (doit DB, manifest, store, state)
    outputs = [r.stdout + r.stderr for r in (first, second, third)]
    assert_no_secrets(s3, outputs, [a.home, b.home, c.home])


def test_the_bucket_stopping_mid_build_fails_clearly_publishes_nothing_and_the_next_build_succeeds(
    tmp_path: Path, s3: Any, tile_server: TileServer
) -> None:
    f = write_flight(tmp_path / "f.json")
    url = f"s3://{s3.bucket}/ci"
    args = (f"FLIGHT={f}", *SMALL, f"PROVIDER={tile_server.template()}", f"STORE={url}")
    m = machine(tmp_path, "m", s3)

    answer = tile_server._answer
    stopped: list[bool] = []

    def answer_then_stop(*a: Any) -> Any:  # the bucket goes away once tiles are being fetched
        if not stopped:
            stopped.append(True)
            s3.stop()
        return answer(*a)

    tile_server._answer = answer_then_stop  # type: ignore[method-assign]
    failed = m.build(*args)
    rep = failed.report
    assert failed.code == 20 and rep["failure_phase"] == "tiles", failed.stderr
    assert url in rep["error"] and "no connection" in rep["error"]
    assert "AWS_ENDPOINT_URL" in rep["remedy"]
    assert not m.current.exists()  # nothing published
    assert rep["store"]["url"] == url

    s3.start()  # the server is back, with its objects
    again = m.build(*args)
    assert again.code == 0, again.stderr
    n = again.report["tiles"]["planned"]
    assert again.report["tiles"]["fetched"] == 0  # the tiles fetched before the failure were kept
    assert (
        sum(len(_decode_pack(s3.read(k))[1]) for k in s3.keys("ci/tiles/")) == n
    )  # now in the bucket
    assert m.current.exists()
    assert_no_secrets(s3, [failed.stdout + failed.stderr, again.stdout + again.stderr], [m.home])


def test_describe_with_the_bucket_gone_is_exit_21_naming_the_url(tmp_path: Path, s3: Any) -> None:
    import numpy as np

    from cachebuild.tileset import tile_dtype, write_tileset

    build = tmp_path / "build"
    (build / "engine").mkdir(parents=True)
    (build / "engine" / "engine.json").write_text(
        json.dumps({"key": "ab" * 32, "descriptor_dim": 8})
    )
    tiles = np.array([(1 << 58 | 1, b"\1" * 32)], dtype=tile_dtype())
    write_tileset(build, tiles, np.zeros(0, "<i8"), {})
    remote = S3Store(StoreURL(s3.bucket, "p"), client=s3.client())
    assert not any(pull_descriptors(remote, tmp_path / "store", build).values())  # an empty bucket
    s3.stop()
    with pytest.raises(BuildError) as exc:
        pull_descriptors(remote, tmp_path / "store", build)
    assert exc.value.exit_code == 21 and exc.value.phase == "describe"
    assert f"s3://{s3.bucket}/p" in exc.value.message and s3.secret_key not in str(exc.value)

"""The tiles phase under a server that says "slow down" (429/503): nothing is
lost, no tile's retries are spent, the figures reach the counts, and
FETCH_DEADLINE ends the wait with the tiles left named.  Real loopback server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from cachebuild.errors import EXIT_DOWNLOAD, DownloadError, UsageError
from cachebuild.providers import open_provider
from cachebuild.providers.xyz import XyzProvider
from cachebuild.providers.xyzconfig import parse_duration
from cachebuild.tilemath import Tile
from cachebuild.tiles.fetch import fetch_with_provider
from tests._harness.tileserver import Reply, TileServer, tile_bytes, too_many
from tests.unit.providers.test_providers import fast_env
from tests.unit.tiles.test_fetch import AREA, PLANNED, run


@pytest.fixture
def server() -> Iterator[TileServer]:
    srv = TileServer(key=None)
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "fault", [too_many("0"), Reply(503, b"busy", {"Retry-After": "0"})], ids=["429", "503"]
)
def test_throttled_answers_spend_no_retry_while_the_server_answers_others(
    tmp_path: Path, server: TileServer, fault: Reply
) -> None:
    # the last planned tile is asked for only after others came back whole
    # (at most 2 x CONCURRENCY are queued): the server is busy, not down
    last = PLANNED[-1]
    server.script(last, *[fault] * 6)
    got = run(tmp_path, server.template(query=""), env=fast_env(HTTP_RETRIES="0"), concurrency=4)
    assert got["fetched"] == len(PLANNED) and got["missing"] == 0
    assert server.count(last) == 7 and server.served(last) == 1  # no retry allowed, six 429s
    assert got["throttled"] == 6
    assert 1 <= got["lowest_concurrency"] < 4


def test_a_share_of_429s_everywhere_loses_no_tile(tmp_path: Path, server: TileServer) -> None:
    server.fault_rate(too_many("0"), 0.2, seed=5, attempts=10_000)
    got = run(tmp_path, server.template(query=""), env=fast_env(HTTP_RETRIES="3"))
    assert got["fetched"] == len(PLANNED) and got["missing"] == 0
    assert all(server.served(t) == 1 for t in PLANNED)
    assert got["throttled"] == server.count() - len(PLANNED) > 0


def test_a_server_that_never_answered_well_still_fails_the_tile(
    tmp_path: Path, server: TileServer
) -> None:
    # 429 from the first request on: not "busy" but refusing; retries run out as before
    server.fault_rate(too_many("0"), 1.0, attempts=10_000)
    with pytest.raises(DownloadError, match=r"HTTP 429 after 3 attempt"):
        run(tmp_path, server.template(query=""))


def test_fetch_deadline_ends_the_wait_naming_the_tiles_left(
    tmp_path: Path, server: TileServer
) -> None:
    provider = open_provider(server.template(query=""), env=fast_env())
    assert isinstance(provider, XyzProvider)
    with closing(provider):
        outside = Tile(1, 1, 3)
        assert provider.fetch(outside) == tile_bytes(outside)  # the server answers well...
        server.fault_rate(too_many("0.2"), 1.0, attempts=10_000)  # ...then only "slow down"
        with pytest.raises(DownloadError) as info:
            fetch_with_provider(
                provider,
                bbox=AREA,
                zooms=[17],
                store_root=tmp_path / "store",
                out_dir=tmp_path / "out",
                concurrency=4,
                progress=False,
                deadline_s=1.0,
            )
    msg = str(info.value)
    assert info.value.exit_code == EXIT_DOWNLOAD
    assert f"FETCH_DEADLINE=1 s passed with {len(PLANNED)} tile(s) left" in msg
    assert "429/503" in msg and not (tmp_path / "out" / "tileset.json").exists()


def test_durations_parse_and_a_bad_one_is_named() -> None:
    assert parse_duration("FETCH_DEADLINE", "90") == 90.0
    assert parse_duration("FETCH_DEADLINE", "15m") == 900.0
    assert parse_duration("TILE_MAX_AGE", "0") == 0.0
    with pytest.raises(UsageError, match="FETCH_DEADLINE='soon' is not a duration"):
        parse_duration("FETCH_DEADLINE", "soon")


def test_the_progress_line_shows_the_flow_control_once_it_acts(
    tmp_path: Path, server: TileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    server.script(PLANNED[-1], *[too_many("0")] * 3)
    run(tmp_path, server.template(query=""), env=fast_env(HTTP_RETRIES="0"), progress=True)
    drawn = term.getvalue()
    assert "3 throttled, " in drawn and " in flight" in drawn
    assert "3 throttled (concurrency down to" in drawn.splitlines()[-1]

"""Tests for cachebuild.store.objects: objects, refs, the ref journal and cached checks."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachebuild.store import objects as store_module
from cachebuild.store.objects import TileStore, sha256_hex
from tests.unit.providers.test_providers import public_names

PROVIDER = "xyz:http://t.example/{z}/{x}/{y}.png?k={key}"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_all_is_complete() -> None:
    assert set(store_module.__all__) == public_names(store_module)


def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    with TileStore(tmp_path) as store:
        d = store.put(b"tile one")
        assert d == sha256_hex(b"tile one") and store.get(d, verify=True) == b"tile one"
        assert store.put(b"tile one") == d
        assert [p.name for p in store.iter_objects()] == [d]
        assert list(store.tmp.iterdir()) == []


def test_concurrent_puts_of_the_same_bytes(tmp_path: Path) -> None:
    data = [os.urandom(2000) for _ in range(20)] * 8
    with TileStore(tmp_path) as store, ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(store.put, data))
        assert digests == [sha256_hex(d) for d in data]
        assert len(list(store.iter_objects())) == 20
        assert list(store.tmp.iterdir()) == []


def test_refs_point_only_at_objects_that_exist(tmp_path: Path) -> None:
    with TileStore(tmp_path) as store:
        d = store.put(b"x")
        store.record_refs(PROVIDER, [((17, 1, 2), d), ((17, 1, 3), "0" * 64)])
        assert store.lookup_refs(PROVIDER, [(17, 1, 2), (17, 1, 3), (17, 9, 9)]) == {(17, 1, 2): d}
        assert store.lookup_refs("other", [(17, 1, 2)]) == {}


@pytest.mark.parametrize("layout", ["block", "scattered"])
def test_lookup_refs_by_range_scan_and_by_join_agree(
    tmp_path: Path, layout: str, monkeypatch
) -> None:
    """An area's block of tiles is read by one range scan, scattered tiles by a join: the same answer."""
    with TileStore(tmp_path) as store:
        d = [store.put(f"tile {i}".encode()) for i in range(3)]
        refs = [((17, x, y), d[(x + y) % 3]) for x in range(100, 110) for y in range(200, 210)]
        refs += [((16, 50, 100), d[0]), ((17, 99, 205), d[1])]  # other zoom; just outside the block
        store.record_refs(PROVIDER, refs)
        store.record_refs("other", [((17, 100, 200), d[2])])
        if layout == "block":  # 8x8 inside the 10x10 block, and two more at other zooms
            wanted = [(17, x, y) for x in range(101, 109) for y in range(201, 209)] + [
                (16, 50, 100),
                (15, 1, 1),
            ]
        else:  # far apart: their rectangle is mostly empty
            wanted = [(17, 100, 200), (17, 109, 209), (17, 5000, 7000), (17, 99, 205)]
        expect = {t: dict(refs)[t] for t in wanted if t in dict(refs)}
        assert store.lookup_refs(PROVIDER, wanted) == expect
        monkeypatch.setattr(store_module, "_RANGE_SLACK", 0)  # always the join
        assert store.lookup_refs(PROVIDER, wanted) == expect
        assert store.lookup_refs("other", wanted) == (
            {(17, 100, 200): d[2]} if (17, 100, 200) in wanted else {}
        )


def test_a_journal_of_a_dead_process_is_replayed(tmp_path: Path) -> None:
    with TileStore(tmp_path) as store:
        d1, d2 = store.put(b"one"), store.put(b"two")
        journal = store.open_journal(PROVIDER)
        journal.append((17, 1, 2), d1)
        journal.append((17, 1, 3), d2)
        journal.append((17, 1, 4), "f" * 64)  # its object never made it
        # as if its process were SIGKILLed: the file stays, under a dead pid
        dead = journal.path.with_name(f"{dead_pid()}-{journal.path.name.split('-', 1)[1]}")
        os.replace(journal.path, dead)
        with open(dead, "ab") as fh:
            fh.write(b'["xyz:torn li')  # the kill came mid-write
        assert store.replay_journals() == 2
        assert store.lookup_refs(PROVIDER, [(17, 1, 2), (17, 1, 3), (17, 1, 4)]) == {
            (17, 1, 2): d1,
            (17, 1, 3): d2,
        }
        assert list(store.journals.iterdir()) == []


def test_a_live_process_keeps_its_journal(tmp_path: Path) -> None:
    with TileStore(tmp_path) as store:
        journal = store.open_journal(PROVIDER)
        journal.append((17, 1, 2), store.put(b"one"))
        assert store.replay_journals() == 0  # ours: we are alive
        assert journal.path.exists()
        assert store.lookup_refs(PROVIDER, [(17, 1, 2)]) == {}
        journal.close()
        assert not journal.path.exists()
        journal.append((17, 1, 3), "0" * 64)  # after close: ignored


def test_journal_lines_survive_odd_provider_names(tmp_path: Path) -> None:
    odd = 'dir:/data/"quoted"\ttab\\back/{z}/{x}/{y}@abc'
    with TileStore(tmp_path) as store:
        d = store.put(b"one")
        journal = store.open_journal(odd)
        journal.append((3, 1, 2), d)
        os.replace(journal.path, journal.path.with_name(f"{dead_pid()}-x.jsonl"))
        assert store.replay_journals() == 1
        assert store.lookup_refs(odd, [(3, 1, 2)]) == {(3, 1, 2): d}


def test_clean_tmp_removes_only_dead_writers_files(tmp_path: Path) -> None:
    with TileStore(tmp_path) as store:
        (store.tmp / f"{dead_pid()}-abc").write_bytes(b"half")
        (store.tmp / f"{os.getpid()}-mine").write_bytes(b"in flight")
        assert store.clean_tmp() == 1
        assert [p.name for p in store.tmp.iterdir()] == [f"{os.getpid()}-mine"]


def test_cached_checks(tmp_path: Path) -> None:
    with TileStore(tmp_path) as store:
        digests = [sha256_hex(str(i).encode()) for i in range(1200)]
        store.record_checks("uniform-v1", [(d, i % 3 == 0) for i, d in enumerate(digests)])
        got = store.lookup_checks("uniform-v1", [*digests, "0" * 64])
        assert len(got) == 1200 and sum(got.values()) == 400
        assert store.lookup_checks("uniform-v2", digests) == {}
    with TileStore(tmp_path) as again:  # persisted
        assert again.lookup_checks("uniform-v1", digests[:3]) == {
            digests[0]: True,
            digests[1]: False,
            digests[2]: False,
        }


def test_a_corrupt_object_is_noticed(tmp_path: Path) -> None:
    with TileStore(tmp_path) as store:
        d = store.put(b"good")
        store.path(d).write_bytes(b"bad")
        with pytest.raises(ValueError, match="corrupt"):
            store.get(d, verify=True)
        with pytest.raises(ValueError, match="not a sha256"):
            store.path("../etc/passwd")


RACE = """
import sys, time
from cachebuild.store.objects import TileStore
start = float(sys.argv[2])
while time.time() < start:
    pass
with TileStore(sys.argv[1]) as s:
    s.replay_journals()
    s.record_refs("p", [((1, 1, int(sys.argv[3])), "0" * 64)])
"""


def test_processes_opening_a_new_store_at_the_same_instant(tmp_path: Path) -> None:
    """Switching a new database to WAL is not covered by SQLite's busy timeout: retried."""
    import time

    for round in range(3):
        root = tmp_path / f"store{round}"
        start = time.time() + 0.5
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACE, str(root), str(start), str(i)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        with TileStore(root) as store:
            assert len(store._conn().execute("SELECT * FROM tile_refs").fetchall()) == 4


def test_a_locked_database_is_retried_other_errors_are_not() -> None:
    import sqlite3

    from cachebuild.store.objects import _retry_locked

    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")

    _retry_locked(flaky)
    assert len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("no such table: x")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _retry_locked(broken)
    assert len(calls) == 4


def test_validators_round_trip_and_an_older_store_gains_their_table(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "store"
    with TileStore(root) as store:
        digest = store.put(b"tile")
        store.record_refs("xyz:t", [((17, 1, 2), digest)])
    # an older cachebuild's database: no tile_validators table
    with sqlite3.connect(root / "refs.sqlite") as db:
        db.execute("DROP TABLE tile_validators")
    with TileStore(root) as store:
        assert store.lookup_refs("xyz:t", [(17, 1, 2)]) == {(17, 1, 2): digest}
        assert store.lookup_validators("xyz:t", [(17, 1, 2)]) == {}
        store.record_validators("xyz:t", [((17, 1, 2), '"e1"', None, 100.0)])
        store.record_validators("xyz:t", [((17, 1, 3), None, "Tue, 14 Nov 2023 22:13:20 GMT", 5.0)])
        got = store.lookup_validators("xyz:t", [(17, 1, 2), (17, 1, 3), (17, 9, 9)])
        assert got == {
            (17, 1, 2): ('"e1"', None, 100.0),
            (17, 1, 3): (None, "Tue, 14 Nov 2023 22:13:20 GMT", 5.0),
        }
        assert store.lookup_validators("xyz:other", [(17, 1, 2)]) == {}

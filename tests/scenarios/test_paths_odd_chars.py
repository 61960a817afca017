"""CACHE_DIR and STORE with characters a URI must escape: real doit runs.

SQLite URIs built by string formatting end the path at ``#`` or ``?`` (and
decode ``%41``), so such a directory broke every build ("no such table:
tiles") and made the doit database look damaged.  A build, a no-op, verify-cache
and preview-cache must work, and nothing may be created beside the
directories at a truncated path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_flight

NAMES = ["with space", "hash#1", "query?mode=rw", "percent%41", "nön-ascii ünïcode 地図"]


@pytest.mark.parametrize("name", NAMES)
def test_a_build_in_a_cache_dir_and_store_with_odd_characters(
    cb: Any, tmp_path: Path, name: str
) -> None:
    top = tmp_path / "top"
    top.mkdir()
    cache, store = top / f"cache {name}", top / f"store {name}"
    flight = write_flight(tmp_path / "f.json")
    args = (f"FLIGHT={flight}", f"CACHE_DIR={cache}", f"STORE={store}", "BUFFER_M=200", "ZOOM=17")
    first = cb.build(*args)
    assert first.code == 0, first.stderr
    again = cb.build(*args)
    assert again.code == 0, again.stderr
    assert again.report["outcome"] == "up_to_date", again.stderr
    assert not (cache / "state" / "doit.sqlite3.corrupt").exists()
    verify = cb.run("verify-cache", f"CACHE_DIR={cache}", f"STORE={store}")
    assert verify.code == 0, verify.stderr
    shown = cb.run("preview-cache", f"CACHE_DIR={cache}", f"STORE={store}", f"OUT={top / 'p.png'}")
    assert shown.code == 0, shown.stderr
    assert sorted(p.name for p in top.iterdir()) == sorted([cache.name, store.name, "p.png"])

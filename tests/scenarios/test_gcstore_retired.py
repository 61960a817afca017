"""``doit gc-store`` after cache directories were deleted: real doit runs.

Two caches built with ``CACHE_DIR=A`` and ``CACHE_DIR=B`` into one store,
both removed with ``rm -rf``, a third cache kept: gc-store must finish,
remove what only the deleted caches used (tile images and action-cache
outputs, interleaved by age) and keep everything the third one uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cachebuild.tileset import hex_digests, read_tiles
from tests.conftest import write_flight

ARGS = ("BUFFER_M=200", "ZOOM=17")


def objects(store: Path) -> set[str]:
    return {p.name for p in (store / "objects").glob("*/*") if p.is_file()}


def test_gc_after_two_caches_were_deleted_finishes_and_keeps_what_the_third_uses(
    cb: Any, tmp_path: Path
) -> None:
    store = cb.home / "store"
    caches = {name: tmp_path / name for name in ("A", "B", "C")}
    for (name, cache), lat in zip(caches.items(), (47.30, 47.40, 47.50)):
        built = cb.build(
            f"FLIGHT={write_flight(tmp_path / f'{name}.json', lat=lat)}",
            f"CACHE_DIR={cache}",
            *ARGS,
        )
        assert built.code == 0, built.stderr
    used = {name: set(hex_digests(read_tiles(cache / "current"))) for name, cache in caches.items()}
    assert used["C"] and not used["C"] & (used["A"] | used["B"])
    assert (used["A"] | used["B"] | used["C"]) <= objects(store)
    for name in ("A", "B"):
        shutil.rmtree(caches[name])

    gc = cb.run("gc-store", f"CACHE_DIR={caches['C']}")
    assert gc.code == 0, gc.stderr
    assert "Traceback" not in gc.stderr
    report = gc.report["gc"]
    left = objects(store)
    assert used["C"] <= left, "a tile the kept cache uses was removed"
    assert not (used["A"] | used["B"]) & left, "tiles only the deleted caches used are kept"
    assert report["removed"]["tiles"] == len(used["A"] | used["B"])
    assert report["removed"]["action_outputs"] > 0
    assert report["kept"]["tiles"] == len(left)

    # the kept cache still verifies and rebuilds as a no-op; a second gc has nothing to do
    assert cb.run("verify-cache", f"CACHE_DIR={caches['C']}").code == 0
    again = cb.build(f"FLIGHT={tmp_path / 'C.json'}", f"CACHE_DIR={caches['C']}", *ARGS)
    assert again.code == 0 and again.report["outcome"] == "up_to_date", again.stderr
    second = cb.run("gc-store", f"CACHE_DIR={caches['C']}")
    assert second.code == 0, second.stderr
    assert json.loads(second.stdout.splitlines()[-1])["gc"]["removed"]["tiles"] == 0

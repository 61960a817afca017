"""Tests for cachebuild.store.lock: builds share the store, gc-store has it alone."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cachebuild.errors import LockHeldError
from cachebuild.store import lock as storelock
from cachebuild.store.lock import StoreLock, register_cache, registered_caches
from tests._harness.surface import assert_public_surface


def test_builds_share_the_store(tmp_path: Path) -> None:
    with StoreLock(tmp_path, exclusive=False), StoreLock(tmp_path, exclusive=False, wait=False):
        pass


def test_collector_does_not_wait_for_a_build(tmp_path: Path) -> None:
    with StoreLock(tmp_path, exclusive=False):
        with pytest.raises(LockHeldError, match="a build is using the store") as err:
            StoreLock(tmp_path, exclusive=True, wait=False).acquire()
        assert err.value.exit_code == 50
    with StoreLock(tmp_path, exclusive=True, wait=False):
        pass


def test_a_build_waits_for_the_collector_and_says_so(tmp_path: Path) -> None:
    gc = StoreLock(tmp_path, exclusive=True, wait=False).acquire()
    said = io.StringIO()
    got = threading.Event()

    def build() -> None:
        with StoreLock(tmp_path, exclusive=False, stream=said):
            got.set()

    t = threading.Thread(target=build)
    t.start()
    time.sleep(0.3)
    assert not got.is_set(), "the build must wait while gc-store runs"
    gc.release()
    t.join(10)
    assert got.is_set() and "waiting for gc-store" in said.getvalue()


def test_a_killed_collector_frees_the_store(tmp_path: Path) -> None:
    code = (
        "import os, sys; from cachebuild.store.lock import StoreLock; "
        f"StoreLock({str(tmp_path)!r}, exclusive=True).acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with StoreLock(tmp_path, exclusive=False, wait=False):
        pass


def test_registry(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    register_cache(tmp_path / "store", a)
    register_cache(tmp_path / "store", a)
    register_cache(tmp_path / "store", b)
    assert set(registered_caches(tmp_path / "store")) == {a, b}
    b.rmdir()
    assert registered_caches(tmp_path / "store") == [a]
    assert len(list((tmp_path / "store" / "caches").glob("*.json"))) == 2
    registered_caches(tmp_path / "store", prune=True)
    assert len(list((tmp_path / "store" / "caches").glob("*.json"))) == 1


def test_public_surface() -> None:
    """``__all__`` lists exactly the public names the module defines."""
    assert_public_surface(storelock)

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachebuild.errors import LockHeldError
from cachebuild.release.lock import CacheLock


def test_second_holder_is_refused_with_path_and_pid(tmp_path: Path) -> None:
    path = tmp_path / "c" / "build.lock"
    with CacheLock(path):
        t = time.monotonic()
        with pytest.raises(LockHeldError) as info:
            CacheLock(path).acquire()
        assert time.monotonic() - t < 1.0
    msg = str(info.value)
    assert str(path) in msg and f"pid {os.getpid()}" in msg
    assert info.value.exit_code == 50
    # released: free again, pid file gone
    CacheLock(path).acquire().release()
    assert not path.with_name("build.lock.pid").exists()


def test_holder_killed_frees_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "build.lock"
    code = f"from cachebuild.release.lock import CacheLock; import time; lock = CacheLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    with pytest.raises(LockHeldError) as info:
        CacheLock(path).acquire()
    assert f"pid {p.pid}" in str(info.value)
    p.kill()
    p.wait()
    p.stdout.close()
    CacheLock(path).acquire().release()

"""issue 19, in process: the companion push's hash cache and the produced-record check before signing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cachebuild.companion.push import file_sha256_cached
from cachebuild.errors import BuildError
from cachebuild.release import produced


def _settle(p: Path) -> None:
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10 * 10**9))


def test_the_push_cache_sees_a_same_size_rewrite_with_its_mtime_restored(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"a" * 4096)
    _settle(model)
    cache = tmp_path / "push-cache.json"
    assert file_sha256_cached(model, cache) == hashlib.sha256(b"a" * 4096).hexdigest()
    st = model.stat()
    with open(model, "r+b") as fh:  # the same inode and size
        fh.write(b"b" * 4096)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256_cached(model, cache) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_the_push_cache_does_not_trust_a_racy_entry(tmp_path: Path) -> None:
    f = tmp_path / "calib.npy"
    f.write_bytes(b"one")
    cache = tmp_path / "push-cache.json"
    file_sha256_cached(f, cache)
    st = f.stat()
    with open(f, "r+b") as fh:  # within the record's tick: every stat field may be equal
        fh.write(b"two")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256_cached(f, cache) == hashlib.sha256(b"two").hexdigest()


def test_check_signable_refuses_and_forgets_what_no_task_wrote(tmp_path: Path) -> None:
    a = tmp_path / "tiles.mbtiles"
    a.write_bytes(b"genuine")
    produced.record(tmp_path, [str(a)])
    assert not os.stat(a).st_mode & 0o222  # made read-only as it is recorded
    assert produced.intact(tmp_path, [str(a)])
    good = hashlib.sha256(b"genuine").hexdigest()
    produced.check_signable(tmp_path, {"tiles.mbtiles": good})
    a.unlink()
    a.write_bytes(b"planted")  # same size
    assert not produced.intact(tmp_path, [str(a)])
    with pytest.raises(BuildError, match="tiles.mbtiles in .* is not what the build wrote"):
        produced.check_signable(tmp_path, {"tiles.mbtiles": hashlib.sha256(b"planted").hexdigest()})
    assert not produced.intact(tmp_path, [str(a)])  # forgotten: its task runs again

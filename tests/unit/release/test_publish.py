from __future__ import annotations

import json
import os
from pathlib import Path

from cachebuild.inputs.config import Paths
from cachebuild.release.publish import (
    KEEP_RELEASES,
    clean_leftovers,
    current_release,
    publish,
    published_manifest_bytes,
    release_intact,
)


def _stage(paths: Paths, build_id: str, version: int, payload: bytes) -> list[str]:
    paths.build.mkdir(parents=True, exist_ok=True)
    (paths.build / "a.bin").write_bytes(payload)
    signed = {
        "build_id": build_id,
        "version": version,
        "targets": {"a.bin": {"length": len(payload)}},
    }
    (paths.build / "manifest.json").write_text(json.dumps({"signed": signed}))
    (paths.build / "signer.pub").write_text("ssh-ed25519 AAAA test\n")
    return ["manifest.json", "signer.pub", "a.bin"]


def test_publish_swaps_current_and_keeps_one_previous(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert current_release(paths) is None and published_manifest_bytes(paths) is None
    releases = []
    for v in range(1, 5):
        files = _stage(paths, f"{v:064x}", v, b"x" * v)
        releases.append(publish(paths, files))
        assert current_release(paths) == releases[-1]
        assert (paths.current / "a.bin").read_bytes() == b"x" * v
        # staged files are replaced by rename, never written in place
        os.unlink(paths.build / "a.bin")
    left = sorted(p.name for p in paths.releases.iterdir())
    assert len(left) == KEEP_RELEASES
    assert releases[-1].name in left and releases[-2].name in left


def test_release_intact_notices_missing_or_resized(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    rel = publish(paths, _stage(paths, "ab" * 32, 1, b"data"))
    signed = json.loads((rel / "manifest.json").read_text())["signed"]
    assert release_intact(rel, signed)
    (rel / "a.bin").unlink()
    (rel / "a.bin").write_bytes(b"dat")
    assert not release_intact(rel, signed)
    (rel / "a.bin").unlink()
    assert not release_intact(rel, signed)


def test_leftovers_of_a_killed_publish_are_removed(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    publish(paths, _stage(paths, "cd" * 32, 1, b"data"))
    (paths.releases / ".tmp-half-123").mkdir()
    (paths.releases / ".tmp-half-123" / "a.bin").write_bytes(b"d")
    os.symlink("releases/nowhere", paths.cache_dir / ".current.tmp-99")
    (paths.build / ".tiles.npy.tmp-77").write_bytes(b"partial")
    (paths.build / ".model.onnx.78-0123abcd.tmp").write_bytes(
        b"partial"
    )  # manifest.atomic_write's temp name
    removed = clean_leftovers(paths)
    assert len(removed) == 4
    assert current_release(paths) is not None
    assert not (paths.build / ".tiles.npy.tmp-77").exists()
    assert not (paths.build / ".model.onnx.78-0123abcd.tmp").exists()

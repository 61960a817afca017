"""Hostile companion packs (issue 19 §3): whatever lands in ``incoming/`` is
read as hostile input, bounded in memory, and a bad pack is quarantined, never
retried, so it cannot wedge later pushes.

The sparse packs are made by GNU tar (``--sparse``), as an attacker would.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from cachebuild.companion import packs
from cachebuild.store.objects import TileStore, sha256_hex
from tests._harness.sshd import SSHD
from tests.conftest import write_flight
from tests.scenarios.test_companion import Companion, companion  # noqa: F401  (the fixture)

TAR = shutil.which("tar")
needs_gnu_tar = pytest.mark.skipif(TAR is None, reason="GNU tar is not installed")


def sparse_pack(path: Path, name: str, size: int, head: bytes = b"x") -> Path:
    """A GNU tar at ``path`` whose one sparse member ``name`` declares ``size`` bytes
    (``head`` then zeros) in a file of a few KB."""
    work = path.parent / f".{path.name}.d"
    work.mkdir()
    member = work / name
    member.write_bytes(head)
    os.truncate(member, size)
    subprocess.run(
        [TAR, "--sparse", "--format=gnu", "-C", str(work), "-cf", str(path), name], check=True
    )
    shutil.rmtree(work)
    assert path.stat().st_size < 64 << 10
    return path


def zeros_digest(head: bytes, size: int) -> str:
    h = hashlib.sha256(head)
    left = size - len(head)
    block = bytes(1 << 20)
    while left:
        n = min(left, len(block))
        h.update(block[:n])
        left -= n
    return h.hexdigest()


def good_pack(path: Path, n: int = 3) -> dict[str, bytes]:
    objs = {sha256_hex(b): b for b in (os.urandom(200) for _ in range(n))}
    path.write_bytes(packs.build_pack(objs.items()))
    return objs


def tar_with(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data) if data else None)
    return path


@needs_gnu_tar
def test_a_sparse_member_is_refused_quarantined_and_the_good_packs_still_unpack(
    tmp_path: Path,
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    size = 8 << 20
    digest = zeros_digest(b"x", size)  # named by its true (expanded) content
    sparse_pack(incoming / "a-000000.tar", digest, size)
    sparse_pack(incoming / "b-000000.tar", "f" * 64, 1 << 40)  # 1 TiB declared
    objs = good_pack(incoming / "c-000000.tar")
    with TileStore(tmp_path / "store") as store:
        counts = packs.settle_incoming(incoming, store)
        assert not store.has(digest), "a sparse member was stored as an object"
        assert all(store.has(d) for d in objs)
    assert counts["packs"] == 1 and counts["objects"] == 3 and counts["corrupt"] == 2
    assert all("sparse" in line for line in counts["quarantined"]), counts["quarantined"]
    quarantined = sorted(p.name for p in (incoming / packs.QUARANTINE_DIR).iterdir())
    assert [n.split("-", 1)[1] for n in quarantined] == ["a-000000.tar", "b-000000.tar"]
    assert not [p for p in incoming.iterdir() if p.name != packs.QUARANTINE_DIR], (
        "nothing left to claim"
    )
    with TileStore(tmp_path / "store") as store:  # the next settle finds nothing to do
        again = packs.settle_incoming(incoming, store)
    assert again["corrupt"] == 0 and again["quarantined"] == []


@pytest.mark.parametrize(
    "kind",
    ["symlink", "hardlink", "chardev", "fifo", "directory", "oversized", "past_the_end"],
)
def test_only_plain_regular_members_within_the_caps_pass(tmp_path: Path, kind: str) -> None:
    name = "a" * 64
    info = tarfile.TarInfo(name)
    data = b""
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "b" * 64
    elif kind == "chardev":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 5  # /dev/zero
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    elif kind == "directory":
        info.type = tarfile.DIRTYPE
    elif kind == "oversized":
        info.size = packs.MAX_MEMBER_BYTES + 1
        data = bytes(info.size)
    elif kind == "past_the_end":
        info.size = 10_000
        data = bytes(info.size)
    pack = tar_with(tmp_path / "p.tar", info, data)
    if kind == "past_the_end":  # declares more than the file holds
        raw = pack.read_bytes()
        pack.write_bytes(raw[: 512 + 1024])
    with pytest.raises(packs.PackCorruptError):
        list(packs.iter_pack(pack))


def test_a_pack_file_over_the_cap_is_quarantined_unread(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    big = incoming / "a-000000.tar"
    good = good_pack(big, 1)
    os.truncate(big, packs.MAX_PACK_FILE_BYTES + 1)  # a valid tar, then zeros: sparse on disk
    (incoming / "b-000000.tar").symlink_to("/dev/zero")
    with TileStore(tmp_path / "store") as store:
        counts = packs.settle_incoming(incoming, store)
        assert not any(store.has(d) for d in good)
    assert counts["corrupt"] == 2 and counts["packs"] == 0
    assert "larger than a pack may be" in counts["quarantined"][0]
    assert "not a regular file" in counts["quarantined"][1]


def test_quarantine_keeps_only_the_newest(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    with TileStore(tmp_path / "store") as store:
        for i in range(packs.QUARANTINE_KEEP + 4):
            (incoming / f"s{i:03d}-000000.tar").write_bytes(b"not a tar" * 100)
            packs.settle_incoming(incoming, store, now=1_000_000 + i)
    kept = sorted(p.name for p in (incoming / packs.QUARANTINE_DIR).iterdir())
    assert len(kept) == packs.QUARANTINE_KEEP and kept[-1].endswith(
        f"s{packs.QUARANTINE_KEEP + 3:03d}-000000.tar"
    )


@needs_gnu_tar
@pytest.mark.skipif(not os.path.exists(SSHD), reason=f"{SSHD} (openssh-server) is not installed")
def test_sparse_packs_on_the_companion_never_wedge_a_build(
    companion: Companion, tmp_path: Path
) -> None:
    """The attack of issue 19: sparse packs left in the companion's ``incoming/``
    (one named by its true 8 MiB content, one declaring 1 TiB)."""
    incoming = companion.dir / "incoming"
    incoming.mkdir(parents=True)
    size = 8 << 20
    digest = zeros_digest(b"x", size)
    sparse_pack(incoming / "0-000000.tar", digest, size)
    sparse_pack(
        incoming / "0-000001.tar.claimed-999999999", "e" * 64, 1 << 40
    )  # its unpacker died on it
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f)
    assert r.code == 0, r.stderr
    refused = [w for w in r.report["warnings"] if "quarantined" in w]
    assert len(refused) == 2 and all("sparse" in w for w in refused), r.report["warnings"]
    assert digest not in companion.objects()
    assert len(list((incoming / packs.QUARANTINE_DIR).iterdir())) == 2
    assert not [p for p in incoming.iterdir() if p.name != packs.QUARANTINE_DIR]
    again = companion.build(f)  # nothing to settle, nothing refused again
    assert again.code == 0, again.stderr
    assert again.report["outcome"] == "up_to_date"
    assert not [w for w in again.report["warnings"] if "quarantined" in w]


def test_the_workstation_never_sends_a_member_the_companion_would_refuse(tmp_path: Path) -> None:
    from cachebuild.companion.errors import CompanionNotReadyError
    from cachebuild.companion.push import PushPlan, push

    digest = "ab" * 32
    plan = PushPlan(
        tiles={digest: (str(tmp_path / "huge"), packs.MAX_MEMBER_BYTES + 1)},
        inputs={},
        inbox="inbox/x",
        inbox_files={},
        remote={},
    )
    with pytest.raises(CompanionNotReadyError, match="at most"):
        push(None, None, plan, {plan.tile_rel(digest)}, root="/c")

"""issue 19: what a verified cache promises, and what the build believes about its inputs.

Each test performs the attack through real `doit build-cache` / `doit
verify-cache` processes on a copy of one built home:

- a file the manifest does not list, planted in ``current/`` (a SQLite hot
  journal, an extra engine file or index): refused, exit 23, ``unlisted``;
- a published release is read-only on disk, files and directories;
- a signed number stored with another type (``17.0`` for ``17``): refused;
- the staged ``tiles.mbtiles`` substituted (same size, mtime restored) before
  a build that changes only the takeoff altitude: the build makes the file
  again and never signs the substitute;
- the signing key rotated in place with its mtime restored: re-signed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cachebuild.errors import EXIT_VERIFY
from tests.conftest import Cb, CbResult, write_flight

SMALL = ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=0")


def write_key(path: Path) -> str:
    """A fresh Ed25519 key (unencrypted PKCS8 PEM: always the same size); returns its public raw hex."""
    k = ed25519.Ed25519PrivateKey.generate()
    pem = k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return (
        k.public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        .hex()
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("issue19")
    home = root / "home"
    home.mkdir()
    write_key(home / "key.pem")
    flight = write_flight(home / "flight.json", origin=(47.3701, 8.5401))
    r = Cb(home=home).build(f"FLIGHT={flight}", f"KEY={home / 'key.pem'}", *SMALL)
    assert r.code == 0, r.stderr
    return home


@pytest.fixture
def cb(built: Path, tmp_path: Path) -> Cb:
    home = tmp_path / "home"
    shutil.copytree(built, home, symlinks=True)
    return Cb(home=home)


@pytest.fixture
def warm(cb: Cb) -> Cb:
    """The copy built once where it lies: doit's database names its files by path, so a copy rebuilds once."""
    r = build(cb)
    assert r.code == 0, r.stderr
    r = build(cb)
    assert r.code == 0 and r.report["outcome"] == "up_to_date", r.report
    return cb


def key_arg(cb: Cb) -> str:
    return f"KEY={cb.home / 'key.pem'}"


def build(cb: Cb, *extra: str) -> CbResult:
    return cb.build(f"FLIGHT={cb.home / 'flight.json'}", key_arg(cb), *SMALL, *extra)


def verify(cb: Cb) -> CbResult:
    return cb.run("verify-cache", key_arg(cb))


def refused(r: CbResult, reason: str, words: str) -> None:
    assert r.code == EXIT_VERIFY, (r.code, r.stdout, r.stderr)
    assert r.report["reason"] == reason, r.report
    assert words in r.report["error"], r.report["error"]
    assert "Traceback" not in r.stderr


def plant(path: Path, data: bytes) -> None:
    """Write ``path`` into a read-only release, as an attacker with the rights to would."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    mode = parent.stat().st_mode
    parent.chmod(mode | 0o700)
    path.write_bytes(data)
    parent.chmod(mode)


# -- 1. what a verified cache promises ----------------------------------------------------


@pytest.mark.parametrize(
    "rel", ["tiles.mbtiles-journal", "engine/engine.plan", "index2.faiss", "extra/x"]
)
def test_an_unlisted_file_in_current_is_refused(cb: Cb, rel: str) -> None:
    assert verify(cb).code == 0
    # a SQLite hot journal header, padded to 21 KB: replayed by a read-write open of the MBTiles
    plant(cb.current / rel, b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + os.urandom(21 * 1024))
    name = rel.split("/")[0] + "/" if rel.startswith("extra/") else rel
    refused(verify(cb), "unlisted", f"unlisted file {name}")


def test_a_release_is_read_only_on_disk(cb: Cb) -> None:
    release = cb.current.resolve()
    for p in [release, *release.rglob("*")]:
        assert not p.stat().st_mode & 0o222, f"{p} is writable ({oct(p.stat().st_mode)})"


def test_old_releases_are_removed_though_read_only(cb: Cb) -> None:
    """Retention removes the read-only releases beyond the last two (as root and, below, as another user)."""
    flight = cb.home / "flight.json"
    for alt in (401.0, 402.0):
        doc = json.loads(flight.read_text())
        doc["takeoff_origin"]["alt_m"] = alt
        flight.write_text(json.dumps(doc))
        assert build(cb).code == 0
    names = [p for p in (cb.cache_dir / "releases").iterdir() if not p.name.startswith(".")]
    assert len(names) == 2, names


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_remove_tree_removes_a_read_only_tree_as_its_owner(tmp_path: Path) -> None:
    """Read-only directories stop an ordinary user's rmtree; publish.remove_tree makes them writable first."""
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"cb-i19-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        rel = base / "rel"
        (rel / "engine").mkdir(parents=True)
        (rel / "engine" / "engine.onnx").write_bytes(b"x")
        (rel / "manifest.json").write_bytes(b"{}")
        from cachebuild.release.publish import make_tree_read_only

        make_tree_read_only(rel)
        for p in [base, rel, *rel.rglob("*")]:
            os.chown(p, 65534, 65534, follow_symlinks=False)
        code = "import sys, shutil; from cachebuild.release.publish import remove_tree; remove_tree(sys.argv[1])"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        plain = [
            *_as_nobody(),
            sys.executable,
            "-c",
            "import sys, shutil; shutil.rmtree(sys.argv[1])",
            str(rel),
        ]
        assert (
            subprocess.run(plain, env=env, capture_output=True).returncode != 0
        )  # the ordinary way fails
        ours = [*_as_nobody(), sys.executable, "-c", code, str(rel)]
        r = subprocess.run(ours, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not rel.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody() -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _retype(cb: Cb, change: str) -> None:
    manifest = cb.current / "manifest.json"
    text = manifest.read_text()
    if change == "zooms":
        new = text.replace('"zooms": [\n    17\n   ]', '"zooms": [\n    17.0\n   ]')
    else:
        doc = json.loads(text)
        n = doc["signed"]["info"]["descriptors"]
        new = text.replace(f'"descriptors": {n},', f'"descriptors": {n}.0,')
    assert new != text
    manifest.unlink()
    plant(manifest, new.encode())


@pytest.mark.parametrize("change", ["zooms", "descriptors"])
def test_a_signed_number_that_changed_type_is_refused(cb: Cb, change: str) -> None:
    _retype(cb, change)
    refused(verify(cb), "malformed", "is not the value that was signed")


def _tile_blobs(path: Path) -> dict[tuple[int, int, int], bytes]:
    con = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        rows = con.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles")
        return {(z, x, y): bytes(d) for z, x, y, d in rows}
    finally:
        con.close()


def test_the_build_never_signs_a_substituted_artifact(warm: Cb, tmp_path: Path) -> None:
    cb = warm
    staged = cb.cache_dir / "state" / "build" / "tiles.mbtiles"
    genuine = _tile_blobs(staged)
    st = staged.stat()
    # a copy with one tile's image replaced by other bytes of the same length
    fake = tmp_path / "fake.mbtiles"
    shutil.copyfile(staged, fake)
    fake.chmod(0o644)
    con = sqlite3.connect(fake)
    key, blob = next(iter(genuine.items()))
    evil = bytes(b ^ 0x5A for b in blob)
    with con:
        con.execute("PRAGMA journal_mode=DELETE")
        n = con.execute(
            "UPDATE tiles SET tile_data = ? WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (evil, *key),
        ).rowcount
    con.close()
    assert n == 1 and fake.stat().st_size == st.st_size
    evil_sha = hashlib.sha256(fake.read_bytes()).hexdigest()
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(fake, staged)
    # only the takeoff altitude changes
    flight = cb.home / "flight.json"
    doc = json.loads(flight.read_text())
    doc["takeoff_origin"]["alt_m"] += 1.0
    flight.write_text(json.dumps(doc))
    r = build(cb)
    assert r.code == 0, r.stderr
    signed = json.loads((cb.current / "manifest.json").read_text())["signed"]
    assert signed["identity"]["takeoff_origin"]["alt_m"] == doc["takeoff_origin"]["alt_m"]
    assert signed["targets"]["tiles.mbtiles"]["hashes"]["sha256"] != evil_sha
    assert _tile_blobs(cb.current / "tiles.mbtiles")[key] == blob
    assert verify(cb).code == 0


def test_a_key_rotated_in_place_with_its_mtime_restored_re_signs(warm: Cb, tmp_path: Path) -> None:
    cb = warm
    key = cb.home / "key.pem"
    st = key.stat()
    new_pub = write_key(tmp_path / "new.pem")
    data = (tmp_path / "new.pem").read_bytes()
    assert len(data) == st.st_size
    with open(key, "r+b") as fh:  # in place: the same inode and size
        fh.write(data)
    os.utime(key, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = build(cb)
    assert r.code == 0, r.stderr
    assert r.report["outcome"] == "success", r.report
    env = json.loads((cb.current / "manifest.json").read_text())
    assert env["signatures"][0]["keyid"] == hashlib.sha256(bytes.fromhex(new_pub)).hexdigest()
    assert verify(cb).code == 0


@pytest.mark.parametrize("how", ["same-size-touch-r", "other-size-cp-p"])
def test_a_changed_model_with_its_mtime_restored_rebuilds_the_engine(
    warm: Cb, tmp_path: Path, how: str
) -> None:
    """MODEL retrained: the same size and ``touch -r``, or ``cp -p`` of another size with the same mtime."""
    from cachebuild.engine.model import write_default_model

    cb = warm
    model = cb.home / "model.onnx"
    write_default_model(model)
    first = build(cb, f"MODEL={model}")
    assert first.code == 0, first.stderr
    before = first.report["engine"]["key"]
    st = model.stat()
    data = bytearray(model.read_bytes())
    if how == "same-size-touch-r":
        data[len(data) // 2] ^= 1  # a low bit of one weight: another model of the same size
        with open(model, "r+b") as fh:
            fh.write(data)
    else:
        other = tmp_path / "other.onnx"
        other.write_bytes(bytes(data) + b"\x00")  # not ONNX-meaningful, just another size
        shutil.copy2(other, model)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = build(cb, f"MODEL={model}")
    if how == "same-size-touch-r":
        assert r.code == 0, r.stderr
        assert r.report["engine"]["key"] != before, r.report
    else:  # a model doit rebuilds: the trailing byte makes it an invalid model, named as such
        assert r.code != 0 or r.report["engine"]["key"] != before, r.report

"""The development key: where it lives, moving it from its old place, and
never re-signing with it a cache that another key signed (issue 18, items
4 and 5).  Real ``doit build-cache`` runs, each in its own home and data dir.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cachebuild.inputs.config import load_settings
from cachebuild.release.lock import CacheLock
from cachebuild.release.signing import keyid, load_private_key
from tests.conftest import Cb, write_flight

SMALL = ("BUFFER_M=200", "ZOOM=17", "SELFTEST_QUERIES=0")


@pytest.fixture
def cbd(tmp_path: Path) -> Cb:
    """A home whose data dir (XDG_DATA_HOME) is its own too."""
    home = tmp_path / "home"
    home.mkdir()
    return Cb(home=home, env_extra={"XDG_DATA_HOME": str(tmp_path / "data")})


def data_key(tmp_path: Path) -> Path:
    return tmp_path / "data" / "cachebuild" / "keys" / "dev_ed25519.pem"


def operator_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return key


def signer(cb: Cb) -> str:
    return str(json.loads((cb.current / "manifest.json").read_bytes())["signatures"][0]["keyid"])


# -- item 4: an operator-signed cache is not re-signed with the development key ----------


def test_rebuild_without_key_refuses_to_resign_an_operator_cache(cbd: Cb, tmp_path: Path) -> None:
    op = operator_key(tmp_path / "operator.pem")
    f = write_flight(tmp_path / "f.json")
    first = cbd.build(f"FLIGHT={f}", *SMALL, f"KEY={tmp_path / 'operator.pem'}")
    assert first.code == 0, first.stderr
    assert signer(cbd) == keyid(op.public_key())
    published = (cbd.current / "manifest.json").read_bytes()

    # refused before the lock: another build holding it changes nothing (exit 2, not 50)
    with CacheLock(cbd.cache_dir / "build.lock"):
        r = cbd.build(f"FLIGHT={f}", *SMALL, "ZOOM=16")
    assert r.code == 2, r.stderr
    assert "ALLOW_DEV_KEY=1" in r.report["remedy"] and "KEY=" in r.report["remedy"]
    assert (
        keyid(op.public_key())[:16] in r.report["error"] and "development key" in r.report["error"]
    )
    assert r.report["tasks"]["run"] == [] and "lock" not in r.report["phases"]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")]) == 1
    assert (cbd.current / "manifest.json").read_bytes() == published
    assert not data_key(tmp_path).exists(), "refused before a development key was made"

    # the same with the key that signed it: a no-op
    again = cbd.build(f"FLIGHT={f}", *SMALL, f"KEY={tmp_path / 'operator.pem'}")
    assert again.code == 0 and again.report["outcome"] == "up_to_date", again.stderr

    # a value that is not 0/1 is refused by name, before anything
    bad = cbd.build(f"FLIGHT={f}", *SMALL, "ALLOW_DEV_KEY=please")
    assert bad.code == 2 and "ALLOW_DEV_KEY" in bad.report["error"], bad.stderr

    # said explicitly: re-signed with the development key, and from then on no refusal
    allowed = cbd.build(f"FLIGHT={f}", *SMALL, "ALLOW_DEV_KEY=1")
    assert allowed.code == 0 and allowed.report["outcome"] == "success", allowed.stderr
    dev = load_private_key(data_key(tmp_path))
    assert signer(cbd) == keyid(dev.public_key())
    after = cbd.build(f"FLIGHT={f}", *SMALL)
    assert after.code == 0 and after.report["outcome"] == "up_to_date", after.stderr


def test_environment_allow_dev_key_and_a_dev_signed_cache(cbd: Cb, tmp_path: Path) -> None:
    """A cache the development key signed rebuilds without KEY; CACHEBUILD_ALLOW_DEV_KEY=1 allows too."""
    f = write_flight(tmp_path / "f.json")
    assert cbd.build(f"FLIGHT={f}", *SMALL).code == 0
    moved = cbd.build(f"FLIGHT={f}", *SMALL, "BUFFER_M=250")
    assert moved.code == 0 and moved.report["outcome"] == "success", moved.stderr
    operator_key(tmp_path / "operator.pem")
    assert cbd.build(f"FLIGHT={f}", *SMALL, f"KEY={tmp_path / 'operator.pem'}").code == 0
    r = cbd.build(f"FLIGHT={f}", *SMALL, env=cbd.env(CACHEBUILD_ALLOW_DEV_KEY="1"))
    assert r.code == 0 and r.report["outcome"] == "success", r.stderr


# -- item 5: the development key lives in the data dir -----------------------------------


def test_purging_the_cache_home_keeps_the_development_key(cbd: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    r = cbd.build(f"FLIGHT={f}", *SMALL)
    assert r.code == 0, r.stderr
    key = data_key(tmp_path)
    assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert not list(cbd.home.rglob("*.pem")), "no key under CACHEBUILD_HOME"
    first = signer(cbd)

    shutil.rmtree(cbd.home)  # caches are purgeable
    cbd.home.mkdir()
    again = cbd.build(f"FLIGHT={f}", *SMALL)
    assert again.code == 0, again.stderr
    assert signer(cbd) == first, "the same development key signed both"
    assert "made a development signing key" not in again.stderr


def test_default_data_dir_is_under_home(tmp_path: Path) -> None:
    """Without XDG_DATA_HOME: ~/.local/share/cachebuild/keys, ~ being HOME."""
    user = tmp_path / "user"
    user.mkdir()
    cb = Cb(home=tmp_path / "cbhome")
    cb.home.mkdir()
    env = {k: v for k, v in cb.env().items() if k != "XDG_DATA_HOME"}
    env["HOME"] = str(user)
    f = write_flight(tmp_path / "f.json")
    r = cb.build(f"FLIGHT={f}", *SMALL, env=env)
    assert r.code == 0, r.stderr
    assert (user / ".local" / "share" / "cachebuild" / "keys" / "dev_ed25519.pem").is_file()


def test_data_home_rule() -> None:
    from cachebuild.inputs.config import cachebuild_data_home

    assert cachebuild_data_home({"XDG_DATA_HOME": "/d", "HOME": "/h"}) == Path("/d/cachebuild")
    # a relative XDG_DATA_HOME is invalid (XDG Base Directory spec) and ignored
    assert cachebuild_data_home({"XDG_DATA_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.local/share/cachebuild"
    )
    assert cachebuild_data_home({"HOME": "/h"}) == Path("/h/.local/share/cachebuild")
    s = load_settings({}, {"CACHEBUILD_HOME": "/c", "XDG_DATA_HOME": "/d"})
    assert s.dev_key == Path("/d/cachebuild/keys/dev_ed25519.pem")


def test_an_old_development_key_is_moved_once(cbd: Cb, tmp_path: Path) -> None:
    old = cbd.home / "keys" / "dev_ed25519.pem"
    old.parent.mkdir(mode=0o700)
    key = operator_key(old)
    old_bytes = old.read_bytes()
    f = write_flight(tmp_path / "f.json")

    # verify-cache of a cache signed before the move still finds the key in its old place
    r = cbd.build(f"FLIGHT={f}", *SMALL)
    assert r.code == 0, r.stderr
    assert "moved the development signing key" in r.stderr and str(data_key(tmp_path)) in r.stderr
    new = data_key(tmp_path)
    assert new.read_bytes() == old_bytes and not old.exists()
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert signer(cbd) == keyid(key.public_key())
    assert "made a development signing key" not in r.stderr

    again = cbd.build(f"FLIGHT={f}", *SMALL)
    assert again.code == 0 and "moved" not in again.stderr, again.stderr
    v = cbd.run("verify-cache")
    assert v.code == 0, v.stderr


def test_the_move_is_said_on_a_no_op_too(cbd: Cb, tmp_path: Path) -> None:
    """A cache signed by the key in its old place: the build after the upgrade signs nothing, yet says it moved."""
    f = write_flight(tmp_path / "f.json")
    assert cbd.build(f"FLIGHT={f}", *SMALL).code == 0
    old = cbd.home / "keys" / "dev_ed25519.pem"
    old.parent.mkdir(mode=0o700)
    os.replace(data_key(tmp_path), old)  # as an older cachebuild left it
    r = cbd.build(f"FLIGHT={f}", *SMALL)
    assert r.code == 0 and r.report["outcome"] == "up_to_date", r.stderr
    assert "moved the development signing key" in r.stderr and data_key(tmp_path).is_file()
    v = cbd.run("verify-cache")
    assert v.code == 0, v.stderr


def test_verify_before_the_move_reads_the_old_place(cbd: Cb, tmp_path: Path) -> None:
    f = write_flight(tmp_path / "f.json")
    assert cbd.build(f"FLIGHT={f}", *SMALL).code == 0
    old = cbd.home / "keys" / "dev_ed25519.pem"
    old.parent.mkdir(mode=0o700)
    os.replace(data_key(tmp_path), old)  # as an older cachebuild left it
    v = cbd.run("verify-cache")
    assert v.code == 0, v.stderr
    assert old.exists(), "verify-cache only reads"


def test_a_key_directory_this_user_may_not_enter_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES on the way to the dev key is one UsageError naming the place, not a traceback.

    Root may enter every directory, so the denial is simulated at ``Path.exists``.
    """
    from cachebuild.errors import UsageError
    from cachebuild.release.signing import ensure_dev_key

    def denied(self: Path, *a: object, **k: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    with pytest.raises(UsageError, match="Permission denied") as info:
        ensure_dev_key(tmp_path / "keys" / "dev_ed25519.pem")
    assert info.value.remedy

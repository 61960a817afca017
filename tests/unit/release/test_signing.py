"""Tests for cachebuild.release.signing: key files, dev keys and signed envelopes."""

from __future__ import annotations

import base64
import copy
import doctest
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import cachebuild
import cachebuild.release.signing as signing
from cachebuild._util.hashing import canonical_json
from cachebuild.errors import UsageError, VerifyError
from cachebuild.release.signing import (
    KeyPermissionWarning,
    ensure_dev_key,
    keyid,
    load_private_key,
    load_public_key,
    public_key_raw,
    sign_envelope,
    verify_envelope,
    write_public_key,
)

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(
    SSH_KEYGEN is None, reason="ssh-keygen (OpenSSH client) is not installed"
)
REPO_ROOT = Path(cachebuild.__file__).resolve().parent.parent

# RFC 8032, section 7.1, test 1.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


# -- helpers -------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _pem(key: object, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )


def _openssh(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _secret_markers(
    data: bytes, key: object | None = None, passphrase: str | None = None
) -> list[str]:
    """Fragments of a key file that must never appear outside it."""
    lines = [ln.decode() for ln in data.splitlines() if ln and not ln.startswith(b"-----")]
    markers = [ln[8:40] for ln in lines if len(ln) >= 40]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes_raw()
        markers += [
            raw.hex(),
            raw.hex().upper(),
            base64.b64encode(raw).decode()[:30],
            repr(raw)[2:40],
        ]
    if passphrase:
        markers.append(passphrase)
    assert markers
    return markers


def _full_text(exc: BaseException) -> str:
    """Everything an operator could see of ``exc``: message, repr, causes."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def _assert_no_secret(text: str, markers: list[str]) -> None:
    for m in markers:
        assert m not in text, "secret material leaked"


def _ssh_keygen(path: Path, *args: str) -> Path:
    assert SSH_KEYGEN is not None
    subprocess.run(
        [SSH_KEYGEN, "-q", "-C", "test@cachebuild", "-f", str(path), *args], check=True, timeout=30
    )
    return path


@pytest.fixture
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def test_docstring_examples() -> None:
    result = doctest.testmod(signing, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_all_is_complete() -> None:
    defined = {
        n
        for n, v in vars(signing).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == signing.__name__
    }
    assert defined | {"PASSPHRASE_ENV", "LEGACY_PASSPHRASE_ENV"} == set(signing.__all__)
    assert all(hasattr(signing, n) for n in signing.__all__)


def test_import_does_not_load_cryptography() -> None:
    code = "import sys, cachebuild.release.manifest; print(any(m.startswith('cryptography') for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "False"


# -- keys --------------------------------------------------------------------------


def test_keyid_is_sha256_of_raw_public_key() -> None:
    pub = ed25519.Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET).public_key()
    assert public_key_raw(pub) == RFC8032_PUBLIC
    assert keyid(pub) == hashlib.sha256(RFC8032_PUBLIC).hexdigest()


def test_load_pem_pkcs8(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    loaded = load_private_key(_write(tmp_path / "k.pem", _pem(key)))
    assert loaded.private_bytes_raw() == key.private_bytes_raw()


def test_load_openssh_from_cryptography(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    loaded = load_private_key(_write(tmp_path / "id_ed25519", _openssh(key)))
    assert loaded.private_bytes_raw() == key.private_bytes_raw()


@needs_ssh_keygen
def test_load_ssh_keygen_key_and_its_pub(tmp_path: Path) -> None:
    priv_path = _ssh_keygen(tmp_path / "id_ed25519", "-t", "ed25519", "-N", "")
    priv = load_private_key(priv_path)
    pub = load_public_key(priv_path.with_suffix(".pub"))
    assert public_key_raw(pub) == public_key_raw(priv.public_key())
    assert public_key_raw(load_public_key(priv_path)) == public_key_raw(pub)
    # a signature made with the ssh-keygen key verifies against its .pub
    env = sign_envelope({"x": 1}, priv)
    assert verify_envelope(env, [pub]) == {"x": 1}


@needs_ssh_keygen
def test_write_public_key_is_read_by_ssh_keygen(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    path = tmp_path / "signer.pub"
    write_public_key(path, key.public_key())
    text = path.read_text()
    assert text.count("\n") == 1 and text.startswith("ssh-ed25519 AAAA")
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-f", str(path)], capture_output=True, text=True, check=True
    )  # type: ignore[list-item]
    blob = base64.b64decode(text.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert expected in out.stdout and "ED25519" in out.stdout


def test_write_public_key_round_trip(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    path = tmp_path / "signer.pub"
    write_public_key(path, key.public_key())
    write_public_key(path, key.public_key())  # overwrite is fine
    assert public_key_raw(load_public_key(path)) == public_key_raw(key.public_key())
    assert keyid(key.public_key())[:16] in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["signer.pub"]  # no temp left behind


def test_load_public_key_formats(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    pub = key.public_key()
    raw = public_key_raw(pub)
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    spki = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    files = {
        "plain.pub": line + b"\n",
        "comment.pub": line + b" operator@ground station\n",
        "with_header.pub": b"# operator key\n\n" + line + b" op\n",
        "spki.pem": spki,
        "private.pem": _pem(key),
        "private_openssh": _openssh(key),
    }
    for name, data in files.items():
        assert public_key_raw(load_public_key(_write(tmp_path / name, data))) == raw, name


def test_load_public_key_rejects_rsa_and_garbage(tmp_path: Path) -> None:
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    p = _write(
        tmp_path / "rsa.pub",
        rsa_pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    )
    with pytest.raises(UsageError, match="RSA"):
        load_public_key(p)
    with pytest.raises(UsageError, match="not a PEM or OpenSSH public key"):
        load_public_key(_write(tmp_path / "junk.pub", b"hello world\n"))
    with pytest.raises(UsageError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_non_ed25519_private_key_refused(tmp_path: Path, kind: str) -> None:
    other = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    data = _pem(other)
    with pytest.raises(UsageError) as info:
        load_private_key(_write(tmp_path / "k.pem", data))
    assert "RSA" in str(info.value) if kind == "rsa" else "ECDSA" in str(info.value)
    assert "Ed25519" in str(info.value) and str(tmp_path / "k.pem") in str(info.value)
    _assert_no_secret(_full_text(info.value), _secret_markers(data))


@needs_ssh_keygen
def test_ssh_keygen_rsa_key_refused(tmp_path: Path) -> None:
    path = _ssh_keygen(tmp_path / "id_rsa", "-t", "rsa", "-b", "2048", "-N", "")
    with pytest.raises(UsageError, match="an RSA key") as info:
        load_private_key(path)
    _assert_no_secret(_full_text(info.value), _secret_markers(path.read_bytes()))


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist") as info:
        load_private_key(tmp_path / "nope.pem")
    assert str(tmp_path / "nope.pem") in str(info.value)
    with pytest.raises(UsageError, match="is a directory"):
        load_private_key(tmp_path)


def test_not_a_key_and_public_key_given(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(UsageError, match="not a PEM or OpenSSH private key"):
        load_private_key(_write(tmp_path / "notes.txt", b"just some text\n"))
    pub_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    with pytest.raises(UsageError, match="is a public key, not a private key"):
        load_private_key(_write(tmp_path / "id.pub", pub_line + b"\n"))


@pytest.mark.parametrize("fmt", ["pem", "openssh"])
def test_damaged_key_message_has_no_key_bytes(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey, fmt: str
) -> None:
    data = _pem(key) if fmt == "pem" else _openssh(key)
    lines = data.splitlines(keepends=True)
    lines[1] = lines[1][:10] + lines[1][10:20][::-1].swapcase() + lines[1][20:]
    del lines[-2]  # drop the last base64 line as well
    damaged = b"".join(lines)
    with pytest.raises(UsageError, match="not a valid") as info:
        load_private_key(_write(tmp_path / "k", damaged))
    _assert_no_secret(_full_text(info.value), _secret_markers(damaged, key))


def test_encrypted_pem_uses_cachebuild_key_passphrase(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    passphrase = "correct horse battery staple 9f3b"
    data = _pem(key, passphrase.encode())
    path = _write(tmp_path / "enc.pem", data)
    markers = _secret_markers(data, key, passphrase)

    monkeypatch.delenv("KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("CACHEBUILD_KEY_PASSPHRASE", raising=False)
    with pytest.raises(
        UsageError, match="encrypted and CACHEBUILD_KEY_PASSPHRASE is not set"
    ) as info:
        load_private_key(path)
    _assert_no_secret(_full_text(info.value), markers)

    monkeypatch.setenv("CACHEBUILD_KEY_PASSPHRASE", "wrong-passphrase-77")
    with pytest.raises(UsageError, match="wrong passphrase") as info:
        load_private_key(path)
    _assert_no_secret(_full_text(info.value), markers + ["wrong-passphrase-77"])

    monkeypatch.setenv("CACHEBUILD_KEY_PASSPHRASE", passphrase)
    assert load_private_key(path).private_bytes_raw() == key.private_bytes_raw()


def test_passphrase_set_for_plain_key_is_ignored(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEBUILD_KEY_PASSPHRASE", "unused")
    for name, data in {"k.pem": _pem(key), "id_ed25519": _openssh(key)}.items():
        assert (
            load_private_key(_write(tmp_path / name, data)).private_bytes_raw()
            == key.private_bytes_raw()
        )


@needs_ssh_keygen
def test_encrypted_openssh_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passphrase = "s3cret-openssh-pass"
    path = _ssh_keygen(tmp_path / "id_ed25519", "-t", "ed25519", "-N", passphrase)
    markers = _secret_markers(path.read_bytes(), passphrase=passphrase)
    monkeypatch.delenv("KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("CACHEBUILD_KEY_PASSPHRASE", raising=False)
    with pytest.raises(UsageError, match="CACHEBUILD_KEY_PASSPHRASE is not set") as info:
        load_private_key(path)
    _assert_no_secret(_full_text(info.value), markers)
    monkeypatch.setenv("CACHEBUILD_KEY_PASSPHRASE", passphrase)
    try:
        import bcrypt  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="bcrypt") as info:
            load_private_key(path)
        _assert_no_secret(_full_text(info.value), markers)
    else:
        pub = load_public_key(path.with_suffix(".pub"))
        assert public_key_raw(load_private_key(path).public_key()) == public_key_raw(pub)


def test_open_permissions_warn(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    path = _write(tmp_path / "k.pem", _pem(key), mode=0o644)
    with pytest.warns(KeyPermissionWarning, match="chmod 600") as record:
        load_private_key(path)
    assert record[0].filename == __file__  # points at the caller
    os.chmod(path, 0o620)
    with pytest.warns(KeyPermissionWarning):
        load_private_key(path)
    os.chmod(path, 0o600)
    load_private_key(path)  # no warning: filterwarnings=error would fail here


# -- dev keys ------------------------------------------------------------------------


def test_ensure_dev_key_creates_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys" / "nested" / "dev.pem"
    with caplog.at_level(logging.DEBUG):
        key, created = ensure_dev_key(path)
    assert created is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in path.parent.iterdir()) == ["dev.pem"]  # no temp files
    again, created2 = ensure_dev_key(path)
    assert created2 is False
    assert again.private_bytes_raw() == key.private_bytes_raw()
    assert path.read_bytes() == data
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert keyid(key.public_key()) in log_text
    _assert_no_secret(log_text, _secret_markers(data, key))


def test_ensure_dev_key_leaves_existing_parent_alone(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    ensure_dev_key(tmp_path / "dev.pem")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_ensure_dev_key_refuses_bad_existing_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "dev.pem", b"not a key")
    with pytest.raises(UsageError, match="not a PEM or OpenSSH private key"):
        ensure_dev_key(path)
    assert path.read_bytes() == b"not a key"


_RACE_SCRIPT = """
import json, sys, time
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ed25519  # warm imports before the race
from cachebuild.release.signing import ensure_dev_key, keyid
path, go, ready = sys.argv[1:4]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.0002)
key, created = ensure_dev_key(path)
print(json.dumps({"keyid": keyid(key.public_key()), "created": created}))
"""


@pytest.mark.parametrize("round_", range(3))
def test_ensure_dev_key_two_processes_one_key(tmp_path: Path, round_: int) -> None:
    path = tmp_path / "keys" / "dev.pem"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_SCRIPT, str(path), str(go), str(tmp_path / f"ready{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.005)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["created"] for r in results) == [False, True]
    assert results[0]["keyid"] == results[1]["keyid"]
    assert keyid(load_private_key(path).public_key()) == results[0]["keyid"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["dev.pem"]


@pytest.mark.parametrize("partial", [b"", b"-----BEGIN PRIV"])
def test_ensure_dev_key_waits_for_a_key_caught_mid_write(tmp_path: Path, partial: bytes) -> None:
    """A racing caller's in-place write (no hard links) is waited for, not refused as a bad key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = tmp_path / "dev.pem"
    path.write_bytes(partial)  # created (mode 0600, as the writer does), not yet written in full
    path.chmod(0o600)
    key = Ed25519PrivateKey.generate()

    def finish() -> None:
        time.sleep(0.3)
        with open(path, "r+b") as fh:
            fh.write(signing._private_pem(key))

    t = threading.Thread(target=finish)
    t.start()
    try:
        got, created = ensure_dev_key(path)
    finally:
        t.join()
    assert not created and got.private_bytes_raw() == key.private_bytes_raw()


def test_ensure_dev_key_reads_again_a_key_finished_after_a_failed_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that caught the file empty fails; by the check the writer has finished: read again."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = tmp_path / "dev.pem"
    key = Ed25519PrivateKey.generate()
    _write(path, signing._private_pem(key))
    real, calls = signing.load_private_key, []

    def first_read_caught_it_empty(p: Path) -> Any:
        calls.append(p)
        if len(calls) == 1:
            raise UsageError(f"signing key {p} is not a PEM or OpenSSH private key")
        return real(p)

    monkeypatch.setattr(signing, "load_private_key", first_read_caught_it_empty)
    got, created = ensure_dev_key(path)
    assert not created and got.private_bytes_raw() == key.private_bytes_raw() and len(calls) == 2


@pytest.mark.parametrize("hard_links", [True, False])
def test_ensure_dev_key_threads_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    if not hard_links:  # a file system without link(): the O_EXCL fallback

        def no_link(src: object, dst: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(signing.os, "link", no_link)
    path = tmp_path / "dev.pem"
    barrier = threading.Barrier(8)
    results: list[tuple[bytes, bool]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            k, created = ensure_dev_key(path)
            results.append((k.private_bytes_raw(), created))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(created for _, created in results) == 1
    assert len({raw for raw, _ in results}) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- envelopes ------------------------------------------------------------------------


def test_sign_verify_round_trip(key: ed25519.Ed25519PrivateKey) -> None:
    signed = {"b": [1, 2.5, "ü"], "a": {"nested": True}}
    env = sign_envelope(signed, key)
    assert set(env) == {"signed", "signatures"}
    (sig,) = env["signatures"]
    assert sig["keyid"] == keyid(key.public_key())
    assert len(sig["sig"]) == 128
    # the signature is over the canonical JSON, checked without our verifier
    key.public_key().verify(bytes.fromhex(sig["sig"]), canonical_json(signed))
    assert verify_envelope(env, [key.public_key()]) == signed
    # and survives a trip through a file with a different layout
    reread = json.loads(json.dumps(env, indent=3))
    assert (
        verify_envelope(
            reread, [ed25519.Ed25519PrivateKey.generate().public_key(), key.public_key()]
        )
        == signed
    )


def test_signature_made_elsewhere_verifies(key: ed25519.Ed25519PrivateKey) -> None:
    payload = b'{"a":1,"b":[true,null]}'  # canonical JSON written by hand
    env = {
        "signed": {"b": [True, None], "a": 1},
        "signatures": [{"keyid": keyid(key.public_key()), "sig": key.sign(payload).hex()}],
    }
    assert verify_envelope(env, [key.public_key()]) == {"a": 1, "b": [True, None]}


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s.__setitem__("a", 2),
        lambda s: s.__setitem__("extra", None),
        lambda s: s["nested"].__setitem__("x", "y"),
        lambda s: s.__setitem__("a", 1.0000000000000002),
    ],
)
def test_tampered_content_fails(key: ed25519.Ed25519PrivateKey, tamper: object) -> None:
    env = sign_envelope({"a": 1, "nested": {"x": "z"}}, key)
    env = copy.deepcopy(env)
    tamper(env["signed"])  # type: ignore[operator]
    with pytest.raises(VerifyError, match="bad signature") as info:
        verify_envelope(env, [key.public_key()])
    assert keyid(key.public_key()) in str(info.value)


def test_other_key_names_keyids(key: ed25519.Ed25519PrivateKey) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    env = sign_envelope({"a": 1}, other)
    with pytest.raises(VerifyError, match="no signature by a trusted key") as info:
        verify_envelope(env, [key.public_key()])
    assert keyid(other.public_key()) in str(info.value)
    assert keyid(key.public_key()) in str(info.value)


def test_claimed_keyid_is_not_trusted_blindly(key: ed25519.Ed25519PrivateKey) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    env = sign_envelope({"a": 1}, other)
    env["signatures"][0]["keyid"] = keyid(key.public_key())  # lie about the signer
    with pytest.raises(VerifyError, match="bad signature"):
        verify_envelope(env, [key.public_key()])


def test_one_good_trusted_signature_suffices(key: ed25519.Ed25519PrivateKey) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    env = sign_envelope({"a": 1}, key)
    env["signatures"].insert(0, sign_envelope({"a": 1}, other)["signatures"][0])
    assert verify_envelope(env, [key.public_key()]) == {"a": 1}
    corrupt = dict(env["signatures"][1], sig="00" * 64)
    env["signatures"].insert(0, corrupt)
    assert verify_envelope(env, [key.public_key()]) == {"a": 1}


@pytest.mark.parametrize(
    ("envelope", "why"),
    [
        ([], "expected a JSON object"),
        ({"signed": {}}, "expected keys"),
        ({"signed": {}, "signatures": [], "x": 1}, "expected keys"),
        ({"signed": [], "signatures": []}, "'signed' is not an object"),
        ({"signed": {}, "signatures": []}, "non-empty list"),
        ({"signed": {}, "signatures": {}}, "non-empty list"),
        ({"signed": {}, "signatures": ["x"]}, "signature 0 has no valid 'keyid'"),
        ({"signed": {}, "signatures": [{"keyid": "ab", "sig": "00" * 64}]}, "keyid"),
        ({"signed": {}, "signatures": [{"keyid": "a" * 64, "sig": "zz" * 64}]}, "'sig'"),
        ({"signed": {}, "signatures": [{"keyid": "a" * 64, "sig": "00" * 10}]}, "'sig'"),
        (
            {"signed": {"x": float("nan")}, "signatures": [{"keyid": "a" * 64, "sig": "00" * 64}]},
            "canonical",
        ),
    ],
)
def test_malformed_envelopes(key: ed25519.Ed25519PrivateKey, envelope: object, why: str) -> None:
    with pytest.raises(VerifyError, match="malformed signed envelope") as info:
        verify_envelope(envelope, [key.public_key()])  # type: ignore[arg-type]
    assert why in str(info.value)


def test_no_trusted_keys_is_a_usage_error(key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(UsageError, match="no trusted public keys"):
        verify_envelope(sign_envelope({}, key), [])


def test_sign_refuses_other_keys_and_payloads(key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(UsageError, match="Ed25519"):
        sign_envelope({}, ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sign_envelope({"x": float("inf")}, key)
    with pytest.raises(TypeError):
        sign_envelope([1], key)  # type: ignore[arg-type]


def test_verify_errors_carry_no_key_material(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    data = _pem(key)
    markers = _secret_markers(data, key)
    texts = []
    for env, trusted in [
        (sign_envelope({"a": 1}, key), [ed25519.Ed25519PrivateKey.generate().public_key()]),
        ({**sign_envelope({"a": 1}, key), "signed": {"a": 2}}, [key.public_key()]),
    ]:
        with pytest.raises(VerifyError) as info:
            verify_envelope(env, trusted)
        texts.append(_full_text(info.value))
    envelope_text = json.dumps(sign_envelope({"a": 1}, key))
    _assert_no_secret("\n".join(texts) + envelope_text, markers)


def test_dsa_key_refused_by_name_without_deprecation_warning(tmp_path: Path) -> None:
    """A DSA key is named in the refusal; naming it reads no deprecated attribute.

    cryptography 51 deprecates DSA: generating the key warns (suppressed here),
    but loading and refusing it must not (the suite turns warnings into errors).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cryptography.hazmat.primitives.asymmetric import dsa

        other = dsa.generate_private_key(key_size=2048)
    data = _pem(other)
    with pytest.raises(UsageError, match="a DSA key") as info:
        load_private_key(_write(tmp_path / "dsa.pem", data))
    assert "Ed25519" in str(info.value)

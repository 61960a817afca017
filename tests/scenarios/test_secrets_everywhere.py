"""Secrets never leave: not in any file written, any output, any error, or any
process's arguments (what ``ps`` shows), with the secrets passed as
documented (docs/configuration.md#secrets) — the tile provider's API key
(``CACHEBUILD_API_KEY``), an extra header's token (``CACHEBUILD_HTTP_HEADERS``),
the Flights API token (``FLIGHTS_API_TOKEN``) and the signing key's bytes
(``KEY=<file>``, or ``COMPANION_KEY`` on the companion).

Real builds, with a real tile server and Flights API on 127.0.0.1 (and a
real sshd for companion mode), while a thread samples the process table
(psutil) of the build, its children, and sshd's children (the remote
commands).  docs/reliability.md, section 6.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import pytest

from cachebuild.release.signing import ensure_dev_key
from tests._harness import tileserver
from tests.conftest import Cb, CbResult
from tests.unit.inputs.test_flights_api import GOOD, TOKEN, FlightsApi

API_KEY = "sk-EverywhereKey/+9f3a71c2"
HEADER_TOKEN = "hdr-Bearer-5c0ffee-d00d"
SMALL = ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=0")


class ProcSampler:
    """Samples, until stopped, the command line of every process under ``roots``."""

    def __init__(self, roots: list[int]):
        self.roots = roots
        self.cmdlines: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.roots:
                try:
                    root = psutil.Process(pid)
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        self.cmdlines.add("\0".join(p.cmdline()))
                    except psutil.Error:
                        pass  # gone between listing and reading
            self.samples += 1
            self._stop.wait(0.005)

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def secret_forms(*secrets: str) -> list[bytes]:
    """Each secret as given and as it would appear in a URL."""
    out = set()
    for s in secrets:
        out.add(s.encode())
        out.add(quote(s, safe="").encode())
    return sorted(out)


def key_forms(key_file: Path) -> list[bytes]:
    """The signing key's secret bytes in every encoding that could leak: raw, hex, base64, PEM body."""
    from cryptography.hazmat.primitives import serialization

    from cachebuild.release.signing import load_private_key

    raw = load_private_key(key_file).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem_body = [
        ln for ln in key_file.read_bytes().splitlines() if ln and not ln.startswith(b"-----")
    ]
    return [
        raw,
        raw.hex().encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        *pem_body,
    ]


def assert_nowhere(
    needles: list[bytes], *, texts: list[str], roots: list[Path], cmdlines: set[str]
) -> int:
    """No needle in any text, file under ``roots`` or command line; returns the files scanned."""
    for text in texts:
        data = text.encode("utf-8", "surrogateescape")
        for n in needles:
            assert n not in data, f"secret {n[:6]!r}… in the output"
    for cmd in cmdlines:
        data = cmd.encode("utf-8", "surrogateescape")
        for n in needles:
            assert n not in data, (
                f"secret {n[:6]!r}… in a process's arguments: {cmd.replace(chr(0), ' ')[:200]}"
            )
    files = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                files += 1
                for n in needles:
                    assert n not in data, f"secret {n[:6]!r}… in {path}"
    return files


@pytest.fixture
def servers() -> Iterator[tuple[tileserver.TileServer, FlightsApi]]:
    tiles = tileserver.TileServer(key=API_KEY, key_status=403)
    tiles.require_headers = {"X-Tile-Token": HEADER_TOKEN}
    api = FlightsApi()
    yield tiles, api
    tiles.close()
    api.close()


def sampled_build(
    cb: Cb, *args: str, env: dict[str, str], extra_roots: list[int] = ()
) -> tuple[CbResult, ProcSampler]:
    p = cb.popen("build-cache", *args, env=env)
    with ProcSampler([p.pid, *extra_roots]) as sampler:
        out, err = p.communicate(timeout=600)
    return CbResult(p.returncode, out, err), sampler


def test_a_real_build_leaks_no_secret(cb: Cb, tmp_path: Path, servers: Any) -> None:
    tiles, api = servers
    key_file = tmp_path / "operator" / "signing.pem"
    ensure_dev_key(key_file)  # the operator's key, outside every directory cachebuild writes
    env = cb.env(
        CACHEBUILD_API_KEY=API_KEY,
        CACHEBUILD_HTTP_HEADERS=f"X-Tile-Token: {HEADER_TOKEN}",
        FLIGHTS_API_TOKEN=TOKEN,
    )
    common = (
        f"FLIGHT={GOOD}",
        f"FLIGHTS_API_URL={api.url}",
        f"PROVIDER={tiles.template()}",
        f"KEY={key_file}",
    )
    runs = []
    r, sampler = sampled_build(cb, *common, *SMALL, env=env)
    assert r.code == 0, r.stderr
    assert (
        r.report["tiles"]["fetched"] > 0 and len(tiles.requests) > 0
    )  # the key and header were used
    runs.append((r, sampler))
    verify = cb.run("verify-cache", f"KEY={key_file}", env=env)
    assert verify.code == 0, verify.stderr

    # error paths: the provider refuses the key, the API refuses the token, a bad header line
    wrong = dict(env, CACHEBUILD_API_KEY=API_KEY + "-wrong")
    r2, s2 = sampled_build(cb, *common, *SMALL, "ZOOM=16", env=wrong)
    assert r2.code == 20 and "refused" in r2.report["error"], r2.stderr
    r3, s3 = sampled_build(cb, *common, *SMALL, env=dict(env, FLIGHTS_API_TOKEN=TOKEN + "x"))
    assert r3.code == 91, r3.stderr
    r4, s4 = sampled_build(
        cb, *common, *SMALL, env=dict(env, CACHEBUILD_HTTP_HEADERS=f"Bad Name: {HEADER_TOKEN}")
    )
    assert r4.code == 2, r4.stderr
    runs += [(r2, s2), (r3, s3), (r4, s4)]

    cmdlines = set().union(*(s.cmdlines for _, s in runs))
    assert any("build-cache" in c for c in cmdlines), "the sampler never saw the build"
    assert all(s.samples > 0 for _, s in runs)
    needles = secret_forms(
        API_KEY, API_KEY + "-wrong", HEADER_TOKEN, TOKEN, TOKEN + "x"
    ) + key_forms(key_file)
    texts = [t for res, _ in runs for t in (res.stdout, res.stderr)] + [
        verify.stdout,
        verify.stderr,
    ]
    files = assert_nowhere(needles, texts=texts, roots=[cb.home], cmdlines=cmdlines)
    assert files > 20  # the cache, its state (doit's database), the store
    samples = sum(s.samples for _, s in runs)
    print(
        f"local: {samples} process-table samples, {len(cmdlines)} command lines, {files} files, {len(texts)} outputs"
    )
    assert (cb.cache_dir / "state" / "doit.sqlite3").is_file()


# -- companion mode, through a real sshd ---------------------------------------------------------

pytest.importorskip("paramiko")

from tests._harness.sshd import Sshd  # noqa: E402
from tests.scenarios.test_companion import Companion  # noqa: E402


def test_a_companion_build_leaks_no_secret(
    cb: Cb, sshd: Sshd, tmp_path: Path, servers: Any
) -> None:
    tiles, api = servers
    c = Companion.under(tmp_path, cb, sshd)
    remote_key = tmp_path / "on-the-companion" / "signing.pem"
    ensure_dev_key(remote_key)
    env = cb.env(
        CACHEBUILD_API_KEY=API_KEY,
        CACHEBUILD_HTTP_HEADERS=f"X-Tile-Token: {HEADER_TOKEN}",
        FLIGHTS_API_TOKEN=TOKEN,
    )
    args = [f"{k}={v}" for k, v in c.vars(COMPANION_KEY=str(remote_key)).items()]
    args += [f"FLIGHT={GOOD}", f"FLIGHTS_API_URL={api.url}", f"PROVIDER={tiles.template()}", *SMALL]
    assert sshd.proc is not None
    r, sampler = sampled_build(cb, *args, env=env, extra_roots=[sshd.proc.pid])
    assert r.code == 0, r.stderr
    assert r.report["companion"]["outcome"] == "success"
    # the remote commands were seen: the agent and the build, run by sshd's children
    assert any("companion-agent" in cmd for cmd in sampler.cmdlines), sorted(sampler.cmdlines)
    assert any("build-cache" in cmd and "PROVIDER=pushed:" in cmd for cmd in sampler.cmdlines)
    needles = secret_forms(API_KEY, HEADER_TOKEN, TOKEN) + key_forms(remote_key)
    files = assert_nowhere(
        needles,
        texts=[r.stdout, r.stderr],
        roots=[cb.home, c.dir, c.home],
        cmdlines=sampler.cmdlines,
    )
    print(
        f"companion: {sampler.samples} samples, {len(sampler.cmdlines)} command lines, {files} files, 2 outputs"
    )


def test_the_sampler_sees_a_childs_arguments(tmp_path: Path) -> None:
    """The check above can fail: an argument of a grandchild is seen."""
    import subprocess
    import sys

    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(1)', 'arg-5ecret'])"
    p = subprocess.Popen([sys.executable, "-c", code])
    with ProcSampler([p.pid]) as sampler:
        p.wait(timeout=60)
    with pytest.raises(AssertionError, match="in a process's arguments"):
        assert_nowhere([b"arg-5ecret"], texts=[], roots=[], cmdlines=sampler.cmdlines)

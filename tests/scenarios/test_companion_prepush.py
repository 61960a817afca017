"""Push while fetching (issue 23 item 2): a companion-mode build with ``PIPELINE=1`` sends packs
of the tiles as they arrive, against the real OpenSSH sshd of the companion tests.

The tile server holds its answers after the first tiles until the companion
has received some of them (or a minute passed): the pre-push then sends
during the fetch whatever the machine's load, with no timing assertion.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._harness.sshd import Sshd
from tests.conftest import Cb, TileServer, write_flight
from tests.scenarios.test_companion import (
    SSHD,
    Companion,
    assert_store_sound,
    local_digests,
)

pytestmark = pytest.mark.skipif(
    not Path(SSHD).exists(), reason=f"{SSHD} (openssh-server) is not installed"
)

AREA = ("BUFFER_M=400",)  # about 50 tiles at z17
GATE_AFTER = 12  # tiles served before the gate


class GatedServer(TileServer):
    """Answers after the first ``after`` requests wait until ``until()`` (at most a minute)."""

    def __init__(self, after: int, until: Callable[[], bool]) -> None:
        super().__init__()
        self.after = after
        self.until = until
        self.opened = threading.Event()

    def _handle(self, h: Any) -> None:
        with self.lock:
            n = len(self.requests)
        if n >= self.after and not self.opened.is_set():
            deadline = time.monotonic() + 60
            while not self.until() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.opened.set()
        super()._handle(h)


def _arrived(c: Companion) -> bool:
    """Some tile has reached the companion (in its store, or in a pack waiting there)."""
    return bool(c.objects()) or any((c.dir / "incoming").glob("*.tar"))


def _companion(root: Path, sshd: Sshd) -> Companion:
    root.mkdir()
    cb = Cb(home=root / "home")
    cb.home.mkdir()
    return Companion.under(root, cb, sshd)


def _cache(c: Companion) -> dict[str, bytes]:
    """What the companion's cache is made of, less what names the build (id, time, signature)."""
    cur = c.dir / "cache" / "current"
    names = ("descriptors.npy", "descriptor_ids.npy", "tiles.npy", "missing.npy")
    return {n: hashlib.sha256((cur / n).read_bytes()).digest() for n in names}


@pytest.fixture
def pair(sshd: Sshd, tmp_path: Path) -> tuple[Companion, Companion]:
    if sshd.proc is None:
        sshd.start()
    return _companion(tmp_path / "on", sshd), _companion(tmp_path / "off", sshd)


def test_push_while_fetching_sends_during_the_fetch_and_makes_the_same_cache(
    pair: tuple[Companion, Companion], tmp_path: Path
) -> None:
    on, off = pair
    srv = GatedServer(GATE_AFTER, lambda: _arrived(on))
    try:
        f = write_flight(tmp_path / "f.json")
        r = on.build(f, *AREA, f"PROVIDER={srv.template()}", "CONCURRENCY=2", PIPELINE="1")
        assert r.code == 0, r.stderr
        assert srv.opened.is_set() and _arrived(on)
        base = off.build(f, *AREA, f"PROVIDER={srv.template()}", PIPELINE="0")
        assert base.code == 0, base.stderr
    finally:
        srv.close()
    rep, rep0 = r.report, base.report
    digests = local_digests(on.cb)
    push, pre = rep["push"], rep["push"]["prepushed"]
    assert pre["state"] == "done" and pre["error"] is None, pre
    assert pre["answered_probe"] is True, "its session's end answered the final probe"
    assert pre["during_fetch"] > 0, "objects reached the companion before the fetch ended"
    assert 0 < pre["objects"] <= len(digests) and pre["packs"] > 0
    # the final push sent only what was left: every image went once, none was there before
    assert push["tile_objects"] == len(digests) and push["already_there"] == 0
    assert rep0["push"]["tile_objects"] == len(digests) and "prepushed" not in rep0["push"]
    # the lines say it as the report does: sent while fetching, then only what was left
    pre_line = f"pre-push: sent {pre['objects']} tile images in {pre['packs']} pack"
    assert pre_line in r.stderr
    left = len(digests) - pre["objects"]
    assert (
        f"push: {left} of {len(digests)} tile images, 5 of 5 flight files missing there" in r.stderr
    )
    assert (
        f"0 of {len(digests)} tile images were there already, {pre['objects']} sent while fetching"
        in r.stderr
    )
    # the report: each stage's busy time, the wall time to the push's end, the overlap
    p = rep["pipeline"]
    assert p["enabled"] and not rep0["pipeline"]["enabled"]
    assert {"tiles", "prepush", "bringup", "push"} <= set(p["stages"])
    assert p["stages"]["prepush"] == pre["busy_s"] > 0
    assert p["sum_s"] == pytest.approx(sum(p["stages"].values()), abs=0.01)
    assert p["overlap_s"] == pytest.approx(max(0.0, p["sum_s"] - p["wall_s"]), abs=0.01)
    assert push["after_download_s"] >= 0 and rep0["push"]["after_download_s"] >= 0
    # the same cache as without it
    assert rep["outcome"] == rep0["outcome"] == "success"
    assert set(on.objects()) == set(off.objects()) == digests
    assert _cache(on) == _cache(off)
    assert_store_sound(on)
    assert not list((on.dir / "incoming").glob("*.tar*"))
    assert on.verify().code == 0


def _cut_links(sshd: Sshd) -> None:
    """SIGKILL sshd's per-connection processes (and what they run): open links drop, sshd stays."""
    import psutil

    assert sshd.proc is not None
    children = psutil.Process(sshd.proc.pid).children(recursive=True)
    for p in children:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=5)


def test_a_prepush_cut_off_mid_fetch_never_fails_the_build(
    pair: tuple[Companion, Companion], sshd: Sshd, tmp_path: Path
) -> None:
    on, _ = pair
    cut: list[int] = []

    def cut_once_arrived() -> bool:
        if not _arrived(on):
            return False
        if not cut:  # the pre-push's link goes, with its unpacker, mid-fetch
            _cut_links(sshd)
            cut.append(len(on.objects()))
        return True

    srv = GatedServer(GATE_AFTER, cut_once_arrived)
    try:
        f = write_flight(tmp_path / "f.json")
        r = on.build(f, *AREA, f"PROVIDER={srv.template()}", "CONCURRENCY=2")
    finally:
        srv.close()
    assert cut, "the gate opened without anything reaching the companion"
    assert r.code == 0, r.stderr
    rep = r.report
    pre = rep["push"]["prepushed"]
    assert pre["state"] == "failed" and pre["error"], pre
    assert "stopped" in r.stderr and "the push sends the rest" in r.stderr
    digests = local_digests(on.cb)
    assert set(on.objects()) == digests  # the final push sent the rest
    assert rep["push"]["tile_objects"] + rep["push"]["already_there"] >= len(digests)
    assert_store_sound(on)
    assert on.verify().code == 0


def test_the_prepush_trusts_no_new_host_key_and_its_refusal_is_not_the_builds(
    pair: tuple[Companion, Companion], tile_server: TileServer, tmp_path: Path
) -> None:
    on, _ = pair
    known = tmp_path / "known_hosts"  # not there yet: only the flow may accept the key
    f = write_flight(tmp_path / "f.json")
    provider = f"PROVIDER={tile_server.template()}"
    r = on.build(f, provider, KNOWN_HOSTS=str(known), HOST_KEY_POLICY="accept-new")
    assert r.code == 0, r.stderr
    pre = r.report["push"]["prepushed"]
    assert pre["state"] == "failed" and "KNOWN_HOSTS" in pre["error"] and pre["objects"] == 0
    assert any("recorded it" in w for w in r.report["warnings"])  # the flow's, once
    assert r.report["push"]["tile_objects"] == len(local_digests(on.cb))


def test_an_interrupted_build_keeps_what_was_prepushed(
    pair: tuple[Companion, Companion], tmp_path: Path
) -> None:
    on, _ = pair
    srv = GatedServer(GATE_AFTER, lambda: False)  # the gate stays shut: the fetch waits
    try:
        f = write_flight(tmp_path / "f.json")
        argv = [f"FLIGHT={f}", "ZOOM=17", *AREA, f"PROVIDER={srv.template()}", "CONCURRENCY=2"]
        p = on.cb.popen("build-cache", *argv, *(f"{k}={v}" for k, v in on.vars().items()))
        deadline = time.monotonic() + 60
        while not _arrived(on) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None and _arrived(on), "nothing was pre-pushed while the fetch waited"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130, err
        srv.until = lambda: True
        time.sleep(1.0)  # what the unpacker had claimed is settled by the next probe
        r = on.build(f, *AREA, f"PROVIDER={srv.template()}", "CONCURRENCY=2")
    finally:
        srv.close()
    assert r.code == 0, r.stderr
    digests = local_digests(on.cb)
    push = r.report["push"]
    assert push["already_there"] > 0, "what the interrupted build pre-pushed was kept"
    assert set(on.objects()) == digests
    assert_store_sound(on)

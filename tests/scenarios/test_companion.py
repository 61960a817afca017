"""Companion mode end to end, against a real OpenSSH sshd on 127.0.0.1.

The "companion" is a directory on this machine (``COMPANION_DIR``) with a
home of its own (``CACHEBUILD_HOME`` there, set by ``COMPANION_CMD``), and
runs this venv's doit: everything between the two goes through sshd, SFTP
and a remote shell, as with a Jetson.  Builds run as real ``doit
build-cache`` processes, except where a test must act at an exact moment
(kill the link mid-push, mid-build): those call the flow in-process with an
injected connection factory or output stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cachebuild.release.lock import CacheLock
from tests._harness.sshd import SSHD, Sshd, free_port, keygen
from tests.conftest import Cb, CbResult, write_flight

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD),
    reason=f"{SSHD} (openssh-server) is not installed; .ci/run installs it",
)

SMALL = ("BUFFER_M=200", "ZOOM=17")
REMOTE_TASKS = {
    "flight",
    "tiles",
    "mbtiles",
    "preview",
    "model",
    "engine",
    "describe",
    "index",
    "manifest",
}


@dataclass
class Companion:
    """A companion directory reached through ``sshd``, and builds that use it."""

    cb: Cb
    sshd: Sshd
    dir: Path
    home: Path

    @classmethod
    def under(cls, root: Path, cb: Cb, sshd: Sshd) -> Companion:
        """A companion at ``root``/companion, its home ``root``/companion-home (made here)."""
        home = root / "companion-home"
        home.mkdir()
        return cls(cb=cb, sshd=sshd, dir=root / "companion", home=home)

    @property
    def cmd(self) -> str:
        return (
            f"env CACHEBUILD_HOME={shlex.quote(str(self.home))} "
            f"XDG_DATA_HOME={shlex.quote(str(self.home / 'data'))} {shlex.quote(sys.executable)} -m doit"
        )

    def vars(self, **over: str) -> dict[str, str]:
        v = {
            "COMPANION": self.sshd.target,
            "SSH_KEY": str(self.sshd.client_key),
            "KNOWN_HOSTS": str(self.sshd.known_hosts),
            "COMPANION_DIR": str(self.dir),
            "COMPANION_CMD": self.cmd,
        }
        v.update(over)
        return v

    def build(
        self, flight: Path, *args: str, env: dict[str, str] | None = None, **over: str
    ) -> CbResult:
        extra = [f"{k}={v}" for k, v in self.vars(**over).items()]
        return self.cb.build(f"FLIGHT={flight}", *SMALL, *args, *extra, env=env)

    def verify(self) -> CbResult:
        """verify-cache of the companion's published cache, with its own key."""
        return self.cb.run(
            "verify-cache",
            f"CACHE_DIR={self.dir / 'cache'}",
            env=self.cb.env(CACHEBUILD_HOME=str(self.home), XDG_DATA_HOME=str(self.home / "data")),
        )

    @property
    def manifest(self) -> Path:
        return self.dir / "cache" / "current" / "manifest.json"

    def objects(self) -> dict[str, Path]:
        root = self.dir / "store" / "objects"
        return {p.name: p for p in root.glob("*/*")} if root.is_dir() else {}


@pytest.fixture
def companion(cb: Cb, sshd: Sshd, tmp_path: Path) -> Companion:
    if sshd.proc is None:  # a test killed it
        sshd.start()
    return Companion.under(tmp_path, cb, sshd)


def local_digests(cb: Cb) -> set[str]:
    from cachebuild.tileset import hex_digests, read_tiles

    return set(hex_digests(read_tiles(cb.cache_dir / "state" / "build")))


def assert_store_sound(c: Companion) -> None:
    """Every object is whole, under its true name; no half file anywhere but *.part."""
    for name, path in c.objects().items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name, (
            f"{path} is not what its name says"
        )
    for path in (c.dir / "store" / "tmp").iterdir():
        pytest.fail(f"leftover in the store's tmp/: {path}")


def test_cold_build_on_the_companion_then_an_unchanged_rerun_pushes_nothing(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json", flight_id="3F2B8C1E-5A7D-4E6F-9B0A-1C2D3E4F5A6B")
    r = companion.build(f)
    assert r.code == 0, r.stderr
    rep = r.report
    assert rep["outcome"] == "success" and rep["exit_code"] == 0
    # the workstation ran only its half; the companion built the rest
    assert set(rep["tasks"]["run"]) == {"flight", "tiles"}
    assert REMOTE_TASKS <= set(rep["companion"]["tasks"]["run"])
    assert not (companion.cb.cache_dir / "state" / "build" / "engine").exists()
    # the coverage map is drawn where the cache is built, and published with it
    assert (companion.dir / "cache" / "current" / "preview.png").is_file()
    assert not (companion.cb.cache_dir / "state" / "build" / "preview.png").exists()
    assert not companion.cb.current.exists()
    digests = local_digests(companion.cb)
    push = rep["push"]
    assert push["objects"] == push["tile_objects"] == len(digests) > 4
    assert push["bytes"] > push["tile_bytes"] > 0 and push["already_there"] == 0
    assert rep["companion"]["host"] == companion.sshd.target
    assert set(rep["companion"]["device"]) >= {"gpu", "tensorrt", "onnxruntime", "jetson"}
    assert rep["tiles"]["fetched"] == rep["tiles"]["planned"]
    assert rep["manifest_path"] == str(companion.manifest.resolve())
    assert set(companion.objects()) == digests
    assert_store_sound(companion)
    assert "companion| .. describe" in r.stderr  # the remote build's lines, as they came
    v = companion.verify()
    assert v.code == 0, v.stderr
    assert v.report["build_id"] == rep["build_id"]

    again = companion.build(f)
    assert again.code == 0, again.stderr
    rep2 = again.report
    assert rep2["outcome"] == "up_to_date"
    assert rep2["push"]["objects"] == rep2["push"]["bytes"] == rep2["push"]["tile_bytes"] == 0
    assert rep2["push"]["already_there"] == len(digests)
    assert rep2["companion"]["tasks"]["run"] == []
    assert (
        rep2["build_id"] == rep["build_id"] and rep2["manifest_version"] == rep["manifest_version"]
    )
    assert not list((companion.dir / "incoming").iterdir())


def test_a_bigger_area_and_a_new_calibration_push_only_what_changed(
    companion: Companion, tmp_path: Path
) -> None:
    from cachebuild.engine.model import build_default_model

    model, cal = tmp_path / "net.onnx", tmp_path / "cal.bin"
    model.write_bytes(build_default_model())
    cal.write_bytes(b"calibration v1")
    f = write_flight(tmp_path / "f.json")
    first = companion.build(f, MODEL=str(model), CALIBRATION=str(cal))
    assert first.code == 0, first.stderr
    before = local_digests(companion.cb)
    push = first.report["push"]
    assert push["objects"] == push["tile_objects"] + 2  # the model and the calibration
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert (companion.dir / "inputs" / f"{sha}.onnx").read_bytes() == model.read_bytes()

    cal.write_bytes(b"calibration v2")
    r = companion.build(f, "BUFFER_M=320", MODEL=str(model), CALIBRATION=str(cal))
    assert r.code == 0, r.stderr
    new = local_digests(companion.cb) - before
    assert new, "the bigger buffer adds tiles"
    push = r.report["push"]
    assert push["tile_objects"] == len(new)
    assert push["objects"] == len(new) + 1, "the new calibration; the model was there"
    assert push["already_there"] == len(before & local_digests(companion.cb)) + 1
    assert r.report["outcome"] == "success"
    assert {"tiles", "engine", "describe", "index", "manifest"} <= set(
        r.report["companion"]["tasks"]["run"]
    )
    assert "model" not in r.report["companion"]["tasks"]["run"]  # MODEL given: no built-in model
    assert companion.verify().code == 0


def test_unknown_host_key_is_refused_unless_accept_new(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    known = tmp_path / "ssh" / "known_hosts"  # not there yet
    r = companion.build(f, KNOWN_HOSTS=str(known))
    assert r.code == 30, r.stderr
    rep = r.report
    assert rep["failure_phase"] == "companion"
    assert "not in KNOWN_HOSTS" in rep["error"] and "SHA256:" in rep["error"]
    assert "ssh-keyscan" in rep["remedy"]
    assert not companion.dir.exists(), "nothing was sent to an untrusted host"

    ok = companion.build(f, KNOWN_HOSTS=str(known), HOST_KEY_POLICY="accept-new")
    assert ok.code == 0, ok.stderr
    assert any("recorded it" in w for w in ok.report["warnings"])
    assert known.read_text() == companion.sshd.known_hosts_line()  # what reject trusts from now on

    # a changed key is refused even under accept-new
    other = keygen(tmp_path / "other_host")
    kind, blob = Path(f"{other}.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{companion.sshd.port} {kind} {blob}\n")
    bad = companion.build(f, KNOWN_HOSTS=str(known), HOST_KEY_POLICY="accept-new")
    assert bad.code == 30
    assert "CHANGED" in bad.report["error"]


def test_a_key_the_companion_does_not_accept_is_exit_30(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    stranger = keygen(tmp_path / "stranger")
    r = companion.build(f, SSH_KEY=str(stranger))
    assert r.code == 30, r.stderr
    assert "refused the key" in r.report["error"] and str(stranger) in r.report["error"]
    assert "authorized_keys" in r.report["remedy"]


def test_unreachable_companion_and_missing_cachebuild_are_exit_30(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f, COMPANION=f"{companion.sshd.user}@127.0.0.1:{free_port()}")
    assert r.code == 30
    assert "cannot connect" in r.report["error"]
    r = companion.build(f, COMPANION_CMD="/opt/nowhere/bin/doit")
    assert r.code == 30
    assert "was not found" in r.report["error"] and "COMPANION_CMD" in r.report["remedy"]
    r = companion.build(f, COMPANION_CMD="true")
    assert r.code == 30
    assert "did not answer" in r.report["error"]


def test_a_build_holding_the_companions_lock_is_exit_50(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    lock = companion.dir / "cache" / "build.lock"
    with CacheLock(lock):
        r = companion.build(f)
    assert r.code == 50, r.stderr
    rep = r.report
    assert rep["failure_phase"] == "lock"
    assert (
        "on the companion" in rep["error"]
        and str(lock) in rep["error"]
        and f"pid {os.getpid()}" in rep["error"]
    )
    assert rep["push"]["objects"] > 0, "the push happened before the companion's lock was asked for"
    assert not companion.manifest.exists()


def _inprocess(c: Companion, flight: Path, **over: str) -> tuple[Any, Any, list[str]]:
    """The settings and plan of a companion build, resolved in this process."""
    from cachebuild._util.report import Report
    from cachebuild.inputs.config import load_settings
    from cachebuild.inputs.plan import resolve_plan

    vars = {"FLIGHT": str(flight), "BUFFER_M": "200", "ZOOM": "17", **c.vars(**over)}
    plan = resolve_plan(load_settings(vars, c.cb.env()))
    warnings: list[str] = []
    return plan, Report("build-cache"), warnings


def test_link_lost_mid_push_then_a_clean_resume(companion: Companion, tmp_path: Path) -> None:
    from cachebuild.companion import build_on_companion
    from cachebuild.companion.errors import ConnectionDroppedError
    from cachebuild.companion.packs import iter_pack
    from cachebuild.companion.ssh import paramiko_factory

    f = write_flight(tmp_path / "f.json", waypoints=[(47.37, 8.54), (47.375, 8.55)])
    # the workstation's half (flight, tiles) runs; the companion is not there yet
    r = companion.build(f, COMPANION=f"{companion.sshd.user}@127.0.0.1:{free_port()}")
    assert r.code == 30
    digests = local_digests(companion.cb)
    assert len(digests) > 30

    renames: list[str] = []

    def factory(target: Any, options: Any, warn: Any) -> Any:
        client = paramiko_factory(target, options, warn)
        open_sftp = client.open_sftp

        def sftp_that_loses_the_link() -> Any:
            sftp = open_sftp()
            rename = sftp.posix_rename

            def posix_rename(a: str, b: str) -> None:
                rename(a, b)
                renames.append(b)
                if sum(n.endswith(".tar") for n in renames) == 3:
                    companion.sshd.kill()  # the link goes, right after a third pack arrived

            sftp.posix_rename = posix_rename
            return sftp

        client.open_sftp = sftp_that_loses_the_link
        return client

    plan, report, warnings = _inprocess(companion, f)
    with pytest.raises(ConnectionDroppedError) as info:
        build_on_companion(plan, report, warnings.append, factory=factory, pack_bytes=40_000)
    err = info.value
    assert err.exit_code == 30 and err.phase == "push"
    assert "lost during the push" in err.message and "had arrived and are kept" in err.message

    # what arrived: three complete packs, nothing under a real name that is not
    # whole. The companion unpacks packs as they land, so some of the three may
    # already be in its store, and one may be claimed by the unpacker the cut
    # killed (``<pack>.tar.claimed-<pid>``, settled by the next probe).
    assert sum(n.endswith(".tar") for n in renames) == 3
    incoming = companion.dir / "incoming"
    packs = sorted([*incoming.glob("*.tar"), *incoming.glob("*.tar.claimed-*")])
    assert len(packs) <= 3
    in_packs = {name for p in packs for name, _ in iter_pack(p)}
    unpacked = set(companion.objects())
    arrived = in_packs | unpacked
    assert arrived and arrived < digests
    assert_store_sound(companion)

    companion.sshd.start()
    r = companion.build(f)
    assert r.code == 0, r.stderr
    push = r.report["push"]
    assert push["tile_objects"] == len(digests - arrived), "what arrived was not sent again"
    assert push["already_there"] == len(arrived)
    if packs:  # packs left in incoming/ are settled first, every member counted
        assert f"kept {len(in_packs):,} objects a cut-off push had sent" in r.stderr
    assert set(companion.objects()) == digests
    assert_store_sound(companion)
    assert not list((companion.dir / "incoming").glob("*.tar*"))
    assert companion.verify().code == 0


def test_link_lost_mid_build_leaves_the_companions_cache_intact(
    companion: Companion, tmp_path: Path
) -> None:
    import io

    from cachebuild.companion import build_on_companion
    from cachebuild.companion.errors import ConnectionDroppedError

    f = write_flight(tmp_path / "f.json", origin=(47.3705, 8.5405))
    assert companion.build(f).code == 0
    published = companion.manifest.read_bytes()
    write_flight(f, origin=(47.3710, 8.5410))  # a new build is due

    class Cut(io.StringIO):
        def write(self, s: str) -> int:
            if s.startswith("companion| ") and companion.sshd.proc is not None:
                companion.sshd.kill()  # the first line of the remote build: the link goes
            return super().write(s)

    # stage the new flight on the workstation (its half runs; that companion is unreachable)
    companion.build(f, COMPANION=f"{companion.sshd.user}@127.0.0.1:{free_port()}")
    plan, report, warnings = _inprocess(companion, f)
    with pytest.raises(ConnectionDroppedError) as info:
        build_on_companion(plan, report, warnings.append, stream=Cut())
    assert info.value.exit_code == 30 and "during the remote build" in info.value.message
    assert "untouched" in info.value.remedy
    assert companion.manifest.read_bytes() == published
    assert companion.verify().code == 0

    companion.sshd.start()
    r = companion.build(f)
    assert r.code == 0, r.stderr
    assert r.report["outcome"] == "success" and companion.manifest.read_bytes() != published
    assert companion.verify().code == 0


def test_secrets_reach_no_output_and_no_file(
    companion: Companion, tmp_path: Path, tile_server: Any
) -> None:
    api_key = "sk-Very-Secret-4f9a2c"
    token = "flights-token-9b7e1d"
    tile_server.key = api_key
    env = companion.cb.env(CACHEBUILD_API_KEY=api_key, FLIGHTS_API_TOKEN=token)
    f = write_flight(tmp_path / "f.json")
    provider = f"PROVIDER={tile_server.template('?key={key}')}"
    r = companion.build(f, provider, env=env)
    assert r.code == 0, r.stderr
    r2 = companion.build(
        f, provider, env=env, COMPANION_CMD="/opt/nowhere/doit"
    )  # an error path too
    assert r2.code == 0 or r2.code == 30
    needles = [api_key, token]
    for text in (r.stdout, r.stderr, r2.stdout, r2.stderr):
        for needle in needles:
            assert needle not in text
    for root in (companion.dir, companion.home, companion.cb.home):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for needle in needles:
                    assert needle.encode() not in data, f"secret found in {path}"
    # the pushed tile set names the provider by its template, {key} and all
    pushed = json.loads(next((companion.dir / "inbox").glob("*/tileset.json")).read_text())
    assert "{key}" in pushed["provider"]


def test_cache_info_reads_the_companions_cache_and_says_whether_it_matches(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json", flight_id="3F2B8C1E-5A7D-4E6F-9B0A-1C2D3E4F5A6B")
    built = companion.build(f)
    assert built.code == 0, built.stderr
    args = [f"{k}={v}" for k, v in companion.vars().items()]

    # read over SSH: the companion's own cache-info, verified there with its key
    info = companion.cb.run("cache-info", *args)
    assert info.code == 0, info.stderr
    c = info.report["companion"]
    signed = json.loads(companion.manifest.read_text())["signed"]
    assert c["host"] == companion.sshd.target and c["dir"] == str(companion.dir)
    assert c["build_id"] == c["cache"]["build_id"] == signed["build_id"] == built.report["build_id"]
    assert (
        c["cache"]["manifest_version"] == signed["version"]
        and c["cache"]["expires"] == signed["expires"]
    )
    assert c["cache"]["artifacts"]["preview.png"] == signed["targets"]["preview.png"]["length"]
    assert c["cache"]["verify"] == {"ok": True, "reason": None}
    # nothing is published on this workstation: the reference is the build it ran there
    assert info.report["cache"] is None and info.report["build_id"] == signed["build_id"]
    assert c["reference"]["source"] == "last companion build"
    assert c["status"] == "matches" and c["matches"] is True
    text = companion.cb.run("cache-info", *args, "REPORT=text")
    assert text.code == 0 and "matches the last build this workstation made for" in text.stdout

    # the operator builds another area here: another cache, not the companion's reference
    g = write_flight(tmp_path / "g.json", lon=8.5460)
    local = companion.cb.build(f"FLIGHT={g}", *SMALL)
    assert local.code == 0, local.stderr
    again = companion.cb.run("cache-info", *args)
    assert again.code == 0, again.stderr
    c = again.report["companion"]
    assert again.report["cache"]["build_id"] == local.report["build_id"]
    assert c["reference"]["source"] == "last companion build"
    assert c["status"] == "matches" and c["build_id"] == signed["build_id"]

    # tampered on the companion: read all the same, verify false with the reason
    target = companion.dir / "cache" / "current" / "index.faiss"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.unlink()
    target.write_bytes(bytes(data))
    bad = companion.cb.run("cache-info", *args).report["companion"]
    assert (
        bad["cache"]["verify"]["ok"] is False and "index.faiss" in bad["cache"]["verify"]["reason"]
    )

    # a companion with no cache, and one that cannot be reached
    empty = companion.cb.run("cache-info", *args, f"COMPANION_DIR={tmp_path / 'fresh'}")
    assert empty.code == 0, empty.stderr
    c = empty.report["companion"]
    assert c["status"] == "no cache" and c["cache"] is None and "no published cache" in c["error"]
    down = companion.cb.run(
        "cache-info", *args, f"COMPANION={companion.sshd.user}@127.0.0.1:{free_port()}"
    )
    assert down.code == 30 and "cannot connect" in down.report["error"]

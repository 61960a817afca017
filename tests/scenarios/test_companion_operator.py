"""Companion mode as an operator meets it (issue 18): what its errors advise,
what ``cache-info`` compares with, the push line, ``~/.ssh/config``.

Real ``doit`` processes against a real OpenSSH sshd on 127.0.0.1, as in
tests/scenarios/test_companion.py (whose :class:`Companion` helper this reuses).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests._harness.sshd import SSHD
from tests.conftest import write_flight
from tests.scenarios.test_companion import Companion, companion  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD),
    reason=f"{SSHD} (openssh-server) is not installed; .ci/run installs it",
)

#: ``KEY`` as a variable name of its own (not COMPANION_KEY, CACHEBUILD_KEY, KEY_PASSPHRASE).
BARE_KEY = re.compile(r"(?<![A-Za-z0-9_])KEY(?=[= ])")


def test_a_missing_companion_key_names_companion_key_keeps_exit_2_and_says_what_to_do(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f, COMPANION_KEY="/missing.pem")
    assert r.code == 2, r.stderr  # the companion's own exit code, as docs/companion.md promises
    rep = r.report
    assert rep["exit_code"] == 2 and rep["outcome"] == "failure"
    assert rep["error"].startswith(f"on the companion {companion.sshd.target}:")
    assert "COMPANION_KEY=/missing.pem" in rep["error"] and not BARE_KEY.search(rep["error"])
    assert "COMPANION_KEY" in rep["remedy"] and "on the companion" in rep["remedy"]
    assert "install the same cachebuild" not in rep["remedy"]
    assert "ERROR [" in r.stderr and not BARE_KEY.search(r.stderr.split("ERROR [", 1)[1])


def test_the_companions_dev_key_warning_says_companion_key(
    companion: Companion, tmp_path: Path
) -> None:
    f = write_flight(tmp_path / "f.json")
    r = companion.build(f)
    assert r.code == 0, r.stderr
    dev = [w for w in r.report["warnings"] if "development" in w]
    assert dev, r.report["warnings"]
    for w in dev:
        assert w.startswith("companion: ") and "COMPANION_KEY" in w and not BARE_KEY.search(w), w
    streamed = [
        ln for ln in r.stderr.splitlines() if ln.startswith("companion| ") and "development" in ln
    ]
    assert streamed and not any(BARE_KEY.search(ln) for ln in streamed), streamed


def test_cache_info_compares_with_the_last_build_made_for_that_companion_and_dir(
    companion: Companion, tmp_path: Path
) -> None:
    from tests.scenarios.test_companion import SMALL

    # an unrelated local cache (the operator tried the demo here first)
    demo = companion.cb.build(f"FLIGHT={write_flight(tmp_path / 'demo.json', lon=8.5460)}", *SMALL)
    assert demo.code == 0, demo.stderr
    f = write_flight(tmp_path / "f.json")
    built = companion.build(f)
    assert built.code == 0, built.stderr
    # the same workstation builds another area into a second COMPANION_DIR on that companion
    other_dir = tmp_path / "companion-b"
    g = write_flight(tmp_path / "g.json", lat=47.3750)
    other = companion.build(g, COMPANION_DIR=str(other_dir))
    assert other.code == 0, other.stderr
    assert len({demo.report["build_id"], built.report["build_id"], other.report["build_id"]}) == 3

    args = [f"{k}={v}" for k, v in companion.vars().items()]
    info = companion.cb.run("cache-info", *args)
    assert info.code == 0, info.stderr
    c = info.report["companion"]
    assert c["status"] == "matches" and c["matches"] is True, c
    ref = c["reference"]
    assert ref["source"] == "last companion build" and ref["build_id"] == built.report["build_id"]
    assert ref["host"] == companion.sshd.target and ref["dir"] == str(companion.dir)
    assert info.report["cache"]["build_id"] == demo.report["build_id"]  # still shown, not compared
    text = companion.cb.run("cache-info", *args, "REPORT=text")
    assert text.code == 0, text.stderr
    assert (
        f"matches the last build this workstation made for {companion.sshd.target} {companion.dir}"
        in text.stdout
    )

    # another workstation (another home) publishes a new build there: this one's record differs
    elsewhere = companion.cb.__class__(home=tmp_path / "home2")
    elsewhere.home.mkdir()
    theirs = Companion(
        cb=elsewhere, sshd=companion.sshd, dir=companion.dir, home=companion.home
    ).build(write_flight(tmp_path / "h.json", origin=(47.3705, 8.5405)))
    assert theirs.code == 0, theirs.stderr
    stale = companion.cb.run("cache-info", *args).report["companion"]
    assert stale["status"] == "stale" and stale["build_id"] == theirs.report["build_id"]
    assert stale["reference"]["build_id"] == built.report["build_id"]

    # a companion dir this workstation never built for: nothing to compare with, said so
    third = companion.cb.__class__(home=tmp_path / "home3")
    third.home.mkdir()
    fresh = third.run("cache-info", *args)
    assert fresh.code == 0, fresh.stderr
    c = fresh.report["companion"]
    assert c["status"] == "unknown" and c["matches"] is None and c["reference"] is None


def _push_lines(stderr: str) -> tuple[str, str]:
    lines = [
        ln for ln in stderr.splitlines() if ln.startswith("push: ") and "/" not in ln.split(",")[0]
    ]
    before = [ln for ln in lines if "missing there" in ln]
    after = [ln for ln in lines if ln.startswith("push: sent")]
    assert len(before) == 1 and len(after) == 1, stderr
    return before[0], after[0]


def test_the_push_lines_count_the_same_things_and_agree_with_the_report(
    companion: Companion, tmp_path: Path
) -> None:
    from cachebuild.engine.model import build_default_model

    model = tmp_path / "net.onnx"
    model.write_bytes(build_default_model())
    f = write_flight(tmp_path / "f.json")
    # PIPELINE=0: no push while fetching (its lines: test_companion_prepush.py)
    r = companion.build(f, MODEL=str(model), PIPELINE="0")
    assert r.code == 0, r.stderr
    push = r.report["push"]
    n = push["tile_objects"]
    before, after = _push_lines(r.stderr)
    assert f"{n} of {n} tile images, 1 of 1 input file, 5 of 5 flight files missing there" in before
    assert f"sent {n} tile images in {push['packs']} pack" in after
    assert "1 input file, 5 flight files:" in after
    assert push["files"] == 1 + 5 and push["objects"] == n + 1
    assert f"0 of {n} tile images were there already" in after

    again = companion.build(f, MODEL=str(model))
    assert again.code == 0, again.stderr
    before, after = _push_lines(again.stderr)
    assert f"0 of {n} tile images, 0 of 1 input file, 0 of 5 flight files missing there" in before
    assert "sent nothing" in after and f"{n} of {n} tile images were there already" in after


def _ssh_home(tmp_path: Path, companion: Companion, jump: object | None) -> Path:
    """A home whose ~/.ssh/config names the companion ``jetson`` (through ``jump`` if given)
    and whose ~/.ssh/known_hosts trusts both servers: nothing else is set."""
    from tests._harness.sshd import Sshd

    home = tmp_path / "operator"
    ssh = home / ".ssh"
    ssh.mkdir(parents=True)
    s = companion.sshd
    lines = [
        "Host jetson",
        "  HostName 127.0.0.1",
        f"  User {s.user}",
        f"  Port {s.port}",
        "  IdentityFile ~/.ssh/nonexistent_key",
        f"  IdentityFile {s.client_key}",
    ]
    known = s.known_hosts_line()
    if isinstance(jump, Sshd):
        lines += [
            "  ProxyJump bastion",
            "Host bastion",
            "  HostName localhost",
            f"  Port {jump.port}",
        ]
        lines += [f"  User {jump.user}", f"  IdentityFile {jump.client_key}"]
        known += jump.known_hosts_line().replace("[127.0.0.1]", "[localhost]")
    (ssh / "config").write_text("\n".join(lines) + "\n")
    (ssh / "known_hosts").write_text(known)
    return home


def test_companion_is_a_host_of_the_operators_ssh_config_through_a_jump_host(
    companion: Companion, tmp_path: Path
) -> None:
    from tests._harness.sshd import Sshd, keygen

    jump = Sshd(tmp_path / "bastion").start()
    try:
        home = _ssh_home(tmp_path, companion, jump)
        env = companion.cb.env(HOME=str(home))
        f = write_flight(tmp_path / "f.json")
        plain = {"COMPANION_DIR": str(companion.dir), "COMPANION_CMD": companion.cmd}
        args = [f"{k}={v}" for k, v in plain.items()]
        from tests.scenarios.test_companion import SMALL

        r = companion.cb.build(f"FLIGHT={f}", *SMALL, "COMPANION=jetson", *args, env=env)
        assert r.code == 0, r.stderr
        assert r.report["companion"]["host"] == companion.sshd.target
        assert "Accepted publickey" in jump.log.read_text(), (
            "the companion was reached through the jump host"
        )
        info = companion.cb.run("cache-info", "COMPANION=jetson", *args, env=env)
        assert info.code == 0, info.stderr
        assert info.report["companion"]["status"] == "matches"

        # explicit variables win over the config: SSH_KEY over IdentityFile, the port over Port
        stranger = keygen(tmp_path / "stranger")
        bad = companion.cb.build(
            f"FLIGHT={f}", *SMALL, "COMPANION=jetson", f"SSH_KEY={stranger}", *args, env=env
        )
        assert (
            bad.code == 30
            and "refused the key" in bad.report["error"]
            and str(stranger) in bad.report["error"]
        )
        from tests._harness.sshd import free_port

        port = free_port()
        bad = companion.cb.build(f"FLIGHT={f}", *SMALL, f"COMPANION=jetson:{port}", *args, env=env)
        assert bad.code == 30 and f"127.0.0.1:{port}" in bad.report["error"], bad.report["error"]
        assert "jump host" in bad.report["error"]
    finally:
        jump.stop()


def test_ssh_config_without_a_jump_and_the_user_in_companion_wins(
    companion: Companion, tmp_path: Path
) -> None:
    home = _ssh_home(tmp_path, companion, None)
    env = companion.cb.env(HOME=str(home))
    f = write_flight(tmp_path / "f.json")
    args = [f"COMPANION_DIR={companion.dir}", f"COMPANION_CMD={companion.cmd}"]
    from tests.scenarios.test_companion import SMALL

    r = companion.cb.build(f"FLIGHT={f}", *SMALL, "COMPANION=jetson", *args, env=env)
    assert r.code == 0, r.stderr
    bad = companion.cb.build(f"FLIGHT={f}", *SMALL, "COMPANION=nosuchuser@jetson", *args, env=env)
    assert bad.code == 30 and f"nosuchuser@127.0.0.1:{companion.sshd.port}" in bad.report["error"]

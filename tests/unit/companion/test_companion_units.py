"""Companion mode without a server: parsing, packs, the agent, the pushed
provider, output streaming and error translation (injected connections).

The real OpenSSH end to end tests are in test_companion.py.
"""

from __future__ import annotations

import getpass
import importlib
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from cachebuild.companion import agent, flow, packs, push, remote, ssh
from cachebuild.companion.errors import (
    AuthenticationError,
    CompanionNotReadyError,
    CompanionUnreachableError,
    ConnectionDroppedError,
    HostKeyError,
    RemoteBuildError,
    RemoteReportError,
)
from cachebuild.errors import DownloadError, StoreObjectError, UsageError
from cachebuild.inputs.config import load_settings
from cachebuild.providers import pushed
from cachebuild.store.objects import TileStore, sha256_hex

ENV = {"CACHEBUILD_HOME": "/tmp/cb-home"}


@pytest.mark.parametrize(
    "module",
    [
        "cachebuild.companion." + m
        for m in (
            "agent",
            "errors",
            "flow",
            "messages",
            "packs",
            "prepush",
            "push",
            "reach",
            "records",
            "remote",
            "ssh",
            "sshconfig",
        )
    ],
)
def test_all_is_complete(module: str) -> None:
    mod = importlib.import_module(module)
    public = {
        n
        for n, v in vars(mod).items()
        if not n.startswith("_") and getattr(v, "__module__", module) == module and callable(v)
    }
    assert public <= set(mod.__all__), public - set(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_importing_companion_does_not_import_paramiko() -> None:
    import subprocess
    import sys

    code = "import sys, cachebuild.cli.runner, cachebuild.companion.flow; print('paramiko' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


# -- COMPANION and the settings ------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("nvidia@jetson.local", ("nvidia", "jetson.local", 22)),
        ("nvidia@192.168.55.1:2222", ("nvidia", "192.168.55.1", 2222)),
        ("op@[fe80::1]:22", ("op", "fe80::1", 22)),
        ("op@[::1]", ("op", "::1", 22)),
    ],
)
def test_parse_companion(spec: str, expected: tuple[str, str, int]) -> None:
    assert tuple(ssh.parse_companion(spec)) == expected


def test_parse_companion_defaults_to_the_local_user() -> None:
    import getpass

    assert ssh.parse_companion("jetson").user == getpass.getuser()


@pytest.mark.parametrize("spec", ["", "a b", "u@h:0", "u@h:70000", "u@h:x", "u@[zz]", "u@@h"])
def test_parse_companion_refuses(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        ssh.parse_companion(spec)
    assert info.value.exit_code == 2 and "COMPANION" in str(info.value)


def test_settings_read_the_companion_variables(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("x")
    s = load_settings(
        {
            "COMPANION": "nvidia@jetson:2200",
            "SSH_KEY": str(key),
            "KNOWN_HOSTS": "~/kh",
            "HOST_KEY_POLICY": "ACCEPT-NEW",
            "COMPANION_DIR": "/srv/cb",
            "COMPANION_CMD": "/opt/cb/bin/doit",
            "COMPANION_KEY": "/etc/cachebuild/sign.pem",
        },
        ENV,
    )
    assert s.companion == "nvidia@jetson:2200" and s.ssh_key == key.resolve()
    assert s.known_hosts == Path("~/kh").expanduser() and s.host_key_policy == "accept-new"
    assert (s.companion_dir, s.companion_cmd, s.companion_key) == (
        "/srv/cb",
        "/opt/cb/bin/doit",
        "/etc/cachebuild/sign.pem",
    )
    d = load_settings({}, ENV)
    assert d.companion is None and d.host_key_policy == "reject" and d.companion_cmd == "doit"


@pytest.mark.parametrize(
    "vars, needle",
    [
        ({"COMPANION": "bad host"}, "COMPANION"),
        ({"HOST_KEY_POLICY": "trust-all"}, "HOST_KEY_POLICY"),
        ({"SSH_KEY": "/no/such/key"}, "SSH_KEY"),
        ({"COMPANION_CMD": " "}, "COMPANION_CMD"),
        ({"COMPANION_DIR": "a\nb"}, "COMPANION_DIR"),
    ],
)
def test_bad_companion_variables_are_usage_errors(vars: dict[str, str], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        load_settings(vars, ENV)
    assert needle in str(info.value)


def test_key_with_companion_is_refused_the_private_key_never_travels(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    with pytest.raises(UsageError) as info:
        load_settings({"COMPANION": "u@h", "KEY": str(key)}, ENV)
    assert "COMPANION_KEY" in info.value.remedy


def test_remote_variables_carry_what_the_build_depends_on() -> None:
    s = load_settings({"COMPANION": "u@h", "ZOOM": "16,17", "BUFFER_M": "250", "STRICT": "0"}, ENV)
    remote_paths = {
        "flight": "/c/inbox/k/flight.json",
        "tileset_dir": "/c/inbox/k",
        "store": "/c/store",
        "cache": "/c/cache",
        "model": None,
        "calibration": None,
    }
    v = flow.remote_variables(s, remote_paths)
    assert (
        v["PROVIDER"] == "pushed:/c/inbox/k" and v["ZOOM"] == "16,17" and v["BUFFER_M"] == "250.0"
    )
    assert v["STRICT"] == "0" and v["REPORT"] == "json" and v["KEY"] is None and v["MODEL"] is None
    cmd = remote.remote_command("doit", "build-cache", v)
    words = cmd.split()
    assert "PROVIDER=pushed:/c/inbox/k" in words and not any(
        w.startswith(("KEY=", "MODEL=")) for w in words
    )
    assert (
        remote.remote_command("doit", "x", {"FLIGHT": "/a b/it's.json"})
        == "doit x 'FLIGHT=/a b/it'\"'\"'s.json'"
    )


class FakeSftp:
    def normalize(self, path: str) -> str:
        return "/home/nvidia"


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, "/home/nvidia/.cache/cachebuild"),
        ("~", "/home/nvidia"),
        ("~/maps/", "/home/nvidia/maps"),
        ("maps", "/home/nvidia/maps"),
        ("/srv//cb/", "/srv/cb"),
    ],
)
def test_companion_dir_is_made_absolute(spec: str | None, expected: str) -> None:
    assert flow.resolve_root(FakeSftp(), spec) == expected


# -- connecting: every failure is exit 30 with a remedy -------------------------------------


def _options(tmp_path: Path) -> ssh.SshOptions:
    return ssh.SshOptions(key_path=tmp_path / "id", known_hosts=tmp_path / "known_hosts")


def _raising(exc: BaseException) -> Any:
    def factory(target: Any, options: Any, warn: Any) -> Any:
        raise exc

    return factory


def test_connect_translates_paramiko_errors(tmp_path: Path) -> None:
    import paramiko

    target = ssh.parse_companion("nvidia@jetson:2222")
    key = paramiko.Ed25519Key.from_private_key_file  # noqa: F841 (the class exists)
    cases: list[tuple[BaseException, type, str]] = [
        (
            paramiko.AuthenticationException("Authentication failed."),
            AuthenticationError,
            "authorized_keys",
        ),
        (
            ConnectionRefusedError(111, "Connection refused"),
            CompanionUnreachableError,
            "Connection refused",
        ),
        (TimeoutError("timed out"), CompanionUnreachableError, "jetson"),
        (
            socket.gaierror(-2, "Name or service not known"),
            CompanionUnreachableError,
            "Name or service",
        ),
        (
            paramiko.SSHException("Error reading SSH protocol banner"),
            CompanionUnreachableError,
            "banner",
        ),
    ]
    for exc, cls, needle in cases:
        with pytest.raises(cls) as info:
            ssh.connect(target, _options(tmp_path), factory=_raising(exc))
        err = info.value
        assert err.exit_code == 30 and err.phase == "companion", exc
        assert needle in str(err), (needle, str(err))
        assert "nvidia@jetson:2222" in err.message


def test_a_changed_host_key_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    import paramiko

    from tests._harness.sshd import keygen

    a = paramiko.PKey.from_path(str(keygen(tmp_path / "a")))
    b = paramiko.PKey.from_path(str(keygen(tmp_path / "b")))
    exc = paramiko.BadHostKeyException("[jetson]:2222", a, b)
    with pytest.raises(HostKeyError) as info:
        ssh.connect(
            ssh.parse_companion("nvidia@jetson:2222"), _options(tmp_path), factory=_raising(exc)
        )
    msg = info.value.message
    assert "CHANGED" in msg and ssh.fingerprint(a) in msg and ssh.fingerprint(b) in msg
    assert "ssh-keygen -R" in info.value.remedy


def test_key_problems_are_named(tmp_path: Path) -> None:
    from tests._harness.sshd import keygen

    missing = ssh.SshOptions(key_path=tmp_path / "nope", known_hosts=tmp_path / "kh")
    with pytest.raises(AuthenticationError, match="cannot read the key"):
        ssh.load_key(missing)
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    with pytest.raises(AuthenticationError, match="not a private key"):
        ssh.load_key(ssh.SshOptions(key_path=junk, known_hosts=tmp_path / "kh"))
    import subprocess

    enc = keygen(tmp_path / "enc")
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", "s3cret-pass", "-f", str(enc)], check=True)
    with pytest.raises(AuthenticationError) as info:
        ssh.load_key(ssh.SshOptions(key_path=enc, known_hosts=tmp_path / "kh"))
    assert ssh.PASSPHRASE_ENV in info.value.remedy
    assert ssh.load_key(
        ssh.SshOptions(key_path=enc, known_hosts=tmp_path / "kh", passphrase="s3cret-pass")
    )
    assert "s3cret-pass" not in repr(
        ssh.SshOptions(key_path=enc, known_hosts=tmp_path, passphrase="s3cret-pass")
    )


def test_no_ssh_key_anywhere_is_exit_30(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = load_settings(
        {"COMPANION": "u@h"}, {"CACHEBUILD_HOME": str(tmp_path), "HOME": str(tmp_path)}
    )
    with pytest.raises(AuthenticationError, match="SSH_KEY"):
        flow.companion_options(s)


# -- output: lines, redaction, the report ---------------------------------------------------


def test_line_splitter_joins_chunks_and_bounds_lines() -> None:
    out: list[str] = []
    s = remote.LineSplitter(out.append, max_line=10)
    for chunk in (b"he", b"llo\r\nwor", b"ld\n", b"x" * 25, b"\n", b"\xff tail"):
        s.feed(chunk)
    s.close()
    assert out == ["hello", "world", "xxxxxxxxxx […cut]", "\ufffd tail"]


class FakeConn:
    """Stands in for ssh.Connection: ``pump`` replays scripted output."""

    def __init__(self, code: int, stdout: bytes = b"", stderr: bytes = b"", chunk: int = 7):
        self.code, self.stdout, self.stderr, self.chunk = code, stdout, stderr, chunk
        self.target = ssh.parse_companion("nvidia@jetson:22")
        self.commands: list[tuple[str, bytes]] = []

    def pump(
        self, command: str, *, stdin: bytes = b"", on_stdout: Any, on_stderr: Any, during: str
    ) -> int:
        self.commands.append((command, stdin))
        for i in range(0, max(len(self.stderr), len(self.stdout)), self.chunk):
            on_stderr(self.stderr[i : i + self.chunk])
            on_stdout(self.stdout[i : i + self.chunk])
        return self.code


def _report(**kw: Any) -> bytes:
    base = {"command": "build-cache", "outcome": "success", "exit_code": 0, "warnings": []}
    base.update(kw)
    return (json.dumps(base) + "\n").encode()


def test_remote_output_is_streamed_redacted_and_the_report_parsed() -> None:
    secret = "sk-Very-Secret-4f9a2c"
    env = {"CACHEBUILD_API_KEY": secret, "FLIGHTS_API_TOKEN": "tok-abcdef123"}
    conn = FakeConn(
        0,
        stdout=b"a stray line\n" + _report(build_id="b1"),
        stderr=f".. tiles\nGET /t?key={secret} failed\ntoken tok-abcdef123\n".encode(),
    )
    out = io.StringIO()
    code, rep = remote.run_remote_build(conn, "doit build-cache", out=out, env=env)
    assert code == 0 and rep["build_id"] == "b1"
    text = out.getvalue()
    assert secret not in text and "tok-abcdef123" not in text
    assert f"{remote.PREFIX}GET /t?key=*** failed" in text and f"{remote.PREFIX}.. tiles" in text
    assert f"{remote.PREFIX}a stray line" in text and "build_id" not in text


@pytest.mark.parametrize(
    "stdout", [b"", b"Traceback...\nKeyError: 'x'\n", b'{"outcome": "success"}\n', b"{not json\n"]
)
def test_a_missing_or_malformed_report_is_exit_21_with_the_tail(stdout: bytes) -> None:
    conn = FakeConn(1, stdout=stdout, stderr=b"".join(f"line {i}\n".encode() for i in range(100)))
    with pytest.raises(RemoteReportError) as info:
        remote.run_remote_build(conn, "doit build-cache", out=io.StringIO(), env={})
    err = info.value
    assert err.exit_code == 21 and "line 99" in err.message and "line 50" not in err.message
    assert "exited 1" in err.message


def test_the_agent_answer_or_what_went_wrong() -> None:
    ok = FakeConn(0, stdout=b'noise\n{"protocol": 1, "absent": ["a"]}\n')
    assert remote.call_agent(ok, "doit", "probe", "/c", wanted=["a", "b"])["absent"] == ["a"]
    command, stdin = ok.commands[0]
    assert command == "doit companion-agent OP=probe DIR=/c WANT=stdin" and stdin == b"a\nb\n"
    with pytest.raises(CompanionNotReadyError, match="was not found") as info:
        remote.call_agent(
            FakeConn(127, stderr=b"bash: doit: command not found\n"), "doit", "probe", "/c"
        )
    assert "command not found" in info.value.message and info.value.exit_code == 30
    with pytest.raises(CompanionNotReadyError, match="did not answer"):
        remote.call_agent(
            FakeConn(3, stderr=b"ERROR: could not find dodo file\n"), "doit", "probe", "/c"
        )
    refusing = FakeConn(1, stdout=b'{"error": "cannot write under /c", "remedy": "fix it"}\n')
    with pytest.raises(CompanionNotReadyError, match="cannot write") as info:
        remote.call_agent(refusing, "doit", "probe", "/c")
    assert info.value.remedy == "fix it"


class FakeReport:
    def __init__(self) -> None:
        self.extra: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.outcome = "failure"
        self.exit_code = 1
        self.build_id = self.manifest_version = self.manifest_path = None


def test_remote_outcomes_map_to_exit_codes() -> None:
    target = ssh.parse_companion("nvidia@jetson")
    rep = FakeReport()
    flow._merge_remote(
        rep, json.loads(_report(outcome="up_to_date", build_id="b", warnings=["w"])), 0, target
    )
    assert (rep.outcome, rep.exit_code, rep.build_id, rep.warnings) == (
        "up_to_date",
        0,
        "b",
        ["companion: w"],
    )
    for code, phase, cls in (
        (22, "coverage", RemoteBuildError),
        (50, "lock", RemoteBuildError),
        (21, "index", RemoteBuildError),
    ):
        with pytest.raises(cls) as info:
            flow._merge_remote(
                FakeReport(),
                json.loads(
                    _report(outcome="failure", exit_code=code, failure_phase=phase, error="boom")
                ),
                code,
                target,
            )
        assert info.value.exit_code == code and info.value.phase == phase
        assert "on the companion nvidia@jetson:22: boom" in info.value.message
    # the companion refusing what this workstation made is a version mismatch; its code is kept
    for code in (2, 95):
        with pytest.raises(RemoteBuildError) as info:
            flow._merge_remote(
                FakeReport(), json.loads(_report(outcome="failure", exit_code=code)), code, target
            )
        assert info.value.exit_code == code and "same cachebuild version" in info.value.remedy


# -- packs and the agent ------------------------------------------------------------------


def _objects(n: int, size: int = 100) -> dict[str, bytes]:
    blobs = [os.urandom(size) for _ in range(n)]
    return {sha256_hex(b): b for b in blobs}


def test_packs_round_trip_into_a_store(tmp_path: Path) -> None:
    objs = _objects(5)
    groups = list(packs.group_into_packs([(d, len(b)) for d, b in objs.items()], limit=250))
    assert [len(g) for g in groups] == [2, 2, 1]
    pack = tmp_path / "p.tar"
    pack.write_bytes(packs.build_pack(objs.items()))
    import tarfile

    with tarfile.open(pack) as tar:
        assert sorted(tar.getnames()) == sorted(objs)  # a plain tar
    with TileStore(tmp_path / "store") as store:
        assert packs.unpack_into(pack, store) == (5, 500)
        assert all(store.get(d, verify=True) == b for d, b in objs.items())


def test_a_member_that_does_not_hash_to_its_name_is_refused(tmp_path: Path) -> None:
    objs = _objects(2)
    (d1, b1), (d2, _) = objs.items()
    pack = tmp_path / "bad.tar"
    pack.write_bytes(packs.build_pack([(d1, b1), (d2, b"tampered")]))
    with TileStore(tmp_path / "store") as store:
        with pytest.raises(packs.PackCorruptError, match="does not hash"):
            packs.unpack_into(pack, store)
        assert store.has(d1) and not store.has(d2)
    evil = tmp_path / "evil.tar"
    evil.write_bytes(packs.build_pack([("../../etc/passwd", b"x")]))
    with pytest.raises(packs.PackCorruptError, match="unexpected member"):
        list(packs.iter_pack(evil))


def test_settle_unpacks_complete_packs_and_drops_stale_parts(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    objs = _objects(4)
    items = list(objs.items())
    (incoming / "s-000000.tar").write_bytes(packs.build_pack(items[:2]))
    (incoming / "s-000001.tar.claimed-999999999").write_bytes(
        packs.build_pack(items[2:3])
    )  # its unpacker died
    (incoming / "s-000002.tar.abc.part").write_bytes(packs.build_pack(items[3:]))  # never complete
    old = incoming / "s-000003.tar.def.part"
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * packs.STALE_PART_S,) * 2)
    (incoming / "x-000000.tar").write_bytes(b"this is not a tar at all" * 40)
    with TileStore(tmp_path / "store") as store:
        counts = packs.settle_incoming(incoming, store)
        quarantined = counts.pop("quarantined")
        assert counts == {"packs": 2, "objects": 3, "bytes": 300, "corrupt": 1, "stale_parts": 1}
        assert len(quarantined) == 1 and quarantined[0].startswith("x-000000.tar: not a pack")
        assert [store.has(d) for d, _ in items] == [True, True, True, False]
    assert sorted(p.name for p in incoming.iterdir()) == ["quarantine", "s-000002.tar.abc.part"]


def test_probe_answers_what_is_absent_and_prepares_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "c"
    objs = _objects(2)
    (d1, b1), (d2, _) = objs.items()
    TileStore(root / "store").put(b1)
    stale = root / "inbox" / "old"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * agent.INBOX_KEEP_S,) * 2)
    wanted = [
        f"store/objects/{d1[:2]}/{d1}",
        f"store/objects/{d2[:2]}/{d2}",
        "inbox/k/tileset.json",
    ]
    ans = agent.probe(root, wanted, backend="onnxruntime")
    assert ans["absent"] == wanted[1:] and ans["protocol"] == agent.PROTOCOL_VERSION
    assert ans["free_bytes"] > 0 and ans["pruned_inbox"] == 1 and not stale.exists()
    assert {"gpu", "tensorrt", "jetson", "onnxruntime"} <= set(ans["device"])
    assert ans["engine"]["backend"] == "onnxruntime"
    assert all((root / d).is_dir() for d in ("store", "incoming", "inputs", "inbox", "cache"))
    with pytest.raises(ValueError):
        agent.probe(root, ["../outside"])


def test_agent_main_speaks_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.main({"OP": "nope"}) == 2
    assert "usage" in json.loads(capsys.readouterr().out)["error"]
    assert agent.main({"OP": "probe", "DIR": "relative/dir"}) == 1
    assert "not absolute" in json.loads(capsys.readouterr().out)["error"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code = agent.main({"OP": "probe", "DIR": str(ro / "c")})
        answer = json.loads(capsys.readouterr().out)
        if os.geteuid() != 0:  # root writes anywhere
            assert code == 1 and "COMPANION_DIR" in answer["remedy"]
    finally:
        ro.chmod(0o700)
    assert agent.main({"OP": "unpack", "DIR": str(tmp_path / "u")}) == 0
    assert json.loads(capsys.readouterr().out)["absent"] == []


# -- the push plan and the pushed provider ---------------------------------------------------


def _staged(tmp_path: Path, n: int = 6, missing: int = 2) -> tuple[Path, Path, dict[int, str]]:
    """A staged tile set of ``n`` present and ``missing`` missing tiles, objects in a store."""
    import numpy as np

    from cachebuild.tilemath import Tile, tile_id
    from cachebuild.tileset import tile_dtype, write_tileset

    build, store_root = tmp_path / "build", tmp_path / "store"
    build.mkdir()
    store = TileStore(store_root)
    rows, ids = [], {}
    for i in range(n):
        tid = tile_id(Tile(100 + i, 200, 17))
        digest = store.put(f"tile {i % 4}".encode())  # some tiles share an image
        rows.append((tid, bytes.fromhex(digest)))
        ids[tid] = digest
    miss = [tile_id(Tile(300 + i, 200, 17)) for i in range(missing)]
    write_tileset(
        build,
        np.array(rows, dtype=tile_dtype()),
        np.array(miss, dtype="<i8"),
        {"provider": "synthetic:v1"},
    )
    (build / "flight.json").write_text('{"flight_id": null}\n')
    return build, store_root, ids


def test_plan_push_lists_each_object_once_and_names_inputs_by_content(tmp_path: Path) -> None:
    build, store_root, ids = _staged(tmp_path)
    model = tmp_path / "net.onnx"
    model.write_bytes(b"model bytes")
    p = push.plan_push(
        build_dir=build, store_root=store_root, root="/c", model=model, state_dir=tmp_path
    )
    assert set(p.tiles) == set(ids.values()) and len(p.tiles) == 4
    rel = f"inputs/{sha256_hex(b'model bytes')}.onnx"
    assert p.inputs == {rel: (model, 11)} and p.remote["model"] == f"/c/{rel}"
    assert (
        p.remote["tileset_dir"] == f"/c/{p.inbox}" and p.wanted()[-1] == f"{p.inbox}/tileset.json"
    )
    assert json.loads(p.inbox_files["push.json"])["store"] == "/c/store"
    assert p.bytes_for(set()) == 0 and p.bytes_for(set(p.wanted())) > p.tile_bytes
    again = push.plan_push(
        build_dir=build, store_root=store_root, root="/c", model=model, state_dir=tmp_path
    )
    assert again.inbox == p.inbox  # same flight, same tiles: same inbox


def test_pushed_provider_serves_the_pushed_tiles_and_only_those(tmp_path: Path) -> None:
    from cachebuild.inputs.plan import provider_key
    from cachebuild.providers import open_provider
    from cachebuild.tilemath import Tile, tile_id
    from cachebuild.tileset import read_summary

    build, store_root, ids = _staged(tmp_path)
    (build / "push.json").write_text(json.dumps({"format": 1, "store": str(store_root)}))
    prov = open_provider(f"pushed:{build}", env={})
    assert prov.identity == f"pushed:{read_summary(build)['aggregate_sha256']}"
    t = Tile(100, 200, 17)
    assert prov.fetch(t) == TileStore(store_root).get(ids[tile_id(t)])
    assert prov.fetch(Tile(300, 200, 17)) is None  # missing on the workstation: missing here
    with pytest.raises(DownloadError, match="another area"):
        prov.fetch(Tile(5, 5, 17))
    os.unlink(TileStore(store_root).path(ids[tile_id(t)]))
    with pytest.raises(DownloadError, match="was not pushed"):
        prov.fetch(t)
    key = provider_key(f"pushed:{build}")
    assert key.startswith(f"pushed:{build}:") and key == provider_key(f"pushed:{build}")
    with pytest.raises(UsageError):
        provider_key(f"pushed:{tmp_path / 'nothing'}")
    with pytest.raises(UsageError, match="no complete pushed tile set"):
        pushed.open_pushed(f"pushed:{tmp_path / 'nothing'}")


def test_the_tiles_phase_on_pushed_tiles_writes_the_workstations_tileset_json(
    tmp_path: Path,
) -> None:
    """Issue 24: the tile set a companion builds from the push names the workstation's provider,
    byte for byte the workstation's tileset.json (the same flight, the same cache); the store's
    refs stay under the push's own identity."""
    from cachebuild.tilemath import LngLatBbox, tiles
    from cachebuild.tiles.fetch import fetch_tiles, fetch_with_provider

    area, store_root = LngLatBbox(8.540, 47.370, 8.548, 47.374), tmp_path / "store"
    here, there = tmp_path / "workstation", tmp_path / "companion"
    kw: dict[str, Any] = {"bbox": area, "zooms": [17], "store_root": store_root, "progress": False}
    fetch_tiles(provider_spec="synthetic", out_dir=here, env={}, **kw)
    (here / "push.json").write_text(json.dumps({"format": 1, "store": str(store_root)}))
    prov = pushed.open_pushed(f"pushed:{here}")
    assert prov.published == "synthetic:v1" != prov.identity
    fetch_with_provider(prov, out_dir=there, **kw)
    assert (there / "tileset.json").read_bytes() == (here / "tileset.json").read_bytes()
    planned = [(t.z, t.x, t.y) for t in tiles(area, [17])]
    with TileStore(store_root) as store:
        assert len(store.lookup_refs(prov.identity, planned)) == len(planned)


class DroppingSftp:
    """An SFTP client whose link dies after ``ok`` renames."""

    def __init__(self, ok: int):
        self.ok = ok
        self.files: dict[str, bytes] = {}

    def open(self, path: str, mode: str) -> Any:
        files = self.files

        class F(io.BytesIO):
            def set_pipelined(self, on: bool) -> None:
                pass

            def close(self) -> None:
                files[path] = self.getvalue()
                super().close()

        return F()

    def posix_rename(self, a: str, b: str) -> None:
        if self.ok == 0:
            raise EOFError("Server connection dropped")
        self.ok -= 1
        self.files[b] = self.files.pop(a)

    def stat(self, path: str) -> Any:
        raise FileNotFoundError(path)

    def mkdir(self, path: str) -> None:
        pass


def test_a_dropped_link_mid_push_is_a_clear_error_saying_what_arrived(tmp_path: Path) -> None:
    build, store_root, _ = _staged(tmp_path, n=40)
    p = push.plan_push(build_dir=build, store_root=store_root, root="/c")
    conn = FakeConn(0)
    conn.alive = lambda: False  # type: ignore[attr-defined]
    sftp = DroppingSftp(ok=1)
    with pytest.raises(ConnectionDroppedError) as info:
        push.push(conn, sftp, p, set(p.wanted()), root="/c", pack_bytes=10)
    err = info.value
    assert err.exit_code == 30 and err.phase == "push"
    assert "lost during the push" in err.message and "1 of 4 objects had arrived" in err.message
    assert [k for k in sftp.files if k.endswith(".tar")] == [
        k for k in sftp.files if "incoming" in k and ".part" not in k
    ]


class SilentChannel:
    """A session channel on a link that went silent: no data, no exit status."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self.closed = False
        self.eof_received = False

    def fileno(self) -> int:
        return self._r

    def send_ready(self) -> bool:
        return True

    def shutdown_write(self) -> None:
        pass

    def recv_ready(self) -> bool:
        return False

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return False


class SilentTransport:
    """Keepalive requests are never answered; ``close`` ends it."""

    def __init__(self) -> None:
        self.active = True
        self.requests = 0

    def is_active(self) -> bool:
        return self.active

    def global_request(self, kind: str, wait: bool = True) -> None:
        self.requests += 1
        while self.active:
            time.sleep(0.01)

    def close(self) -> None:
        self.active = False

    def set_keepalive(self, s: int) -> None:
        pass


def test_a_silent_link_is_declared_dead_after_unanswered_keepalives() -> None:
    transport = SilentTransport()

    class Client:
        def get_transport(self) -> SilentTransport:
            return transport

    options = ssh.SshOptions(
        key_path=Path("k"), known_hosts=Path("kh"), keepalive_s=0.1, dead_after_s=1.2
    )
    conn = ssh.Connection(Client(), ssh.parse_companion("nvidia@jetson"), options)
    chan = SilentChannel()
    import threading

    # a watchdog: were silence never noticed, the link "goes" later and the
    # message below (no "no answer") fails the test instead of hanging it
    watchdog = threading.Timer(60, transport.close)
    watchdog.start()
    try:
        with pytest.raises(ConnectionDroppedError) as info:
            conn._pump(chan, b"", lambda b: None, lambda b: None, "the remote build")
    finally:
        watchdog.cancel()
        os.close(chan._r)
        os.close(chan._w)
    assert transport.requests == 1 and not transport.active  # asked once, then gave the link up
    assert "during the remote build" in info.value.message and "no answer" in info.value.message


def test_a_watching_unpacker_takes_packs_as_they_arrive_until_done(tmp_path: Path) -> None:
    import threading

    root = tmp_path / "c"
    agent.probe(root, [])
    objs = list(_objects(6).items())
    wanted = [f"store/objects/{d[:2]}/{d}" for d, _ in objs]
    answers: list[dict[str, Any]] = []
    watcher = threading.Thread(
        target=lambda: answers.append(agent.unpack(root, wanted, watch="s1"))
    )
    watcher.start()
    incoming = root / "incoming"
    for n in range(3):
        # as the pusher does: written under .part, renamed when whole (the
        # watcher would otherwise find a half-written pack corrupt)
        part = incoming / f"s1-{n:06d}.tar{packs.PART_SUFFIX}"
        part.write_bytes(packs.build_pack(objs[2 * n : 2 * n + 2]))
        part.rename(incoming / f"s1-{n:06d}.tar")
    (incoming / f"s1{agent.DONE_SUFFIX}").write_bytes(b"")
    watcher.join(timeout=120)
    assert answers and answers[0]["done"] is True
    assert answers[0]["absent"] == [] and answers[0]["settled"]["objects"] == 6
    assert list(incoming.iterdir()) == []
    # a watcher nobody feeds gives up, saying what is still absent
    idle = agent.unpack(root, [*wanted, "store/objects/00/00"], watch="s2", idle_s=0.2)
    assert idle["done"] is False and idle["absent"] == ["store/objects/00/00"]


class MemSftp:
    """Files in memory, with what a resumable upload needs: stat, r+ and seek."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.written = 0

    def open(self, path: str, mode: str) -> Any:
        sftp = self
        if mode == "w" or path not in self.files:
            self.files[path] = bytearray()
        buf = self.files[path]

        class F:
            pos = 0

            def set_pipelined(self, on: bool) -> None:
                pass

            def seek(self, n: int) -> None:
                self.pos = n

            def truncate(self, n: int) -> None:
                del buf[n:]

            def write(self, data: Any) -> None:
                data = bytes(data)
                buf[self.pos : self.pos + len(data)] = data
                self.pos += len(data)
                sftp.written += len(data)

            def __enter__(self) -> Any:
                return self

            def __exit__(self, *a: Any) -> None:
                pass

        return F()

    def stat(self, path: str) -> Any:
        if path not in self.files:
            raise FileNotFoundError(path)
        return type("St", (), {"st_size": len(self.files[path])})()

    def posix_rename(self, a: str, b: str) -> None:
        self.files[b] = self.files.pop(a)

    def mkdir(self, path: str) -> None:
        pass


def test_the_push_never_sends_a_corrupt_tile_image_and_removes_it(tmp_path: Path) -> None:
    """Issue 24 (the push read store objects unchecked; the companion refused the pack on every
    build): each image is checked as it is read; a corrupt one is removed and named, phase push,
    for the wrapper to fetch again, and no pack holds it."""
    build, store_root, _ = _staged(tmp_path)
    p = push.plan_push(build_dir=build, store_root=store_root, root="/c")
    bad = sorted(p.tiles)[1]  # one image a pack: the first pack goes, then the corrupt one
    obj = Path(p.tiles[bad][0])
    obj.write_bytes(b"rot " + obj.read_bytes())
    sftp = MemSftp()
    with pytest.raises(StoreObjectError) as info:
        push.push(FakeConn(0), sftp, p, set(p.wanted()), root="/c", pack_bytes=1)
    err = info.value
    assert (err.digest, err.phase, err.path) == (bad, "push", str(obj))
    assert "is corrupt" in err.message and "removed it" in err.message
    assert not obj.exists()
    sent = [bytes(data) for name, data in sftp.files.items() if name.endswith(packs.PACK_SUFFIX)]
    assert len(sent) == 1 and not any(b"rot " in data for data in sent)


def test_a_cut_off_model_upload_resumes_where_it_stopped(tmp_path: Path) -> None:
    build, store_root, _ = _staged(tmp_path)
    model = tmp_path / "big.onnx"
    model.write_bytes(os.urandom(3 * push.CHUNK_BYTES + 123))
    p = push.plan_push(
        build_dir=build, store_root=store_root, root="/c", model=model, state_dir=tmp_path
    )
    (rel,) = p.inputs
    sftp = MemSftp()
    sftp.files[f"/c/{rel}.part"] = bytearray(
        model.read_bytes()[: push.CHUNK_BYTES + 7]
    )  # what arrived
    result = push.push(FakeConn(0), sftp, p, {rel}, root="/c")
    assert bytes(sftp.files[f"/c/{rel}"]) == model.read_bytes()
    assert sftp.written == result.bytes == model.stat().st_size - (push.CHUNK_BYTES + 7)
    assert result.objects == result.files == 1 and f"/c/{rel}.part" not in sftp.files


def test_the_text_report_says_what_was_pushed_and_built_there() -> None:
    from cachebuild._util.report import Report

    rep = Report("build-cache")
    rep.outcome, rep.exit_code = "success", 0
    rep.extra["push"] = {"objects": 3, "bytes": 2_500_000}
    rep.extra["companion"] = {"host": "nvidia@jetson:22", "tasks": {"run": ["describe", "index"]}}
    out = io.StringIO()
    rep.emit("text", out=out, err=io.StringIO())
    assert (
        "companion nvidia@jetson:22: pushed 3 objects (2.5 MB), built describe, index"
        in out.getvalue()
    )


def test_every_variable_is_either_local_or_passed_to_the_companion() -> None:
    from cachebuild.inputs.config import VARIABLES

    assert flow.LOCAL_ONLY <= set(VARIABLES), flow.LOCAL_ONLY - set(VARIABLES)
    given = {name: "x" for name in VARIABLES}
    s = load_settings({"COMPANION": "u@h", "ZOOM": "17", "BUFFER_M": "100"}, ENV)
    s = type(s)(**{**vars(s), "given": given})
    paths = {
        k: f"/c/{k}" for k in ("flight", "tileset_dir", "store", "cache", "model", "calibration")
    }
    v = flow.remote_variables(s, paths)
    for name in (
        set(VARIABLES) - flow.LOCAL_ONLY - {"ZOOM", "BUFFER_M", "PRECISION", "BACKEND", "BATCH"}
    ):
        if name in ("THREADS", "EXPIRES_DAYS", "STRICT"):
            continue  # passed on, normalised from the settings
        assert v.get(name) == "x", name  # e.g. INDEX, MIN_RECALL: the remote build depends on them
    for name in flow.LOCAL_ONLY - {
        "FLIGHT",
        "PROVIDER",
        "CACHE_DIR",
        "STORE",
        "MODEL",
        "CALIBRATION",
        "KEY",
        "REPORT",
    }:
        assert name not in v, name
    assert v["ZOOM"] == "17" and v["BUFFER_M"] == "100.0" and v["REPORT"] == "json"


def test_ssh_config_resolution_explicit_values_win(tmp_path: Path) -> None:
    from cachebuild.companion.sshconfig import resolve_target

    key = tmp_path / "jet_key"
    key.write_text("k")
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        f"Host jetson\n  HostName 10.1.2.3\n  User nv\n  Port 2222\n  IdentityFile {key}\n"
        "  ProxyJump op@bastion:2200,hop2\nHost hop2\n  HostName 10.9.9.9\n  Port 22022\n"
    )
    r = resolve_target("jetson", None, home=tmp_path)
    assert r.target == ssh.CompanionTarget("nv", "10.1.2.3", 2222) and r.key_path == key
    assert [str(h) for h in r.jumps] == [
        "op@bastion:2200",
        f"{getpass.getuser()}@10.9.9.9:22022",
    ]
    r = resolve_target("me@jetson:23", tmp_path / "explicit", home=tmp_path)
    assert (
        r.target == ssh.CompanionTarget("me", "10.1.2.3", 23)
        and r.key_path == tmp_path / "explicit"
    )
    r = resolve_target("other.local", None, home=tmp_path)
    assert (
        r.target.host == "other.local" and r.target.port == 22 and not r.jumps and r.config is None
    )
    (tmp_path / ".ssh" / "config").write_text("Host jetson\n  Port many\n")
    with pytest.raises(UsageError, match="Port 'many'"):
        resolve_target("jetson", None, home=tmp_path)

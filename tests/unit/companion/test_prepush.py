"""The pre-push (push while fetching) against an in-process companion: the SSH link is
stood in for (an SFTP on the local disk, the agent called in this process); packing,
corrupt objects, the companion's disk, an abort and a failure."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cachebuild.companion import agent, prepush, ssh
from cachebuild.companion.remote import Pending
from cachebuild.store.objects import sha256_hex


class LocalSftp:
    """The SFTP calls the pre-push makes, on the local disk."""

    def open(self, path: str, mode: str) -> Any:
        fh = open(path, mode + "b")

        class F:
            def set_pipelined(self, on: bool) -> None:
                pass

            def write(self, data: Any) -> None:
                fh.write(bytes(data))

            def __enter__(self) -> Any:
                return self

            def __exit__(self, *a: Any) -> None:
                fh.close()

        return F()

    def posix_rename(self, a: str, b: str) -> None:
        os.rename(a, b)

    def close(self) -> None:
        pass


class LocalConn:
    target = ssh.parse_companion("nvidia@jetson:22")

    def __enter__(self) -> LocalConn:
        return self

    def __exit__(self, *a: Any) -> None:
        pass

    def open_sftp(self) -> LocalSftp:
        return LocalSftp()

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def companion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A companion directory the pre-push reaches in-process; ``free`` overrides its free disk."""
    state: dict[str, Any] = {"root": tmp_path / "companion", "free": None, "connect": None}

    def connect(target: Any, options: Any, factory: Any = None, warn: Any = None) -> Any:
        if state["connect"] is not None:
            raise state["connect"]
        return LocalConn()

    def call_agent(conn: Any, base: str, op: str, root: str, **kw: Any) -> dict[str, Any]:
        info = agent.probe(Path(root), kw.get("wanted") or [])
        if state["free"] is not None:
            info["free_bytes"] = state["free"]
        return info

    def start_agent(conn: Any, base: str, op: str, root: str, **kw: Any) -> Pending:
        done = Path(root) / "incoming" / f"{kw['watch']}{agent.DONE_SUFFIX}"

        def run(cancel: threading.Event) -> dict[str, Any]:
            # cancelled: the channel closes and the agent stops (here: its session ends)
            threading.Thread(target=lambda: cancel.wait() and done.touch(), daemon=True).start()
            return agent.unpack(Path(root), [], watch=kw["watch"])

        return Pending(run)

    monkeypatch.setattr(prepush, "connect", connect)
    monkeypatch.setattr(prepush, "call_agent", call_agent)
    monkeypatch.setattr(prepush, "start_agent", start_agent)
    return state


def _store(root: Path, n: int) -> dict[str, bytes]:
    """``n`` objects in a workstation store at ``root``."""
    objs = {}
    for _ in range(n):
        data = os.urandom(3000)
        digest = sha256_hex(data)
        (root / "objects" / digest[:2]).mkdir(parents=True, exist_ok=True)
        (root / "objects" / digest[:2] / digest).write_bytes(data)
        objs[digest] = data
    return objs


def _pre(tmp_path: Path, companion: dict[str, Any], **kw: Any) -> prepush.PrePush:
    options = ssh.SshOptions(key_path=tmp_path / "k", known_hosts=tmp_path / "kh")
    return prepush.PrePush(
        LocalConn.target, options, command="env TOKEN=hunter2 doit",
        companion_dir=str(companion["root"]), store_root=tmp_path / "store", **kw,
    )  # fmt: skip


def _there(companion: dict[str, Any]) -> set[str]:
    return {p.name for p in (companion["root"] / "store" / "objects").glob("*/*")}


def test_fetched_tiles_go_in_packs_and_a_corrupt_one_is_left_to_the_push(
    tmp_path: Path, companion: dict[str, Any]
) -> None:
    objs = _store(tmp_path / "store", 12)
    names = sorted(objs)
    bad = names[3]
    path = tmp_path / "store" / "objects" / bad[:2] / bad
    path.write_bytes(b"rot " + path.read_bytes())
    pre = _pre(tmp_path, companion, pack_bytes=5 * 16384)  # five tiles a pack
    for i, name in enumerate(names):
        pre.fetched(i, bytes.fromhex(name))
    pre.fetched(0, bytes.fromhex(names[0]))  # told twice: sent once
    pre.present(1, bytes.fromhex(names[1]))  # reused, or told as settled: not its business
    pre.finish()
    entry = pre.wait()
    assert entry["state"] == "done" and entry["error"] is None, entry
    assert entry["objects"] == 11 and entry["skipped_corrupt"] == 1 and entry["packs"] >= 3
    assert entry["during_fetch"] >= 0 and entry["busy_s"] >= 0 and entry["tail_s"] >= 0
    assert _there(companion) == set(names) - {bad}
    assert path.exists(), "the final push meets it (and removes it, and it is fetched again)"
    assert not list((companion["root"] / "incoming").glob("*.tar*"))
    assert "sent 11 tile images" in pre.line()
    assert pre.there() == set(), "one was not sent: the final probe asks for every image"


def test_it_stops_before_the_companions_disk_reserve_and_the_push_sends_the_rest(
    tmp_path: Path, companion: dict[str, Any]
) -> None:
    objs = _store(tmp_path / "store", 6)
    companion["free"] = 2 * prepush.DISK_RESERVE_BYTES + 4 * 3000  # room for about 2 tiles
    pre = _pre(tmp_path, companion, pack_bytes=16384)  # one tile a pack
    for i, name in enumerate(sorted(objs)):
        pre.fetched(i, bytes.fromhex(name))
    pre.finish()
    entry = pre.wait()
    assert entry["state"] == "disk" and entry["error"] is None
    assert 0 < entry["objects"] < 6 and len(_there(companion)) == entry["objects"]
    assert "the companion's free disk" in pre.line() and "the push sends the rest" in pre.line()
    assert pre.there() == set()


def test_an_abort_stops_it_and_keeps_what_arrived(
    tmp_path: Path, companion: dict[str, Any]
) -> None:
    objs = _store(tmp_path / "store", 4)
    pre = _pre(tmp_path, companion, pack_bytes=16384)
    names = sorted(objs)
    pre.fetched(0, bytes.fromhex(names[0]))
    deadline = time.monotonic() + 30
    while pre.result.packs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    pre.abort()  # an interrupted fetch
    pre.fetched(1, bytes.fromhex(names[1]))  # too late: not taken
    entry = pre.wait()
    assert entry["state"] == "stopped" and entry["objects"] == 1
    assert names[1] not in _there(companion)


def test_a_failure_is_kept_cleaned_never_raised(tmp_path: Path, companion: dict[str, Any]) -> None:
    _store(tmp_path / "store", 1)
    companion["connect"] = OSError("cannot run env TOKEN=hunter2 doit there")
    pre = _pre(tmp_path, companion)
    pre.fetched(0, b"\x00" * 32)
    pre.finish()
    entry = pre.wait()
    assert entry["state"] == "failed" and entry["objects"] == 0
    assert "OSError" in entry["error"] and "hunter2" not in entry["error"]
    assert "the push sends the rest" in pre.line()


def test_nothing_downloaded_means_no_connection(tmp_path: Path, companion: dict[str, Any]) -> None:
    companion["connect"] = AssertionError("it connected")
    pre = _pre(tmp_path, companion)
    pre.finish()
    assert pre.wait()["state"] == "idle"
    assert pre.line() == "nothing downloaded to send while fetching"


def test_what_it_saw_unpacked_whole_is_left_out_of_the_final_probe(
    tmp_path: Path, companion: dict[str, Any]
) -> None:
    objs = _store(tmp_path / "store", 5)
    pre = _pre(tmp_path, companion, pack_bytes=2 * 16384)
    for i, name in enumerate(sorted(objs)):
        pre.fetched(i, bytes.fromhex(name))
    pre.finish()
    assert pre.wait()["state"] == "done"
    assert {d.hex() for d in pre.there()} == set(objs) == _there(companion)


def test_its_sessions_end_answers_the_final_probe(
    tmp_path: Path, companion: dict[str, Any]
) -> None:
    objs = _store(tmp_path / "store", 4)
    pre = _pre(tmp_path, companion, pack_bytes=2 * 16384, backend="onnxruntime")
    for i, name in enumerate(sorted(objs)):
        pre.fetched(i, bytes.fromhex(name))
    pre.finish()
    assert pre.told() == {bytes.fromhex(n) for n in objs}
    kept = sha256_hex(b"reused")  # an image the companion has from an earlier push
    (companion["root"] / "store" / "objects" / kept[:2]).mkdir(parents=True, exist_ok=True)
    (companion["root"] / "store" / "objects" / kept[:2] / kept).write_bytes(b"reused")
    (companion["root"] / "inbox" / "k1").mkdir(parents=True)
    rest = [f"store/objects/{kept[:2]}/{kept}", "inbox/k1/flight.json", "inbox/k1/tileset.json"]
    pre.end_with(rest)
    pre.end_with(["inbox/other"])  # the first word stands
    assert pre.wait()["state"] == "done"
    info = pre.final_info()
    assert info is not None
    assert info["absent"] == ["inbox/k1/flight.json", "inbox/k1/tileset.json"]
    assert info["free_bytes"] > 0 and info["protocol"] == agent.PROTOCOL_VERSION
    assert "device" in info and info["settled"] == {}
    assert not list((companion["root"] / "incoming").glob("*.done"))


def test_without_the_rest_named_the_final_probe_is_the_flows(
    tmp_path: Path, companion: dict[str, Any]
) -> None:
    objs = _store(tmp_path / "store", 3)
    pre = _pre(tmp_path, companion)
    for i, name in enumerate(sorted(objs)):
        pre.fetched(i, bytes.fromhex(name))
    pre.finish()
    assert pre.wait()["state"] == "done"  # wait() ends the session without a list
    assert pre.final_info() is None and len(pre.there()) == 3


def test_a_marker_naming_a_path_outside_the_companion_dir_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "c"
    agent.probe(root, [])
    (root / "incoming" / f"s1{agent.DONE_SUFFIX}").write_text(
        "inbox/k/flight.json\n../../etc/passwd\n"
    )
    with pytest.raises(ValueError, match="not a path under DIR"):
        agent.unpack(root, [], watch="s1")

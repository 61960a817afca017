"""Push while fetching: packs of the tiles this fetch stores go to the companion as they land.

In companion mode with ``PIPELINE`` on, the tiles phase tells a
:class:`PrePush` (its ``observer``) each tile it downloaded and stored
(:meth:`PrePush.fetched`; a tile the store already had is left to the final
push, which asks the companion).  On the first one a background thread
connects to the companion, probes it (layout, protocol, free disk), starts
its watching unpacker (``companion-agent OP=unpack WATCH=…``) and sends the
stored objects in packs over SFTP, as :mod:`.push` does; when the fetch
ends it sends what is left, ends its session and waits for the unpacker's
answer, before the flow's own bring-up (:mod:`.flow`).

It is purely an optimisation: the final push still asks the companion what
is absent and sends that, so a pre-push that fails, is refused, is cut off
or is interrupted changes what the final push sends, never whether the
build succeeds.  Its errors are kept (redacted) in its stats, never raised.

- **Back-pressure, not memory.**  The hand-off holds tile *names* (32-byte
  digests), not bytes: the store is the buffer.  The sender reads a pack's
  objects from the store when it builds that pack, so it holds one pack
  (:data:`PACK_BYTES`) at a time however far the link falls behind, and
  the fetch never waits for it.
- **Nothing half-written under a real name.**  Packs go to temporary names
  and are renamed (:class:`.push._Uploader`); an object whose bytes do not
  hash to its name is not sent (the final push meets it).
- **Disk.**  It stops sending before the packs and the objects unpacked
  from them would leave less than the flow's reserve free there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
import uuid
from typing import Any, TextIO

from cachebuild._util.report import redact
from cachebuild.companion.agent import DONE_SUFFIX, PROTOCOL_VERSION
from cachebuild.companion.messages import command_values
from cachebuild.companion.packs import MAX_MEMBER_BYTES, PACK_SUFFIX, build_pack
from cachebuild.companion.push import PushResult, _Uploader
from cachebuild.companion.reach import DISK_RESERVE_BYTES, companion_options, resolve_root
from cachebuild.companion.remote import Pending, call_agent, start_agent
from cachebuild.companion.ssh import Factory, SshOptions, connect
from cachebuild.inputs.companion import CompanionTarget

__all__ = ["PrePush", "PACK_BYTES", "SEND_AFTER_S"]

#: About how many bytes of tiles go in one pre-push pack: small, so the tail after the fetch is short.
PACK_BYTES = 2 << 20
#: Tiles waiting longer than this go in a pack however few they are.
SEND_AFTER_S = 0.5
#: How long :meth:`PrePush.abort` waits for the thread (a connect in progress may outlast it).
ABORT_JOIN_S = 10.0
#: How long the sender, all sent, waits for :meth:`PrePush.end_with` before it ends its session.
END_WAIT_S = 30.0
_UNSET: Any = object()


class _Stopped(Exception):
    """Raised in the sender thread once aborted."""


def _lower_priority() -> None:
    """The fetch first: raise this thread's nice value (Linux applies it per thread; its
    children, paramiko's transport thread included, inherit it)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 5))
    except (OSError, AttributeError):
        pass


class PrePush:
    """A background push fed by the tiles phase (its ``observer``).

    Parameters
    ----------
    target, options
        The companion and how to reach it (:func:`.reach.companion_options`).
    command
        ``COMPANION_CMD``.
    companion_dir
        ``COMPANION_DIR`` as given (None: the default).
    store_root
        The workstation's tile store.
    factory
        Makes the SSH connection (tests inject one); paramiko by default.
    backend
        The build's engine backend, asked of the companion in the first probe.

    Call :meth:`fetched` from one thread (the fetch's), then :meth:`finish`
    (no more tiles) or :meth:`abort`, then :meth:`wait`.  Between them
    :meth:`end_with` may name the rest of what the build needs: the
    session's end then asks the companion about it (:meth:`final_info`).
    """

    def __init__(
        self,
        target: CompanionTarget,
        options: SshOptions,
        *,
        command: str,
        companion_dir: str | None,
        store_root: str | os.PathLike[str],
        factory: Factory | None = None,
        pack_bytes: int = PACK_BYTES,
        backend: str | None = None,
    ):
        self.target = target
        self.options = options
        self.command = command
        self.companion_dir = companion_dir
        self.objects = os.path.join(os.fspath(store_root), "objects")
        self.factory = factory
        self.pack_bytes = int(pack_bytes)
        self.backend = backend
        self.root: str | None = None  # the COMPANION_DIR, once resolved there
        self._probe: dict[str, Any] | None = None  # the first probe's answer
        self._final: dict[str, Any] | None = None  # the session's end's, with ``listed``
        self._rest: Any = _UNSET  # what end_with() named
        self.result = PushResult()
        self._cv = threading.Condition()
        self._pending: list[bytes] = []
        self._seen: set[bytes] = set()
        self._since = 0.0  # when the oldest pending tile arrived
        self._finished = False
        self._dead = False  # the sender ended: take no more names
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._finished_at: float | None = None
        self._idle = 0.0  # the sender waiting for tiles
        self._whole = False  # every image it was told of is there (see there())
        self._hide = tuple(command_values(command))
        self.stats: dict[str, Any] = {
            "state": "idle",  # idle, connecting, sending, done, disk, stopped, failed, skipped
            "error": None,
            "busy_s": 0.0,  # connecting, reading, packing and sending: not waiting for tiles
            "during_fetch": 0,  # objects there before the fetch ended
            "tail_s": 0.0,  # from the end of the fetch to the end of the pre-push
            "skipped_corrupt": 0,
        }
        #: What its agents settled there: objects a cut-off push had left, packs quarantined.
        self.settled: dict[str, Any] = {"kept": 0, "quarantined": []}

    @classmethod
    def for_settings(cls, settings: Any, store_root: str | os.PathLike[str]) -> PrePush | None:
        """A pre-push to ``settings.companion``; None when it cannot be reached so (no SSH key:
        the flow's bring-up says so with its exit code).  It trusts only host keys already
        in ``KNOWN_HOSTS``."""
        try:
            target, options = companion_options(settings)
        except Exception:
            return None
        # a host key not known yet is the flow's to accept (HOST_KEY_POLICY=accept-new), and say so
        options = dataclasses.replace(options, host_key_policy="reject")
        return cls(
            target, options, command=settings.companion_cmd,
            companion_dir=settings.companion_dir, store_root=store_root,
            backend=settings.backend,
        )  # fmt: skip

    # -- the fetch's side ----------------------------------------------------

    def present(self, tid: int, digest: bytes) -> None:
        """A stored tile: fetched now or reused (only :meth:`fetched` ones are pre-pushed)."""

    def absent(self, tid: int) -> None:
        """A tile with no image: nothing to push."""

    def fetched(self, tid: int, digest: bytes) -> None:
        """Tile ``tid`` was downloaded now and is in the store under ``digest`` (32 bytes)."""
        key = bytes(digest)
        with self._cv:
            if self._dead or self._finished or key in self._seen:
                return
            self._seen.add(key)
            if not self._pending:
                self._since = time.monotonic()
            self._pending.append(key)
            if self._thread is None:  # the first tile: connect now, in the background
                self._thread = threading.Thread(
                    target=self._main, name="cachebuild-prepush", daemon=True
                )
                self._thread.start()
            self._cv.notify()

    def finish(self) -> None:
        """No more tiles: the sender sends what is left and ends its session."""
        with self._cv:
            self._finished = True
            self._finished_at = time.monotonic()
            self.stats["during_fetch"] = self.result.tile_objects
            self._cv.notify()

    def abort(self) -> None:
        """Stop now (an interrupted or failed fetch): what arrived there is kept, the rest is the next push's."""
        with self._cv:
            self._finished = True
            self._stop.set()
            self._cv.notify()
            conn = self._conn
        if conn is not None:  # a pack on the wire ends now (its temp name is removed there later)
            conn.close()
        self._join(ABORT_JOIN_S)

    def told(self) -> set[bytes]:
        """The images :meth:`fetched` named (after :meth:`finish`, no more come)."""
        with self._cv:
            return set(self._seen)

    def end_with(self, rest: list[str] | None) -> None:
        """After :meth:`finish`: the paths (under ``COMPANION_DIR``) the build needs besides
        the images it was told of; the session's end asks which are absent (None: ask nothing)."""
        with self._cv:
            if self._rest is _UNSET:
                self._rest = rest
                self._cv.notify()

    def final_info(self) -> dict[str, Any] | None:
        """The companion's answer to the final probe, given at the session's end: the first
        probe's facts, the free disk and which of :meth:`end_with`'s paths are absent; None
        unless it ended ``done`` with every pack whole (ask the companion then)."""
        if not self.there() or self._probe is None or self._final is None:
            return None
        final = self._final
        return self._probe | {
            "free_bytes": final["free_bytes"],
            "absent": final["absent"],
            "settled": {},
        }

    def wait(self) -> dict[str, Any]:
        """Wait for the sender to end (after :meth:`finish` or :meth:`abort`); its stats."""
        self.end_with(None)
        self._join(None)
        return self.entry()

    def settle(self, report: Any, out: TextIO) -> dict[str, Any]:
        """Wait for the tail (interrupted: stop it), time it as phase ``prepush``, say what
        was sent; the report's ``push`` so far: what was sent, and ``prepushed``."""
        t = time.monotonic()
        try:
            pre = self.wait()
        except BaseException:
            self.abort()
            raise
        report.timed("prepush", time.monotonic() - t)
        if self.settled["kept"]:
            out.write(f"companion: kept {self.settled['kept']:,} objects a cut-off push had sent\n")
        out.write(f"pre-push: {self.line()}\n")
        r = self.result
        return {
            "objects": r.tile_objects, "bytes": r.bytes, "tile_objects": r.tile_objects,
            "tile_bytes": r.tile_bytes, "files": 0, "packs": r.packs, "prepushed": pre,
        }  # fmt: skip

    def there(self) -> set[bytes]:
        """The images it was told of, once it ended ``done`` with every pack unpacked whole:
        the companion has them (the final probe leaves them out); else none."""
        with self._cv:
            return self._seen if self.stats["state"] == "done" and self._whole else set()

    def entry(self) -> dict[str, Any]:
        """The report's ``push.prepushed``: what was sent while fetching, and how it ended."""
        r, s = self.result, self.stats
        return {
            "objects": r.tile_objects,
            "bytes": r.bytes,
            "tile_bytes": r.tile_bytes,
            "packs": r.packs,
            **{k: s[k] for k in ("state", "busy_s", "during_fetch", "tail_s", "skipped_corrupt")},
            "error": s["error"],
            "quarantined": len(self.settled["quarantined"]),
            "answered_probe": self.final_info() is not None,  # the flow started no probe
        }

    def line(self) -> str:
        """What the pre-push did, for the operator (the flow prints it before its own push)."""
        r, s = self.result, self.stats
        if s["state"] == "idle":
            return "nothing downloaded to send while fetching"
        sent = f"sent {r.tile_objects:,} tile images in {r.packs:,} packs ({r.bytes / 1e6:,.1f} MB) while fetching"
        end = f", done {s['tail_s']:.1f} s after the download"
        if s["state"] in ("done", "sending"):
            return sent + end
        why = {"disk": "the companion's free disk", "skipped": "another companion protocol"}
        return f"{sent}; stopped ({why.get(s['state']) or s['error'] or s['state']}): the push sends the rest"

    def _join(self, timeout: float | None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    # -- the sender thread ---------------------------------------------------

    def _main(self) -> None:
        t0 = time.monotonic()
        _lower_priority()
        try:
            self._run()
        except BaseException as exc:  # never the build's failure: the final push sends the rest
            if self._stop.is_set():  # aborted: whatever that cut short
                self.stats["state"] = "stopped"
                return
            self.stats["state"] = "failed"
            self.stats["error"] = self._clean(f"{type(exc).__name__}: {exc}")
        finally:
            end = time.monotonic()
            with self._cv:
                self._dead = True
                self._pending.clear()
                if self._finished_at is not None:
                    self.stats["tail_s"] = round(max(0.0, end - self._finished_at), 3)
            self.stats["busy_s"] = round(max(0.0, end - t0 - self._idle), 3)

    def _clean(self, text: str) -> str:
        for value in self._hide:
            text = text.replace(value, "***")
        return redact(text)

    def _run(self) -> None:
        self.stats["state"] = "connecting"
        with connect(self.target, self.options, factory=self.factory) as conn:
            with self._cv:
                self._conn = conn
            self._check_stop()
            sftp = conn.open_sftp()
            try:
                root = resolve_root(sftp, self.companion_dir)
                info = call_agent(
                    conn, self.command, "probe", root, wanted=[], backend=self.backend,
                    during="the pre-push's probe", cancel=self._stop,
                )  # fmt: skip
                self.root, self._probe = root, info
                self._check_stop()
                self._settled(info.get("settled"), kept=True)
                if info.get("protocol") != PROTOCOL_VERSION:  # the flow's bring-up says why
                    self.stats["state"] = "skipped"
                    return
                room = int(info.get("free_bytes") or 0) - 2 * DISK_RESERVE_BYTES
                self._send(conn, sftp, root, room)
            finally:
                sftp.close()

    def _settled(self, got: dict[str, Any] | None, kept: bool = False) -> None:
        """Add what an agent settled in ``incoming/`` to :attr:`settled` (``kept``: the probe's,
        packs a cut-off push had left)."""
        got = got or {}
        self.settled["quarantined"].extend(got.get("quarantined") or [])
        if kept:
            self.settled["kept"] += int(got.get("objects") or 0)

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    def _send(self, conn: Any, sftp: Any, root: str, room: int) -> None:
        """Packs until the fetch ends (or the disk there is at its reserve), then the session's end."""
        session = f"{int(time.time())}-{os.getpid()}-pre{uuid.uuid4().hex[:8]}"
        up = _Uploader(conn, sftp, root, self.result, 0)
        unpacker = start_agent(
            conn, self.command, "unpack", root, wanted=[], watch=session,
            during="unpacking the pre-push",
        )  # fmt: skip
        pending: Pending | None = unpacker  # None once it answered
        self.stats["state"] = "sending"
        try:
            n = 0
            while (group := self._next_group()) is not None:
                self._check_stop()
                members = self._read(group)
                size = sum(len(data) for _, data in members)
                if 2 * (self.result.tile_bytes + size) > room:  # a pack and its objects there
                    self.stats["state"] = "disk"
                    break
                if not members:
                    continue
                data = build_pack(members)
                up.write(f"incoming/{session}-{n:06d}{PACK_SUFFIX}", data, resume=False)
                n += 1
                self.result.packs += 1
                self.result.objects += len(members)
                self.result.tile_objects += len(members)
                self.result.tile_bytes += size
                self.result.bytes += len(data)
            self._check_stop()
            rest = self._await_rest()
            up.write(
                f"incoming/{session}{DONE_SUFFIX}", "".join(f"{r}\n" for r in rest or ()).encode()
            )
            answer = unpacker.result()
            pending = None
            if rest and answer.get("listed") is True:
                self._final = answer
            settled = answer.get("settled") or {}
            self._settled(settled)
            if self.stats["state"] == "sending":
                self.stats["state"] = "done"
            # every pack it sent was unpacked whole: the final probe need not ask for those
            self._whole = answer.get("done") is True and not (
                settled.get("corrupt")
                or settled.get("quarantined")
                or self.stats["skipped_corrupt"]
            )
        finally:
            if pending is not None:  # stopped or failed: end the unpacker (what arrived stays)
                pending.cancel()

    def _await_rest(self) -> list[str] | None:
        """What :meth:`end_with` named (None when it was not called in :data:`END_WAIT_S`)."""
        with self._cv:
            end = time.monotonic() + END_WAIT_S
            while self._rest is _UNSET and time.monotonic() < end:
                self._check_stop()
                t = time.monotonic()
                self._cv.wait(min(1.0, max(0.0, end - t)))
                self._idle += time.monotonic() - t
            self._check_stop()
            return None if self._rest is _UNSET else self._rest

    def _next_group(self) -> list[bytes] | None:
        """The next pack's names: when enough wait, the oldest waited long enough, or the fetch
        ended; None once nothing is left after the end."""
        with self._cv:
            while True:
                if self._stop.is_set():
                    raise _Stopped
                waited = time.monotonic() - self._since
                enough = len(self._pending) * 16384 >= self.pack_bytes  # about 16 KB a tile
                if self._pending and (enough or self._finished or waited >= SEND_AFTER_S):
                    take = max(1, self.pack_bytes // 16384)
                    group, self._pending = self._pending[:take], self._pending[take:]
                    self._since = time.monotonic()
                    return group
                if self._finished:
                    return None
                t = time.monotonic()
                self._cv.wait(SEND_AFTER_S / 2 if self._pending else 1.0)
                self._idle += time.monotonic() - t

    def _read(self, group: list[bytes]) -> list[tuple[str, bytes]]:
        """``(hex digest, bytes)`` of the objects of ``group`` whose bytes match their name."""
        out = []
        for key in group:
            digest = key.hex()
            try:
                with open(f"{self.objects}/{digest[:2]}/{digest}", "rb") as fh:
                    data = fh.read(MAX_MEMBER_BYTES + 1)
            except OSError:
                data = b""
            if len(data) > MAX_MEMBER_BYTES or hashlib.sha256(data).hexdigest() != digest:
                self.stats["skipped_corrupt"] += 1  # gone or damaged: the final push meets it
                continue
            out.append((digest, data))
        return out

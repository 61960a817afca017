"""Kill real builds at chosen instants and check what they leave behind.

A :class:`KillHarness` builds an *old* cache (flight A) and keeps a copy of
that home (store, cache, keys) as the starting point.  Each kill point then
starts from a fresh copy of it, runs a real ``doit build-cache`` of a *new*
flight B (as tests/scenarios/test_build_cache.py does: :class:`tests.conftest.Cb`,
tiles from the real HTTP server in tests/_harness/tileserver.py), SIGKILLs it at the
point's instant, and checks:

- the published cache verifies (``doit verify-cache``) and is the old build
  or the new one, never a mix (its manifest's build id is A's or B's, and
  every artifact's SHA-256 matches that manifest);
- every object in the tile store is whole: its SHA-256 equals its name;
- every descriptor the descriptor store's index names is whole on disk;
- the lock is free: it is taken at once;
- the next build (the resume) succeeds, publishes B, verifies, leaves no
  leftovers, and does no more work than it must: it asks the provider only
  for tiles whose object was not in the store after the kill, and computes
  descriptors only for tiles the descriptor store lacked.

An instant is either a delay after the process started, or a *marker*: a
phase line on stderr (``.. describe``) or the publish step appearing on disk
(``releases/.tmp-*``), plus an offset.  The run itself is measured by
:meth:`KillHarness.measure`, so delays can be spread over a whole build.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachebuild._util.hashing import sha256_file
from cachebuild.release.lock import CacheLock
from tests._harness.tileserver import TileServer
from tests.conftest import Cb, write_flight

__all__ = [
    "KillPoint",
    "KillOutcome",
    "KillHarness",
    "CompanionKillHarness",
    "PHASE_MARKERS",
    "store_problems",
]

#: The stderr lines the recording reporter prints as each task starts, in
#: build order; ``publish`` is seen on disk instead.
PHASE_MARKERS = (
    "flight",
    "tiles",
    "mbtiles",
    "model",
    "engine",
    "describe",
    "index",
    "preview",
    "selftest",
    "manifest",
)
PUBLISH = "publish"

ARGS = ("BUFFER_M=200", "ZOOM=17")


@dataclass(frozen=True)
class KillPoint:
    """When to kill: ``delay_s`` after start, or ``offset_s`` after ``marker`` shows.

    ``until``, if given, must also hold: the kill waits for it (a condition on
    the world, such as "the server has answered a tile", instead of a guess at
    how long that takes on a loaded machine).
    """

    delay_s: float | None = None
    marker: str | None = None
    offset_s: float = 0.0
    until: Callable[[], bool] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        if self.marker is None:
            return f"t+{self.delay_s:.3f}s"
        return f"{self.marker}+{self.offset_s:.3f}s"


@dataclass
class KillOutcome:
    """What one kill point left behind, and what the resume did."""

    point: KillPoint
    killed: bool  # False: the build finished before the kill arrived
    phase: str  # the last phase the killed build had started
    published: str  # "old" or "new"
    objects_after_kill: int
    requests_resume: int
    requests_expected: int
    computed_resume: int  # descriptors (CompanionKillHarness: tile objects pushed)
    computed_expected: int
    problems: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """One run of B's build (:meth:`KillHarness._run`)."""

    killed: bool  # SIGKILLed; False: it finished first
    returncode: int | None
    stdout: str
    lines: list[tuple[float, str]]  # (seconds since start, stderr line)
    seconds: float  # start to end
    publish_at: float | None  # when the publish step showed on disk (if watched)


def _publishing(releases: Path) -> bool:
    """A release is being assembled (publish's temporary directory exists)."""
    try:
        return any(n.startswith(".tmp-") for n in os.listdir(releases))
    except FileNotFoundError:
        return False


def store_problems(store: Path) -> list[str]:
    """Partial or misnamed objects, and index rows naming bytes a shard lacks."""
    problems = []
    objects = store / "objects"
    if objects.is_dir():
        for sub in objects.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                problems.append(f"stray entry in the store: {sub}")
                continue
            for obj in sub.iterdir():
                if not obj.name.startswith(sub.name) or sha256_file(obj)[0] != obj.name:
                    problems.append(f"store object {obj} does not hash to its name")
    base = store / "descriptors"
    for engine in base.iterdir() if base.is_dir() else []:
        if not (engine / "index.sqlite").exists():
            continue  # opened (meta.json), nothing stored yet: a build that described nothing
        meta = json.loads((engine / "meta.json").read_text())
        row_bytes = 4 * int(meta["dim"])
        db = sqlite3.connect(f"file:{engine / 'index.sqlite'}?mode=ro", uri=True)
        try:
            shards = dict(db.execute("SELECT id, name FROM shards"))
            for sid, top in db.execute("SELECT shard, MAX(row) FROM descriptors GROUP BY shard"):
                path = engine / "shards" / f"{shards.get(sid)}.f32"
                have = path.stat().st_size // row_bytes if path.exists() else 0
                if top >= have:
                    problems.append(
                        f"descriptor index names row {top} of {path}, which holds {have}"
                    )
        finally:
            db.close()
    return problems


def _window_blocks(build: Path, tiles: Any) -> tuple[str, list[str]] | None:
    """``(store namespace, block digests)`` of a build made with windows, else None."""
    import numpy as np

    from cachebuild.store.windowkeys import block_digests, namespace, neighbours

    rec = json.loads((build / "windows.json").read_text())
    if int(rec["stride"]) == 1:
        return None
    key = json.loads((build / "engine/engine.json").read_text())["key"]
    tiles = tiles[np.argsort(tiles["id"], kind="stable")]
    raw = np.ascontiguousarray(tiles["sha256"]).view(np.uint8).reshape(len(tiles), 32)
    digests = block_digests(raw, neighbours(tiles["id"]), rec["stride"], rec["mode"])
    return namespace(key, rec["stride"], rec["mode"]), [bytes(d).hex() for d in digests]


def _missing_descriptors(store: Path, engine_key: str, digests: list[str]) -> int:
    """How many of ``digests`` (tile order, repeats counted) lack a whole descriptor."""
    engine = store / "descriptors" / engine_key
    if not (engine / "index.sqlite").exists():
        return len(digests)
    row_bytes = 4 * int(json.loads((engine / "meta.json").read_text())["dim"])
    db = sqlite3.connect(f"file:{engine / 'index.sqlite'}?mode=ro", uri=True)
    try:
        shards = dict(db.execute("SELECT id, name FROM shards"))
        missing = 0
        for d in digests:
            row = db.execute(
                "SELECT shard, row FROM descriptors WHERE sha256 = ?", (bytes.fromhex(d),)
            ).fetchone()
            if row is None:
                missing += 1
                continue
            path = engine / "shards" / f"{shards.get(row[0])}.f32"
            have = path.stat().st_size // row_bytes if path.exists() else 0
            missing += row[1] >= have
        return missing
    finally:
        db.close()


class KillHarness:
    """Old cache A, then kill points over the build of B (see the module doc)."""

    def __init__(self, root: Path, server: TileServer):
        self.root = Path(root)
        self.server = server
        self.snapshot = self.root / "snapshot"
        self.work = self.root / "work"
        self.flight_a = write_flight(self.root / "a.json", lat=47.3700, lon=8.5400)
        # B overlaps A: some of its tiles are in the store already
        self.flight_b = write_flight(self.root / "b.json", lat=47.3712, lon=8.5418)
        self.provider = f"PROVIDER={server.template(query='')}"
        self.old_id = ""
        self.new_id = ""
        self.engine_key = ""
        self.b_digests: list[str] = []  # tile order, from B's tiles.npy
        self.b_blocks: tuple[str, list[str]] | None = None  # B's window blocks, by id
        self.b_tiles: dict[str, Any] = {}  # digest -> a tile showing it
        self.duration_s = 0.0
        self.phase_starts: dict[str, float] = {}
        #: More NAME=value for B's builds, killed and resumed (not the build identity):
        #: ``CONCURRENCY=1`` with a slowed server makes tiles land one by one.
        self.extra_args: tuple[str, ...] = ()

    # -- setup -----------------------------------------------------------

    def cb(self, home: Path) -> Cb:
        return Cb(home=home)

    def _link_args(self) -> tuple[str, ...]:
        """NAME=value for every build besides the flight, zoom and provider (CompanionKillHarness: the link)."""
        return ()

    def _b_args(self) -> tuple[str, ...]:
        """The NAME=value of B's builds, killed and resumed."""
        return (
            f"FLIGHT={self.flight_b}",
            *ARGS,
            *self.extra_args,
            self.provider,
            *self._link_args(),
        )

    def _releases(self, home: Path) -> Path | None:
        """Where publish assembles a release, watched for the publish step (None: not watched)."""
        return home / "cache" / "releases"

    @staticmethod
    def _phase_of(line: str) -> str | None:
        """The phase a stderr line says has started, or None."""
        if line.startswith(".. ") and line[3:] in PHASE_MARKERS:
            return line[3:]
        return None

    def build(self, home: Path, flight: Path) -> Any:
        r = self.cb(home).build(f"FLIGHT={flight}", *ARGS, self.provider, *self._link_args())
        assert r.code == 0, r.stderr
        return r

    def setup(self) -> None:
        """Build A, keep its home as the snapshot; build B once to learn its ids and duration."""
        home = self.snapshot / "home"
        home.mkdir(parents=True)
        r = self.build(home, self.flight_a)
        self.old_id = r.report["build_id"]
        self.engine_key = json.loads((home / "cache/state/build/engine/engine.json").read_text())[
            "key"
        ]
        self.measure()

    def restore(self) -> Path:
        """A fresh copy of the snapshot home (hard links inside it kept, as ``cp -a`` does)."""
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        subprocess.run(
            ["cp", "-a", str(self.snapshot / "home"), str(self.work / "home")], check=True
        )
        return self.work / "home"

    def _run(self, home: Path, point: KillPoint | None = None) -> _Run:
        """Run B's build from ``home``; SIGKILL it at ``point`` (None: let it finish)."""
        releases = self._releases(home)
        # the publish step is looked for on disk only when it is wanted (measuring, or the point's marker)
        watch = releases is not None and (point is None or point.marker == PUBLISH)
        t0 = time.monotonic()
        p = self.cb(home).popen("build-cache", *self._b_args())
        lines: list[tuple[float, str]] = []

        def read() -> None:
            assert p.stderr is not None
            for line in p.stderr:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        publish_at: float | None = None
        seen_at: float | None = None
        while p.poll() is None:
            now = time.monotonic() - t0
            if watch and publish_at is None and _publishing(releases):
                publish_at = now
            if point is not None:
                if point.marker is None:
                    if now >= (point.delay_s or 0.0):
                        break
                else:
                    if seen_at is None:
                        if point.marker == PUBLISH:
                            seen_at = publish_at
                        elif any(self._phase_of(ln) == point.marker for _, ln in list(lines)):
                            seen_at = now
                    due = seen_at is not None and now >= seen_at + point.offset_s
                    if due and (point.until is None or point.until()):
                        break
            time.sleep(0.0005 if point is not None else 0.001)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        assert p.stdout is not None and p.stderr is not None
        out = p.stdout.read()
        p.stdout.close()
        reader.join()
        p.stderr.close()
        p.wait()
        return _Run(killed, p.returncode, out, lines, time.monotonic() - t0, publish_at)

    def measure(self) -> None:
        """One uninterrupted build of B from the snapshot: its id, tiles, duration, phase starts."""
        home = self.restore()
        run = self._run(home)
        self.duration_s = run.seconds
        assert run.returncode == 0, "\n".join(ln for _, ln in run.lines)
        self.new_id = json.loads(run.stdout.strip().splitlines()[-1])["build_id"]
        for at, line in run.lines:
            phase = self._phase_of(line)
            if phase:
                self.phase_starts.setdefault(phase, at)
        if run.publish_at is not None:
            self.phase_starts[PUBLISH] = run.publish_at
        import numpy as np

        from cachebuild.tilemath import tile_from_id
        from cachebuild.tileset import hex_digests

        tiles = np.load(home / "cache/state/build/tiles.npy")
        self.b_digests = hex_digests(tiles)
        for tid, d in zip(tiles["id"].tolist(), self.b_digests):
            self.b_tiles.setdefault(d, tile_from_id(tid))
        self.b_blocks = _window_blocks(home / "cache/state/build", tiles)

    # -- one kill point --------------------------------------------------

    def kill_at(self, point: KillPoint) -> KillOutcome:
        home = self.restore()
        run = self._run(home, point)
        phases = [ph for ph in (self._phase_of(ln) for _, ln in run.lines) if ph]
        phase = phases[-1] if phases else "start"
        releases = self._releases(home)
        if not run.killed:
            phase = "finished"
        elif (
            phase == "manifest"
            and releases is not None
            and (
                _publishing(releases)
                or len([n for n in os.listdir(releases) if not n.startswith(".")]) > 1
            )
        ):
            phase = PUBLISH  # a release of B was being (or had been) assembled
        return self.check(home, point, run.killed, phase)

    def _published(self, v: Any, problems: list[str], whose: str = "") -> str:
        """ "old", "new" or "?" from a verify-cache result ``v``; what is wrong goes to ``problems``."""
        if v.code != 0:
            problems.append(
                f"{whose}verify-cache exit {v.code} after the kill: {v.report.get('error')}"
            )
            return "?"
        bid = v.report["build_id"]
        published = "old" if bid == self.old_id else "new" if bid == self.new_id else "?"
        if published == "?":
            problems.append(f"{whose}published build {bid} is neither the old nor the new one")
        return published

    def _resume(self, home: Path, expected_requests: int, problems: list[str]) -> tuple[Any, int]:
        """Build B again from ``home``: its result (None if it failed) and the tiles it asked for."""
        before = self.server.count()
        r = self.cb(home).build(*self._b_args())
        requests = self.server.count() - before
        if r.code != 0:
            problems.append(f"the resume failed, exit {r.code}: {r.report.get('error')}")
            return None, requests
        if r.report["build_id"] != self.new_id:
            problems.append(f"the resume built {r.report['build_id']}, not {self.new_id}")
        if requests != expected_requests:
            problems.append(
                f"the resume asked the provider for {requests} tiles; {expected_requests} were not in the store"
            )
        return r, requests

    def check(self, home: Path, point: KillPoint, killed: bool, phase: str) -> KillOutcome:
        problems: list[str] = []
        cb = self.cb(home)
        store = home / "store"
        # the published cache: the old or the new one, whole
        published = self._published(cb.run("verify-cache"), problems)
        problems += store_problems(store)
        try:
            CacheLock(home / "cache" / "build.lock").acquire().release()
        except Exception as exc:  # LockHeldError
            problems.append(f"the lock is not free after the kill: {exc}")

        # what the resume must do
        objects = {p.name for p in (store / "objects").glob("*/*")}
        # every tile whose image is not stored is asked for (tiles showing one image, each)
        expected_requests = sum(1 for d in self.b_digests if d not in objects)
        # with windows (the default) the store keeps one block per anchor tile
        ns, blocks = self.b_blocks or (self.engine_key, self.b_digests)
        expected_computed = _missing_descriptors(store, ns, blocks)
        r, requests = self._resume(home, expected_requests, problems)
        computed = -1
        if r is not None:
            computed = int(r.report.get("descriptors", {}).get("computed", 0))
            if computed != expected_computed:
                problems.append(
                    f"the resume computed {computed} descriptors; the store lacked {expected_computed}"
                )
            v2 = cb.run("verify-cache")
            if v2.code != 0 or v2.report["build_id"] != self.new_id:
                problems.append(
                    f"after the resume verify-cache says {v2.code}: {v2.report.get('error')}"
                )
            leftovers = [
                *(home / "cache").glob(".current.tmp-*"),
                *(home / "cache" / "releases").glob(".tmp-*"),
                *(home / "store" / "journal").iterdir(),
                *(home / "cache" / "state" / "build").rglob(".*.tmp-*"),
                *(home / "cache" / "state" / "build").rglob(".*.tmp"),
            ]
            if leftovers:
                problems.append(f"leftovers after the resume: {[str(p) for p in leftovers]}")
            problems += [f"after the resume: {p}" for p in store_problems(store)]
        return KillOutcome(
            point=point,
            killed=killed,
            phase=phase,
            published=published,
            objects_after_kill=len(objects),
            requests_resume=requests,
            requests_expected=expected_requests,
            computed_resume=computed,
            computed_expected=expected_computed,
            problems=problems,
        )

    # -- choosing points ---------------------------------------------------

    def spread(self, n: int) -> list[KillPoint]:
        """``n`` delays spread evenly over the measured build (start to end)."""
        return [KillPoint(delay_s=self.duration_s * (i + 0.5) / n) for i in range(n)]

    def per_phase(self, offsets: tuple[float, ...] = (0.0,)) -> list[KillPoint]:
        """A point at each phase marker (and the publish step) plus each offset."""
        markers = [m for m in (*PHASE_MARKERS, PUBLISH) if m in self.phase_starts]
        return [KillPoint(marker=m, offset_s=o) for m in markers for o in offsets]

    def within_phases(self, per_phase: int) -> list[KillPoint]:
        """``per_phase`` points spread over each phase's measured span."""
        order = sorted(self.phase_starts.items(), key=lambda kv: kv[1])
        points = []
        for i, (name, start) in enumerate(order):
            end = order[i + 1][1] if i + 1 < len(order) else self.duration_s
            span = max(end - start, 0.0)
            points += [
                KillPoint(marker=name, offset_s=span * k / per_phase) for k in range(per_phase)
            ]
        return points


class CompanionKillHarness(KillHarness):
    """The same, with ``COMPANION=`` through a real sshd: kills land in the push too.

    The workstation fetches and pushes, the companion (a directory with a
    home of its own, reached through ``sshd``, as in tests/scenarios/test_companion.py)
    builds and publishes.  A kill of the workstation's process cuts the link;
    what runs on the companion then (an unpack, a build) ends by itself,
    which the checks wait for (up to a minute) before looking.  The checks
    are those of :class:`KillHarness`, on the companion's cache and store,
    and the resume must push only the tile objects the companion lacks
    (complete packs that arrived count as there).
    """

    PUSH = "push"
    REMOTE = "remote"

    def __init__(self, root: Path, server: TileServer, sshd: Any):
        super().__init__(root, server)
        self.sshd = sshd
        self.work_root = self.root / "cwork"
        self.snap_root = self.root / "csnapshot"

    @property
    def companion_dir(self) -> Path:
        return self.work_root / "companion"

    @property
    def companion_home(self) -> Path:
        return self.work_root / "companion-home"

    def _vars(self) -> list[str]:
        cmd = f"env CACHEBUILD_HOME={self.companion_home} {sys.executable} -m doit"
        return [
            f"COMPANION={self.sshd.target}",
            f"SSH_KEY={self.sshd.client_key}",
            f"KNOWN_HOSTS={self.sshd.known_hosts}",
            f"COMPANION_DIR={self.companion_dir}",
            f"COMPANION_CMD={cmd}",
        ]

    def _link_args(self) -> tuple[str, ...]:
        return tuple(self._vars())

    def _releases(self, home: Path) -> Path | None:
        return None  # the companion publishes; its phases are seen on stderr

    def _companion_verify(self) -> Any:
        return self.cb(self.work_root / "home").run(
            "verify-cache",
            f"CACHE_DIR={self.companion_dir / 'cache'}",
            env=self.cb(self.companion_home).env(),
        )

    def setup(self) -> None:
        """Build A on the companion (work paths), snapshot it; measure B."""
        for d in (self.work_root / "home", self.companion_home):
            d.mkdir(parents=True)
        r = self.build(self.work_root / "home", self.flight_a)
        self.old_id = r.report["build_id"]
        self.engine_key = json.loads(
            (self.companion_dir / "cache/state/build/engine/engine.json").read_text()
        )["key"]
        subprocess.run(["cp", "-a", str(self.work_root), str(self.snap_root)], check=True)
        self.measure()

    def restore(self) -> Path:
        shutil.rmtree(self.work_root)
        subprocess.run(["cp", "-a", str(self.snap_root), str(self.work_root)], check=True)
        return self.work_root / "home"

    @staticmethod
    def _phase_of(line: str) -> str | None:
        if line.startswith("push: ") and "missing there" in line:
            return CompanionKillHarness.PUSH
        if line.startswith("companion| .. "):
            return "remote " + line[len("companion| .. ") :]
        if line.startswith(".. ") and line[3:] in ("flight", "tiles"):
            return line[3:]
        return None

    def _wait_lock(self, path: Path, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                CacheLock(path).acquire().release()
                return True
            except Exception:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)

    def _arrived(self) -> set[str]:
        from cachebuild.companion.packs import iter_pack

        names: set[str] = set()
        for pack in (self.companion_dir / "incoming").glob("*.tar"):
            try:
                names.update(name for name, _ in iter_pack(pack))
            except Exception:
                pass  # not a whole pack: not counted
        return names

    def check(self, home: Path, point: KillPoint, killed: bool, phase: str) -> KillOutcome:
        problems: list[str] = []
        if not self._wait_lock(self.companion_dir / "cache" / "build.lock"):
            problems.append("the companion's lock is still held a minute after the kill")
        if not self._wait_lock(home / "cache" / "build.lock", 5.0):
            problems.append("the workstation's lock is not free after the kill")
        published = self._published(self._companion_verify(), problems, "the companion's ")
        store = self.companion_dir / "store"
        problems += [f"companion: {p}" for p in store_problems(store)]
        problems += [f"workstation: {p}" for p in store_problems(home / "store")]
        objects = {p.name for p in (store / "objects").glob("*/*")}
        expected_push = len(set(self.b_digests) - objects - self._arrived())
        ws_objects = {p.name for p in (home / "store" / "objects").glob("*/*")}
        expected_requests = sum(1 for d in self.b_digests if d not in ws_objects)
        r, requests = self._resume(home, expected_requests, problems)
        pushed = -1
        if r is not None:
            pushed = int(r.report.get("push", {}).get("tile_objects", 0))
            if pushed != expected_push:
                problems.append(
                    f"the resume pushed {pushed} tile objects; the companion lacked {expected_push}"
                )
            v2 = self._companion_verify()
            if v2.code != 0 or v2.report["build_id"] != self.new_id:
                problems.append(f"after the resume the companion's verify-cache says {v2.code}")
            problems += [f"after the resume, companion: {p}" for p in store_problems(store)]
        return KillOutcome(
            point=point,
            killed=killed,
            phase=phase,
            published=published,
            objects_after_kill=len(objects),
            requests_resume=requests,
            requests_expected=expected_requests,
            computed_resume=pushed,
            computed_expected=expected_push,
            problems=problems,
        )

    def per_phase(self, offsets: tuple[float, ...] = (0.0,)) -> list[KillPoint]:
        return [KillPoint(marker=m, offset_s=o) for m in self.phase_starts for o in offsets]

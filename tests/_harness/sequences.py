"""The world of the sequence test (tests/scenarios/test_sequences.py): providers, flights, keys, checks.

One :class:`World` per test run holds real tile servers on 127.0.0.1 (good,
holes, flaky, slow, empty-then-filled; a wrong-area provider is the good
server with x and y swapped; a dead one a closed port), signing keys, and
the reference builds: each flight configuration built once, cleanly, in a
fresh home, against the good provider.  The checks compare a sequence's
cache with that reference (same ``build_id``, same artifact hashes, or the
same content where a documented incremental shortcut makes bytes differ).
"""

from __future__ import annotations

import json
import shlex
import socket
import sqlite3
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cachebuild.tilemath import Tile
from cachebuild.tileset import hex_digests, read_tiles
from tests._harness import tileserver
from tests._harness.killharness import store_problems
from tests._harness.s3server import S3Server
from tests._harness.sshd import Sshd
from tests.conftest import REPO, Cb, CbResult, write_flight

__all__ = [
    "DOCUMENTED_CODES",
    "SHORTCUTS",
    "FLIGHTS",
    "VARIANTS",
    "Config",
    "Companion",
    "World",
    "popen_disk_full",
    "Reference",
    "check_result",
    "target_differences",
    "store_damage",
    "unreferenced",
]

#: docs/exit-codes.md
DOCUMENTED_CODES = {0, 2, 20, 21, 22, 23, 24, 30, 50, 90, 91, 92, 93, 94, 95, 130}

#: name -> write_flight keyword arguments
FLIGHTS: dict[str, dict[str, Any]] = {
    "demo": {},
    "other-area": {"lat": 47.4000, "lon": 8.5000},
    "shifted": {"lat": 47.3705, "lon": 8.5406},
    "new-origin": {"origin": (47.3702, 8.5398)},
    "new-id": {"flight_id": "5eb0a1c2-7d3e-4f60-9a8b-0c1d2e3f4a5b"},
}

#: name -> build arguments (a widened area, another zoom, another self-test setting)
VARIANTS: dict[str, tuple[str, ...]] = {
    "base": ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=4"),
    "widened": ("BUFFER_M=250", "ZOOM=17", "SELFTEST_QUERIES=4"),
    "zoom16": ("BUFFER_M=150", "ZOOM=16", "SELFTEST_QUERIES=4"),
    "queries": ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=6"),
    # an operator's ONNX file: cbnet-v2's network with other weights (MODEL=@name: a model
    # file of the World's)
    "other-model": ("BUFFER_M=150", "ZOOM=17", "SELFTEST_QUERIES=4", "MODEL=@seed7"),
}

#: MODEL=@name -> the seed of the model file's weights
MODEL_SEEDS = {"seed7": 7}

#: keys of index.json and selftest.json that record how a build went, not
#: what it holds (the issue-21 change removes them from the artifacts)
HISTORY_KEYS = {"index.json": ("seconds",), "selftest.json": ("frames",)}


#: how often each documented exception was needed: artifact name -> count
SHORTCUTS: Counter[str] = Counter()


@dataclass(frozen=True)
class Config:
    flight: str
    variant: str

    def args(self, world: World) -> tuple[str, ...]:
        return (
            f"FLIGHT={world.flight_file(self.flight)}",
            *(
                f"MODEL={world.model_file(a[7:])}" if a.startswith("MODEL=@") else a
                for a in VARIANTS[self.variant]
            ),
        )


@dataclass
class Reference:
    build_id: str
    targets: dict[str, Any]
    current: Path


class HolesServer(tileserver.TileServer):
    """Has no image for one tile in five (404), everywhere."""

    def is_missing(self, t: Tile) -> bool:
        return (t.x + 2 * t.y) % 5 == 0


class EmptyServer(tileserver.TileServer):
    """Serves nothing (404 for every tile) until :attr:`filled`."""

    filled = False

    def is_missing(self, t: Tile) -> bool:
        return not self.filled or super().is_missing(t)


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _write_key(path: Path) -> Path:
    k = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


class World:
    """Servers, flights, keys and reference builds shared by every sequence of a run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.good = tileserver.TileServer()
        self.holes = HolesServer()
        self.flaky = tileserver.TileServer()
        self.flaky.fault_rate(tileserver.Reply(503), 0.3, seed=1)
        self.flaky.fault_rate(tileserver.too_many("0"), 0.2, seed=2)
        self.flaky.fault_rate(tileserver.Slow(0.05), 0.2, seed=3)
        self.slow = tileserver.TileServer()
        self.slow.latency_s = 0.4
        self.empty = EmptyServer()
        self.dead_port = _dead_port()
        self.keys = {name: _write_key(self.root / f"{name}.pem") for name in ("k1", "k2")}
        self.references: dict[Config, Reference] = {}
        self.ops: Counter[str] = Counter()
        self.exits: Counter[str] = (
            Counter()
        )  # "operation: exit code" of the rules that allow several
        self.sequences = 0
        self.steps = 0
        self.convergences = 0
        self._runs = 0
        self._s3: S3Server | None = None
        self._sshd: Sshd | None = None

    def s3(self) -> S3Server:
        """A real S3-compatible server (moto's), started the first time a sequence asks for it."""
        if self._s3 is None:
            self._s3 = S3Server(self.root / "s3")
        return self._s3

    def sshd(self) -> Sshd:
        """A real OpenSSH sshd on 127.0.0.1 (the companion's), started the first time it is needed."""
        if self._sshd is None:
            self._sshd = Sshd(self.root / "sshd").start()
        return self._sshd

    def close(self) -> None:
        for srv in (self.good, self.holes, self.flaky, self.slow, self.empty):
            srv.close()
        if self._s3 is not None:
            self._s3.stop()
        if self._sshd is not None:
            self._sshd.stop()

    def model_file(self, name: str) -> Path:
        """An operator's ONNX model file (``MODEL=``): cbnet-v2's graph with seeded weights."""
        path = self.root / "models" / f"{name}.onnx"
        if not path.exists():
            from cachebuild.engine.model import build_default_model

            path.parent.mkdir(exist_ok=True)
            path.write_bytes(build_default_model(seed=MODEL_SEEDS[name]))
        return path

    def flight_file(self, name: str) -> Path:
        path = self.root / "flights" / f"{name}.json"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            write_flight(path, **FLIGHTS[name])
        return path

    def provider(self, kind: str) -> str:
        """The ``PROVIDER=`` argument of a kind of provider."""
        self._runs += 1
        if kind == "good":
            return f"PROVIDER={self.good.template(query='')}"
        if kind == "wrong-area":  # x and y swapped: valid tiles of another place
            return f"PROVIDER=http://127.0.0.1:{self.good.port}/{{z}}/{{y}}/{{x}}.jpg"
        if kind == "dead":
            return f"PROVIDER=http://127.0.0.1:{self.dead_port}/{{z}}/{{x}}/{{y}}.jpg"
        if kind == "slow":  # a new query: a new provider, so its tiles are fetched, slowly
            return f"PROVIDER={self.slow.template(query=f'?run={self._runs}')}"
        srv = {"holes": self.holes, "flaky": self.flaky, "empty": self.empty}[kind]
        return f"PROVIDER={srv.template(query='')}"

    def reference(self, config: Config) -> Reference:
        """A clean build of ``config`` in a fresh home, against the good provider (made once)."""
        if config not in self.references:
            home = self.root / "ref" / f"{config.flight}-{config.variant}"
            home.mkdir(parents=True)
            r = Cb(home=home).build(*config.args(self), self.provider("good"))
            assert r.code == 0, r.stderr
            signed = json.loads((home / "cache" / "current" / "manifest.json").read_text())[
                "signed"
            ]
            self.references[config] = Reference(
                signed["build_id"], signed["targets"], home / "cache" / "current"
            )
        return self.references[config]


class Companion:
    """A sequence's companion, reached through the World's sshd: one directory per cache
    (``COMPANION_DIR``), a home of its own, this checkout's doit (docs/companion.md)."""

    def __init__(self, world: World, root: Path):
        self.world = world
        self.root = root
        self.home = root / "companion-home"
        self.home.mkdir(parents=True)

    def dir(self, cache: str) -> Path:
        return self.root / f"companion-{cache}"

    def cmd(self, fail_at: int | None = None) -> str:
        """``COMPANION_CMD``; with ``fail_at``, the companion's disk fills at that write of each command."""
        run = ["-m", "tests._harness.diskfault", str(fail_at)] if fail_at else ["-m", "doit"]
        words = [
            "env",
            f"CACHEBUILD_HOME={self.home}",
            f"XDG_DATA_HOME={self.home / 'data'}",
            f"PYTHONPATH={REPO}",  # this checkout's cachebuild, not the installed one
            sys.executable,
            *run,
        ]
        return " ".join(shlex.quote(w) for w in words)

    def args(self, cache: str, fail_at: int | None = None) -> list[str]:
        sshd = self.world.sshd()
        return [
            f"COMPANION={sshd.target}",
            f"SSH_KEY={sshd.client_key}",
            f"KNOWN_HOSTS={sshd.known_hosts}",
            f"COMPANION_DIR={self.dir(cache)}",
            f"COMPANION_CMD={self.cmd(fail_at)}",
        ]

    def env(self, cb: Cb) -> dict[str, str]:
        """The environment of a command run on the companion (here: its home)."""
        return cb.env(CACHEBUILD_HOME=str(self.home), XDG_DATA_HOME=str(self.home / "data"))


def popen_disk_full(cb: Cb, fail_at: int, command: str, *args: str) -> subprocess.Popen:
    """``doit command args`` as a real process whose ``fail_at``-th write, and every later one,
    fails with ENOSPC (tests/_harness/diskfault.py)."""
    argv = [sys.executable, "-m", "tests._harness.diskfault", str(fail_at), command, *args]
    return subprocess.Popen(
        [*argv, "REPORT=json"],
        cwd=cb.cwd,
        env=cb.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_result(r: CbResult, what: str) -> dict[str, Any]:
    """Invariant 1: no traceback, a documented exit code, an error with a remedy; returns the report."""
    assert "Traceback" not in r.stderr, f"{what}: a traceback\n{r.stderr[-3000:]}"
    assert r.code in DOCUMENTED_CODES, (
        f"{what}: exit {r.code} is not documented\n{r.stderr[-3000:]}"
    )
    rep = r.report
    assert rep["exit_code"] == r.code, (what, rep)
    if r.code != 0:
        assert rep.get("error") and rep.get("remedy"), f"{what}: an error without a remedy: {rep}"
    return rep


def _strip(doc: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(doc, dict):
        return {k: _strip(v, keys) for k, v in doc.items() if k not in keys}
    return doc


def _mbtiles_content(path: Path) -> tuple[list[Any], list[Any]]:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        rows = sorted(db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles"))
        meta = sorted(db.execute("SELECT name, value FROM metadata"))
        return rows, meta
    finally:
        db.close()


def _faiss_ids(path: Path) -> list[int]:
    import faiss
    import numpy as np

    index = faiss.read_index(str(path))
    ids = (
        faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else np.arange(index.ntotal)
    )
    return sorted(int(i) for i in ids)


def target_differences(current: Path, ref: Reference) -> list[str]:
    """Invariant 3: the artifacts of ``current`` against the clean build's.

    Byte-identical, except the documented shortcuts, checked by content:
    ``tiles.mbtiles`` (an update in place: the same rows and metadata),
    ``index.faiss`` (a reused quantizer: the same ids), and the history
    fields of ``index.json``/``selftest.json``.  A companion's build is held to the same: its
    ``tileset.json`` names the workstation's provider
    (``test_a_companion_publishes_the_workstations_tileset_json``).
    """
    signed = json.loads((current / "manifest.json").read_text())["signed"]
    problems = []
    if signed["build_id"] != ref.build_id:
        problems.append(f"build_id {signed['build_id']} != clean build's {ref.build_id}")
    targets = signed["targets"]
    if sorted(targets) != sorted(ref.targets):
        problems.append(f"targets {sorted(targets)} != clean build's {sorted(ref.targets)}")
    for name in sorted(set(targets) & set(ref.targets)):
        if targets[name] == ref.targets[name]:
            continue
        mine, theirs = current / name, ref.current / name
        if name == "tiles.mbtiles" and _mbtiles_content(mine) == _mbtiles_content(theirs):
            SHORTCUTS[name] += 1
            continue
        if name == "index.faiss" and _faiss_ids(mine) == _faiss_ids(theirs):
            SHORTCUTS[name] += 1
            continue
        if name in HISTORY_KEYS:
            a = _strip(json.loads(mine.read_text()), HISTORY_KEYS[name])
            if a == _strip(json.loads(theirs.read_text()), HISTORY_KEYS[name]):
                SHORTCUTS[name] += 1
                continue
        problems.append(f"{name} differs from the clean build's{_npy_difference(mine, theirs)}")
    return problems


def _npy_difference(mine: Path, theirs: Path) -> str:
    """For a .npy artifact: how it differs (shapes; rows that differ, the largest difference)."""
    if mine.suffix != ".npy":
        return ""
    import numpy as np

    a, b = np.load(mine, allow_pickle=False), np.load(theirs, allow_pickle=False)
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype.names:
        return f" ({a.dtype} {a.shape} against {b.dtype} {b.shape})"
    rows = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))
    worst = float(np.abs(a.astype(np.float64) - b).max()) if len(rows) else 0.0
    return (
        f" ({len(rows)} of {len(a)} rows, e.g. {rows[:5].tolist()}; largest difference {worst:.3g})"
    )


def store_damage(store: Path, flipped: set[str]) -> list[str]:
    """Invariant 4: objects that do not hash to their name, other than those the test flipped."""
    return [
        p
        for p in store_problems(store)
        if not any(name in p for name in flipped) or "does not hash" not in p
    ]


def unreferenced(store: Path, cache_dirs: list[Path]) -> list[str]:
    """Invariant 4: tile objects a published or staged cache names that the store lacks."""
    lacking = []
    for cache in cache_dirs:
        for d in (cache / "current", cache / "state" / "build"):
            if not (d / "tiles.npy").exists() or not (d / "tileset.json").exists():
                continue
            for digest in hex_digests(read_tiles(d)):
                if not (store / "objects" / digest[:2] / digest).exists():
                    lacking.append(f"{d}/tiles.npy names {digest}, not in the store")
    return lacking

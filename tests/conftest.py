"""Fixtures shared by the integration tests: real doit processes, a real
HTTP tile server on 127.0.0.1, throwaway homes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cachebuild.tilemath import Tile
from tests._harness import tileserver

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CbResult:
    code: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        assert lines, f"no report on stdout; stderr:\n{self.stderr}"
        return json.loads(lines[-1])


@dataclass
class Cb:
    """Runs `doit <command> NAME=value ...` as a real process in its own home."""

    home: Path
    cwd: Path = REPO
    env_extra: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBUILD_")}
        env["CACHEBUILD_HOME"] = str(self.home)
        # the development key lives in the data dir: inside the home, so a
        # copied home (test_tamper) carries its key along
        env["XDG_DATA_HOME"] = str(self.home / "data")
        env.update(self.env_extra)
        env.update(extra)
        return env

    def popen(
        self, command: str, *args: str, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen:
        argv = [sys.executable, "-m", "doit", command, *args]
        if not any(a.startswith("REPORT=") for a in args):
            argv.append("REPORT=json")
        return subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=env or self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )

    def run(
        self, command: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> CbResult:
        p = self.popen(command, *args, env=env)
        out, err = p.communicate(timeout=timeout)
        return CbResult(p.returncode, out, err)

    def build(self, *args: str, **kw: Any) -> CbResult:
        return self.run("build-cache", *args, **kw)

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def current(self) -> Path:
        return self.cache_dir / "current"


@pytest.fixture
def cb(tmp_path: Path) -> Cb:
    home = tmp_path / "home"
    home.mkdir()
    return Cb(home=home)


def write_flight(
    path: Path,
    *,
    lat: float = 47.3700,
    lon: float = 8.5400,
    flight_id: str | None = None,
    origin: tuple[float, float] | None = None,
    waypoints: list[tuple[float, float]] | None = None,
) -> Path:
    """A small flight: by default one short leg (about 16 tiles at z17 with BUFFER_M=200)."""
    wps = waypoints or [(lat, lon), (lat + 0.001, lon + 0.001)]
    doc: dict[str, Any] = {
        "waypoints": [{"lat": a, "lon": b, "alt_m": 120.0} for a, b in wps],
    }
    if flight_id is not None:
        doc["flight_id"] = flight_id
    doc["takeoff_origin"] = (
        None if origin is None else {"lat": origin[0], "lon": origin[1], "alt_m": 400.0}
    )
    path.write_text(json.dumps(doc))
    return path


class TileServer(tileserver.TileServer):
    """The shared server (tests/_harness/tileserver.py) with this module's original interface.

    ``missing`` holds ``(z, x, y)`` tuples; a wrong ``key`` (given as
    ``?key=``) answers 403; ``requests`` lists every path asked for;
    :meth:`template` serves under ``/tiles/``.  Faults, latency and the
    server-side counts of the shared server are all there too.
    """

    def __init__(self) -> None:
        super().__init__(key=None, key_status=403)

    def is_missing(self, t: Tile) -> bool:
        return (t.z, t.x, t.y) in self.missing

    def template(self, suffix: str = "") -> str:  # type: ignore[override]
        return f"http://127.0.0.1:{self.port}/tiles/{{z}}/{{x}}/{{y}}.jpg{suffix}"


@pytest.fixture
def tile_server() -> Iterator[TileServer]:
    srv = TileServer()
    yield srv
    srv.close()


@pytest.fixture
def server() -> Iterator[tileserver.TileServer]:
    """The shared tile server, wanting ``?key=`` :data:`tests._harness.tileserver.KEY` (else 401)."""
    srv = tileserver.TileServer(key=tileserver.KEY)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real OpenSSH sshd on 127.0.0.1 (tests/_harness/sshd.py) for the module; skips where none can run."""
    from tests._harness.sshd import start_or_skip

    srv = start_or_skip(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.stop()

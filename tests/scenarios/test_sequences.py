"""Any sequence of operations ends in the same cache as a clean build (issue 24).

A hypothesis state machine whose rules are what an operator and the world
do — builds of changing flights against good, wrong, holed, flaky, slow,
dead or empty providers, with STRICT and KEY varied; ``doit clean``,
``forget``, ``ignore``; ``gc-store`` with and without a bound; a deleted
cache directory; a second cache on the same store; SIGKILL or SIGINT at a
random instant; a second build while one runs; a flipped byte in a store
object — each a real ``doit`` process in a scratch home
(tests/_harness/sequences.py).  After every step: no traceback, documented
exit codes, errors with remedies, ``current`` verifying against the key
that signed it, a sound store that still holds what every published or
staged cache names.  At the end of each sequence (and as a rule of its
own), a good build of the current flight must succeed at once and give the
clean build's ``build_id`` and artifacts.

CI runs a bounded budget; ``CACHEBUILD_LONG=1`` runs
``CACHEBUILD_SEQUENCES`` (default 1000) sequences, and
``CACHEBUILD_SEQ_REPORT=path`` saves the figures as JSON.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cachebuild.release.publish import remove_tree
from tests._harness.sequences import (
    FLIGHTS,
    SHORTCUTS,
    VARIANTS,
    Config,
    World,
    check_result,
    store_damage,
    target_differences,
    unreferenced,
)
from tests.conftest import Cb, CbResult

LONG = os.environ.get("CACHEBUILD_LONG") == "1"
SEQUENCES = int(os.environ.get("CACHEBUILD_SEQUENCES", "1000")) if LONG else 20
STEPS = 8

CACHES = ("cache", "cache2")
configs = st.builds(Config, st.sampled_from(sorted(FLIGHTS)), st.sampled_from(sorted(VARIANTS)))
providers = st.sampled_from(["good", "good", "wrong-area", "holes", "flaky", "dead", "empty"])
keys = st.sampled_from([None, None, "k1", "k2"])
TASKS = ("tiles", "mbtiles", "describe", "index", "selftest", "manifest")


class CacheModel:
    """What the test knows of one cache directory."""

    def __init__(self) -> None:
        self.signer: str | None = None  # "dev", "k1", "k2"; None: nothing published
        self.build_id: str | None = None
        self.config: Config | None = None


class Sequences(RuleBasedStateMachine):
    world: World  # set by the test

    @initialize()
    def start(self, s3: bool | None = None) -> None:
        w = self.world
        w.sequences += 1
        s3 = w.sequences % 4 == 0 if s3 is None else s3  # a quarter of the sequences
        self.since_converge = 0
        self.home = w.root / "seq" / str(w.sequences)
        self.home.mkdir(parents=True)
        self.cb = Cb(home=self.home)
        if s3:  # the store is a bucket shared by every machine ($CACHEBUILD_HOME/store its
            # copy), and describe runs on a Dask local cluster
            w.ops["sequence on the S3 store and Dask"] += 1
            self.cb.env_extra = {
                **w.s3().env,
                "CACHEBUILD_STORE": f"s3://{w.s3().bucket}/seq-{w.sequences}",
                "CACHEBUILD_DASK_SCHEDULER": "local:1",
            }
        self.caches = {name: CacheModel() for name in CACHES}
        self.flipped: set[str] = set()
        self.config = Config("demo", "base")
        w.empty.filled = False

    # -- helpers -------------------------------------------------------------

    def cache_arg(self, cache: str) -> str:
        return f"CACHE_DIR={self.home / cache}"

    def key_args(self, key: str | None, allow_dev: bool = False) -> list[str]:
        args = [f"KEY={self.world.keys[key]}"] if key else []
        return args + (["ALLOW_DEV_KEY=1"] if allow_dev else [])

    def step(self, op: str) -> None:
        self.world.ops[op] += 1
        self.world.steps += 1
        self.since_converge = 0 if op == "converge" else self.since_converge + 1

    def refused_key(self, cache: str, key: str | None, allow_dev: bool) -> bool:
        """A build without KEY of a cache another key signed: refused (exit 2) unless ALLOW_DEV_KEY=1."""
        return key is None and self.caches[cache].signer in ("k1", "k2") and not allow_dev

    def signer_key(self, cache: str) -> str | None:
        s = self.caches[cache].signer
        return s if s in ("k1", "k2") else None

    def verify(self, cache: str, *candidates: str | None) -> None:
        """Invariant 2: ``current`` verifies against the key that signed it (one of ``candidates``)."""
        model = self.caches[cache]
        if model.signer is None and not candidates:
            return
        tried = []
        if None in candidates and not (self.home / cache / "current").exists():
            model.signer = model.build_id = None  # nothing was published, nothing is
            return
        for signer in candidates or (model.signer,):
            key = signer if signer in ("k1", "k2") else None
            r = self.cb.run("verify-cache", self.cache_arg(cache), *self.key_args(key))
            check_result(r, "verify-cache")
            tried.append((signer, r.code, r.report.get("reason")))
            if r.code == 0:
                model.signer = signer
                signed = json.loads((self.home / cache / "current" / "manifest.json").read_text())
                model.build_id = signed["signed"]["build_id"]
                return
        raise AssertionError(f"{cache}/current verifies against none of {tried}")

    def expected(self, cache: str, provider: str, strict: bool, key: str | None, allow: bool):
        if self.refused_key(cache, key, allow):
            return {2}
        if provider == "dead":
            return {20}
        if provider == "holes":
            return {22} if strict else {0}
        if provider == "empty" and not self.world.empty.filled:
            return {22} if strict else {0, 21, 22}
        if provider == "empty":  # filled now; tiles it lacked before stay missing (RETRY_MISSING=0)
            return {0, 22} if strict else {0}
        return {0}

    def build(self, cache: str, config: Config, *extra: str) -> CbResult:
        return self.cb.build(self.cache_arg(cache), *config.args(self.world), *extra)

    def after_build(self, cache: str, r: CbResult, key: str | None, config: Config) -> None:
        rep = self.last_report = check_result(r, "build-cache")
        model = self.caches[cache]
        if r.code == 0:
            model.signer, model.config = key or "dev", config
            self.verify(cache)
            assert rep["build_id"] == model.build_id, rep
        else:
            before = model.build_id
            self.verify(cache)
            assert model.build_id == before, f"a failed build changed current: {rep}"

    # -- rules ---------------------------------------------------------------

    @rule(
        cache=st.sampled_from(CACHES),
        config=configs,
        provider=providers,
        strict=st.booleans(),
        key=keys,
        allow_dev=st.booleans(),
    )
    def build_flight(
        self,
        cache: str,
        config: Config,
        provider: str,
        strict: bool,
        key: str | None,
        allow_dev: bool,
    ) -> None:
        self.step(f"build ({provider})")
        if cache == "cache":
            self.config = config
        want = self.expected(cache, provider, strict, key, allow_dev)
        r = self.build(
            cache,
            config,
            self.world.provider(provider),
            f"STRICT={int(strict)}",
            "HTTP_RETRIES=4",
            "HTTP_BACKOFF=0.01",
            *self.key_args(key, allow_dev),
        )
        assert r.code in want, (
            f"build with {provider}: exit {r.code}, expected {want}\n{r.stderr[-3000:]}"
        )
        self.after_build(cache, r, key, config)

    @rule(cache=st.sampled_from(CACHES), config=configs, key=keys)
    def build_flight_from_the_good_provider(
        self, cache: str, config: Config, key: str | None
    ) -> None:
        self.build_flight(cache, config, "good", True, key, False)

    @rule()
    def fill_the_empty_provider(self) -> None:
        self.step("provider filled")
        self.world.empty.filled = True

    @rule(cache=st.sampled_from(CACHES))
    def doit_clean(self, cache: str) -> None:
        self.step("doit clean")
        r = self.cb.run("clean", self.cache_arg(cache))
        assert check_result(r, "clean")["exit_code"] == 0, r.stderr
        self.verify(cache)

    @rule(cache=st.sampled_from(CACHES), task=st.sampled_from(TASKS))
    def doit_forget(self, cache: str, task: str) -> None:
        self.step("doit forget")
        r = self.cb.run("forget", task, self.cache_arg(cache))
        assert check_result(r, "forget")["exit_code"] == 0, r.stderr

    @rule(cache=st.sampled_from(CACHES), task=st.sampled_from(TASKS))
    def doit_ignore_is_refused(self, cache: str, task: str) -> None:
        self.step("doit ignore (refused)")
        r = self.cb.run("ignore", task, self.cache_arg(cache))
        assert check_result(r, "ignore")["exit_code"] == 2, r.stderr

    @rule(bound=st.sampled_from([None, "1K", "1M"]))
    def gc_store(self, bound: str | None) -> None:
        self.step("gc-store" + (" (bound)" if bound else ""))
        args = [f"MAX_STORE_BYTES={bound}"] if bound else []
        r = self.cb.run("gc-store", *args)
        assert check_result(r, "gc-store")["exit_code"] == 0, r.stderr
        for cache in CACHES:
            self.verify(cache)

    @rule(cache=st.sampled_from(CACHES))
    def delete_cache_dir(self, cache: str) -> None:
        self.step("delete a cache directory")
        if (self.home / cache).exists():
            remove_tree(self.home / cache)
        self.caches[cache] = CacheModel()

    @rule(index=st.integers(0, 10_000))
    def flip_a_byte_in_the_store(self, index: int) -> None:
        self.step("flip a byte in a store object")
        objects = sorted((self.home / "store" / "objects").glob("??/*"))
        if not objects:
            return
        obj = objects[index % len(objects)]
        data = bytearray(obj.read_bytes())
        if not data:
            return
        data[len(data) // 2] ^= 0xFF
        obj.chmod(0o644)
        obj.write_bytes(bytes(data))
        self.flipped.add(obj.name)

    @rule(sig=st.sampled_from(["SIGKILL", "SIGINT"]), delay=st.floats(0.0, 2.0), config=configs)
    def signal_a_build(self, sig: str, delay: float, config: Config) -> None:
        self.step(f"{sig} a build")
        self.config = config
        key = self.signer_key("cache")
        prior = self.caches["cache"].signer
        proc = self.cb.popen(
            "build-cache",
            self.cache_arg("cache"),
            *config.args(self.world),
            self.world.provider("good"),
            *self.key_args(key),
        )
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=300)
        if proc.returncode < 0:  # died of it: SIGKILL; SIGINT only outside cachebuild's code
            # (while Python and doit load, or once Python is shutting down: its handler is gone)
            assert proc.returncode == -getattr(signal, sig), err[-3000:]
            frames = re.findall(r'File "([^"]+)"', err)
            assert not [f for f in frames if "/cachebuild/" in f or "/targets/" in f], err[-3000:]
        else:
            check_result(CbResult(proc.returncode, out, err), f"build after {sig}")
            assert proc.returncode in (0, 130), err[-3000:]
        self.verify("cache", *dict.fromkeys([prior, key or "dev"]))
        if proc.returncode == 0:
            self.caches["cache"].config = config

    @rule(config=configs)
    def second_build_while_one_runs(self, config: Config) -> None:
        self.step("second build while one runs")
        self.config = config
        key = self.signer_key("cache")
        slow = self.world.slow
        seen = slow.count()
        first = self.cb.popen(
            "build-cache",
            self.cache_arg("cache"),
            *config.args(self.world),
            self.world.provider("slow"),
            "CONCURRENCY=1",
            *self.key_args(key),
        )
        deadline = time.monotonic() + 60
        while slow.count() == seen and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()
        second = self.build("cache", config, self.world.provider("good"), *self.key_args(key))
        rep = check_result(second, "the second build")
        assert second.code == 50 and rep["failure_phase"] == "lock", second.stderr[-3000:]
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
        check_result(CbResult(first.returncode, out, err), "the interrupted first build")
        assert first.returncode in (0, 130), err[-3000:]
        self.verify("cache")

    @precondition(lambda self: self.since_converge >= 2)  # else it crowds the other rules out
    @rule()
    def converge(self) -> None:
        self.step("converge")
        self.check_convergence()

    # -- invariants ----------------------------------------------------------

    @invariant()
    def store_is_sound(self) -> None:
        if not hasattr(self, "home"):
            return
        store = self.home / "store"
        assert store_damage(store, self.flipped) == []
        assert unreferenced(store, [self.home / c for c in CACHES]) == []

    def check_convergence(self) -> None:
        """Invariant 3: a good build of the current flight, next, gives the clean build's cache."""
        key = self.signer_key("cache")
        r = self.build("cache", self.config, self.world.provider("good"), *self.key_args(key))
        check_result(r, "the converging build")
        assert r.code == 0, f"the converging build failed: {r.stderr[-3000:]}"
        self.caches["cache"].signer, self.caches["cache"].config = key or "dev", self.config
        self.verify("cache")
        ref = self.world.reference(self.config)
        self.world.convergences += 1
        assert target_differences(self.home / "cache" / "current", ref) == []

    def teardown(self) -> None:
        if hasattr(self, "home"):
            self.check_convergence()
            if out := os.environ.get("CACHEBUILD_SEQ_REPORT"):  # so far: a long run may be cut
                Path(out).write_text(json.dumps(_figures(self.world), indent=1))


_NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


def _run(world: World, sequences: int, steps: int) -> None:
    Sequences.world = world
    run_state_machine_as_test(
        Sequences,
        settings=settings(
            max_examples=sequences,
            stateful_step_count=steps,
            deadline=None,
            derandomize=not LONG,
            phases=tuple(Phase)
            if os.environ.get("CACHEBUILD_SEQ_SHRINK", "1") == "1"
            else _NO_SHRINK,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def _figures(world: World) -> dict[str, Any]:
    return {
        "sequences": world.sequences,
        "steps": world.steps,
        "operations": dict(world.ops.most_common()),
        "convergence checks": world.convergences,
        "equal content, other bytes": dict(SHORTCUTS),
    }


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path / "world")
    yield w
    w.close()
    figures = _figures(w)
    print("\nsequences:", json.dumps(figures, indent=1))
    if out := os.environ.get("CACHEBUILD_SEQ_REPORT"):
        Path(out).write_text(json.dumps(figures, indent=1))


def test_any_sequence_ends_in_the_clean_build(world: World) -> None:
    _run(world, SEQUENCES, STEPS)
    assert world.sequences >= 1 and world.steps >= world.sequences


# -- plain tests -------------------------------------------------------------


def test_the_same_flight_in_two_fresh_homes_gives_byte_identical_tileset_json(
    world: World,
) -> None:
    """Artifacts describe content, not history: no fetched/reused counts in tileset.json."""
    config = Config("demo", "base")
    ref = world.reference(config)
    home = world.root / "second"
    cb = Cb(home=home)
    # the second home's store is warm: another store, filled by the same provider
    first = cb.build(*config.args(world), world.provider("good"))
    assert first.code == 0, first.stderr
    assert first.report["tiles"]["fetched"] == first.report["tiles"]["planned"] > 0
    again = cb.build(*config.args(world), world.provider("good"), "CACHE_DIR=" + str(home / "c2"))
    assert again.code == 0 and again.report["tiles"]["fetched"] == 0, again.stderr
    a = (ref.current / "tileset.json").read_bytes()
    assert (home / "cache" / "current" / "tileset.json").read_bytes() == a
    assert (home / "c2" / "current" / "tileset.json").read_bytes() == a
    assert b"fetched" not in a and b"reused" not in a


# -- the minimal sequences of the failures found, as plain tests -------------


def _machine(world: World) -> Sequences:
    Sequences.world = world
    state = Sequences()
    state.start()
    return state


def test_a_build_after_its_cache_directory_was_deleted_converges(world: World) -> None:
    """Found on a tree of the index change (f6153df's time; passes at 8181c87): after the cache
    directory was deleted, the next build reran the index alone and failed in the manifest,
    "artifact positions.npy is missing" (exit 21, and no remedy: that is fixed in manifest.py)."""
    state = _machine(world)
    state.converge()
    state.delete_cache_dir(cache="cache")
    state.converge()
    state.teardown()


@pytest.mark.parametrize("delay", [0.25, 0.4, 0.55])
def test_a_ctrl_c_while_the_command_loads_is_exit_130_without_a_traceback(
    world: World, delay: float
) -> None:
    """Found: SIGINT while build-cache was still importing printed Python's KeyboardInterrupt
    traceback (and died of the signal) instead of the documented exit 130 with a remedy."""
    cb = Cb(home=world.root / "ctrl-c")
    proc = cb.popen("build-cache", *Config("demo", "base").args(world), world.provider("good"))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    rep = check_result(CbResult(proc.returncode, out, err), "build-cache after SIGINT")
    assert proc.returncode == 130 and "interrupted" in rep["error"], err


def test_a_sequence_on_the_s3_store_converges(world: World) -> None:
    """The S3 share of the machine, as one fixed sequence: two caches, one deleted, gc, a kill."""
    Sequences.world = world
    state = Sequences()
    state.start(s3=True)
    state.build_flight_from_the_good_provider(
        cache="cache2", config=Config("shifted", "base"), key=None
    )
    assert state.last_report["describe"]["executor"] == "dask"
    assert state.last_report["store"]["url"].startswith("s3://")
    state.build_flight(
        cache="cache",
        config=Config("demo", "base"),
        provider="holes",
        strict=False,
        key="k1",
        allow_dev=False,
    )
    state.delete_cache_dir(cache="cache2")
    state.gc_store(bound=None)
    state.store_is_sound()
    state.signal_a_build(sig="SIGKILL", delay=0.8, config=Config("demo", "widened"))
    state.store_is_sound()
    state.teardown()

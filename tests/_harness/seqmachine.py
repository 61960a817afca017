"""The state machine of the sequence test (tests/scenarios/test_sequences.py, issue 24).

Its rules are what an operator and the world do, each a real ``doit``
process in a scratch home; its model (:class:`CacheModel`, the expected
exit codes) says what each must end in; its invariants and
:meth:`Sequences.check_convergence` are the promises of
docs/reliability.md section 8.  The world it runs in (servers, keys,
reference builds, the companion) is tests/_harness/sequences.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cachebuild.errors import LockHeldError
from cachebuild.release.lock import CacheLock
from cachebuild.release.publish import remove_tree
from tests._harness.sequences import (
    FLIGHTS,
    SHORTCUTS,
    VARIANTS,
    Companion,
    Config,
    World,
    check_result,
    popen_disk_full,
    store_damage,
    target_differences,
    unreferenced,
)
from tests._harness.sshd import SSHD
from tests.conftest import Cb, CbResult

__all__ = ["CACHES", "CacheModel", "Sequences", "figures"]

CACHES = ("cache", "cache2")
configs = st.builds(Config, st.sampled_from(sorted(FLIGHTS)), st.sampled_from(sorted(VARIANTS)))
# "good" last: hypothesis favours a list's first elements, and the good provider has a rule
# of its own (build_flight_from_the_good_provider)
providers = st.sampled_from(["wrong-area", "holes", "flaky", "dead", "empty", "good"])
keys = st.sampled_from([None, None, "k1", "k2"])
#: half on this machine's store, a quarter each on S3 (with Dask) and on a companion
shares = st.sampled_from(["local", "s3", "companion", "local"])

#: A full disk while the development key is created was exit 2, "make … writable"; fixed
#: (exit 24): test_a_full_disk_while_the_development_key_is_created_is_exit_24.
DEV_KEY_ENOSPC_IS_EXIT_2 = False


def _dev_key_not_written(rep: dict[str, Any]) -> bool:
    error = rep.get("error") or ""
    return "cannot create signing key" in error and "No space left on device" in error


#: A companion's build staged its tile set before it registered its cache with the store, so
#: gc-store there removed the staged tiles of a build that stopped after the tiles phase; fixed
#: (the tiles phase registers the cache): test_gc_on_a_companion_keeps_what_a_failed_build_staged.
COMPANION_STAGES_UNREGISTERED = False

TASKS = ("tiles", "mbtiles", "describe", "index", "selftest", "manifest")


class CacheModel:
    """What the test knows of one cache directory."""

    def __init__(self) -> None:
        self.signer: str | None = None  # "dev", "k1", "k2"; None: nothing published
        self.build_id: str | None = None
        self.config: Config | None = None


class Sequences(RuleBasedStateMachine):
    world: World  # set by the test

    @initialize(share=shares)
    def start(self, share: str = "local") -> None:
        """A fresh home; ``share``: this machine's store, the S3 store with Dask, or a companion
        (where sshd is installed: .ci/run installs it).  Drawn, so that a failing sequence
        replays and shrinks as it ran."""
        w = self.world
        w.sequences += 1
        s3, companion = share == "s3", share == "companion" and os.path.exists(SSHD)
        self.since_converge = 0
        self.home = w.root / "seq" / str(w.sequences)
        self.home.mkdir(parents=True)
        self.cb = Cb(home=self.home)
        self.remote: Companion | None = None
        if companion:  # steps 3-8 of every build on the companion, through the real sshd
            w.ops["sequence on a companion (sshd)"] += 1
            self.remote = Companion(w, self.home)
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

    def site_args(self, cache: str, fail_at: int | None = None) -> list[str]:
        """Where a build of ``cache`` runs: here, or on the companion (its disk full at ``fail_at``)."""
        remote = self.remote.args(cache, fail_at) if self.remote else []
        return [self.cache_arg(cache), *remote]

    def published(self, cache: str) -> Path:
        """The directory whose ``current`` a build of ``cache`` publishes."""
        return self.remote.dir(cache) / "cache" if self.remote else self.home / cache

    def stores(self) -> list[tuple[Path, list[Path]]]:
        """Each store, with the cache directories that use it."""
        here = (self.home / "store", [self.home / c for c in CACHES])
        if self.remote is None:
            return [here]
        return [here] + [
            (self.remote.dir(c) / "store", [self.remote.dir(c) / "cache"]) for c in CACHES
        ]

    def wait_for_the_companion(self, cache: str) -> None:
        """A build cut off on the workstation may go on on the companion, holding its lock until
        it ends (docs/companion.md, "When things go wrong"): the world waits for it."""
        lock = self.published(cache) / "build.lock"
        if self.remote is None or not lock.exists():
            return
        deadline, waited = time.monotonic() + 300, False
        while True:
            try:
                CacheLock(lock).acquire().release()
                break
            except LockHeldError:
                assert time.monotonic() < deadline, f"the companion's build still holds {lock}"
                waited = True
                time.sleep(0.2)
        if waited:
            self.world.ops["waited for a cut-off build on the companion"] += 1

    def remote_env(self) -> dict[str, str] | None:
        """The environment of a command run on the companion; None: here."""
        return self.remote.env(self.cb) if self.remote else None

    def key_args(self, key: str | None, allow_dev: bool = False) -> list[str]:
        name = "COMPANION_KEY" if self.remote else "KEY"  # KEY is refused with COMPANION
        args = [f"{name}={self.world.keys[key]}"] if key else []
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
        where = self.published(cache)
        if None in candidates and not (where / "current").exists():
            model.signer = model.build_id = None  # nothing was published, nothing is
            return
        env = self.remote_env()  # run there, with its own key
        for signer in candidates or (model.signer,):
            key = [f"KEY={self.world.keys[signer]}"] if signer in ("k1", "k2") else []
            r = self.cb.run("verify-cache", f"CACHE_DIR={where}", *key, env=env)
            check_result(r, "verify-cache")
            tried.append((signer, r.code, r.report.get("reason")))
            if r.code == 0:
                model.signer = signer
                signed = json.loads((where / "current" / "manifest.json").read_text())
                model.build_id = signed["signed"]["build_id"]
                return
        raise AssertionError(f"{cache}/current verifies against none of {tried}")

    def expected(self, cache: str, provider: str, strict: bool, key: str | None, allow: bool):
        if self.refused_key(cache, key, allow):
            return {2}
        if provider == "dead":
            return {20}
        if provider == "holes":  # one tile in five, so a small area (zoom 16) may have none
            return {0, 22} if strict else {0}
        if provider == "empty" and not self.world.empty.filled:
            return {22} if strict else {0, 21, 22}
        if provider == "empty":  # filled now; tiles it lacked before stay missing (RETRY_MISSING=0)
            return {0, 22} if strict else {0}
        return {0}

    def build(self, cache: str, config: Config, *extra: str) -> CbResult:
        return self.cb.build(*self.site_args(cache), *config.args(self.world), *extra)

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
        self.world.exits[f"build ({provider}): {r.code}"] += 1
        assert r.code in want, (
            f"build with {provider}: exit {r.code}, expected {want}\n{r.stderr[-3000:]}"
        )
        if provider == "holes" and strict and r.code in (0, 22):  # 22 exactly where tiles lack
            missing = (r.report.get("tiles") or {}).get("missing")
            assert (r.code == 22) == bool(missing), (r.code, r.report)
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
        for store, caches in self.stores()[1:]:  # the companion's stores, there
            if store.exists():
                # naming the cache keeps what it stages: the known bug works around it
                named = [f"CACHE_DIR={caches[0]}"] if COMPANION_STAGES_UNREGISTERED else []
                r = self.cb.run("gc-store", f"STORE={store}", *args, *named, env=self.remote_env())
                assert check_result(r, "gc-store on the companion")["exit_code"] == 0, r.stderr
        for cache in CACHES:
            self.verify(cache)

    @rule(cache=st.sampled_from(CACHES))
    def delete_cache_dir(self, cache: str) -> None:
        self.step("delete a cache directory")
        for d in dict.fromkeys([self.home / cache, self.published(cache)]):
            if d.exists():
                remove_tree(d)
        self.caches[cache] = CacheModel()

    @rule(index=st.integers(0, 10_000))
    def flip_a_byte_in_the_store(self, index: int) -> None:
        self.step("flip a byte in a store object")
        stores = self.stores()  # on a companion: the workstation's store and the companion's
        objects = [o for store, _ in stores for o in sorted((store / "objects").glob("??/*"))]
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
            *self.site_args("cache"),
            *config.args(self.world),
            self.world.provider("good"),
            *self.key_args(key),
        )
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=300)
        self.world.exits[f"{sig} a build: {proc.returncode}"] += 1
        frames = re.findall(r'File "([^"]+)"', err)
        ours = [f for f in frames if "/cachebuild/" in f or "/targets/" in f]
        if proc.returncode < 0:  # died of it: SIGKILL; SIGINT only before cachebuild's code
            # (while Python and doit load); once the report is out the process ends with its code
            assert proc.returncode == -getattr(signal, sig), err[-3000:]
            assert not ours, err[-3000:]
            assert sig == "SIGKILL" or not out.strip(), f"died of SIGINT after its report: {out}"
        elif sig == "SIGINT" and re.search(r"Fatal Python error: init_\w+", err) and not ours:
            # the documented limit (Found and fixed, the first item): an interrupt while Python
            # itself starts (init_import_site, init_sys_streams...), before any of cachebuild's code,
            # is Python's (exit 1, its traceback)
            self.world.exits["SIGINT while Python starts: Python's own error (documented)"] += 1
        else:
            check_result(CbResult(proc.returncode, out, err), f"build after {sig}")
            assert proc.returncode in (0, 130), err[-3000:]
        self.wait_for_the_companion("cache")
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
            *self.site_args("cache"),
            *config.args(self.world),
            self.world.provider("slow"),
            "CONCURRENCY=1",
            *self.key_args(key),
        )
        deadline = time.monotonic() + 60
        while slow.count() == seen and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, f"the first build ended early: {first.communicate()}"
        second = self.build("cache", config, self.world.provider("good"), *self.key_args(key))
        rep = check_result(second, "the second build")
        assert second.code == 50 and rep["failure_phase"] == "lock", second.stderr[-3000:]
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
        check_result(CbResult(first.returncode, out, err), "the interrupted first build")
        assert first.returncode in (0, 130), err[-3000:]
        self.wait_for_the_companion("cache")
        self.verify("cache")

    @rule(cache=st.sampled_from(CACHES), config=configs, key=keys)
    def build_at_a_precision_the_backend_lacks(
        self, cache: str, config: Config, key: str | None
    ) -> None:
        """PRECISION=fp16 needs TensorRT; here (ONNX Runtime, on the CPU) the engine refuses it."""
        self.step("build (PRECISION=fp16, refused)")
        want = {2} if self.refused_key(cache, key, False) else {21}
        # PIPELINE=0: the tiles phase first, so the build stops after it, its tile set staged
        # (with the pipeline the engine comes first and refuses fp16 before any tile)
        r = self.build(
            cache, config, self.world.provider("good"), "PRECISION=fp16", "PIPELINE=0",
            *self.key_args(key),
        )  # fmt: skip
        assert r.code in want, f"PRECISION=fp16: exit {r.code}, expected {want}\n{r.stderr[-3000:]}"
        if r.code == 21:
            assert "PRECISION=fp16" in r.report["error"], r.report
        self.after_build(cache, r, key, config)

    @rule(
        cache=st.sampled_from(CACHES),
        config=configs,
        at=st.integers(1, 450),  # a build here makes 13 (up to date) to about 420 (cold) writes
        there=st.booleans(),
    )
    def disk_fills_during_a_build(self, cache: str, config: Config, at: int, there: bool) -> None:
        """The ``at``-th write of the build (or, on a companion, of each of its commands there)
        fails with ENOSPC, and every later one: exit 24 (or success, when the build needed fewer)."""
        there = there and self.remote is not None
        self.step("disk full " + ("on the companion" if there else "during a build"))
        if cache == "cache":
            self.config = config
        key = self.signer_key(cache)
        prior = self.caches[cache].signer
        args = [*config.args(self.world), self.world.provider("good"), *self.key_args(key)]
        if there:
            r = self.cb.build(*self.site_args(cache, fail_at=at), *args)
        else:
            p = popen_disk_full(self.cb, at, "build-cache", *self.site_args(cache), *args)
            out, err = p.communicate(timeout=300)
            r = CbResult(p.returncode, out, err)
        rep = check_result(r, "build-cache on a full disk")
        self.world.exits[f"disk full {'on the companion' if there else 'here'}: {r.code}"] += 1
        if r.code == 2 and DEV_KEY_ENOSPC_IS_EXIT_2 and _dev_key_not_written(rep):
            self.world.exits["disk full: the development key not written (exit 2, known)"] += 1
        else:
            want = {0, 24, 30} if there else {0, 24}
            assert r.code in want, r.stderr[-3000:]
        if r.code == 24:
            assert "disk full" in rep["error"], rep
        # a disk that fills after the swap fails the bookkeeping, not the publish: either release
        self.wait_for_the_companion(cache)
        self.verify(cache, *dict.fromkeys([prior, key or "dev"]))
        if r.code == 0:
            assert rep["build_id"] == self.caches[cache].build_id, rep

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
        for store, caches in self.stores():
            damage = store_damage(store, self.flipped)
            assert damage == [], f"{store}: {damage}"
            lacking = unreferenced(store, caches)
            assert lacking == [], f"{store}: {lacking}"

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
        current = self.published("cache") / "current"
        diffs = target_differences(current, ref)
        assert diffs == [], f"{current} did not converge to {ref.current}: {diffs}"

    def teardown(self) -> None:
        if hasattr(self, "home"):
            self.check_convergence()
            if out := os.environ.get("CACHEBUILD_SEQ_REPORT"):  # so far: a long run may be cut
                Path(out).write_text(json.dumps(figures(self.world), indent=1))


def figures(world: World) -> dict[str, Any]:
    return {
        "sequences": world.sequences,
        "steps": world.steps,
        "operations": dict(world.ops.most_common()),
        "convergence checks": world.convergences,
        "exit codes": dict(sorted(world.exits.items())),
        "equal content, other bytes": dict(SHORTCUTS),
    }

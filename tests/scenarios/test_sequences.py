"""Any sequence of operations ends in the same cache as a clean build (issue 24).

A hypothesis state machine whose rules are what an operator and the world
do — builds of changing flights (another area, zoom, self-test setting, an
operator's ONNX ``MODEL``) against good, wrong, holed, flaky, slow, dead or
empty providers, with STRICT and KEY varied; a build at a ``PRECISION`` the
backend lacks; ``doit clean``, ``forget``, ``ignore``; ``gc-store`` with
and without a bound; a deleted cache directory; a second cache on the same
store; SIGKILL or SIGINT at a random instant; a second build while one
runs; a flipped byte in a store object; a disk that fills during a build —
each a real ``doit`` process in a scratch home
(tests/_harness/seqmachine.py; its world, tests/_harness/sequences.py).  A
quarter of the sequences run on the S3 store with Dask, another quarter on
a companion through a real sshd.  After every step: no traceback,
documented exit codes, errors with remedies, ``current`` verifying against
the key that signed it, sound stores that still hold what every published
or staged cache names.  At the end of each sequence (and as a rule of its
own), a good build of the current flight must succeed at once and give the
clean build's ``build_id`` and artifacts.

CI runs a bounded budget; ``CACHEBUILD_LONG=1`` runs
``CACHEBUILD_SEQUENCES`` (default 1000) sequences, and
``CACHEBUILD_SEQ_REPORT=path`` saves the figures as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests._harness.seqmachine import Sequences, figures
from tests._harness.sequences import Config, World, check_result, popen_disk_full
from tests._harness.sshd import SSHD
from tests.conftest import Cb, CbResult

LONG = os.environ.get("CACHEBUILD_LONG") == "1"
SEQUENCES = int(os.environ.get("CACHEBUILD_SEQUENCES", "1000")) if LONG else 10
STEPS = 8

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


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path / "world")
    yield w
    w.close()
    figs = figures(w)
    print("\nsequences:", json.dumps(figs, indent=1))
    if out := os.environ.get("CACHEBUILD_SEQ_REPORT"):
        Path(out).write_text(json.dumps(figs, indent=1))


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


def test_a_ctrl_c_at_any_moment_of_a_build_ends_with_the_reported_code(world: World) -> None:
    """Found by CI and a sweep of 120 delays: a SIGINT during describe aborted the process
    ("terminate called without an active exception", -6: the background describer was left
    running the engine), and one after the manifest killed it (-2) though its report said 0.
    A SIGINT anywhere in a build now ends it with the code its report gives, 0 or 130, whether
    doit or the ``cachebuild`` console script runs it; the next build in that home succeeds."""
    config = Config("demo", "base")
    first = Cb(home=world.root / "timed")
    t = time.monotonic()
    assert first.build(*config.args(world), world.provider("good")).code == 0
    took = time.monotonic() - t
    script = Path(sys.executable).with_name("cachebuild")  # the console script, every other time
    for i, share in enumerate((0.35, 0.5, 0.65, 0.8, 0.9, 0.97)):
        cb = Cb(home=world.root / f"ctrl-c-{i}")
        args = ("build-cache", *config.args(world), world.provider("good"))
        if i % 2 and script.exists():
            proc = subprocess.Popen(
                [str(script), *args, "REPORT=json"], cwd=cb.cwd, env=cb.env(),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        else:
            proc = cb.popen(*args)
        time.sleep(share * took)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in err and "terminate called" not in err, err
        rep = check_result(CbResult(proc.returncode, out, err), f"SIGINT at {share:.0%}")
        assert proc.returncode in (0, 130), (share, rep)
        # then the next good build in the same home succeeds unaided
        again = cb.build(*config.args(world), world.provider("good"))
        assert again.code == 0, (share, again.stderr[-2000:])


def test_a_doit_process_leaves_with_its_code_after_the_exit_hooks(tmp_path: Path) -> None:
    """startup.leave: the exit hooks run and buffered output is flushed, then the process ends
    with the command's code; settled() makes a later SIGINT change nothing."""
    mark = tmp_path / "hooks-ran"
    code = (
        "import atexit, os, signal, sys; sys.argv = ['doit']; from cachebuild.cli import startup; "
        f"atexit.register(lambda: open({str(mark)!r}, 'w').close()); "
        "sys.stdout.write('report'); startup.settled(); os.kill(os.getpid(), signal.SIGINT); "
        "startup.leave(7); print('not reached')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr) == (7, "report", "")
    assert mark.exists()
    # in an importer's process (not doit's) both leave everything as it was
    code = "from cachebuild.cli import startup; startup.settled(); print(startup.leave(5))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "5"


@pytest.mark.parametrize("settle", [False, True])
def test_a_ctrl_c_python_swallows_in_a_callback_still_stops_the_command(settle: bool) -> None:
    """Found by CI: a SIGINT that Python delivered inside a weakref callback printed "Exception
    ignored in ... KeyboardInterrupt" and the build carried on.  The command's process now has
    it land again in ordinary code; once the outcome is settled it changes nothing."""
    code = (
        "import sys, time, weakref; sys.argv = ['doit']; from cachebuild.cli import startup\n"
        "startup.started()\n" + ("startup.settled()\n" if settle else "") + "class T: pass\n"
        "def cb(_): raise KeyboardInterrupt\n"
        "t = T(); r = weakref.ref(t, cb); del t\n"
        "try:\n"
        "    for _ in range(300): time.sleep(0.01)\n"
        "except KeyboardInterrupt: print('interrupted')\n"
        "else: print('carried on')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (p.stdout.strip(), p.stderr) == ("carried on" if settle else "interrupted", "")


def test_the_start_guard_holds_until_the_command_runs() -> None:
    """Found by the sequence test: a SIGINT while doit still defined cachebuild's command classes
    (after the guard was lifted at the top of the module) printed a KeyboardInterrupt traceback.
    The guard now holds through the whole import; the command lifts it when it starts."""
    code = (
        "import signal, sys; sys.argv = ['doit']; from cachebuild.cli import startup; "
        "signal.signal(signal.SIGINT, signal.default_int_handler); startup.guard(); "
        "import cachebuild.cli.doitcmds; "
        "print(signal.getsignal(signal.SIGINT) is startup._interrupted)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "True", p.stdout + p.stderr


def test_a_sequence_on_the_s3_store_converges(world: World) -> None:
    """The S3 share of the machine, as one fixed sequence: two caches, one deleted, gc, a kill."""
    Sequences.world = world
    state = Sequences()
    state.start(share="s3")
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


needs_sshd = pytest.mark.skipif(
    not os.path.exists(SSHD), reason=f"{SSHD} (openssh-server) is not installed"
)


@needs_sshd
def test_a_sequence_on_a_companion_converges(world: World) -> None:
    """The companion share, as one fixed sequence: another model signed with a key there, a
    refused precision, a disk that fills on either side, gc on both, a kill mid-build."""
    Sequences.world = world
    state = Sequences()
    state.start(share="companion")
    state.build_flight(
        cache="cache",
        config=Config("shifted", "other-model"),
        provider="good",
        strict=True,
        key="k1",
        allow_dev=False,
    )
    assert state.last_report["companion"]["host"] == world.sshd().target
    state.build_at_a_precision_the_backend_lacks(
        cache="cache", config=Config("demo", "base"), key="k1"
    )
    state.disk_fills_during_a_build(cache="cache", config=Config("demo", "base"), at=40, there=True)
    state.disk_fills_during_a_build(
        cache="cache2", config=Config("demo", "base"), at=60, there=False
    )
    state.store_is_sound()
    state.gc_store(bound=None)
    state.signal_a_build(sig="SIGKILL", delay=1.0, config=Config("new-id", "base"))
    state.store_is_sound()
    state.teardown()


def test_a_local_sequence_with_a_full_disk_another_model_and_a_refused_precision(
    world: World,
) -> None:
    """The new rules on this machine's store, as one fixed sequence."""
    state = _machine(world)
    state.build_flight_from_the_good_provider(
        cache="cache", config=Config("demo", "base"), key="k2"
    )
    for at in (5, 120):
        state.disk_fills_during_a_build(
            cache="cache", config=Config("demo", "other-model"), at=at, there=False
        )
        state.store_is_sound()
    state.build_at_a_precision_the_backend_lacks(
        cache="cache", config=Config("other-area", "base"), key=None
    )
    state.teardown()


@needs_sshd
def test_a_companion_publishes_the_workstations_tileset_json(world: World) -> None:
    """Found by the sequence test (was the provider pushed:<aggregate hash>): the same flight gives
    the same tileset.json on a companion as in a clean local build."""
    Sequences.world = world
    state = Sequences()
    state.start(share="companion")
    state.build_flight_from_the_good_provider(
        cache="cache", config=Config("demo", "base"), key=None
    )
    ref = world.reference(Config("demo", "base"))
    mine = state.published("cache") / "current" / "tileset.json"
    assert mine.read_bytes() == (ref.current / "tileset.json").read_bytes()


@needs_sshd
def test_a_companion_build_from_another_provider_names_it_in_tileset_json(world: World) -> None:
    """Found by the sequence test: the same tiles from a flaky provider, then the good one, went to
    the same inbox, so the companion kept naming the flaky provider and did not converge."""
    Sequences.world = world
    state = Sequences()
    state.start(share="companion")
    state.build_flight(
        cache="cache",
        config=Config("demo", "base"),
        provider="flaky",
        strict=False,
        key=None,
        allow_dev=False,
    )
    state.converge()
    state.teardown()


@needs_sshd
def test_a_corrupt_tile_object_on_the_workstation_does_not_block_companion_builds(
    world: World,
) -> None:
    """Found by the long run (the push sent the object unchecked, the companion refused its pack:
    exit 30 on every build).  A tile object flipped in the workstation's store, then a build on a
    companion that lacks it: the push finds it corrupt, and it is removed, fetched again and
    pushed in the same build (as without a companion, where the phase that reads it finds it)."""
    Sequences.world = world
    state = Sequences()
    state.start(share="companion")
    # the workstation's store gets the demo's tiles (the companion of cache2 gets them too)
    state.build_flight_from_the_good_provider(
        cache="cache2", config=Config("demo", "base"), key=None
    )
    obj = sorted((state.home / "store" / "objects").glob("??/*"))[0]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    state.flipped.add(obj.name)
    # the companion of cache lacks every object: all are pushed, the corrupt one among them
    r = state.build("cache", Config("demo", "base"), world.provider("good"))
    rep = check_result(r, "the build after the flip")
    assert r.code == 0, r.stderr[-3000:]
    assert any(obj.name in w and "fetching it again" in w for w in rep["warnings"]), rep
    assert rep["tiles"]["fetched"] == 1, rep["tiles"]
    state.store_is_sound()
    state.check_convergence()


def test_a_full_disk_while_the_development_key_is_created_is_exit_24(world: World) -> None:
    """Found by the long run (was exit 2, 'make … writable'): the first build in a fresh home,
    without KEY, on a disk that is already full."""
    state = _machine(world)
    p = popen_disk_full(state.cb, 1, "build-cache", *Config("demo", "base").args(world))
    out, err = p.communicate(timeout=300)
    rep = check_result(CbResult(p.returncode, out, err), "build-cache on a full disk")
    assert p.returncode == 24 and "disk full" in rep["error"], rep


def test_a_ctrl_c_while_the_dask_cluster_starts_prints_no_traceback(world: World) -> None:
    """Found by the long run (was exit 130, then distributed's atexit close_clusters traceback,
    'AssertionError: Status.init' or 'Nanny failed to start', over a half-started cluster)."""
    for n, delay in enumerate((0.3, 0.5, 0.8)):  # the cluster takes about a second to start
        cb = Cb(home=world.root / f"dask-{n}", env_extra={"CACHEBUILD_DASK_SCHEDULER": "local:1"})
        proc = cb.popen("build-cache", *Config("demo", "base").args(world), world.provider("good"))
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(".. describe"):
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
        check_result(CbResult(proc.returncode, out, "".join(seen) + err), f"SIGINT at +{delay} s")
        assert proc.returncode == 130, err


@needs_sshd
def test_a_corrupt_tile_object_on_the_companion_does_not_fail_the_next_build(world: World) -> None:
    """Found by the long run (was exit 20, 'run build-cache from the workstation again', and the
    next run converged): the companion's build removes the corrupt object and cannot fetch it
    (it reads only what was pushed; the probe had counted it present); the workstation asks
    again what it lacks, pushes that and builds there once more, in the same run."""
    Sequences.world = world
    state = Sequences()
    state.start(share="companion")
    state.build_flight_from_the_good_provider(
        cache="cache", config=Config("demo", "base"), key=None
    )
    state.delete_cache_dir(cache="cache")  # the companion's store stays; its descriptors go
    assert state.remote is not None
    obj = sorted((state.remote.dir("cache") / "store" / "objects").glob("??/*"))[0]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    state.flipped.add(obj.name)
    r = state.build("cache", Config("demo", "base"), world.provider("good"))
    rep = check_result(r, "the build after the flip")
    assert r.code == 0, r.stderr[-3000:]
    assert any("is corrupt" in w and obj.name in w for w in rep["warnings"]), rep["warnings"]
    assert rep["push"]["tile_objects"] == 1, rep["push"]
    state.store_is_sound()
    state.check_convergence()


@needs_sshd
def test_gc_on_a_companion_keeps_what_a_failed_build_staged(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests._harness import seqmachine

    monkeypatch.setattr(seqmachine, "COMPANION_STAGES_UNREGISTERED", False)  # gc as it comes
    Sequences.world = world
    state = Sequences()
    state.start(share="companion")
    state.build_at_a_precision_the_backend_lacks(
        cache="cache", config=Config("demo", "base"), key=None
    )
    state.gc_store(bound=None)
    state.store_is_sound()

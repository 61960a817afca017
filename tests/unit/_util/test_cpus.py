"""CPU counts that honour a container's quota (cachebuild/_util/cpus.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachebuild._util.cpus import cgroup_cpu_limit, usable_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "ci" / "job" / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/ci/job\n") == 2.0


def test_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    _write(tmp_path / "ci" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "ci" / "job" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/ci/job\n") == 1.5


def test_v2_without_quota_is_none(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None


def test_v1_quota(tmp_path: Path) -> None:
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "300000\n")
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu:/\n") == 3.0


def test_v1_unlimited_is_none(tmp_path: Path) -> None:
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu:/\n") is None


def test_garbage_files_are_ignored(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "lots of cpus\n")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None


def test_usable_cpus_never_exceeds_affinity() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("0", None), ("x", None)])
def test_override(value: str, expected: int | None) -> None:
    code = "from cachebuild._util.cpus import usable_cpus; print(usable_cpus())"
    env = {**os.environ, "CACHEBUILD_CPUS": value}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) == (expected if expected is not None else usable_cpus())

"""pipeline.core.cpus: thread pools follow a container's CPU quota, not the host's core count."""
from __future__ import annotations

import os

import pytest

import pipeline.core.cpus as cpus


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """Point the module at a fake cgroup tree (neither file exists until a test writes it)."""
    v1 = tmp_path / "cpu"
    v1.mkdir()
    monkeypatch.setattr(cpus, "CGROUP_V2_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(cpus, "CGROUP_V1_DIR", v1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    return tmp_path


def test_without_a_quota_the_affinity_counts(cgroup):
    assert cpus.cgroup_cpu_quota() is None and cpus.available_cores() == 16
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_quota() is None and cpus.available_cores() == 16


@pytest.mark.parametrize("line, quota, cores", [("200000 100000", 2.0, 2), ("150000 100000", 1.5, 2),
                                                ("50000 100000", 0.5, 1), ("4000000 100000", 40.0, 16)])
def test_a_cgroup_v2_quota_lowers_the_count(cgroup, line, quota, cores):
    (cgroup / "cpu.max").write_text(line + "\n")
    assert cpus.cgroup_cpu_quota() == pytest.approx(quota) and cpus.available_cores() == cores


def test_cgroup_v1_quota_and_unreadable_files(cgroup):
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (cgroup / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.available_cores() == 3
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")          # v1's "no limit"
    assert cpus.cgroup_cpu_quota() is None and cpus.available_cores() == 16
    (cgroup / "cpu.max").write_text("garbage\n")                      # unreadable v2: fall back to v1
    assert cpus.available_cores() == 16


def test_the_pools_use_it(cgroup):
    from pipeline.config import DataConfig
    from pipeline.data.validate import worker_count
    from pipeline.vectors import projections, retrieval

    (cgroup / "cpu.max").write_text("200000 100000\n")
    assert retrieval._worker_count() == 2 and projections._cores() == 2
    assert worker_count(DataConfig()) == 2 and worker_count(DataConfig(workers=5)) == 5

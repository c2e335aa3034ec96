"""Thread and job counts follow the CPUs a process may use (affinity mask, cgroup CPU quota), not the host's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vitcompress.deploy.cpus import cgroup_cpu_limit

ROOT = Path(__file__).parents[1]
PROBE = """
import json
from vitcompress.batch.keys import machine_fingerprint
from vitcompress.deploy.cpus import available_cpus
from vitcompress.recipe import Recipe
print(json.dumps({"cpus": available_cpus(), "validate_threads": Recipe().validate_.threads,
                  "batch_cores": machine_fingerprint(1)["cores"]}))
"""


def _one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def test_a_process_pinned_to_one_cpu_uses_one(tmp_path):
    """Under a one-CPU affinity mask (as taskset or a cpuset gives a CI job): one CPU, one ORT thread by default,
    and ``batch --jobs 2`` is refused, where os.cpu_count() still counts every core of the host."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE], preexec_fn=_one_cpu, capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cpus": 1, "validate_threads": 1, "batch_cores": 1}
    (tmp_path / "m.yaml").write_text("version: 1\njobs:\n  - {name: a, model: test_vit, recipe: svd}\n")
    refused = subprocess.run([sys.executable, "-m", "vitcompress", "batch", "m.yaml", "--jobs", "2"],
                             preexec_fn=_one_cpu, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "--jobs 2 exceeds the 1 CPU cores available" in refused.stderr
    unpinned = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)
    assert json.loads(unpinned.stdout)["validate_threads"] == min(2, len(os.sched_getaffinity(0)))


def _cgroup_tree(tmp_path: Path, files: dict[str, str], own: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self_cgroup").write_text(own)
    return root, tmp_path / "self_cgroup"


def test_cgroup_quotas_v2_and_v1_are_read_with_their_ancestors(tmp_path):
    """cgroup v2: the tightest cpu.max of the process's cgroup and its parents (1.5 CPUs); "max" is no limit.
    cgroup v1: cfs_quota_us / cfs_period_us (quota -1: no limit)."""
    v2 = _cgroup_tree(tmp_path / "v2", {"cpu.max": "max 100000\n", "ci/cpu.max": "400000 100000\n",
                                        "ci/job/cpu.max": "150000 100000\n"}, "0::/ci/job\n")
    assert cgroup_cpu_limit(*v2) == 1.5
    unlimited = _cgroup_tree(tmp_path / "none", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(*unlimited) is None
    v1 = _cgroup_tree(tmp_path / "v1", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "250000\n",
                                        "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
                                        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                        "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                      "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n0::/\n")
    assert cgroup_cpu_limit(*v1) == 2.5

"""The CPUs this process may really use: its affinity mask, capped by its cgroup's CPU quota.

``os.cpu_count()`` counts the host's cores. A CI job pinned to some of them (``taskset``, a cpuset, a
Kubernetes static CPU policy) sees them in ``os.sched_getaffinity``; a container limited by a CFS quota
(``docker --cpus 2``, a Kubernetes CPU limit) still sees every core there, but gets only quota/period of CPU
time: cgroup v2's ``cpu.max`` (``"200000 100000"``, or ``"max 100000"`` for none), cgroup v1's
``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (quota ``-1``: none). Threads beyond that share the same time
slices and slow each other down. :func:`available_cpus` is the smaller of the two (a fractional quota rounded
up, at least 1); the batch's thread budget, the recipe's default ``validate.threads``, the DataLoader's default
workers and ``convert --nproc``'s ``OMP_NUM_THREADS`` use it.

:func:`isa_flags` names the vector instruction sets of the CPU (from ``/proc/cpuinfo``) that decide which
onnxruntime kernels run, so a bundle records the converting CPU's and ``verify`` can tell another kind of CPU.

A leaf module: the standard library only (a deployment imports it without torch).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: /proc/cpuinfo flags that select onnxruntime's CPU kernels: AVX2/FMA, AVX-512, the int8 dot products (VNNI) and
#: the AMX tiles.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (every CPU where the platform has no masks, e.g. macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """This process's cgroup path per controller list (``""`` for cgroup v2's unified hierarchy)."""
    found = {}
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            found[controllers] = path
    except (OSError, ValueError):
        pass
    return found


def _ancestors(root: Path, path: str) -> list[Path]:
    """``root/path`` and each of its parents up to ``root`` (a parent's quota limits its children too)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota(text: str) -> float | None:
    """CPUs granted by a ``"QUOTA PERIOD"`` pair; None for no limit (``max`` or a negative quota)."""
    quota, period = text.split()
    if quota == "max" or int(quota) < 0 or int(period) <= 0:
        return None
    return int(quota) / int(period)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (and its ancestors) in CPUs, e.g. 1.5; None when there is none or
    no cgroup file system can be read."""
    own = _own_cgroups(proc_cgroup)
    limits = []
    for directory in _ancestors(root, own.get("", "/")):  # cgroup v2
        try:
            limits.append(_quota((directory / "cpu.max").read_text()))
        except (OSError, ValueError):
            continue
    v1 = next((path for controllers, path in own.items() if "cpu" in controllers.split(",")), "/")
    for base in (root / "cpu", root / "cpu,cpuacct"):  # cgroup v1
        for directory in _ancestors(base, v1):
            try:
                text = (directory / "cpu.cfs_quota_us").read_text() + (directory / "cpu.cfs_period_us").read_text()
                limits.append(_quota(text))
            except (OSError, ValueError):
                continue
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup CPU quota (rounded up), at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def isa_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The :data:`ISA_FLAGS` this CPU has (sorted; [] where /proc/cpuinfo cannot be read, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return sorted(set(value.split()) & set(ISA_FLAGS))
    return []
